//! The sampler runs on the host, between GPU segments, on the same pages the GPU wrote
//! (the logits are read in place, not copied back). It is the ABI's reference sampler,
//! so every backend draws the same token from the same RNG state.
use samepage_abi::{self as abi, SampleParams};
use samepage_backend::{Mem, OpError};
use samepage_backend_cpu::reference::sample_logits;

fn check_params(p: &SampleParams, history_cap: u32) -> Result<(), String> {
    if !p.temperature.is_finite() {
        return Err(format!("temperature {} is not a finite number", p.temperature));
    }
    if !(0.0..=1.0).contains(&p.top_p) {
        return Err(format!("top_p {} is not in [0, 1]", p.top_p));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return Err(format!("min_p {} is not in [0, 1]", p.min_p));
    }
    if !(p.repeat_penalty.is_finite() && p.repeat_penalty > 0.0) {
        return Err(format!(
            "repeat_penalty {} must be a positive finite number",
            p.repeat_penalty
        ));
    }
    if p.history_len > history_cap {
        return Err(format!(
            "history_len {} exceeds history_cap {history_cap}",
            p.history_len
        ));
    }
    Ok(())
}

pub(crate) fn sample(mem: Mem, s: &abi::Sample) -> Result<(), OpError> {
    let err = |m: String| OpError::runtime(format!("sample: {m}"));
    let p: SampleParams = mem
        .read_pod(s.params)
        .ok_or_else(|| err("params out of bounds".into()))?;
    check_params(&p, s.history_cap).map_err(err)?;
    let mut rng = mem.read_u64(s.rng).ok_or_else(|| err("rng out of bounds".into()))?;
    // SAFETY: logits (vocab,) f32 and history (history_cap,) u32 were validated, and the
    // GPU is idle (the previous segment was waited for); rng and out are disjoint from them.
    let logits: &[f32] = unsafe { mem.slice(s.logits, s.vocab as usize) };
    let history: &[u32] = unsafe { mem.slice(s.history, s.history_cap as usize) };
    let window = &history[(s.history_cap - p.history_len) as usize..];
    let tok = sample_logits(logits, &p, window, &mut rng).map_err(err)?;
    mem.write_u64(s.rng, rng)
        .ok_or_else(|| err("rng out of bounds".into()))?;
    mem.write_u32(s.out, tok)
        .ok_or_else(|| err("out out of bounds".into()))?;
    Ok(())
}
