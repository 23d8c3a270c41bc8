//! Per-token words staged on the device once per graph launch.
//!
//! The guest keeps the words it rewrites every token (token ids, positions) on host pages
//! (`hint::HOST`), so its writes migrate nothing; each kernel read of such a word then
//! crosses the bus, and in a decode step rope, kv_store and attention of every layer
//! would each wait on one (measured ~5-10 us apiece on an H200, on the critical path; in
//! a prefill every block of kv_store and attention read it). A recorded graph therefore
//! starts with one `stage_tok` launch that copies the distinct single words its ops read
//! (the KV `pos`; a one-token op's id and position) into a small device buffer, and the
//! kernels read the copy (`tok_word` in cu/common.cuh, through `KCtx::tok` and the
//! per-launch `tmap`).
//! Only words that no op of the graph writes are staged, so the copy always equals what
//! the op would have read. `SAMEPAGE_CUDA_STAGE=0` turns it off.
use samepage_abi::DType;
use samepage_backend::Op;

/// Most words one graph stages (`struct TokStage` of cu/ops.cu).
pub(crate) const MAX_WORDS: usize = 16;

/// `struct TokStage` of cu/ops.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TokStage {
    pub n: u32,
    pub off: [u32; MAX_WORDS],
}
// SAFETY: #[repr(C)] of u32s, no padding.
unsafe impl samepage_abi::Pod for TokStage {}

/// The per-token words (region offsets) a single-token op reads on the device, in the
/// kernel's slot order (`tok_word(c, slot, ..)`).
pub(crate) fn reads(op: &Op) -> Vec<u32> {
    match *op {
        Op::Embed(e) if e.n == 1 => vec![e.ids],
        Op::Rope(r) if r.n == 1 => vec![r.positions],
        Op::KvStore(s) => vec![s.pos],
        Op::Attention(a) => vec![a.pos],
        _ => vec![],
    }
}

/// Byte ranges of the region an op writes.
pub(crate) fn writes(op: &Op) -> Vec<(u64, u64)> {
    let f = |o: u32, n: u64| (o as u64, o as u64 + n * 4);
    match *op {
        Op::Embed(e) => vec![f(e.out, e.n as u64 * e.dim as u64)],
        Op::RmsNorm(r) => vec![f(r.out, r.n as u64 * r.dim as u64)],
        Op::Matmul(m) => vec![f(m.out, m.n as u64 * m.m as u64)],
        Op::Rope(r) => vec![f(r.x, r.n as u64 * r.n_heads as u64 * r.head_dim as u64)],
        Op::KvStore(s) => {
            let eb = if s.cache_dtype == DType::F16 as u32 { 2 } else { 4 };
            let len = s.n_kv_heads as u64 * s.ctx as u64 * s.head_dim as u64 * eb;
            vec![
                (s.k_cache as u64, s.k_cache as u64 + len),
                (s.v_cache as u64, s.v_cache as u64 + len),
            ]
        }
        Op::Attention(a) => vec![f(a.out, a.n as u64 * a.n_heads as u64 * a.head_dim as u64)],
        Op::SwiGlu(s) => vec![f(s.out, s.len as u64)],
        Op::Add(s) => vec![f(s.out, s.len as u64)],
        Op::Scale(s) => vec![f(s.out, s.len as u64)],
        Op::Softmax(s) => vec![f(s.out, s.rows as u64 * s.cols as u64)],
        Op::Argmax(s) => vec![f(s.out, s.rows as u64)],
        Op::Sample(s) => vec![f(s.out, 1), (s.rng as u64, s.rng as u64 + 8)],
    }
}

/// For launches that read the words `reads[j]` (per launch, in slot order), the words to
/// stage and each launch's `tmap` (byte s: the staged index of its s-th word, 0xff: read
/// the region). Words written by any of `ops` are not staged.
pub(crate) fn plan(ops: &[Op], reads: &[Vec<u32>]) -> (TokStage, Vec<u32>) {
    let written: Vec<(u64, u64)> = ops.iter().flat_map(writes).collect();
    let mut st = TokStage::default();
    let maps = reads
        .iter()
        .map(|rs| {
            let mut tm = u32::MAX;
            for (slot, &w) in rs.iter().enumerate().take(4) {
                let wr = (w as u64, w as u64 + 4);
                if written.iter().any(|r| r.0 < wr.1 && wr.0 < r.1) {
                    continue;
                }
                let n = st.n as usize;
                let idx = match st.off[..n].iter().position(|&o| o == w) {
                    Some(i) => i,
                    None if n < MAX_WORDS => {
                        st.off[n] = w;
                        st.n += 1;
                        n
                    }
                    None => continue,
                };
                tm = tm & !(0xff << (8 * slot)) | (idx as u32) << (8 * slot);
            }
            tm
        })
        .collect();
    (st, maps)
}

/// Whether staging is on (`SAMEPAGE_CUDA_STAGE=0`: off).
pub(crate) fn enabled() -> bool {
    std::env::var("SAMEPAGE_CUDA_STAGE").as_deref() != Ok("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_abi as abi;

    #[test]
    fn plan_dedups_words_and_skips_written_ones() {
        let at = |pos| {
            Op::Attention(abi::Attention {
                pos,
                out: 4096,
                n: 1,
                n_heads: 1,
                head_dim: 4,
                ..Default::default()
            })
        };
        // Two ops read word 64; one reads 4096, which the first op writes.
        let ops = [at(64), at(64), at(4096)];
        let reads: Vec<Vec<u32>> = ops.iter().map(reads).collect();
        let (st, maps) = plan(&ops, &reads);
        assert_eq!(st.n, 1);
        assert_eq!(st.off[0], 64);
        assert_eq!(maps, vec![0xffff_ff00, 0xffff_ff00, u32::MAX]);
        // A launch reading three words gets three slots.
        let (st, maps) = plan(&ops[..1], &[vec![8, 12, 8]]);
        assert_eq!((st.n, &st.off[..2]), (2, &[8, 12][..]));
        assert_eq!(maps, vec![0xff00_0100]);
    }
}
