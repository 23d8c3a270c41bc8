//! Prefill: matmul with n > 1 through cuBLAS on tensor cores, and tiled causal attention.
//!
//! **GEMM.** `out (n, m) (+)= x (n, k) · W (m, k)^T (+ bias)` is, column-major, `C (m, n)
//! = op_T(A) · B` with A = W as stored (k x m, lda = k), B = x (k x n), C = out (ldc = m).
//! - BF16 W: x is rounded to bf16 into scratch, then `cublasGemmEx` bf16 x bf16 -> f32,
//!   `CUBLAS_COMPUTE_32F` (PyTorch's bf16 numerics). F16 W: the same in f16. F32 W:
//!   `cublasSgemm` on x and W in place (default math mode: no TF32).
//! - Quantized W (and F16/BF16 rows that are not 8-byte aligned; 8-byte aligned
//!   safetensors data is read in place): rows are dequantized to f16 (copied as they are for
//!   F16/BF16) into scratch by `gemm_w_<dtype>` (cu/gemm.cu, `dq_elem`'s arithmetic) in
//!   chunks of at most [`W_CHUNK_BYTES`], one GEMM per chunk; x goes to f16 (llama.cpp's
//!   cuBLAS path does the same).
//! - x is converted in chunks of at most [`X_CHUNK_BYTES`] rows of x (each 16-bit row
//!   padded to a multiple of 8 elements, so every row is 16-byte aligned).
//! - The bias is one elementwise launch after the GEMM(s); `MATMUL_ACCUMULATE` is beta = 1.
//! - Quantized W with n <= [`MATVEC_MAX_N`] runs as n single-token matvecs instead (exact).
//! - Precision: every product is of 16-bit-rounded inputs, summed in f32: relative error
//!   per output about `2^-8` (bf16) or `2^-11` (f16) of `sum |x| |w|`. The old exact fp32
//!   tiled kernel stays for `SAMEPAGE_CUDA_GEMM=tiled` (A/B and precision checks) and
//!   serves every n > 1 matmul on GPUs older than sm_80.
//! - Capture: the handle's stream is the backend's stream and its workspace is set once
//!   ([`WORKSPACE_BYTES`]), so a GEMM is captured into a CUDA graph like any kernel and
//!   allocates nothing. The handle is used under the backend's enqueue lock (and its own
//!   mutex).
//!
//! **Attention** with n >= [`ATTENTION_PREFILL_MIN_N`] runs `attention_prefill_<64|128|256>`
//! (cu/attention_prefill.cu, head_dim rounded up) on tensor cores, flash-attention style:
//! blocks of 64 (query, group head) rows of one KV head (16 per warp) share K/V tiles of 64
//! positions (32 for head_dim > 128) in shared memory, double buffered; S = Q K^T and
//! O += P V by `mma.sync` m16n8k16 on f16 inputs (q * scale, K, V, P each rounded to f16
//! once) with f32 accumulation and an f32 online softmax. Normwise error a few 2^-11.
//! `SAMEPAGE_CUDA_ATTN=simt` (and GPUs older than sm_80) runs the exact fp32 SIMT kernel
//! `attention_prefill_simt_<hdt>` instead (32-row blocks, 32-position tiles).
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use samepage_abi::{self as abi, DType};
use samepage_backend::OpError;

use crate::exec::{cuda_err, KCtx};
use crate::kernels::Kernels;

/// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;
/// The most scratch one chunk of 16-bit x takes.
pub(crate) const X_CHUNK_BYTES: usize = 32 << 20;
/// The most scratch one chunk of dequantized W rows takes (8192 x 2048 f16 is one chunk).
pub(crate) const W_CHUNK_BYTES: usize = 32 << 20;
/// Matmuls with at least this many rows of x use cuBLAS (when it is on).
pub(crate) const GEMM_MIN_N: u32 = 2;
/// Quantized matmuls with at most this many rows of x run as one single-token matvec per
/// row instead (W read from L2 after the first; no dequantized copy of W).
pub(crate) const MATVEC_MAX_N: u32 = 4;
/// Attention with at least this many queries uses the tiled prefill kernel: below it the
/// per-(query, head) kernel has more blocks to spread a long cache over.
pub(crate) const ATTENTION_PREFILL_MIN_N: u32 = 32;

/// How n > 1 matmuls run: `SAMEPAGE_CUDA_GEMM` = `cublas` (the default) or `tiled` (the
/// exact fp32 SIMT kernel, for A/B and precision checks).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum GemmMode {
    Cublas,
    Tiled,
}

pub(crate) fn gemm_mode() -> Result<GemmMode, String> {
    static MODE: OnceLock<Result<GemmMode, String>> = OnceLock::new();
    MODE.get_or_init(|| match std::env::var("SAMEPAGE_CUDA_GEMM").as_deref() {
        Ok("cublas") | Ok("") | Err(_) => Ok(GemmMode::Cublas),
        Ok("tiled") => Ok(GemmMode::Tiled),
        Ok(other) => Err(format!(
            "SAMEPAGE_CUDA_GEMM={other} is not a GEMM mode; use cublas or tiled"
        )),
    })
    .clone()
}

/// `(region base, scratch, x, k, n, bf16)` of a converted x.
type XKey = (u64, u64, u32, u32, u32, bool);

thread_local! {
    /// The x last converted to 16 bits in scratch while enqueueing: `(region base, scratch,
    /// x, k, n, bf16)`. q/k/v (and gate/up) of a prefill read one x: the first converts it,
    /// the others reuse the copy. Every other kind of launch forgets it ([`forget_x`]), so
    /// only back-to-back 16-bit GEMMs share a conversion; a GEMM never writes its own x
    /// (validated), and one that converts another x replaces the entry.
    static X_CACHE: std::cell::Cell<Option<XKey>> = const { std::cell::Cell::new(None) };
}

/// Forget the converted x (see `X_CACHE`): at the start of a recording or an immediate
/// batch, and before any launch other than a 16-bit prefill GEMM.
pub(crate) fn forget_x() {
    X_CACHE.with(|c| c.set(None));
}

/// The alignment (bytes) at which 16-bit W is handed to cuBLAS in place.
fn w_align() -> usize {
    static A: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *A.get_or_init(|| match std::env::var("SAMEPAGE_CUDA_GEMM_W_ALIGN").as_deref() {
        Ok("16") => 16,
        _ => 8,
    })
}

/// How one n > 1 matmul of a 16-bit type is cut up (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Plan {
    /// Row length of the 16-bit copies (k rounded up to 8).
    ld: usize,
    /// Rows of x per chunk.
    nc: usize,
    /// Whether W goes through scratch, and its rows per chunk.
    copy_w: bool,
    mc: usize,
    /// Scratch bytes of the x chunk (W's chunk follows it).
    x_bytes: usize,
    w_bytes: usize,
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

impl Plan {
    /// `None` for F32 weights (Sgemm in place, no scratch).
    fn new(m: &abi::Matmul) -> Option<Plan> {
        let dt = DType::from_u32(m.dtype)?;
        if dt == DType::F32 {
            return None;
        }
        let (k, n, rows) = (m.k as usize, m.n as usize, m.m as usize);
        let ld = round_up(k, 8);
        let nc = (X_CHUNK_BYTES / (2 * ld)).clamp(1, n.max(1));
        // The region's base is page aligned, so the offset decides W's alignment.
        let dense = matches!(dt, DType::F16 | DType::BF16);
        // cuBLAS reads 16-bit W in place at 8-byte alignment (safetensors data is
        // usually 8-byte aligned); `SAMEPAGE_CUDA_GEMM_W_ALIGN=16` demands 16 (A/B).
        let al = w_align();
        let copy_w = !dense || !(m.w as usize).is_multiple_of(al) || !(2 * k).is_multiple_of(al);
        let mut mc = rows;
        if copy_w {
            mc = (W_CHUNK_BYTES / (2 * ld)).max(1);
            if mc >= 256 {
                mc -= mc % 128;
            }
            mc = mc.min(rows);
        }
        Some(Plan {
            ld,
            nc,
            copy_w,
            mc,
            x_bytes: round_up(nc * ld * 2, 256),
            w_bytes: if copy_w { round_up(mc * ld * 2, 256) } else { 0 },
        })
    }
}

/// Whether an n > 1 matmul runs as n single-token matvecs (cuBLAS mode, quantized W, few
/// rows of x): `launch_op` then launches `per_token(m, t)` for each row t.
pub(crate) fn as_matvecs(m: &abi::Matmul) -> bool {
    (2..=MATVEC_MAX_N).contains(&m.n)
        && DType::from_u32(m.dtype).is_some_and(|d| d.block_elems() > 1)
        && gemm_mode() == Ok(GemmMode::Cublas)
}

/// Row `t` of an n > 1 matmul as a single-token matmul (same W, bias and flags).
pub(crate) fn per_token(m: &abi::Matmul, t: u32) -> abi::Matmul {
    // Inside the validated x and out, so below 2^32.
    abi::Matmul {
        x: (m.x as u64 + t as u64 * m.k as u64 * 4) as u32,
        out: (m.out as u64 + t as u64 * m.m as u64 * 4) as u32,
        n: 1,
        ..*m
    }
}

/// Scratch an n > 1 matmul needs (0 where the tiled kernel, matvecs or Sgemm run it).
pub(crate) fn gemm_scratch_bytes(m: &abi::Matmul) -> usize {
    if m.n < GEMM_MIN_N || gemm_mode() != Ok(GemmMode::Cublas) || as_matvecs(m) {
        return 0;
    }
    Plan::new(m).map_or(0, |p| p.x_bytes + p.w_bytes)
}

/// A descriptor passed by value to the kernels of cu/gemm.cu and cu/attention_prefill.cu.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Arg<T>(T);
// SAFETY: ABI descriptors and the structs below are #[repr(C)] structs of 4-byte scalars.
unsafe impl<T: samepage_abi::Pod> DeviceRepr for Arg<T> {}

/// `struct GemmX` of cu/gemm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemmX {
    x: u32,
    k: u32,
    ld: u32,
    n0: u32,
    rows: u32,
}
// SAFETY: #[repr(C)] of u32s.
unsafe impl samepage_abi::Pod for GemmX {}

/// `struct GemmW` of cu/gemm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemmW {
    mm: abi::Matmul,
    r0: u32,
    rows: u32,
    ld: u32,
}
// SAFETY: #[repr(C)] of 4-byte scalars.
unsafe impl samepage_abi::Pod for GemmW {}

#[allow(clippy::too_many_arguments)]
fn launch<T: samepage_abi::Pod>(
    stream: &CudaStream,
    f: &CudaFunction,
    c: KCtx,
    d: T,
    threads: u64,
    block: u32,
    smem: u32,
    name: &str,
) -> Result<(), OpError> {
    let grid = u32::try_from(threads.div_ceil(block as u64))
        .ok()
        .filter(|&g| g > 0 && g < i32::MAX as u32)
        .ok_or_else(|| OpError::unsupported(format!("cuda: {name}: a launch of {threads} threads is too large")))?;
    let lc = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    };
    let d = Arg(d);
    let mut b = stream.launch_builder(f);
    b.arg(&c).arg(&d);
    // SAFETY: the op was validated against the region; the kernels index only inside
    // its validated tensors and the scratch sized by `scratch_bytes`.
    unsafe { b.launch(lc) }.map(|_| ()).map_err(|e| cuda_err(name, e))
}

fn i32_of(v: usize, what: &str) -> Result<i32, OpError> {
    i32::try_from(v).map_err(|_| OpError::unsupported(format!("cuda: matmul {what} {v} is past what cuBLAS takes")))
}

fn blas_err(what: &str, e: blas::CublasError) -> OpError {
    OpError::runtime(format!("cuda: cuBLAS {what} failed: {:?}", e.0))
}

struct Handle {
    h: bsys::cublasHandle_t,
    stream: sys::CUstream,
}
// SAFETY: a cuBLAS handle may be used from any thread, one at a time (the mutex).
unsafe impl Send for Handle {}

/// One cuBLAS handle per backend context, bound to the backend's stream, with its own
/// workspace.
pub(crate) struct Blas {
    ctx: Arc<CudaContext>,
    handle: Mutex<Handle>,
    workspace: u64,
}

impl Blas {
    /// `None` when n > 1 matmuls use the tiled kernel (`SAMEPAGE_CUDA_GEMM=tiled`, or a GPU
    /// older than sm_80, which has no bf16 GEMM).
    pub(crate) fn new(ctx: &Arc<CudaContext>, stream: &CudaStream) -> Result<Option<Blas>, String> {
        if gemm_mode()? == GemmMode::Tiled {
            return Ok(None);
        }
        let (major, _) = ctx
            .compute_capability()
            .map_err(|e| format!("compute capability: {e:?}"))?;
        if major < 8 {
            return Ok(None);
        }
        ctx.bind_to_thread()
            .map_err(|e| format!("binding the context: {e:?}"))?;
        let h = blas::create_handle().map_err(|e| format!("creating a cuBLAS handle: {:?}", e.0))?;
        // SAFETY: a fresh allocation, owned by the returned Blas (freed in Drop).
        let workspace = match unsafe { result::malloc_sync(WORKSPACE_BYTES) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: created above, unused.
                let _ = unsafe { blas::destroy_handle(h) };
                return Err(format!("allocating the cuBLAS workspace: {e:?}"));
            }
        };
        let b = Blas {
            ctx: ctx.clone(),
            handle: Mutex::new(Handle {
                h,
                stream: std::ptr::null_mut(),
            }),
            workspace,
        };
        b.bind(&mut b.handle.lock().unwrap_or_else(|e| e.into_inner()), stream)
            .map_err(|e| e.to_string())?;
        Ok(Some(b))
    }

    /// Point the handle at `stream` with our workspace (setting a stream resets cuBLAS's
    /// workspace to its own pool, which stream capture cannot use).
    fn bind(&self, h: &mut Handle, stream: &CudaStream) -> Result<(), OpError> {
        let s = stream.cu_stream();
        if h.stream == s {
            return Ok(());
        }
        // SAFETY: a live handle, the backend's stream, and our workspace of that size.
        unsafe {
            blas::set_stream(h.h, s as _).map_err(|e| blas_err("setting the stream", e))?;
            bsys::cublasSetWorkspace_v2(h.h, self.workspace as *mut c_void, WORKSPACE_BYTES)
                .result()
                .map_err(|e| blas_err("setting the workspace", e))?;
            bsys::cublasSetMathMode(h.h, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| blas_err("setting the math mode", e))?;
        }
        h.stream = s;
        Ok(())
    }

    /// Enqueue an n > 1 matmul (validated) on `stream`; `c.scratch` holds
    /// `gemm_scratch_bytes(m)` bytes.
    pub(crate) fn matmul(&self, k: &Kernels, stream: &CudaStream, c: KCtx, m: &abi::Matmul) -> Result<(), OpError> {
        let dt = DType::from_u32(m.dtype).ok_or_else(|| OpError::runtime("cuda: matmul with an unknown dtype"))?;
        let mut h = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.bind(&mut h, stream)?;
        let (mi, ki) = (i32_of(m.m as usize, "m")?, i32_of(m.k as usize, "k")?);
        let one = 1.0f32;
        let beta = if m.flags & abi::MATMUL_ACCUMULATE != 0 {
            1.0f32
        } else {
            0.0
        };
        let out = c.base + m.out as u64;
        let op_t = bsys::cublasOperation_t::CUBLAS_OP_T;
        let op_n = bsys::cublasOperation_t::CUBLAS_OP_N;
        match Plan::new(m) {
            None => {
                forget_x();
                // F32: Sgemm on x and W in place.
                // SAFETY: W (m x k), x (n x k) and out (n x m) are validated f32 tensors
                // of the region; the scalars are host values read during the call.
                unsafe {
                    blas::sgemm(
                        h.h,
                        op_t,
                        op_n,
                        mi,
                        i32_of(m.n as usize, "n")?,
                        ki,
                        &one,
                        (c.base + m.w as u64) as *const f32,
                        ki,
                        (c.base + m.x as u64) as *const f32,
                        ki,
                        &beta,
                        out as *mut f32,
                        mi,
                    )
                }
                .map_err(|e| blas_err("Sgemm", e))?;
            }
            Some(p) => {
                let bf = dt == DType::BF16;
                let ty = if bf {
                    bsys::cudaDataType::CUDA_R_16BF
                } else {
                    bsys::cudaDataType::CUDA_R_16F
                };
                let xs = c.scratch;
                let ws = c.scratch + p.x_bytes as u64;
                let rb = dt.row_bytes(m.k as usize).expect("validated shape") as u64;
                let ldi = i32_of(p.ld, "k")?;
                let (n, rows) = (m.n as usize, m.m as usize);
                let fx = if bf { &k.gemm_x_bf16 } else { &k.gemm_x_f16 };
                // x in one chunk: converted once for GEMMs back to back on the same x.
                let key = (c.base, xs, m.x, m.k, m.n, bf);
                let one_chunk = p.nc >= n;
                let cached = one_chunk && X_CACHE.with(|c| c.get()) == Some(key);
                X_CACHE.with(|c| c.set(one_chunk.then_some(key)));
                for n0 in (0..n).step_by(p.nc) {
                    let nr = p.nc.min(n - n0);
                    let g = GemmX {
                        x: m.x,
                        k: m.k,
                        ld: p.ld as u32,
                        n0: n0 as u32,
                        rows: nr as u32,
                    };
                    let cx = KCtx { scratch: xs, ..c };
                    if !cached {
                        launch(stream, fx, cx, g, (nr * p.ld / 8) as u64, 256, 0, "gemm_x")?;
                    }
                    for r0 in (0..rows).step_by(p.mc) {
                        let mr = p.mc.min(rows - r0);
                        let (a, lda) = if p.copy_w {
                            let g = GemmW {
                                mm: *m,
                                r0: r0 as u32,
                                rows: mr as u32,
                                ld: p.ld as u32,
                            };
                            let cw = KCtx { scratch: ws, ..c };
                            let f = &k.gemm_w[m.dtype as usize - 1];
                            launch(stream, f, cw, g, (mr * p.ld / 8) as u64, 256, 0, "gemm_w")?;
                            (ws, ldi)
                        } else {
                            (c.base + m.w as u64 + r0 as u64 * rb, ki)
                        };
                        let cp = out + 4 * (n0 as u64 * rows as u64 + r0 as u64);
                        // SAFETY: A (mr rows of lda, 16-bit), B (nr rows of ld in scratch)
                        // and C (an (nr, mr) block of out, row stride m) lie inside their
                        // validated tensors or the scratch; scalars are host values.
                        unsafe {
                            blas::gemm_ex(
                                h.h,
                                op_t,
                                op_n,
                                i32_of(mr, "m")?,
                                i32_of(nr, "n")?,
                                ki,
                                &one as *const f32 as *const c_void,
                                a as *const c_void,
                                ty,
                                lda,
                                xs as *const c_void,
                                ty,
                                ldi,
                                &beta as *const f32 as *const c_void,
                                cp as *mut c_void,
                                bsys::cudaDataType::CUDA_R_32F,
                                mi,
                                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )
                        }
                        .map_err(|e| blas_err("GemmEx", e))?;
                    }
                }
            }
        }
        drop(h);
        if m.flags & abi::MATMUL_BIAS != 0 {
            let threads = (m.n as u64 * m.m as u64).min(8192 * 256);
            launch(stream, &k.gemm_bias, c, *m, threads, 256, 0, "gemm_bias")?;
        }
        Ok(())
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let h = self.handle.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: ours; the backend synchronised its stream before dropping (graphs and
        // immediate runs wait for their work).
        unsafe {
            // Off the backend's stream first: it may be destroyed before this handle.
            let _ = blas::set_stream(h.h, std::ptr::null_mut());
            let _ = blas::destroy_handle(h.h);
            let _ = result::free_sync(self.workspace);
        }
    }
}

/// How prefill attention runs: `SAMEPAGE_CUDA_ATTN` = `mma` (tensor cores, the default
/// on sm_80+) or `simt` (the exact fp32 kernel, for A/B and precision checks).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AttnMode {
    Mma,
    Simt,
}

pub(crate) fn attn_mode() -> Result<AttnMode, String> {
    static MODE: OnceLock<Result<AttnMode, String>> = OnceLock::new();
    MODE.get_or_init(|| match std::env::var("SAMEPAGE_CUDA_ATTN").as_deref() {
        Ok("mma") | Ok("") | Err(_) => Ok(AttnMode::Mma),
        Ok("simt") => Ok(AttnMode::Simt),
        Ok(other) => Err(format!(
            "SAMEPAGE_CUDA_ATTN={other} is not an attention mode; use mma or simt"
        )),
    })
    .clone()
}

/// Dynamic shared memory of `attention_prefill_simt_<hdt>` (`APF_SMEM` in the .cu).
pub(crate) fn attention_prefill_smem(hdt: u32) -> u32 {
    const R: u32 = 32;
    const KT: u32 = 32;
    (R * hdt + KT * (hdt + 4) + KT * hdt + R * KT) * 4
}

/// Rows (query, group head) per block of `attention_prefill_<hdt>` (`APT_BM`).
const TC_ROWS: u32 = 64;

/// Dynamic shared memory of `attention_prefill_<hdt>` (`APT_SMEM16` / `APT_SMEM32` in the
/// .cu): f16 Q and double-buffered K, V tiles, plus an f32 staging tile for an F32 cache.
pub(crate) fn attention_prefill_tc_smem(hdt: u32, f32_cache: bool) -> u32 {
    let kt = if hdt <= 128 { 64 } else { 32 };
    let f16 = (TC_ROWS + 4 * kt) * (hdt + 8) * 2;
    if f32_cache {
        f16 + 2 * kt * hdt * 4
    } else {
        f16
    }
}

/// The head sizes `attention_prefill_<hdt>` is built for.
pub(crate) const ATTENTION_PREFILL_HDT: [u32; 3] = [64, 128, 256];

/// Enqueue a prefill attention with a tiled kernel; `false` when it does not apply (few
/// queries, or kernels whose shared memory the device could not grant).
pub(crate) fn attention(k: &Kernels, stream: &CudaStream, c: KCtx, a: &abi::Attention) -> Result<bool, OpError> {
    if a.n < ATTENTION_PREFILL_MIN_N || a.n_kv_heads == 0 {
        return Ok(false);
    }
    let Some(i) = ATTENTION_PREFILL_HDT.iter().position(|&h| a.head_dim <= h) else {
        return Ok(false);
    };
    let hdt = ATTENTION_PREFILL_HDT[i];
    let g = (a.n_heads / a.n_kv_heads) as u64;
    let rows = a.n as u64 * g;
    // Tensor cores where loaded and granted this cache's shared memory.
    let smem = attention_prefill_tc_smem(hdt, a.cache_dtype != DType::F16 as u32);
    if let Some((f, _)) = k
        .attention_prefill_tc
        .get(i)
        .and_then(|f| f.as_ref())
        .filter(|f| f.1 >= smem)
    {
        let threads = rows.div_ceil(TC_ROWS as u64) * a.n_kv_heads as u64 * 128;
        launch(stream, f, c, *a, threads, 128, smem, "attention_prefill")?;
        return Ok(true);
    }
    let Some(f) = k.attention_prefill[i].as_ref() else {
        return Ok(false);
    };
    let tiles = rows.div_ceil(32);
    launch(
        stream,
        f,
        c,
        *a,
        tiles * a.n_kv_heads as u64 * 128,
        128,
        attention_prefill_smem(hdt),
        "attention_prefill_simt",
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mm(dtype: DType, w: u32, m: u32, k: u32, n: u32) -> abi::Matmul {
        abi::Matmul {
            w,
            dtype: dtype as u32,
            m,
            k,
            n,
            ..Default::default()
        }
    }

    /// Scratch stays bounded (one x chunk + one W chunk) and chunks cover the matrices.
    #[test]
    fn gemm_plans() {
        // Aligned bf16: W in place, x of 512 tokens in one chunk.
        let p = Plan::new(&mm(DType::BF16, 4096, 8192, 2048, 512)).unwrap();
        assert!(!p.copy_w && p.nc == 512 && p.mc == 8192 && p.w_bytes == 0);
        assert_eq!(p.x_bytes, 512 * 2048 * 2);
        // 2-byte aligned bf16 rows, and quantized rows: through scratch, 8192 x 2048 in
        // one chunk, the output matrix in 16.
        let p = Plan::new(&mm(DType::BF16, 4098, 8192, 2048, 512)).unwrap();
        assert!(p.copy_w && p.mc == 8192);
        let p = Plan::new(&mm(DType::Q4_K, 0, 128256, 2048, 512)).unwrap();
        assert!(p.copy_w && p.mc == 8192 && p.w_bytes == W_CHUNK_BYTES);
        // Rows of a length not a multiple of 8 bytes: copied, padded to 8 elements; 8-byte
        // aligned rows stay in place.
        let p = Plan::new(&mm(DType::F16, 0, 33, 35, 5)).unwrap();
        assert!(p.copy_w && p.ld == 40);
        assert!(!Plan::new(&mm(DType::BF16, 4104, 33, 36, 5)).unwrap().copy_w);
        // Many tokens: x in chunks, never more than the caps.
        let p = Plan::new(&mm(DType::Q8_0, 0, 2048, 8192, 100_000)).unwrap();
        assert!(p.nc == 2048 && p.x_bytes <= X_CHUNK_BYTES && p.w_bytes <= W_CHUNK_BYTES);
        assert!(Plan::new(&mm(DType::F32, 0, 64, 64, 64)).is_none());
    }
}
