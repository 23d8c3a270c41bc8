//! Token sampling: repetition penalty, temperature, top-k, softmax, top-p, min-p, draw.
//! The pipeline and the RNG are specified in the doc comment of `samepage_abi::Sample`;
//! this is the reference implementation of that text.
use samepage_abi::{self as abi, SampleParams};
use samepage_backend::{Mem, OpError};

use crate::elementwise::argmax_row;

/// One splitmix64 step: advance the state, return the new state and its output.
pub fn splitmix64(state: u64) -> (u64, u64) {
    let s = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (s, z ^ (z >> 31))
}

/// A uniform draw in `[0, 1)` with 24 bits: `(splitmix64 output >> 40) / 2^24`.
pub fn draw_uniform(state: &mut u64) -> f32 {
    let (s, z) = splitmix64(*state);
    *state = s;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Check the per-token parameters the guest wrote.
pub fn check_params(p: &SampleParams, history_cap: u32) -> Result<(), String> {
    if p.temperature.is_nan() || p.temperature.is_infinite() {
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

/// Sample a token from `logits` (not modified). `history` is the window of recent
/// tokens to penalise (already cut to `history_len`). Returns the token; `rng` is
/// advanced by one draw unless sampling is greedy.
pub fn sample_logits(logits: &[f32], p: &SampleParams, history: &[u32], rng: &mut u64) -> Result<u32, String> {
    let vocab = logits.len();
    if let Some(&t) = history.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("history token id {t} is past the vocabulary of {vocab}"));
    }
    let mut l: Vec<f32> = logits
        .iter()
        .map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v })
        .collect();
    // 1. Repetition penalty over the distinct tokens in the window.
    if p.repeat_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            let v = &mut l[t as usize];
            *v = if *v > 0.0 {
                *v / p.repeat_penalty
            } else {
                *v * p.repeat_penalty
            };
        }
    }
    // 2. Greedy.
    if p.temperature <= 0.0 {
        return Ok(argmax_row(&l));
    }
    for v in &mut l {
        *v /= p.temperature;
    }
    // Candidates in descending logit order where an order is needed; ties by index.
    let desc = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
    let mut kept: Vec<u32> = (0..vocab as u32).collect();
    // 3. Top-k.
    if p.top_k > 0 && (p.top_k as usize) < vocab {
        let k = p.top_k as usize;
        kept.select_nth_unstable_by(k - 1, desc);
        kept.truncate(k);
    }
    // 4. Softmax over the candidates.
    let max = kept.iter().map(|&t| l[t as usize]).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Ok(argmax_row(&l));
    }
    let mut prob: Vec<f32> = kept.iter().map(|&t| (l[t as usize] - max).exp()).collect();
    let sum: f64 = prob.iter().map(|&v| v as f64).sum();
    for v in &mut prob {
        *v = (*v as f64 / sum) as f32;
    }
    let mut cand: Vec<(u32, f32)> = kept.into_iter().zip(prob).collect();
    // 5. Top-p: the smallest prefix (by descending probability) whose mass reaches
    //    top_p, at least one token. Sort only as much as needed.
    if p.top_p < 1.0 {
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut head = 64.min(cand.len());
        loop {
            if head < cand.len() {
                cand.select_nth_unstable_by(head - 1, by_prob);
            }
            cand[..head].sort_unstable_by(by_prob);
            let mut cum = 0.0f64;
            let cut = cand[..head].iter().position(|c| {
                cum += c.1 as f64;
                cum >= p.top_p as f64
            });
            if let Some(i) = cut {
                cand.truncate(i + 1);
                break;
            }
            if head == cand.len() {
                break;
            }
            head = (head * 4).min(cand.len());
        }
    }
    // 6. Min-p.
    if p.min_p > 0.0 {
        let pmax = cand.iter().map(|c| c.1).fold(0.0f32, f32::max);
        let thr = p.min_p * pmax;
        cand.retain(|c| c.1 >= thr);
    }
    // 7. Renormalise and draw, walking the candidates in ascending token id.
    cand.sort_unstable_by_key(|c| c.0);
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    let u = draw_uniform(rng) as f64 * total;
    let mut cum = 0.0f64;
    for c in &cand {
        cum += c.1 as f64;
        if u < cum {
            return Ok(c.0);
        }
    }
    Ok(cand.last().map(|c| c.0).unwrap_or(0))
}

/// The `sample` op on the host, over guest memory: reads the parameters, history and RNG
/// state the guest wrote, checks them, and writes the token and the new RNG state. Other
/// backends whose sampler runs on the host (wgpu) call this too, so every backend draws
/// the same token from the same state.
pub fn sample(mem: &Mem, s: &abi::Sample) -> Result<(), OpError> {
    let err = |m: String| OpError::runtime(format!("sample: {m}"));
    let p: SampleParams = mem
        .read_pod(s.params)
        .ok_or_else(|| err("params out of bounds".into()))?;
    check_params(&p, s.history_cap).map_err(err)?;
    let mut rng = mem.read_u64(s.rng).ok_or_else(|| err("rng out of bounds".into()))?;
    // SAFETY: logits (vocab,) f32 and history (history_cap,) u32 were validated; the
    // outputs (rng, out) are disjoint from them.
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
