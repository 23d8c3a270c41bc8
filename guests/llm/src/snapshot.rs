//! KV-cache snapshots, guest side. The guest only *describes* its cache (`kv_layout`:
//! where the K/V bytes of every layer live in its memory, which tokens they hold, and
//! the model's identity) and *adopts* bytes the host wrote there (`kv_restore`). The host
//! reads and writes the bytes in place through the region, so a snapshot costs no copy
//! through the guest and no JSON-encoded tensor data.
use serde_json::{json, Value};

use crate::model::{Config, Model, State, Tensor};

/// Version of the layout description (and of the host's snapshot files built on it).
pub const FORMAT: u32 = 1;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(FNV_PRIME);
    }
    h
}

/// Bytes `[at, at + n)` of a weight tensor, read in place (only inside the wasm guest,
/// where tensor offsets are addresses).
fn sample(t: &Tensor, at: usize, n: usize) -> &'static [u8] {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: `t` is a loaded weight: `[off, off + size)` is guest memory that lives
        // as long as the model; callers keep `at + n <= size`.
        unsafe { std::slice::from_raw_parts((t.off as usize + at) as *const u8, n) }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (t, at, n);
        &[]
    }
}

/// The model's identity: FNV-1a 64 over the architecture, the shape, every tensor's
/// type and shape, and 3 x 64 sampled bytes (start, middle, end) of every tensor's data.
/// Computed once at load; two files with the same architecture but other weights differ.
pub fn model_hash(m: &Model) -> u64 {
    let c: &Config = &m.cfg;
    let mut h = fnv(FNV_OFFSET, c.arch.as_bytes());
    for v in [
        c.n_layers,
        c.dim,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn,
        c.vocab,
        c.n_rot,
        c.rope_mode,
    ] {
        h = fnv(h, &v.to_le_bytes());
    }
    h = fnv(h, &c.norm_eps.to_le_bytes());
    h = fnv(h, &c.rope_base.to_le_bytes());
    let w = &m.w;
    let mut tensors: Vec<&Tensor> = vec![&w.embed, &w.out_norm, &w.output];
    for l in &w.layers {
        tensors.extend([
            &l.attn_norm,
            &l.wq,
            &l.wk,
            &l.wv,
            &l.wo,
            &l.ffn_norm,
            &l.w_gate,
            &l.w_up,
            &l.w_down,
        ]);
        if let Some(b) = &l.bqkv {
            tensors.extend(b.iter());
        }
    }
    for t in tensors {
        h = fnv(h, &(t.dtype as u32).to_le_bytes());
        h = fnv(h, &t.rows.to_le_bytes());
        h = fnv(h, &t.cols.to_le_bytes());
        let size = t.dtype.row_bytes(t.cols as usize).unwrap_or(0) * t.rows as usize;
        let n = size.min(64);
        for at in [0, (size - n) / 2, size - n] {
            h = fnv(h, sample(t, at, n));
        }
    }
    h
}

/// `kv_layout`: where the cache is and what it holds.
pub fn layout(cfg: &Config, s: &State, hash: u64) -> Value {
    let (k, v, bytes) = s.kv_cache();
    let elt = s.cache_dtype.block_bytes() as u64;
    let row = cfg.head_dim as u64 * elt; // one position of one head
    let head = row * s.ctx as u64; // one head of one layer: ctx positions
    let layer = head * cfg.n_kv_heads as u64;
    debug_assert!(layer * cfg.n_layers as u64 <= bytes as u64);
    let layers: Vec<Value> = (0..cfg.n_layers as u64)
        .map(|l| json!({ "k": k as u64 + l * layer, "v": v as u64 + l * layer }))
        .collect();
    json!({
        "format": FORMAT,
        "model_hash": format!("{hash:016x}"),
        "arch": cfg.arch,
        "n_layers": cfg.n_layers,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab": cfg.vocab,
        "ctx": s.ctx,
        "cache_dtype": s.cache_dtype.name(),
        // Per layer, K and V are (n_kv_heads, ctx, head_dim): head h's position p starts at
        // layers[l].k + h * head_stride + p * row_bytes.
        "layers": layers,
        "head_stride": head,
        "row_bytes": row,
        "tokens": s.tokens,
        "pos": s.tokens.len(),
        "pending": s.pending,
    })
}

/// `kv_restore`: the host has written the K/V bytes of `tokens` (positions `0..n`) into
/// the cache at the offsets of [`layout`]; adopt them. `pending` is a sampled token that
/// was not run yet (a `keep_cache` generation continues after it).
pub fn restore(s: &mut State, vocab: u32, tokens: Vec<u32>, pending: Option<u32>) -> Result<Value, String> {
    if tokens.len() > s.ctx as usize {
        return Err(format!(
            "the snapshot holds {} tokens, more than the context of {}",
            tokens.len(),
            s.ctx
        ));
    }
    if let Some(t) = tokens.iter().chain(&pending).find(|&&t| t >= vocab) {
        return Err(format!("token id {t} is outside the vocabulary of {vocab}"));
    }
    s.all_logits = None;
    s.tokens = tokens;
    s.pending = pending;
    Ok(json!({ "ok": true, "pos": s.tokens.len() }))
}
