//! Turning validated ops into kernel launches, and the small buffers they need: a
//! host-mapped status word for errors found on the GPU, and device scratch.
use cudarc::driver::{result, sys, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg};
use samepage_abi::{self as abi, DType};
use samepage_backend::{Op, OpError};

use crate::kernels::Kernels;

/// `struct Ctx` of `cu/common.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct KCtx {
    pub base: u64,
    pub status: u64,
    pub scratch: u64,
    pub counters: u64,
    pub op: u32,
    pub aux: u32,
    /// Staged per-token words (`stage`), or 0.
    pub tok: u64,
    /// Per slot (byte), the staged index of the op's per-token word; 0xff: the region.
    pub tmap: u32,
    pub pad: u32,
    /// `SAMEPAGE_CUDA_TRACE=3`: the timeline words (`TlGuard` in common.cuh), or 0.
    pub tl: u64,
}

impl KCtx {
    /// A context whose kernels read every per-token word from the region.
    pub fn new(base: u64, status: u64, scratch: u64, counters: u64, op: u32) -> KCtx {
        KCtx {
            base,
            status,
            scratch,
            counters,
            op,
            aux: 0,
            tok: 0,
            tmap: u32::MAX,
            pad: 0,
            tl: 0,
        }
    }
}
// SAFETY: plain old data matching the C struct.
unsafe impl DeviceRepr for KCtx {}

/// A descriptor passed by value (its C twin is in `cu/common.cuh`).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct D<T>(T);
// SAFETY: ABI descriptors are #[repr(C)] structs of 4-byte scalars.
unsafe impl<T: samepage_abi::Pod> DeviceRepr for D<T> {}

pub(crate) fn cuda_err(what: &str, e: DriverError) -> OpError {
    OpError::runtime(format!("cuda: {what} failed: {e:?}"))
}

/// Status words in pinned, device-mapped host memory: written by a kernel only on an
/// error, read by the host after a wait with a plain load (no copy).
pub(crate) struct StatusWord {
    host: *mut u32,
    dev: u64,
}
// SAFETY: a fixed pinned allocation; accessed by the host only between launches.
unsafe impl Send for StatusWord {}

pub(crate) const STATUS_WORDS: usize = 8;

impl StatusWord {
    pub fn new() -> Result<StatusWord, DriverError> {
        // SAFETY: a fresh pinned allocation, zeroed before use.
        unsafe {
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            sys::cuMemHostAlloc(
                &mut p,
                64,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
            .result()?;
            let mut dev: sys::CUdeviceptr = 0;
            if let Err(e) = sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0).result() {
                let _ = result::free_host(p);
                return Err(e);
            }
            let w = StatusWord {
                host: p as *mut u32,
                dev,
            };
            w.reset();
            Ok(w)
        }
    }
    pub fn dev(&self) -> u64 {
        self.dev
    }
    pub fn reset(&self) {
        for i in 0..STATUS_WORDS {
            // SAFETY: 64 bytes allocated; no kernel runs while the host resets it.
            unsafe { std::ptr::write_volatile(self.host.add(i), 0) };
        }
    }
    pub fn read(&self) -> [u32; STATUS_WORDS] {
        std::array::from_fn(|i| {
            // SAFETY: as above; called after the stream was synchronised.
            unsafe { std::ptr::read_volatile(self.host.add(i)) }
        })
    }
    /// The error a kernel reported, if any, with the op and the values it saw.
    pub fn check(&self, ops: &[Op]) -> Result<(), OpError> {
        let w = self.read();
        if w[0] == 0 {
            return Ok(());
        }
        let idx = w[1] as usize;
        let (reason, a, b) = (w[2], w[3], w[4]);
        let msg = match (ops.get(idx), reason) {
            (Some(Op::KvStore(s)), 1) => format!(
                "kv_store: positions {a}..{} run past the cache of {} (pos + n must be <= ctx)",
                a as u64 + b as u64,
                s.ctx
            ),
            (Some(Op::Attention(s)), 2) => format!(
                "attention: positions {a}..{} run past the cache of {} (pos + n must be <= ctx)",
                a as u64 + b as u64,
                s.ctx
            ),
            (Some(Op::Embed(e)), 3) => {
                format!("embed: token id {a} at index {b} is past the vocabulary of {}", e.vocab)
            }
            (Some(Op::Sample(s)), 4) => match a {
                1 => "sample: temperature is not a finite number".to_string(),
                2 => "sample: top_p is not in [0, 1]".to_string(),
                3 => "sample: min_p is not in [0, 1]".to_string(),
                4 => "sample: repeat_penalty must be a positive finite number".to_string(),
                _ => format!("sample: history_len {b} exceeds history_cap {}", s.history_cap),
            },
            (Some(Op::Sample(s)), 5) => {
                format!("sample: history token id {a} is past the vocabulary of {}", s.vocab)
            }
            (_, 6) => format!(
                "the decode megakernel waited over 2 s at its step {a} for blocks that never ran (other work held \
                 the GPU's multiprocessors); without SAMEPAGE_CUDA_MEGA=1 the steps launch one by one"
            ),
            _ => format!("a kernel reported error {reason} ({a}, {b})"),
        };
        Err(OpError::runtime(format!("op {idx}: {msg}")))
    }
}

impl Drop for StatusWord {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`.
        let _ = unsafe { result::free_host(self.host as *mut _) };
    }
}

/// Device scratch (`cuMemAlloc`), backend-internal: attention partials, sampler buffers.
/// Also `COUNTERS` zeroed u32 words that kernels leave zero when they finish
/// (attention's split counters), allocated with the first scratch.
pub(crate) struct Scratch {
    ptr: u64,
    bytes: usize,
    counters: u64,
}

/// Words in a scratch's counter buffer: attention's split counters below the last
/// `RESERVED_COUNTERS`: the quantized matvec's tile counter and blocks-done word
/// (`QMV_COUNTER` in cu/matmul.cu: 4093, 4094) and the greedy sampler's merge counter
/// (`SAMPLE_COUNTER` in cu/sample.cu: 4095).
pub(crate) const COUNTERS: usize = 4096;
pub(crate) const RESERVED_COUNTERS: usize = 3;

impl Scratch {
    pub fn empty() -> Scratch {
        Scratch {
            ptr: 0,
            bytes: 0,
            counters: 0,
        }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn counters(&self) -> u64 {
        self.counters
    }
    /// Make room for `bytes`; the caller makes sure nothing in flight uses the old buffer.
    pub fn ensure(&mut self, bytes: usize) -> Result<(), DriverError> {
        if self.counters == 0 {
            // SAFETY: a fresh allocation of COUNTERS words, zeroed before any use.
            unsafe {
                let p = result::malloc_sync(COUNTERS * 4)?;
                if let Err(e) = result::memset_d8_sync(p, 0, COUNTERS * 4) {
                    let _ = result::free_sync(p);
                    return Err(e);
                }
                self.counters = p;
            }
        }
        if bytes <= self.bytes {
            return Ok(());
        }
        let bytes = bytes.max(4096).next_power_of_two();
        // SAFETY: the old buffer is idle (see above); the new one is ours.
        unsafe {
            if self.ptr != 0 {
                result::free_sync(self.ptr)?;
                self.ptr = 0;
                self.bytes = 0;
            }
            self.ptr = result::malloc_sync(bytes)?;
        }
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in [self.ptr, self.counters] {
            if p != 0 {
                // SAFETY: allocated by malloc_sync; owners synchronise before dropping.
                let _ = unsafe { result::free_sync(p) };
            }
        }
    }
}

/// Attention splits over positions (the most; the kernel uses as many as the position
/// needs, chunks of >= 16): decode (n == 1) spreads the cache over up to 64 blocks per
/// head; prefill has enough (query, head) blocks already.
pub(crate) fn attention_splits(a: &abi::Attention) -> u32 {
    if a.n == 1 {
        a.ctx.div_ceil(16).clamp(1, 64)
    } else {
        1
    }
}

/// Whether the single-token attention kernel (`attention_dec_*`) takes `a`: one token,
/// head_dim a multiple of 4, cache rows aligned for 16-byte (f32) / 8-byte (f16) loads.
/// Returns whether the cache is f16.
fn attention_dec_fits(base: u64, a: &abi::Attention) -> Option<bool> {
    let f16 = a.cache_dtype == DType::F16 as u32;
    let al = if f16 { 8 } else { 16 };
    let ok = a.n == 1
        && a.head_dim.is_multiple_of(4)
        && (base + a.k_cache as u64).is_multiple_of(al)
        && (base + a.v_cache as u64).is_multiple_of(al);
    ok.then_some(f16)
}

/// Scratch bytes an op needs.
pub(crate) fn scratch_bytes(op: &Op) -> usize {
    match op {
        Op::Attention(a) => {
            let s = attention_splits(a) as usize;
            if s == 1 {
                0
            } else {
                a.n as usize * a.n_heads as usize * s * (a.head_dim as usize + 2) * 4
            }
        }
        Op::Sample(s) => 2 * s.vocab as usize * 4,
        Op::Matmul(m) if m.n > 1 => crate::prefill::gemm_scratch_bytes(m),
        _ => 0,
    }
}

/// Whether the CUDA kernels handle this op (attention keeps a head in registers, rope a
/// token's angles in shared memory).
pub(crate) fn supports(op: &Op) -> bool {
    match op {
        Op::Attention(a) => a.head_dim <= 256,
        // `rope` keeps a token's angles in shared memory.
        Op::Rope(r) => r.n_rot <= 256,
        _ => true,
    }
}

pub(crate) fn cfg(grid: u64, block: u32) -> Result<LaunchConfig, OpError> {
    let g = u32::try_from(grid)
        .ok()
        .filter(|&g| g > 0 && g < i32::MAX as u32)
        .ok_or_else(|| OpError::unsupported(format!("a launch of {grid} blocks is past what one CUDA grid holds")))?;
    Ok(LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `struct MatvecGroup` of `cu/matmul.cu`: up to 3 matvecs of one dtype, one launch.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct MatvecGroup {
    m: [abi::Matmul; 3],
    count: u32,
    end: [u32; 3],
    aux: [u32; 3],
    nm: XNorm,
    pair: u32,
    sw_out: u32,
}

/// `struct XNorm` of `cu/matmul.cu`: the rmsnorm fused into a quantized group's x.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct XNorm {
    on: u32,
    x: u32,
    w: u32,
    out: u32,
    eps: f32,
}

/// The rmsnorm `n` before quantized matvecs `ms` can run inside their launch
/// (`quantize_x`): quantized, one x window (k <= 8192) and x, weight and out 16-byte
/// aligned (`SAMEPAGE_CUDA_QMV_NORM=0`: never).
fn quant_norm(base: u64, n: Option<abi::RmsNorm>, ms: &[abi::Matmul]) -> Option<XNorm> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("SAMEPAGE_CUDA_QMV_NORM").as_deref() != Ok("0"));
    let n = n.filter(|_| on)?;
    let dt = DType::from_u32(ms.first()?.dtype)?;
    let al = |off: u32| (base + off as u64).is_multiple_of(16);
    let ok = quantized(dt) && n.dim <= QKW && n.dim.is_multiple_of(8) && al(n.x) && al(n.weight) && al(n.out);
    ok.then_some(XNorm {
        on: 1,
        x: n.x,
        w: n.weight,
        out: n.out,
        eps: n.eps,
    })
}
// SAFETY: #[repr(C)] of 4-byte scalars (Matmul is such a struct), no padding.
unsafe impl samepage_abi::Pod for MatvecGroup {}

/// Dense W load width code (`gemv_dense`, aux bits 2-3): 3: 16 bytes, 2: 8, 1: 4, 0: by
/// element; the widest that the rows' start (base + w, and the row length) allows.
fn dense_width(base: u64, m: &abi::Matmul, rb: usize) -> u32 {
    let a = base + m.w as u64;
    [(16u64, 3u32), (8, 2), (4, 1)]
        .into_iter()
        .find(|&(v, _)| a.is_multiple_of(v) && (rb as u64).is_multiple_of(v))
        .map_or(0, |(_, c)| c)
}

/// log2 of the warps that share one row of a dense single-token matvec (`aux` bits 4-5,
/// see `row_reduce` in matmul.cu): doubled while the launch has fewer than ~one full GPU
/// of warps (8192: 132 SMs x 64) and each warp still gets a whole round of loads (8 loads
/// per lane). `rows`: all rows of the launch (a group's sum); `width`: the dense load
/// width code (0: by element, no split).
fn matvec_split(dt: DType, k: u32, rows: u64, width: u32, sms: u32) -> u32 {
    if width == 0 {
        return 0;
    }
    let vb = 2u32 << width; // bytes per load
    let (loads, warps) = split_knobs();
    if loads == 0 {
        return wave_split(dt, k, rows, vb, sms);
    }
    let per_warp_min = 32 * loads * vb / dt.block_bytes() as u32;
    let mut ls = 0;
    while ls < 3 && rows << (ls + 1) <= warps && k >> (ls + 1) >= per_warp_min {
        ls += 1;
    }
    ls
}

/// The default split: more warps per row only while that fills the launch's last wave
/// by at least 10% more (waves of 6 blocks of 256 threads per SM: `gemv_dense` takes ~40
/// registers), keeping at least 2 loads per lane. ncu on an H100 showed the old rule (at least 8
/// loads per lane) leaving q/k/v at 0.48 of one wave and down at 1.29 waves.
fn wave_split(dt: DType, k: u32, rows: u64, vb: u32, sms: u32) -> u32 {
    let slots = 6 * sms.max(1) as u64;
    let min_elems = 32 * 2 * vb / dt.block_bytes() as u32;
    let mut best = (0u32, 0.0f64);
    for ls in 0..=3u32 {
        if ls > 0 && k >> ls < min_elems {
            break;
        }
        let blocks = (rows << ls).div_ceil(8);
        let fill = blocks as f64 / (blocks.div_ceil(slots) * slots) as f64;
        if fill > best.1 + 0.1 {
            best = (ls, fill);
        }
    }
    best.0
}

/// `matvec_split`'s rule: 0 (default) fills waves (`wave_split`); `SAMEPAGE_CUDA_MV_LOADS=n`
/// selects the older rule (at least n loads per lane, launches of up to
/// `SAMEPAGE_CUDA_MV_WARPS` warps, 8192 by default; n = 8 was the default before).
fn split_knobs() -> (u32, u64) {
    static K: std::sync::OnceLock<(u32, u64)> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        (
            env_num("SAMEPAGE_CUDA_MV_LOADS").unwrap_or(0).min(64) as u32,
            env_num("SAMEPAGE_CUDA_MV_WARPS").unwrap_or(8192),
        )
    })
}

/// `aux` bits of the quantized single-token matvec kernels (matmul.cu `MV_EARLY`,
/// `MV_TMA`, `MV_DYN`), and the longest row its x window holds (`QKW`).
const MV_EARLY: u32 = 512;
const MV_TMA: u32 = 1024;
const MV_DYN: u32 = 2048;
const QKW: u32 = 8192;

/// `aux` bit of the sampler (sample.cu `SAMPLE_PRE`): no op of the graph writes its params
/// or history and no other op its RNG state, so it reads them before its PDL wait.
pub(crate) const SAMPLE_PRE: u32 = 1 << 20;

/// Whether `dt` is a block-quantized type (the i16/dp2a matvec path).
pub(crate) fn quantized(dt: DType) -> bool {
    !matches!(dt, DType::F32 | DType::F16 | DType::BF16)
}

/// A numeric tuning switch from the environment (read once by each caller's `OnceLock`).
fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// Blocks of a single-token matvec launch of `m` rows at split `ls`.
fn matvec_blocks(m: u32, ls: u32) -> u64 {
    ((m as u64) << ls).div_ceil(8)
}

/// Blocks a quantized single-token matvec launch aims at (`gemv_quant`): two per SM of a
/// 132-SM H100/H200 (its registers allow two blocks of 256 threads per SM), so the whole
/// launch is one wave; `SAMEPAGE_CUDA_QMV_BLOCKS` overrides (for measuring).
fn qmv_target_blocks() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| env_num("SAMEPAGE_CUDA_QMV_BLOCKS").filter(|&t| t > 0).unwrap_or(264))
}

/// Rows per block and log2 warps per row of a quantized single-token matvec (`gemv_quant`,
/// aux bits 16-23 and 4-5) in a launch of `rows` rows in all. Each block quantizes x once
/// (a read of 4k bytes from L2), so blocks take many rows: enough rows per block for
/// `qmv_target_blocks` blocks (at most 64); a block of fewer than 8 rows splits rows over
/// warps where a row has chunks (QChunk: 1024 or 2048 elements) for them.
fn quant_plan(dt: DType, k: u32, rows: u64) -> (u32, u32) {
    let chunk_elems = if dt.block_elems() == 32 { 1024 } else { 2048 };
    let chunks = k.div_ceil(chunk_elems);
    let mut per = rows.div_ceil(qmv_target_blocks()).clamp(1, 64) as u32;
    let mut ls = 0;
    while ls < 3 && (8 >> ls) > per && 2u32 << ls <= chunks {
        ls += 1;
    }
    let group = 8u32 >> ls;
    per = per.div_ceil(group) * group;
    (per, ls)
}

/// The `aux` word of a single-token matvec launch of `rows` rows in all (see
/// `MATMUL_KERNELS`): alignment bits, the split and (quantized) rows per block; and the
/// blocks this matvec takes.
fn matvec_aux(base: u64, m: &abi::Matmul, rows: u64, sms: u32) -> (u32, u64) {
    let dt = DType::from_u32(m.dtype).expect("validated dtype");
    let rb = dt.row_bytes(m.k as usize).expect("validated shape");
    let w_al = (base + m.w as u64).is_multiple_of(16) && rb.is_multiple_of(16);
    let x_al = (base + m.x as u64).is_multiple_of(16);
    match dt {
        DType::F32 | DType::F16 | DType::BF16 => {
            let wd = dense_width(base, m, rb);
            let ls = matvec_split(dt, m.k, rows, wd, sms);
            ((x_al as u32) << 1 | wd << 2 | ls << 4, matvec_blocks(m.m, ls))
        }
        _ => {
            let (per, ls) = quant_plan(dt, m.k, rows);
            (
                w_al as u32 | (x_al as u32) << 1 | ls << 4 | per << 16,
                (m.m as u64).div_ceil(per as u64),
            )
        }
    }
}

/// Dynamic shared memory of a quantized single-token matvec's TMA chunk ring (`QRing` in
/// matmul.cu: per warp as many chunks of 32 blocks / 8 super-blocks, plus 16 bytes, as
/// fit 56 KiB for the 8 warps, at most 8); `None` for the dense types.
pub(crate) fn qmv_ring_bytes(dt: DType) -> Option<u32> {
    if !quantized(dt) {
        return None;
    }
    let per_block = if dt.block_elems() == 32 { 1 } else { 4 };
    let chunk = (32 / per_block) * dt.block_bytes() as u32;
    let cp = (chunk + 16).div_ceil(16) * 16;
    let nb = (57344 / (8 * cp)).min(8);
    Some(8 * nb * cp)
}

/// `MV_TMA` (matmul.cu) for a quantized single-token matvec with this `aux`: the kernel
/// has its ring, W rows are 16-byte aligned (aux bit 0), k fits one window; with the
/// shared memory to launch with. `SAMEPAGE_CUDA_QMV_TMA=0`: off.
fn qmv_tma(k: &Kernels, m: &abi::Matmul, aux: u32) -> (u32, u32) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("SAMEPAGE_CUDA_QMV_TMA").as_deref() != Ok("0"));
    let ring = DType::from_u32(m.dtype).and_then(qmv_ring_bytes);
    match ring {
        Some(b) if on && k.qmv_tma.get(m.dtype as usize) == Some(&true) && aux & 1 != 0 && m.k <= QKW => {
            (aux | MV_TMA, b)
        }
        _ => (aux, 0),
    }
}

/// `MV_DYN` (matmul.cu) for a quantized matvec launch on the TMA path (`aux` with MV_TMA,
/// one warp per row) of `tiles` tiles: a grid of two blocks per SM that take tiles from a
/// counter. `SAMEPAGE_CUDA_QMV_DYN`: 2 (default) where the tiles are at least two waves
/// of blocks (the output head), 1 where there are at least 1.5 tiles per block (also the
/// gate/up pairs, in tiles of 16 rows), 0 never. Returns the aux and the grid.
fn qmv_dyn(k: &Kernels, c: &KCtx, aux: u32, tiles: u64) -> (u32, u64) {
    static MODE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let mode = *MODE.get_or_init(|| env_num("SAMEPAGE_CUDA_QMV_DYN").unwrap_or(2));
    let grid = 2 * k.sms.max(1) as u64;
    let enough = match mode {
        0 => false,
        1 => 2 * tiles >= 3 * grid,
        _ => tiles >= 2 * grid,
    };
    if enough && c.counters != 0 && aux & MV_TMA != 0 && (aux >> 4) & 3 == 0 {
        (aux | MV_DYN, grid)
    } else {
        (aux, tiles)
    }
}

/// Byte ranges `[start, end)` a matvec reads and the one it writes.
fn matvec_ranges(m: &abi::Matmul) -> (Vec<(u64, u64)>, (u64, u64)) {
    let dt = DType::from_u32(m.dtype).expect("validated dtype");
    let rb = dt.row_bytes(m.k as usize).expect("validated shape") as u64;
    let out = (m.out as u64, m.out as u64 + m.m as u64 * 4);
    let mut reads = vec![
        (m.w as u64, m.w as u64 + m.m as u64 * rb),
        (m.x as u64, m.x as u64 + m.k as u64 * 4),
    ];
    if m.flags & abi::MATMUL_BIAS != 0 {
        reads.push((m.bias as u64, m.bias as u64 + m.m as u64 * 4));
    }
    (reads, out)
}

pub(crate) fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Whether `ops` (2 or 3) can run as one `matvecs` launch with the same results as one
/// after another: single-token matvecs of one dtype over the same x, and no op writes
/// what another reads or writes (so their order cannot matter).
pub(crate) fn groupable(ops: &[Op]) -> bool {
    groupable_mixed(ops, false)
}

/// [`groupable`], and with `mixed` also matrices of a [`crate::kernels::MVQ_MIX`] pair
/// (the first dtype, then the second: Q4_K_M's Q4_K q, k and Q6_K v), which only the
/// pipelined matvec runs as one launch ([`launch_mv`] splits the group otherwise).
pub(crate) fn groupable_mixed(ops: &[Op], mixed: bool) -> bool {
    if !(2..=3).contains(&ops.len()) {
        return false;
    }
    let ms: Vec<abi::Matmul> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Matmul(m) if m.n == 1 => Some(m),
            _ => None,
        })
        .collect();
    if ms.len() != ops.len() {
        return false;
    }
    let m0 = ms[0];
    if ms.iter().any(|m| m.x != m0.x || m.k != m0.k) {
        return false;
    }
    let mix = ms.iter().position(|m| m.dtype != m0.dtype).unwrap_or(ms.len());
    if mix < ms.len() {
        let pair = (DType::from_u32(m0.dtype), DType::from_u32(ms[mix].dtype));
        let known = crate::kernels::MVQ_MIX.iter().any(|&(a, b)| pair == (Some(a), Some(b)));
        if !mixed || !known || ms[mix..].iter().any(|m| m.dtype != ms[mix].dtype) {
            return false;
        }
    }
    let rw: Vec<_> = ms.iter().map(matvec_ranges).collect();
    for (i, (_, wi)) in rw.iter().enumerate() {
        for (j, (rj, wj)) in rw.iter().enumerate() {
            if i != j && (overlap(*wi, *wj) || rj.iter().any(|r| overlap(*wi, *r))) {
                return false;
            }
        }
    }
    true
}

/// `struct RopeKv` of `cu/ops.cu`, with q's and k's pair frequencies ([`freq_table`]).
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeKv {
    q: abi::Rope,
    k: abi::Rope,
    s: abi::KvStore,
    qhi: [f32; RK_PAIRS],
    qlo: [f32; RK_PAIRS],
    khi: [f32; RK_PAIRS],
    klo: [f32; RK_PAIRS],
}
// SAFETY: #[repr(C)] of 4-byte scalars, no padding.
unsafe impl samepage_abi::Pod for RopeKv {}

/// Rotated pairs a head of `rope_kv` and `rope` at most (n_rot <= 256).
const RK_PAIRS: usize = 128;

/// `struct RopeT` of `cu/ops.cu`: a rope op and its pairs' frequencies ([`freq_table`]).
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeT {
    r: abi::Rope,
    hi: [f32; RK_PAIRS],
    lo: [f32; RK_PAIRS],
}
// SAFETY: #[repr(C)] of 4-byte scalars, no padding.
unsafe impl samepage_abi::Pod for RopeT {}

/// Pair j's rotation frequency (f64, [`samepage_backend::rope::rope_freqs`]) as two f32,
/// `hi[j] + lo[j]` (48 of its 53 bits), for the kernels' `rope_sincos`: they then need a
/// multiply, a range reduction and two short series a pair, where pow, two divisions and
/// an f64 sincos took ~2 us of a decode step on an H100.
fn freq_table<const N: usize>(r: &abi::Rope) -> ([f32; N], [f32; N]) {
    let (mut hi, mut lo) = ([0.0f32; N], [0.0f32; N]);
    for (j, f) in samepage_backend::rope::rope_freqs(r).into_iter().take(N).enumerate() {
        hi[j] = f as f32;
        lo[j] = (f - hi[j] as f64) as f32;
    }
    (hi, lo)
}

/// Whether `ops` are rope(q), rope(k), kv_store(k, v) of one token that one `rope_kv`
/// launch runs with the same results: kv_store stores the rotated k, and no op writes
/// what another reads or writes except that (k is rotated before it is copied).
pub(crate) fn rope_kv_fusable(ops: &[Op]) -> bool {
    let [Op::Rope(q), Op::Rope(k), Op::KvStore(s)] = *ops else {
        return false;
    };
    if q.n != 1 || k.n != 1 || s.n != 1 || s.k != k.x || s.n_kv_heads != k.n_heads || s.head_dim != k.head_dim {
        return false;
    }
    if q.n_rot as usize / 2 > RK_PAIRS || k.n_rot as usize / 2 > RK_PAIRS {
        return false;
    }
    let span = |x: u32, len: u64| (x as u64, x as u64 + len);
    let qr = span(q.x, q.n_heads as u64 * q.head_dim as u64 * 4);
    let kr = span(k.x, k.n_heads as u64 * k.head_dim as u64 * 4);
    let vr = span(s.v, kr.1 - kr.0);
    let eb = if s.cache_dtype == DType::F16 as u32 { 2 } else { 4 };
    let cb = s.n_kv_heads as u64 * s.ctx as u64 * s.head_dim as u64 * eb;
    let (kc, vc) = (span(s.k_cache, cb), span(s.v_cache, cb));
    let writes = [qr, kr, kc, vc];
    let reads = [vr, span(q.positions, 4), span(k.positions, 4), span(s.pos, 4)];
    for (i, w) in writes.iter().enumerate() {
        if writes.iter().enumerate().any(|(j, o)| i != j && overlap(*w, *o)) || reads.iter().any(|r| overlap(*w, *r)) {
            return false;
        }
    }
    true
}

/// `struct RopeKvAttn` of `cu/attention.cu`, with the pairs' frequencies ([`freq_table`];
/// q and k rotate alike).
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeKvAttn {
    q: abi::Rope,
    k: abi::Rope,
    s: abi::KvStore,
    a: abi::Attention,
    fhi: [f32; RKA_PAIRS],
    flo: [f32; RKA_PAIRS],
}
// SAFETY: #[repr(C)] of 4-byte scalars, no padding.
unsafe impl samepage_abi::Pod for RopeKvAttn {}

/// Rotated pairs a head of the fused decode attention at most (head_dim <= 128).
const RKA_PAIRS: usize = 64;

impl Default for RopeKvAttn {
    fn default() -> RopeKvAttn {
        RopeKvAttn {
            q: Default::default(),
            k: Default::default(),
            s: Default::default(),
            a: Default::default(),
            fhi: [0.0; RKA_PAIRS],
            flo: [0.0; RKA_PAIRS],
        }
    }
}

impl RopeKvAttn {
    fn new(q: abi::Rope, k: abi::Rope, s: abi::KvStore, a: abi::Attention) -> RopeKvAttn {
        let (fhi, flo) = freq_table(&q);
        RopeKvAttn { q, k, s, a, fhi, flo }
    }
}

/// Most positions per block and GQA group size of the fused decode attention
/// (`rope_kv_attn`), and the blocks it aims at (about one per SM;
/// `SAMEPAGE_CUDA_ATTN_BLOCKS` overrides).
const RKA_CH: u32 = 256;
const RKA_G: u32 = 4;
const RKA_BLOCKS: u32 = 128;

/// Splits (blocks per KV head) of the fused decode attention: about RKA_BLOCKS blocks in
/// all, at least enough that a split holds at most RKA_CH positions, and no more than
/// the attention op's scratch has room for (`attention_splits`).
fn rka_splits(a: &abi::Attention) -> u32 {
    static BLOCKS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let blocks =
        *BLOCKS.get_or_init(|| env_num("SAMEPAGE_CUDA_ATTN_BLOCKS").map_or(RKA_BLOCKS, |b| b.clamp(1, 4096) as u32));
    blocks
        .div_ceil(a.n_kv_heads.max(1))
        .max(a.ctx.div_ceil(RKA_CH))
        .min(attention_splits(a))
}

/// Whether `ops` are rope(q), rope(k), kv_store, attention of one token that one
/// `rope_kv_attn` launch (blocks per KV head and split of the positions) runs with the
/// same results: the first three as for [`rope_kv_fusable`], both ropes with the same
/// parameters and positions, attention over the cache kv_store writes at the same `pos`
/// with the rotated q, splits of at most RKA_CH positions (a context of at most 16384),
/// head_dim a multiple of 4 and at most 128, groups of at most 4 heads, and its output
/// apart from everything else the four ops touch.
pub(crate) fn rope_kv_attn_fusable(ops: &[Op]) -> bool {
    let [Op::Rope(q), Op::Rope(k), Op::KvStore(s), Op::Attention(a)] = *ops else {
        return false;
    };
    if !rope_kv_fusable(&ops[..3]) {
        return false;
    }
    let same_rope = q.head_dim == k.head_dim
        && q.n_rot == k.n_rot
        && q.mode == k.mode
        && q.positions == k.positions
        && q.freq_base.to_bits() == k.freq_base.to_bits()
        && q.scaling_factor.to_bits() == k.scaling_factor.to_bits()
        && q.low_freq_factor.to_bits() == k.low_freq_factor.to_bits()
        && q.high_freq_factor.to_bits() == k.high_freq_factor.to_bits()
        && q.original_context == k.original_context;
    let hd = a.head_dim;
    if !same_rope
        || a.n != 1
        || a.q != q.x
        || a.n_heads != q.n_heads
        || a.n_kv_heads != s.n_kv_heads
        || hd != q.head_dim
        || hd != s.head_dim
        || !hd.is_multiple_of(4)
        || hd > 128
        || a.n_heads / a.n_kv_heads > RKA_G
        || a.k_cache != s.k_cache
        || a.v_cache != s.v_cache
        || a.cache_dtype != s.cache_dtype
        || a.ctx != s.ctx
        || (rka_splits(&a) as u64) * (RKA_CH as u64) < a.ctx as u64
        || a.n_kv_heads as usize + RESERVED_COUNTERS > COUNTERS
        || a.pos != s.pos
    {
        return false;
    }
    let span = |x: u32, len: u64| (x as u64, x as u64 + len);
    let eb = if s.cache_dtype == DType::F16 as u32 { 2 } else { 4 };
    let cb = s.n_kv_heads as u64 * s.ctx as u64 * hd as u64 * eb;
    let out = span(a.out, a.n_heads as u64 * hd as u64 * 4);
    let others = [
        span(q.x, q.n_heads as u64 * hd as u64 * 4),
        span(k.x, k.n_heads as u64 * hd as u64 * 4),
        span(s.v, k.n_heads as u64 * hd as u64 * 4),
        span(s.k_cache, cb),
        span(s.v_cache, cb),
        span(q.positions, 4),
        span(s.pos, 4),
    ];
    others.iter().all(|r| !overlap(out, *r))
}

/// The fused decode attention's splits, its launch word (`c.aux`: the splits, `early` in
/// bit 17, the minimum positions a split in bits 24-31) and whether its caches are f16, where the
/// caches are aligned for its vector loads and the split merge has its counters; `None`
/// otherwise (the ops then run unfused).
fn rka_aux(c: &KCtx, a: &abi::Attention, early: bool) -> Option<(u32, u32, bool)> {
    let splits = rka_splits(a);
    let f16 = attention_dec_fits(c.base, a).filter(|_| splits == 1 || c.counters != 0)?;
    // `SAMEPAGE_CUDA_ATTN_MIN=N`: at least N positions a split (8-256, a multiple of 8),
    // in aux bits 24-31 as N / 8; by default the kernel's 64 up to 256 positions, 32
    // beyond. On an H100 (tg128, two rounds in one call), 64 against 32: Q4_K_M 1509/1516
    // vs 1469/1484 tok/s from an empty context, but 1456/1459 vs 1464/1467 at depth 512;
    // bf16 875/877 vs 869/873 and 857/857 vs 855/863. 128 lost 9-10% at depth 512.
    static MIN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let min = *MIN.get_or_init(|| env_num("SAMEPAGE_CUDA_ATTN_MIN").map_or(0, |v| (v.clamp(8, 256) / 8) as u32));
    Some((splits, splits | (early as u32) << 17 | min << 24, f16))
}

/// Enqueue ops accepted by [`rope_kv_attn_fusable`]: one launch where the caches are
/// aligned for the kernel's vector loads (and the split merge has its counters), else
/// rope_kv and attention (`c.op`: the kv_store's; `c.tmap` slots: q.positions,
/// k.positions, kv_store.pos, attention.pos). `early`: the staged per-token words are
/// written before this launch can start (graph.rs `tok_ready_early`), so the kernel
/// reads them, and the cache rows before pos, ahead of its PDL wait.
pub(crate) fn launch_rope_kv_attn(
    k: &Kernels,
    stream: &CudaStream,
    mut c: KCtx,
    ops: &[Op],
    early: bool,
    after_quant: bool,
) -> Result<(), OpError> {
    let [Op::Rope(q), Op::Rope(kr), Op::KvStore(s), Op::Attention(a)] = *ops else {
        return Err(OpError::runtime("cuda: not a rope/rope/kv_store/attention group"));
    };
    if let Some((splits, aux, f16)) = rka_aux(&c, &a, early) {
        let f = RopeKvAttn::new(q, kr, s, a);
        c.aux = aux;
        // The narrow kernel (head_dim <= 64, 80 registers) after a quantized matvec step,
        // whose blocks it can start beside: Q8_0 tg128 at depth 512 1284/1283 tok/s vs
        // 1258/1255 with the wide one, Q4_K_M 1445/1451 vs 1426/1426; after bf16 it was
        // the slower (846/841 vs 850/851). `SAMEPAGE_CUDA_ATTN64=0`: never, `=1`: always.
        static NARROW: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let knob = *NARROW.get_or_init(|| env_num("SAMEPAGE_CUDA_ATTN64"));
        let narrow = a.head_dim <= 64 && knob.map_or(after_quant, |v| v != 0);
        let fs = if narrow { &k.rope_kv_attn_64 } else { &k.rope_kv_attn };
        return go(
            stream,
            &fs[f16 as usize],
            c,
            f,
            cfg(a.n_kv_heads as u64 * splits as u64, 256)?,
            "rope_kv_attn",
        );
    }
    launch_rope_kv(k, stream, c, &ops[..3])?;
    let ca = KCtx {
        op: c.op + 1,
        tmap: c.tmap >> 24 | 0xffff_ff00,
        ..c
    };
    launch_op(k, stream, ca, &ops[3])
}

/// Enqueue ops accepted by [`rope_kv_fusable`] as one launch (`c.op`: the kv_store's).
pub(crate) fn launch_rope_kv(k: &Kernels, stream: &CudaStream, c: KCtx, ops: &[Op]) -> Result<(), OpError> {
    let [Op::Rope(q), Op::Rope(kr), Op::KvStore(s)] = *ops else {
        return Err(OpError::runtime("cuda: not a rope/rope/kv_store group"));
    };
    let block = |r: &abi::Rope| (r.n_rot / 2).div_ceil(32).clamp(1, 8) * 32;
    let ((qhi, qlo), (khi, klo)) = (freq_table(&q), freq_table(&kr));
    let f = RopeKv {
        q,
        k: kr,
        s,
        qhi,
        qlo,
        khi,
        klo,
    };
    go(
        stream,
        &k.rope_kv,
        c,
        f,
        cfg(q.n_heads as u64 + kr.n_heads as u64, block(&q).max(block(&kr)))?,
        "rope_kv",
    )
}

/// Whether `ops` are gate, up (a `groupable` pair of equal height) and swiglu(gate.out,
/// up.out) that one paired launch (`mvp`, or the quantized pair) runs with the same
/// results: each output element is written by the thread that summed its gate and up
/// rows, so `out` may be either of them, or else must be apart from everything the
/// matvecs read or write.
pub(crate) fn swiglu_pairable(ops: &[Op]) -> bool {
    let [Op::Matmul(g), Op::Matmul(u), Op::SwiGlu(s)] = *ops else {
        return false;
    };
    if !groupable(&ops[..2]) || g.m != u.m || s.gate != g.out || s.up != u.out || s.len != g.m {
        return false;
    }
    if s.out == g.out || s.out == u.out {
        return true;
    }
    let o = (s.out as u64, s.out as u64 + s.len as u64 * 4);
    [g, u].iter().all(|m| {
        let (reads, w) = matvec_ranges(m);
        !overlap(o, w) && reads.iter().all(|r| !overlap(o, *r))
    })
}

/// Enqueue ops accepted by [`swiglu_pairable`] that the pipelined kernel did not take:
/// one quantized paired launch where it applies, else the matvec group and the swiglu
/// one after the other.
pub(crate) fn launch_matvecs_swiglu(
    k: &Kernels,
    stream: &CudaStream,
    c: KCtx,
    ops: &[Op],
    nm: Option<XNorm>,
) -> Result<(), OpError> {
    let [Op::Matmul(g), Op::Matmul(u), Op::SwiGlu(s)] = *ops else {
        return Err(OpError::runtime("cuda: not a gate/up/swiglu group"));
    };
    if launch_quant_pair(k, stream, c, g, u, s, nm)? {
        return Ok(());
    }
    launch_matvec_group(k, stream, c, &ops[..2], nm)?;
    launch_op(k, stream, KCtx { op: c.op + 2, ..c }, &ops[2])
}

/// Quantized gate/up/swiglu (accepted by [`swiglu_pairable`]) as one launch: each block
/// takes the same rows of gate and up through the TMA path and writes the swiglu too
/// (`gemv_quant`'s `up`). Where the TMA path runs for both with one warp per row, unless
/// `SAMEPAGE_CUDA_QMV_PAIR=0`; whether it launched.
fn launch_quant_pair(
    k: &Kernels,
    stream: &CudaStream,
    c: KCtx,
    g: abi::Matmul,
    u: abi::Matmul,
    s: abi::SwiGlu,
    nm: Option<XNorm>,
) -> Result<bool, OpError> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("SAMEPAGE_CUDA_QMV_PAIR").as_deref() != Ok("0"));
    if !on || g.m != u.m || DType::from_u32(g.dtype).and_then(qmv_ring_bytes).is_none() {
        return Ok(false);
    }
    let rows = 2 * g.m as u64;
    let (ag, _) = matvec_aux(c.base, &g, rows, k.sms);
    let (au, _) = matvec_aux(c.base, &u, rows, k.sms);
    let ((ag, ring), (au, _)) = (qmv_tma(k, &g, ag), qmv_tma(k, &u, au));
    // One warp per row (split bits 4-5 zero): rows per block a multiple of 8.
    let per = (ag >> 16) & 0xff;
    if ag & au & MV_TMA == 0 || (ag >> 4) & 3 != 0 || per < 2 || per % 2 != 0 {
        return Ok(false);
    }
    // Taken from a counter (`qmv_dyn`), tiles of 32 virtual rows (16 of gate, 16 of up:
    // with 2 chunks a row, 8 items per warp over two tiles, more than a ring holds); else
    // a block per `per` virtual rows.
    let (ag, blocks) = match qmv_dyn(k, &c, ag, (g.m as u64).div_ceil(16)) {
        (a, grid) if a & MV_DYN != 0 => (a & !(0xff << 16) | 32 << 16, grid),
        (a, _) => (a, (g.m as u64).div_ceil(per as u64 / 2)),
    };
    let end = u32::try_from(blocks).map_err(|_| OpError::unsupported("cuda: matvec group too large"))?;
    let grp = MatvecGroup {
        m: [g, u, abi::Matmul::default()],
        count: 2,
        end: [end, end, 0],
        aux: [ag | prefetch_bit() | early_bit(g.dtype), 0, 0],
        nm: nm.unwrap_or_default(),
        pair: 1,
        sw_out: s.out,
    };
    let mut lc = cfg(blocks, 256)?;
    lc.shared_mem_bytes = ring;
    go(stream, &k.matvecs[g.dtype as usize], c, grp, lc, "matvecs")?;
    Ok(true)
}

/// The matvec descriptors among `ops` (in order).
fn matmuls(ops: &[Op]) -> Vec<abi::Matmul> {
    ops.iter()
        .filter_map(|op| if let Op::Matmul(m) = op { Some(*m) } else { None })
        .collect()
}

/// Enqueue a group accepted by [`groupable`] as one launch.
pub(crate) fn launch_matvec_group(
    k: &Kernels,
    stream: &CudaStream,
    c: KCtx,
    ops: &[Op],
    nm: Option<XNorm>,
) -> Result<(), OpError> {
    let mut g = MatvecGroup {
        m: [abi::Matmul::default(); 3],
        count: ops.len() as u32,
        end: [0; 3],
        aux: [0; 3],
        nm: nm.unwrap_or_default(),
        pair: 0,
        sw_out: 0,
    };
    let mut blocks = 0u64;
    let mut smem = 0u32;
    let rows: u64 = ops
        .iter()
        .map(|op| if let Op::Matmul(m) = op { m.m as u64 } else { 0 })
        .sum();
    for (i, op) in ops.iter().enumerate() {
        let Op::Matmul(m) = *op else {
            return Err(OpError::runtime("cuda: a matvec group holds a non-matmul op"));
        };
        let (aux, nblk) = matvec_aux(c.base, &m, rows, k.sms);
        let (aux, ring) = qmv_tma(k, &m, aux);
        smem = smem.max(ring);
        g.m[i] = m;
        g.aux[i] = aux | prefetch_bit() | early_bit(m.dtype);
        blocks += nblk;
        g.end[i] = u32::try_from(blocks).map_err(|_| OpError::unsupported("cuda: matvec group too large"))?;
    }
    if g.count == 1 {
        // One matrix (the output head with its rmsnorm): tiles from a counter (`qmv_dyn`).
        let (aux, grid) = qmv_dyn(k, &c, g.aux[0], blocks);
        g.aux[0] = aux;
        blocks = grid;
        g.end[0] = u32::try_from(grid).map_err(|_| OpError::unsupported("cuda: matvec group too large"))?;
    }
    let mut lc = cfg(blocks, 256)?;
    lc.shared_mem_bytes = smem;
    go(stream, &k.matvecs[g.m[0].dtype as usize], c, g, lc, "matvecs")
}

/// `struct MvPipe` of `cu/mvp.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MvPipe {
    m: [abi::Matmul; 3],
    count: u32,
    rend: [u32; 3],
    p: u32,
    r: u32,
    stages: u32,
    pair: u32,
    sw_out: u32,
    norm: u32,
    nx: u32,
    nw: u32,
    nout: u32,
    eps: f32,
    pre: u32,
    early: u32,
    nw_early: u32,
    vmix: u32,
}
// SAFETY: #[repr(C)] of 4-byte scalars (Matmul is such a struct), no padding.
unsafe impl samepage_abi::Pod for MvPipe {}

impl MvPipe {
    /// The descriptor's matrices (1-3, their rows concatenated: `rend`), parts and rows a
    /// stage, the fused rmsnorm and swiglu, and whether any matrix has a bias or
    /// accumulates (`pre`); `None` past u32 rows. The caller sets the launch's fields.
    fn new(ms: &[abi::Matmul], p: u32, r: u32, norm: Option<abi::RmsNorm>, sw: Option<abi::SwiGlu>) -> Option<MvPipe> {
        let mut g = MvPipe {
            count: ms.len() as u32,
            p,
            r,
            ..Default::default()
        };
        let mut rows = 0u64;
        for (i, m) in ms.iter().enumerate() {
            g.m[i] = *m;
            rows += m.m as u64;
            g.rend[i] = u32::try_from(rows).ok()?;
        }
        if let Some(x) = sw {
            (g.pair, g.sw_out) = (1, x.out);
        }
        if let Some(n) = norm {
            (g.norm, g.nx, g.nw, g.nout, g.eps) = (1, n.x, n.weight, n.out, n.eps);
        }
        g.pre = ms
            .iter()
            .any(|m| m.flags & (abi::MATMUL_BIAS | abi::MATMUL_ACCUMULATE) != 0) as u32;
        Some(g)
    }
}

/// A record-time matvec step: `ops[at..]` holds an rmsnorm (if `norm`), `len` (1-3)
/// single-token matvecs over one x (its output, with `norm`), and a swiglu of the gate/up
/// pair (if `swiglu`). `w_fixed`: no op of the whole graph writes any of their W, so the
/// pipelined kernel may read W before the previous kernel has finished; `nw_fixed`: the
/// same for the rmsnorm's weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MvStep {
    pub at: usize,
    pub norm: bool,
    pub len: usize,
    pub swiglu: bool,
    pub w_fixed: bool,
    pub nw_fixed: bool,
}

impl MvStep {
    pub(crate) fn ops(&self) -> usize {
        self.norm as usize + self.len + self.swiglu as usize
    }
}

/// The longest matvec step starting at `ops[i]` (see [`MvStep`]), or `None` where
/// `ops[i]` starts none. `writes`: every op's write ranges ([`crate::stage::writes`]) in the graph.
/// An rmsnorm joins only when every matvec reads its output as x (k = dim) and nothing is
/// in place: its out apart from its x and weight, and every output of the step apart
/// from all three (the fused kernel's blocks read x while others write).
pub(crate) fn mv_step(ops: &[Op], i: usize, writes: &[(u64, u64)]) -> Option<MvStep> {
    let single = |j: usize| matches!(ops.get(j), Some(Op::Matmul(m)) if m.n == 1);
    let norm = match ops.get(i)? {
        Op::RmsNorm(r) if r.n == 1 => Some(*r),
        _ => None,
    };
    let j = i + norm.is_some() as usize;
    let len = (2..=3)
        .rev()
        .find(|&l| j + l <= ops.len() && groupable_mixed(&ops[j..j + l], true))
        .unwrap_or(single(j) as usize);
    if len == 0 {
        return None;
    }
    let ms = matmuls(&ops[j..j + len]);
    let swiglu = len == 2 && j + 3 <= ops.len() && swiglu_pairable(&ops[j..j + 3]);
    let mut outs: Vec<(u64, u64)> = ms.iter().map(|m| matvec_ranges(m).1).collect();
    if let Some(Op::SwiGlu(s)) = ops.get(j + 2).filter(|_| swiglu) {
        outs.push((s.out as u64, s.out as u64 + s.len as u64 * 4));
    }
    if let Some(r) = norm {
        let row = |x: u32| (x as u64, x as u64 + r.dim as u64 * 4);
        let (x, w, o) = (row(r.x), row(r.weight), row(r.out));
        let ok = ms.iter().all(|m| m.x == r.out && m.k == r.dim)
            && !overlap(o, x)
            && !overlap(o, w)
            && outs
                .iter()
                .all(|d| !overlap(*d, x) && !overlap(*d, w) && !overlap(*d, o));
        if !ok {
            return None;
        }
    }
    let w_fixed = ms.iter().all(|m| {
        let w = matvec_ranges(m).0[0];
        writes.iter().all(|d| !overlap(w, *d))
    });
    let nw_fixed = norm.is_some_and(|r| {
        let w = (r.weight as u64, r.weight as u64 + r.dim as u64 * 4);
        writes.iter().all(|d| !overlap(w, *d))
    });
    Some(MvStep {
        at: i,
        norm: norm.is_some(),
        len,
        swiglu,
        w_fixed,
        nw_fixed,
    })
}

/// The pipelined matvec's switches: `SAMEPAGE_CUDA_MVP=0` (off), `_STAGES` (2-6 stages
/// of 8 parts per block; default 2: on an H100, bf16 tg128 2 vs 3 stages, interleaved in
/// one call, 817/813 vs 789/796 and 807/819 vs 797/720 tok/s; see NOTES.md), `_BPS`
/// (blocks per SM; default 2: on an H100, bf16 tg128 916/917 vs 883/873 with 1, in one
/// call, session 8), `_PAIR=0` (stages not capped so that two blocks fit an SM).
fn mvp_knobs() -> (bool, u32, u64, bool) {
    static K: std::sync::OnceLock<(bool, u32, u64, bool)> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        (
            std::env::var("SAMEPAGE_CUDA_MVP").as_deref() != Ok("0"),
            env_num("SAMEPAGE_CUDA_MVP_STAGES")
                .unwrap_or(2)
                .clamp(2, crate::kernels::MVP_SMAX as u64) as u32,
            env_num("SAMEPAGE_CUDA_MVP_BPS").unwrap_or(2).clamp(1, 4),
            std::env::var("SAMEPAGE_CUDA_MVP_PAIR").as_deref() != Ok("0"),
        )
    })
}

/// Stages the pipelined matvec issues before its PDL wait (`SAMEPAGE_CUDA_MVP_EARLY`,
/// default 1): the rest go out once x is in. Each early byte streams while earlier
/// kernels run, but also queues ahead of the block's own x reads (and every other
/// dependent read on the GPU): on an H100, bf16 Llama-1B tg128, all stages early gave
/// 706-738 tok/s, one 771-773, two 722-742, none 722-733 (interleaved, one call).
fn mvp_early() -> u32 {
    static E: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *E.get_or_init(|| env_num("SAMEPAGE_CUDA_MVP_EARLY").map_or(1, |v| v.min(64) as u32))
}

/// Whether `SAMEPAGE_CUDA_MVP` leaves the pipelined matvec on.
pub(crate) fn mvp_enabled() -> bool {
    mvp_knobs().0
}

/// `mvp`'s part shape for rows of `k` elements: (J, P) with k = 256 J P, J <= 8 (x
/// registers per lane: 8 J), P <= 8 parts per row (a warp each), the fewest parts.
pub(crate) fn mvp_shape(k: u32) -> Option<(u32, u32)> {
    if k == 0 || !k.is_multiple_of(256) {
        return None;
    }
    let c = k / 256;
    let p = (1..=8u32).find(|&p| c.is_multiple_of(p) && c / p <= 8)?;
    Some((c / p, p))
}

/// The quantized dtypes the pipelined matvec decodes (`QUnit` in cu/quant.cuh): the
/// activations per unit of work of one lane (a block, or a K-quant's 64-element unit).
pub(crate) fn mvq_dtype(code: u32) -> Option<u32> {
    match DType::from_u32(code)? {
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 => Some(32),
        DType::Q4_K | DType::Q5_K | DType::Q6_K => Some(64),
        _ => None,
    }
}

/// Parts per row (P, a warp each; a stage holds 8 / P rows times the rows each warp
/// takes) of the quantized pipelined matvec for rows of `k` elements: the fewest with at
/// most 64 units a part (two per lane) and whole blocks; rows whose bytes are a 16-byte
/// multiple (bulk copies) and k <= QKW (x quantized in shared memory once, `quantize_x`).
pub(crate) fn mvq_shape(dt: DType, k: u32) -> Option<u32> {
    let unit = mvq_dtype(dt as u32)?;
    let be = dt.block_elems() as u32;
    if k == 0 || k > QKW || !k.is_multiple_of(be) || !(dt.row_bytes(k as usize)? as u32).is_multiple_of(16) {
        return None;
    }
    let units = k / unit;
    [1u32, 2, 4, 8]
        .into_iter()
        .find(|&p| units.div_ceil(p) <= 64 && (k / p).is_multiple_of(be) && k.is_multiple_of(p))
}

/// Shared memory of the quantized x (`XQ` in cu/quant.cuh: granules with a pad every 8,
/// a scale per 32, a sum per 16) for rows of `k` elements.
fn mvq_x_bytes(k: u32) -> u32 {
    let g = k / 8;
    (g + g / 8) * 16 + k / 32 * 4 + k / 16 * 4
}

/// Stage buffers of a quantized pipelined matvec block: as many as asked (`want`) and as
/// `fit` in its share of the SM, but never more than the block has stages (`per_block`),
/// and one where two do not fit. Llama-1B's Q6_K down projection (k = 8192) has one stage
/// of 53 KiB a block: two buffers did not let two blocks share an SM, and the second
/// wave of blocks started only as the first ended (12 us a step instead of 5).
fn mvq_stages(want: u32, fit: u32, per_block: u32) -> u32 {
    want.min(fit.max(1)).min(per_block.max(1))
}

/// The quantized pipelined matvec's switches (all `SAMEPAGE_CUDA_MVQ_*`, read once).
/// Every default was measured on an H100, tg128, variants interleaved in one call (see
/// scripts/cuda/NOTES.md, session 6).
struct MvqKnobs {
    /// `SAMEPAGE_CUDA_MVQ=0`: off (the quantized steps launch `gemv_quant` as before).
    on: bool,
    /// `_STAGES`: most stages in flight per block (default 8, at most what lets `fit`
    /// blocks share an SM).
    stages: u32,
    /// `_BPS`, `_BPS_LONG` (rows over 4096 elements, where every block quantizes all of
    /// x): blocks per SM (default 2 and 2).
    bps: u64,
    bps_long: u64,
    /// `_RW`, `_RW_LONG`: rows each warp decodes per stage, 1 or 2 (default 2 and 2: two
    /// independent chains a lane and twice the bytes per stage; Q4_K_M 1433/1441 tok/s
    /// with 2 vs 1150/1159 with 1, Q8_0 1258/1257 vs 1132/1131).
    rw: u32,
    rw_long: u32,
    /// `_EARLY=N`: stages issued before the PDL wait, for every dtype; by default 1 for
    /// Q8_0 and 2 for the others (Q8_0 1291/1281 tok/s with 1 vs 1255/1245 with 2;
    /// Q4_K_M 1417/1418 with 1 vs 1433/1427 with 2).
    early: Option<u32>,
    /// `_EARLY_LONG=N`: the same for rows over 4096 elements (default: as `_EARLY`).
    early_long: Option<u32>,
    /// `_MIN_STAGES`: only steps of at least this many stages (default 64: a small matrix,
    /// most blocks idle after quantizing x, does better on `gemv_quant`; Q4_K_M 1437/1431
    /// tok/s with 64 vs 1424 with 0, where Llama-1B's 512-row v goes back to `gemv_quant`,
    /// Q8_0 1289/1283 vs 1273/1277; SmolLM2-135M Q4_1 decode, whose 576-row down
    /// projection was the only step it took, 1220/1217 with the kernel vs 1260/1252
    /// without).
    min_stages: u64,
    /// `_MAX_STAGES`: ... and at most this many (default 0: no limit; the output head,
    /// 8016 stages for Llama-1B, is no slower here than on `gemv_quant`'s counter tiles:
    /// Q4_K_M 1435/1437 tok/s vs 1414/1414 with 4096, Q8_0 1288/1288 vs 1283/1283).
    max_stages: u64,
    /// `_FIT`: blocks sized to share one SM, 2-4 (default 2; 3 would leave room for the
    /// next launch's block to start its stream early, but fewer stages in flight measured
    /// slower: Q4_K_M 1435/1441 tok/s with 2 vs 1381/1391 with 3, Q8_0 1258/1257 vs
    /// 1200/1201).
    fit: u32,
    /// `_REST=0`: Q8_0 steps issue their stages after the early ones once x is quantized,
    /// as the other dtypes do (by default they are issued as soon as x's loads are:
    /// Q8_0 tg128 1353/1354 tok/s vs 1315/1313; the same for Q4_K_M gave 1379/1373 vs
    /// 1442/1437, and for bf16 843/841 vs 861/859, so only Q8_0 has it: `mvp_q8_0_rest`).
    rest: bool,
}

fn mvq_knobs() -> &'static MvqKnobs {
    static K: std::sync::OnceLock<MvqKnobs> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let num = |name: &str| env_num(&format!("SAMEPAGE_CUDA_MVQ_{name}"));
        let rw = |name: &str| num(name).map_or(2, |v| v.clamp(1, 2) as u32);
        MvqKnobs {
            on: std::env::var("SAMEPAGE_CUDA_MVQ").as_deref() != Ok("0"),
            stages: num("STAGES").unwrap_or(8).clamp(2, crate::kernels::MVP_SMAX as u64) as u32,
            bps: num("BPS").unwrap_or(2).clamp(1, 4),
            bps_long: num("BPS_LONG").unwrap_or(2).clamp(1, 4),
            rw: rw("RW"),
            rw_long: rw("RW_LONG"),
            early: num("EARLY").map(|v| v.min(64) as u32),
            early_long: num("EARLY_LONG").map(|v| v.min(64) as u32),
            min_stages: num("MIN_STAGES").unwrap_or(64),
            max_stages: num("MAX_STAGES").unwrap_or(0),
            fit: num("FIT").map_or(2, |v| v.clamp(2, 4) as u32),
            rest: num("REST") != Some(0),
        }
    })
}

/// The pipelined matvec (`mvp_body` in cu/mvp.cu) for matvecs `ms` (with the rmsnorm
/// before them and the swiglu after them fused, if given): the descriptor, the kernel,
/// the blocks and the dynamic shared memory. `None` where it does not apply: switched
/// off, below sm_90, matrices of different dtypes or lengths, a dtype or row length
/// without a part shape (`mvp_shape`, `mvq_shape`), anything not 16-byte aligned, or
/// gate/up pairs with an odd number of rows per stage.
fn mvp_plan<'k>(
    k: &'k Kernels,
    base: u64,
    ms: &[abi::Matmul],
    norm: Option<abi::RmsNorm>,
    sw: Option<abi::SwiGlu>,
    nw_fixed: bool,
) -> Option<(MvPipe, &'k CudaFunction, u64, u32)> {
    let (on, stages, bps, pair) = mvp_knobs();
    let m0 = *ms.first()?;
    if !on || ms.len() > 3 || !ms.iter().all(|m| m.k == m0.k) {
        return None;
    }
    let dt = DType::from_u32(m0.dtype)?;
    // Two dtypes: the matrices from `mix` on are of `dt2` (a kernel of `MVQ_MIX`).
    let mix = ms.iter().position(|m| m.dtype != m0.dtype).unwrap_or(ms.len());
    let dt2 = match ms.get(mix) {
        None => dt,
        Some(m) if sw.is_none() && ms[mix..].iter().all(|x| x.dtype == m.dtype) => DType::from_u32(m.dtype)?,
        Some(_) => return None,
    };
    // Virtual rows before the second dtype (all of them with one).
    let before: u64 = ms[..mix].iter().map(|m| m.m as u64).sum();
    // (kernel, J, P, R, stage bytes, x and norm weight bytes in shared memory, stages,
    // blocks per SM)
    let (f, j, p, r, sb, xb, stages, bps) = match dt {
        DType::F16 | DType::BF16 if dt2 == dt => {
            let (j, p) = mvp_shape(m0.k)?;
            let di = (dt == DType::BF16) as usize;
            let f = k.mvp.get(di * 8 + j as usize - 1)?.as_ref()?;
            let r = 8 / p;
            let xb = m0.k * 4 * (1 + norm.is_some() as u32);
            (f, j, p, r, r * p * 32 * j * 16, xb, stages, bps)
        }
        _ => {
            let q = mvq_knobs();
            if !q.on {
                return None;
            }
            let p = mvq_shape(dt, m0.k)?;
            let f = if dt2 == dt && dt == DType::Q8_0 && q.rest && k.mvq_q8_0_rest.is_some() {
                k.mvq_q8_0_rest.as_ref()?
            } else if dt2 == dt {
                k.mvq.get(dt as usize)?.as_ref()?
            } else {
                (mvq_shape(dt2, m0.k)? == p).then_some(())?;
                k.mvq_mix.iter().find(|(a, b, _)| (*a, *b) == (dt, dt2))?.2.as_ref()?
            };
            let rb = dt.row_bytes(m0.k as usize)?.max(dt2.row_bytes(m0.k as usize)?) as u32;
            let long = m0.k > 4096;
            let r = 8 * if long { q.rw_long } else { q.rw } / p;
            let rows: u64 = ms.iter().map(|m| m.m as u64).sum();
            let nst = rows.div_ceil(r as u64);
            if nst < q.min_stages || (q.max_stages > 0 && nst > q.max_stages) {
                return None;
            }
            // A stage is of one dtype: the rows before the second start at a stage.
            if mix < ms.len() && !before.is_multiple_of(r as u64) {
                return None;
            }
            let bps = if long { q.bps_long } else { q.bps };
            (f, 1, p, r, r * rb + 16, mvq_x_bytes(m0.k), q.stages, bps)
        }
    };
    if sw.is_some() && (ms.len() != 2 || !r.is_multiple_of(2)) {
        return None;
    }
    if !mv_aligned(base, ms, norm) {
        return None;
    }
    let mut g = MvPipe::new(ms, p, r, norm, sw)?;
    g.vmix = u32::try_from(before).ok()?;
    let rows = g.rend[ms.len() - 1] as u64;
    // With the rmsnorm, block b < J * P also writes segment b (256 elements) of its
    // output, so there are at least J * P blocks (a block past the last stage does only that).
    let least = if norm.is_some() { (j * p) as u64 } else { 1 };
    let blocks = (k.sms.max(1) as u64 * bps).min(rows.div_ceil(r as u64)).max(least);
    // Stages per block (at most).
    let per_block = rows.div_ceil(r as u64).div_ceil(blocks) as u32;
    let pre = g.pre != 0;
    // The stages, x (and the norm weight) as f32, the rows' bias / old values: as many
    // stages as the knob asks, but no more than let two blocks share an SM (so the next
    // launch's blocks start streaming before this one's end), and at least 2.
    let fixed = xb + pre as u32 * per_block * r * 4;
    // Quantized: as many as let `MvqKnobs::fit` blocks share an SM (their static shared
    // memory is 128 bytes over the dense kernels').
    let share = if quantized(dt) {
        k.mvp_share(mvq_knobs().fit, 128)
    } else {
        k.mvp_share(2, 0)
    };
    let fit = share.saturating_sub(fixed) / sb;
    g.stages = if quantized(dt) {
        mvq_stages(stages, fit, per_block)
    } else if pair {
        stages.min(fit.max(2))
    } else {
        stages
    };
    g.early = if quantized(dt) {
        let q = mvq_knobs();
        let early = q.early.unwrap_or(if dt == DType::Q8_0 { 1 } else { 2 });
        if m0.k > 4096 {
            q.early_long.unwrap_or(early)
        } else {
            early
        }
    } else {
        mvp_early()
    }
    .min(g.stages);
    // `SAMEPAGE_CUDA_MVP_NW_EARLY=0`: the norm weight is read after the wait, with x.
    static NW_EARLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let nw_early = *NW_EARLY.get_or_init(|| env_num("SAMEPAGE_CUDA_MVP_NW_EARLY") != Some(0));
    g.nw_early = (nw_fixed && nw_early) as u32;
    let smem = g.stages * sb + fixed;
    if smem > k.mvp_smem || g.stages as usize > crate::kernels::MVP_SMAX as usize {
        return None;
    }
    Some((g, f, blocks, smem))
}

/// `struct MegaPhase` of `cu/mega.cu`: one step of the decode megakernel, a matvec step
/// (`kind` 0, `mv`) or a fused attention step (1, `at` with the launch's `aux`), with the
/// step's op index and per-token slot map.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct MegaPhase {
    pub kind: u32,
    pub op: u32,
    pub tmap: u32,
    pub aux: u32,
    pub f16: u32,
    pad: [u32; 3],
    mv: MvPipe,
    at: RopeKvAttn,
    tail: u32,
}
// SAFETY: #[repr(C)] of 4-byte scalars, no padding.
unsafe impl samepage_abi::Pod for MegaPhase {}
// The kernel's `static_assert` checks the same size.
const _: () = assert!(std::mem::size_of::<MegaPhase>() == 912);

/// `struct Mega` of `cu/mega.cu`: the phases and the barrier words (device addresses).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Mega {
    pub ph: u64,
    pub bar: u64,
    pub n: u32,
    pub pad: u32,
}
// SAFETY: #[repr(C)]: two u64 then two u32, no padding.
unsafe impl samepage_abi::Pod for Mega {}

/// Most rows' old values a block of the megakernel holds in a phase (`MG_PREV`), and the
/// longest x (`MG_XMAX`).
const MG_PREV: u64 = 1024;
const MG_XMAX: u32 = 8192;

/// Whether the matrices' W and x and the rmsnorm's x, weight and out are 16-byte aligned
/// (the pipelined kernels' bulk copies and vector loads).
fn mv_aligned(base: u64, ms: &[abi::Matmul], norm: Option<abi::RmsNorm>) -> bool {
    let al = |off: u32| (base + off as u64).is_multiple_of(16);
    ms.iter().all(|m| al(m.w) && al(m.x)) && norm.is_none_or(|n| al(n.x) && al(n.weight) && al(n.out))
}

/// A [`MvStep`]'s parts (`ops`: exactly its ops): its matmuls, the rmsnorm before them and
/// the swiglu after them, where it has them.
fn mv_parts(ops: &[Op], s: MvStep) -> (Vec<abi::Matmul>, Option<abi::RmsNorm>, Option<abi::SwiGlu>) {
    let off = s.norm as usize;
    let norm = match ops[0] {
        Op::RmsNorm(r) if s.norm => Some(r),
        _ => None,
    };
    let sw = match ops.get(off + 2) {
        Some(Op::SwiGlu(x)) if s.swiglu => Some(*x),
        _ => None,
    };
    (matmuls(&ops[off..off + s.len]), norm, sw)
}

/// A [`MvStep`] as a megakernel phase, for `blocks` blocks: f16 or bf16 W of one dtype
/// (`dt`), the `mvp` shape with 8 chunks a lane and P of 1, 2 or 4 parts a row (a stage of
/// 8 / P rows is one 32 KiB ring slot), x within `MG_XMAX` floats, everything 16-byte aligned,
/// a fixed norm weight. `None` otherwise.
pub(crate) fn mega_mv_phase(base: u64, ops: &[Op], s: MvStep, dt: DType, blocks: u32) -> Option<MegaPhase> {
    let (ms, norm, sw) = mv_parts(ops, s);
    let m0 = *ms.first()?;
    if !s.w_fixed || (s.norm && !s.nw_fixed) || ms.len() > 3 || blocks < 32 {
        return None;
    }
    if !ms.iter().all(|m| m.k == m0.k && m.dtype == dt as u32 && m.n == 1) {
        return None;
    }
    let (j, p) = mvp_shape(m0.k)?;
    if j != 8 || !matches!(p, 1 | 2 | 4) || m0.k > MG_XMAX || (sw.is_some() && ms.len() != 2) {
        return None;
    }
    if !mv_aligned(base, &ms, norm) {
        return None;
    }
    let r = 8 / p;
    let mut g = MvPipe::new(&ms, p, r, norm, sw)?;
    let rows = g.rend[ms.len() - 1] as u64;
    g.vmix = rows as u32;
    if g.pre != 0 && rows.div_ceil(r as u64).div_ceil(blocks as u64) * r as u64 > MG_PREV {
        return None;
    }
    Some(MegaPhase {
        mv: g,
        ..Default::default()
    })
}

/// Fused attention ops ([`rope_kv_attn_fusable`]) as a megakernel phase for `blocks`
/// blocks: cache rows aligned for the vector loads, split-merge counters, and no more
/// (KV head, split) units than blocks. `None` otherwise.
pub(crate) fn mega_attn_phase(c: &KCtx, ops: &[Op], blocks: u32) -> Option<MegaPhase> {
    let [Op::Rope(q), Op::Rope(kr), Op::KvStore(s), Op::Attention(a)] = *ops else {
        return None;
    };
    // The words are read before the phase's barrier (after the launch's own wait).
    let (splits, aux, f16) = rka_aux(c, &a, true)?;
    if splits as u64 * a.n_kv_heads as u64 > blocks as u64 {
        return None;
    }
    Some(MegaPhase {
        kind: 1,
        aux,
        f16: f16 as u32,
        at: RopeKvAttn::new(q, kr, s, a),
        ..Default::default()
    })
}

/// Enqueue a [`MvStep`] (`ops`: exactly its ops): one pipelined launch where it applies
/// (and W is fixed), else its parts as before: the rmsnorm, the matvec group (or the
/// gate/up/swiglu path), one after the other.
pub(crate) fn launch_mv(k: &Kernels, stream: &CudaStream, c: KCtx, ops: &[Op], s: MvStep) -> Result<(), OpError> {
    let off = s.norm as usize;
    let (ms, norm, sw) = mv_parts(ops, s);
    if s.w_fixed {
        if let Some((g, f, blocks, smem)) = mvp_plan(k, c.base, &ms, norm, sw, s.nw_fixed) {
            let mut lc = cfg(blocks, 256)?;
            lc.shared_mem_bytes = smem;
            go(stream, f, c, g, lc, "matvec")?;
            crate::count_pipelined();
            return Ok(());
        }
    }
    // A group of two dtypes that the pipelined matvec did not take: the first dtype's
    // matrices (with the rmsnorm), then the rest, as two steps.
    if let Some(mix) = ms.iter().position(|m| m.dtype != ms[0].dtype) {
        let first = MvStep {
            len: mix,
            swiglu: false,
            ..s
        };
        launch_mv(k, stream, c, &ops[..first.ops()], first)?;
        let rest = MvStep {
            at: s.at + first.ops(),
            norm: false,
            len: s.len - mix,
            swiglu: false,
            ..s
        };
        let c2 = KCtx {
            op: c.op + first.ops() as u32,
            ..c
        };
        return launch_mv(k, stream, c2, &ops[first.ops()..first.ops() + rest.ops()], rest);
    }
    // Quantized: the rmsnorm inside the group's launch where it fits, else on its own.
    let nm = quant_norm(c.base, norm, &ms);
    let mut c1 = c;
    if s.norm {
        if nm.is_none() {
            launch_op(k, stream, c, &ops[0])?;
        }
        c1.op += 1;
    }
    let _early = EarlyScope::new(s.w_fixed);
    let mv = &ops[off..];
    if s.swiglu {
        launch_matvecs_swiglu(k, stream, c1, &mv[..3], nm)
    } else if s.len >= 2 || nm.is_some() {
        launch_matvec_group(k, stream, c1, &mv[..s.len], nm)
    } else {
        launch_op(k, stream, c1, &mv[0])
    }
}

pub(crate) fn go<T: samepage_abi::Pod>(
    stream: &CudaStream,
    f: &CudaFunction,
    c: KCtx,
    d: T,
    lc: LaunchConfig,
    name: &str,
) -> Result<(), OpError> {
    let d = D(d);
    if crate::kernels::pdl() && PDL_NOW.with(|p| p.get()) {
        return launch_pdl(stream, f, c, d, lc, name);
    }
    let mut b = stream.launch_builder(f);
    b.arg(&c).arg(&d);
    // SAFETY: the op was validated against the region; kernels index only inside the
    // validated tensors and check per-token values they read.
    unsafe { b.launch(lc) }.map(|_| ()).map_err(|e| cuda_err(name, e))
}

thread_local! {
    /// Set while capturing a single-token (decode) graph: its launches use programmatic
    /// dependent launch. Prefill graphs and immediate ops launch plainly (PDL measured
    /// 27% slower pp512 there: early-launched blocks wait on SM slots the GEMMs need).
    static PDL_NOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `MV_EARLY` (matmul.cu) for a quantized single-token matvec launched now: in a PDL
/// capture, inside an [`EarlyScope`] (a matvec step whose W no op of the graph writes),
/// unless `SAMEPAGE_CUDA_QMV_EARLY=0`; with the chunks per warp issued before the wait in
/// aux bits 24-27 (0: the kernel's `QEARLY`, 2). `SAMEPAGE_CUDA_QMV_EARLY=N` (1-15) sets
/// them for every dtype; by default Q8_0 issues 4 (H100, tg128, interleaved in one call:
/// Q8_0 1202/1200 tok/s with 4 vs 1176/1175 with 2 and 1163/1160 with 1; Q4_K_M
/// 1272/1267 with 4 vs 1283/1271 with 2, so the K-quants keep 2).
fn early_bit(dtype: u32) -> u32 {
    static ON: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| match env_num("SAMEPAGE_CUDA_QMV_EARLY") {
        Some(0) => None,
        Some(n) => Some(n.min(15) as u32),
        None => Some(0),
    });
    let dt = DType::from_u32(dtype);
    let now = crate::kernels::pdl() && PDL_NOW.with(|p| p.get()) && EARLY_NOW.with(|p| p.get());
    match (on, dt) {
        (Some(n), Some(dt)) if quantized(dt) && now => {
            let n = if n == 0 && dt == DType::Q8_0 { 4 } else { n };
            MV_EARLY | n << 24
        }
        _ => 0,
    }
}

thread_local! {
    /// Set while enqueueing the parts of a matvec step whose W is fixed (`launch_mv`).
    static EARLY_NOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Quantized matvecs enqueued while this lives (on this thread) may read W before their
/// PDL wait (`early_bit`), if `on`.
struct EarlyScope(bool);

impl EarlyScope {
    fn new(on: bool) -> EarlyScope {
        EarlyScope(EARLY_NOW.with(|p| p.replace(on)))
    }
}

impl Drop for EarlyScope {
    fn drop(&mut self) {
        EARLY_NOW.with(|p| p.set(self.0));
    }
}

/// `MV_PREFETCH` (matmul.cu) for a single-token matvec launched now: in a PDL capture
/// (where the block starts before the previous kernel ends), with
/// `SAMEPAGE_CUDA_PREFETCH=1`. Off by default: measured 4-5% slower bf16 decode on both an
/// H100 (tg128 668-672 vs 701-703 tok/s) and an H200 (762-773 vs 806).
fn prefetch_bit() -> u32 {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("SAMEPAGE_CUDA_PREFETCH").as_deref() == Ok("1"));
    if on && crate::kernels::pdl() && PDL_NOW.with(|p| p.get()) {
        256
    } else {
        0
    }
}

/// Launches made while this lives (on this thread) use PDL, if `on` and the device has it.
pub(crate) struct PdlScope(bool);

impl PdlScope {
    pub(crate) fn new(on: bool) -> PdlScope {
        PdlScope(PDL_NOW.with(|p| p.replace(on)))
    }
}

impl Drop for PdlScope {
    fn drop(&mut self) {
        PDL_NOW.with(|p| p.set(self.0));
    }
}

/// Whether `op` works on one token (a decode step's op).
pub(crate) fn single_token(op: &Op) -> bool {
    match *op {
        Op::Embed(e) => e.n == 1,
        Op::RmsNorm(r) => r.n == 1,
        Op::Matmul(m) => m.n == 1,
        Op::Rope(r) => r.n == 1,
        Op::KvStore(s) => s.n == 1,
        Op::Attention(a) => a.n == 1,
        Op::Softmax(s) => s.rows == 1,
        Op::Argmax(s) => s.rows == 1,
        _ => true,
    }
}

/// Launch with programmatic stream serialization (sm_90+): the kernel may start launching
/// while the previous one on the stream finishes; every kernel begins with
/// `griddepcontrol.wait` (PDL_ENTER in common.cuh), so it reads nothing before the
/// previous grid has completed. In a captured graph this becomes a programmatic edge.
fn launch_pdl<T>(
    stream: &CudaStream,
    f: &CudaFunction,
    mut c: KCtx,
    mut d: D<T>,
    lc: LaunchConfig,
    name: &str,
) -> Result<(), OpError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the context", e))?;
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: lc.grid_dim.0,
        gridDimY: lc.grid_dim.1,
        gridDimZ: lc.grid_dim.2,
        blockDimX: lc.block_dim.0,
        blockDimY: lc.block_dim.1,
        blockDimZ: lc.block_dim.2,
        sharedMemBytes: lc.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut params: [*mut std::ffi::c_void; 2] = [
        &mut c as *mut KCtx as *mut std::ffi::c_void,
        &mut d as *mut D<T> as *mut std::ffi::c_void,
    ];
    // SAFETY: as in `go`; the parameters are the kernel's (Ctx, descriptor) by value,
    // read by the driver during this call.
    unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(|e| cuda_err(name, e))
}

fn elementwise_grid(len: u32) -> u64 {
    (len as u64).div_ceil(256).min(8192)
}

/// Enqueue one op on `stream`. `c` carries the region base, status and scratch.
pub(crate) fn launch_op(k: &Kernels, stream: &CudaStream, mut c: KCtx, op: &Op) -> Result<(), OpError> {
    // Only a 16-bit prefill GEMM (`prefill`) keeps the converted x; it re-checks itself.
    if !matches!(*op, Op::Matmul(m) if m.n >= crate::prefill::GEMM_MIN_N && k.blas.is_some()) {
        crate::prefill::forget_x();
    }
    if !supports(op) {
        return Err(OpError::unsupported(format!(
            "cuda: {} with these shapes is not supported",
            op.name()
        )));
    }
    match *op {
        Op::Embed(e) => go(
            stream,
            &k.embed,
            c,
            e,
            cfg(e.n as u64 * e.dim.div_ceil(256) as u64, 256)?,
            "embed",
        ),
        Op::RmsNorm(r) => {
            // Threads for 8 elements each (the row in registers at once, see rmsnorm).
            let block = (r.dim.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024);
            go(stream, &k.rmsnorm, c, r, cfg(r.n as u64, block)?, "rmsnorm")
        }
        Op::Matmul(m) => {
            if m.n == 1 {
                let (aux, blocks) = matvec_aux(c.base, &m, m.m as u64, k.sms);
                let (aux, ring) = qmv_tma(k, &m, aux);
                let (aux, blocks) = qmv_dyn(k, &c, aux, blocks);
                c.aux = aux | prefetch_bit() | early_bit(m.dtype);
                let mut lc = cfg(blocks, 256)?;
                lc.shared_mem_bytes = ring;
                go(stream, &k.matvec[m.dtype as usize], c, m, lc, "matvec")
            } else {
                // Prefill: tensor cores through cuBLAS (see `prefill`), else the tiled kernel.
                if crate::prefill::as_matvecs(&m) && k.blas.is_some() {
                    for t in 0..m.n {
                        launch_op(k, stream, c, &Op::Matmul(crate::prefill::per_token(&m, t)))?;
                    }
                    return Ok(());
                }
                if m.n >= crate::prefill::GEMM_MIN_N {
                    if let Some(b) = k.blas.as_ref() {
                        return b.matmul(k, stream, c, &m);
                    }
                }
                let mut lc = cfg((m.m as u64).div_ceil(64), 256)?;
                lc.grid_dim.1 = u32::try_from((m.n as u64).div_ceil(64))
                    .ok()
                    .filter(|&y| y <= 65535)
                    .ok_or_else(|| OpError::unsupported("cuda: matmul with more than 4M rows of x"))?;
                go(stream, &k.matmul[m.dtype as usize], c, m, lc, "matmul")
            }
        }
        Op::Rope(r) => {
            let (hi, lo) = freq_table(&r);
            go(stream, &k.rope, c, RopeT { r, hi, lo }, cfg(r.n as u64, 256)?, "rope")
        }
        Op::KvStore(s) => go(
            stream,
            &k.kv_store,
            c,
            s,
            cfg(s.n as u64 * s.n_kv_heads as u64, 128)?,
            "kv_store",
        ),
        Op::Attention(a) => {
            // Prefill: the tiled kernel (`prefill::attention`) where it applies.
            if crate::prefill::attention(k, stream, c, &a)? {
                return Ok(());
            }
            let s = attention_splits(&a);
            let blocks = a.n as u64 * a.n_heads as u64;
            // The last split to finish merges (counters), else a combine launch.
            let fused = c.counters != 0 && blocks + RESERVED_COUNTERS as u64 <= COUNTERS as u64;
            // Its chunks are >= 128 positions: fewer splits (<= `attention_splits`, which
            // sizes the scratch), so idle blocks don't each read the pos word.
            let sd = a.ctx.div_ceil(128).clamp(1, 64);
            if let Some(f16) = attention_dec_fits(c.base, &a).filter(|_| sd == 1 || fused) {
                c.aux = sd | (fused as u32) << 16;
                let f = &k.attention_dec[f16 as usize];
                return go(stream, f, c, a, cfg(blocks * sd as u64, 128)?, "attention");
            }
            c.aux = s | (fused as u32) << 16;
            go(stream, &k.attention, c, a, cfg(blocks * s as u64, 128)?, "attention")?;
            if s > 1 && !fused {
                go(
                    stream,
                    &k.attention_combine,
                    c,
                    a,
                    cfg(blocks, 64)?,
                    "attention_combine",
                )?;
            }
            Ok(())
        }
        Op::SwiGlu(s) => go(stream, &k.swiglu, c, s, cfg(elementwise_grid(s.len), 256)?, "swiglu"),
        Op::Add(s) => go(stream, &k.add, c, s, cfg(elementwise_grid(s.len), 256)?, "add"),
        Op::Scale(s) => go(stream, &k.scale, c, s, cfg(elementwise_grid(s.len), 256)?, "scale"),
        Op::Softmax(s) => go(stream, &k.softmax, c, s, cfg(s.rows as u64, 1024)?, "softmax"),
        Op::Argmax(s) => go(stream, &k.argmax, c, s, cfg(s.rows as u64, 1024)?, "argmax"),
        Op::Sample(s) => {
            // Greedy sampling spreads the argmax over blocks of 8192 logits (at most 64)
            // and merges in the last (a counter, scratch for the partials): the grid is
            // fixed at record time, the path is chosen on the device from the params.
            let blocks = if c.counters != 0 && c.scratch != 0 {
                s.vocab.div_ceil(8192).clamp(1, 64)
            } else {
                1
            };
            go(stream, &k.sample, c, s, cfg(blocks as u64, 1024)?, "sample")
        }
    }
}

#[cfg(test)]
mod tests {
    use samepage_abi::DType;

    /// `gemv_quant` holds rows-per-block x warps-per-row partial sums in `part[512]`, and
    /// every warp of a block gets rows: the plan stays inside both.
    #[test]
    fn quant_plan_fits_the_kernel() {
        for dt in [DType::Q8_0, DType::Q4_K] {
            for k in [32, 256, 576, 2048, 8192, 14336] {
                for rows in [1u64, 7, 67, 2048, 3072, 16384, 128256] {
                    if k % dt.block_elems() != 0 {
                        continue;
                    }
                    let (per, ls) = super::quant_plan(dt, k as u32, rows);
                    assert!((1..=64).contains(&per) && ls <= 3, "{dt:?} k={k} rows={rows}");
                    assert!(
                        per * (1 << ls) <= 512 && per % (8 >> ls) == 0,
                        "{dt:?} k={k} rows={rows}"
                    );
                }
            }
        }
        // The Llama-1B shapes: one wave of ~2 blocks per SM, a warp per row.
        assert_eq!(super::quant_plan(DType::Q4_K, 8192, 2048), (8, 0));
        assert_eq!(super::quant_plan(DType::Q8_0, 2048, 16384), (64, 0));
    }

    /// The quantized pipelined matvec's parts: at most 64 units a part, whole blocks,
    /// rows of 16-byte multiples, k <= 8192; x's shared memory as `XQ` lays it out.
    #[test]
    fn mvq_shapes() {
        assert_eq!(super::mvq_shape(DType::Q4_K, 2048), Some(1));
        assert_eq!(super::mvq_shape(DType::Q4_K, 8192), Some(2));
        assert_eq!(super::mvq_shape(DType::Q8_0, 2048), Some(1));
        assert_eq!(super::mvq_shape(DType::Q8_0, 8192), Some(4));
        assert_eq!(super::mvq_shape(DType::Q6_K, 2048), Some(1));
        assert_eq!(super::mvq_shape(DType::Q4_0, 2048), Some(1));
        // Rows of 1260 and 360 bytes (no bulk copies), k over 8192, not a dtype it decodes.
        assert_eq!(super::mvq_shape(DType::Q6_K, 1536), None);
        assert_eq!(super::mvq_shape(DType::Q4_1, 576), None);
        assert_eq!(super::mvq_shape(DType::Q8_0, 16384), None);
        assert_eq!(super::mvq_shape(DType::BF16, 2048), None);
        // The seven quantized dtypes `QUnit` decodes; every shape given fits the kernel.
        let decoded: Vec<DType> = DType::ALL
            .into_iter()
            .filter(|&d| super::mvq_dtype(d as u32).is_some())
            .collect();
        assert_eq!(decoded.len(), 7);
        for dt in decoded {
            for k in (256..=8192).step_by(256) {
                if let Some(p) = super::mvq_shape(dt, k) {
                    let unit = super::mvq_dtype(dt as u32).unwrap();
                    assert!([1, 2, 4, 8].contains(&p) && (k / p) % dt.block_elems() as u32 == 0);
                    assert!((k / unit).div_ceil(p) <= 64, "{dt:?} k={k}");
                }
            }
        }
        assert_eq!(super::mvq_x_bytes(2048), (256 + 32) * 16 + 64 * 4 + 128 * 4);
    }

    /// Stage buffers of the quantized pipelined matvec: two blocks of Llama-1B's Q6_K down
    /// projection (2048 rows of k = 8192 over 264 blocks: one stage each) share an H100 SM.
    #[test]
    fn mvq_stage_buffers() {
        let (k, rows, blocks) = (8192u32, 2048u32, 264u32);
        let p = super::mvq_shape(DType::Q6_K, k).unwrap();
        let r = 16 / p;
        let sb = r * DType::Q6_K.row_bytes(k as usize).unwrap() as u32 + 16;
        let per_block = rows.div_ceil(r).div_ceil(blocks);
        let share = 233_472 / 2 - (1024 + 256 + 128); // H100: 228 KiB an SM, two blocks
        let fixed = super::mvq_x_bytes(k) + per_block * r * 4;
        let n = super::mvq_stages(8, (share - fixed) / sb, per_block);
        assert_eq!((per_block, n), (1, 1));
        assert!(fixed + n * sb <= share);
        // Where the block has more stages than fit, as many as fit, and at least one.
        assert_eq!(super::mvq_stages(8, 3, 4), 3);
        assert_eq!(super::mvq_stages(8, 0, 4), 1);
        assert_eq!(super::mvq_stages(2, 5, 4), 2);
    }

    /// A pipelined matvec's descriptor: the matrices' rows concatenated, the fused norm
    /// and swiglu, `pre` when one matrix accumulates; rows past u32 refused.
    #[test]
    fn mv_pipe_descriptor() {
        let mm = |m, flags| samepage_abi::Matmul {
            m,
            k: 2048,
            flags,
            ..Default::default()
        };
        let g = super::MvPipe::new(&[mm(2048, 0), mm(512, 0), mm(512, 0)], 1, 8, None, None).unwrap();
        assert_eq!(
            (g.count, g.rend, g.pre, g.pair, g.norm),
            (3, [2048, 2560, 3072], 0, 0, 0)
        );
        let sw = samepage_abi::SwiGlu {
            out: 64,
            ..Default::default()
        };
        let n = samepage_abi::RmsNorm {
            x: 16,
            weight: 32,
            out: 48,
            eps: 1e-5,
            ..Default::default()
        };
        let g = super::MvPipe::new(&[mm(8192, 0), mm(8192, 0)], 1, 8, Some(n), Some(sw)).unwrap();
        assert_eq!(
            (g.rend[1], g.pair, g.sw_out, g.norm, g.nx, g.nw, g.nout),
            (16384, 1, 64, 1, 16, 32, 48)
        );
        let g = super::MvPipe::new(&[mm(2048, samepage_abi::MATMUL_ACCUMULATE)], 4, 2, None, None).unwrap();
        assert_eq!((g.pre, g.p, g.r), (1, 4, 2));
        assert!(super::MvPipe::new(&[mm(u32::MAX, 0), mm(2, 0)], 1, 8, None, None).is_none());
    }

    /// The pipelined matvec's part shapes: k = 256 J P with J <= 8 registers' worth of x
    /// per lane and the fewest parts; none where k has no such split.
    #[test]
    fn mvp_shapes() {
        assert_eq!(super::mvp_shape(2048), Some((8, 1)));
        assert_eq!(super::mvp_shape(8192), Some((8, 4)));
        assert_eq!(super::mvp_shape(1536), Some((6, 1)));
        assert_eq!(super::mvp_shape(4608), Some((6, 3)));
        assert_eq!(super::mvp_shape(256), Some((1, 1)));
        for k in [0, 576, 960, 100, 256 * 81] {
            assert_eq!(super::mvp_shape(k), None, "k = {k}");
        }
        for k in (256..=16384).step_by(256) {
            if let Some((j, p)) = super::mvp_shape(k) {
                assert!(256 * j * p == k && (1..=8).contains(&j) && (1..=8).contains(&p));
            }
        }
    }
}
