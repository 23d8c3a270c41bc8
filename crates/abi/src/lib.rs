//! The samepage guest ABI, version 1: shared, `no_std`, by the host and the guest.
//!
//! A guest imports functions from the module [`IMPORT_MODULE`] (`samepage`). Every
//! argument is a `u32` offset into the guest's own linear memory, which *is* the
//! backend's buffer. An op is a `#[repr(C)]` descriptor written into guest memory;
//! the guest passes its offset and length to [`imports::OP`]. The host copies the
//! descriptor out, validates every `(offset, length)` against the region, and only
//! then lets a kernel near it.
//!
//! Conventions, for every op:
//! - Tensors are addressed by byte offsets into guest memory. Activations are f32,
//!   row-major; `(n, k)` means `n` rows of `k` contiguous elements.
//! - f32/u32 tensors must be 4-byte aligned; weight tensors must be aligned to their
//!   block's natural alignment (2 bytes for f16/bf16 and the ggml block formats, 4 for f32).
//! - Values that change per token (positions, token ids, the sampler's RNG state,
//!   sampling parameters) are *read by the kernels from guest memory* at execution
//!   time, so a recorded graph replays unchanged.
//! - Elementwise ops may run in place (`out == input`, exactly); any other overlap of an
//!   output with an input is rejected.
//! - Status codes are `i32`: [`status::OK`] or a negative error; the reason can be read
//!   with [`imports::LAST_ERROR`].
#![no_std]

/// The version of this ABI. The guest exports [`exports::ABI_VERSION`] returning it,
/// and the host refuses a guest whose number differs.
pub const ABI_VERSION: u32 = 1;

/// The import module name.
pub const IMPORT_MODULE: &str = "samepage";

/// Names of the functions the host provides (module [`IMPORT_MODULE`]).
pub mod imports {
    /// `op(code: u32, desc: u32, desc_len: u32) -> i32`: run one op now (immediate mode),
    /// or record it when a graph is open.
    pub const OP: &str = "op";
    /// `graph_begin() -> i32`: start recording; ops are validated and recorded, not run.
    pub const GRAPH_BEGIN: &str = "graph_begin";
    /// `graph_end() -> i32`: finish recording; returns a graph id (>= 0) or an error.
    pub const GRAPH_END: &str = "graph_end";
    /// `submit(graph: u32) -> i32`: start a recorded graph. Until `wait`, the guest must
    /// not touch the tensors the graph reads or writes, and `memory.grow` is refused.
    pub const SUBMIT: &str = "submit";
    /// `wait(graph: u32) -> i32`: wait for a submitted graph; returns its status.
    /// Afterwards every device write is visible to the guest.
    pub const WAIT: &str = "wait";
    /// `graph_free(graph: u32) -> i32`.
    pub const GRAPH_FREE: &str = "graph_free";
    /// `last_error(buf: u32, cap: u32) -> i32`: copy the last error message (UTF-8) into
    /// `buf`, at most `cap` bytes; returns the full length of the message.
    pub const LAST_ERROR: &str = "last_error";
    /// `mem_hint(offset: u32, len: u32, kind: u32) -> i32`: say what a range is used
    /// for ([`crate::hint`]), so a backend can place it (GPU-resident weights, a
    /// host-resident range the guest touches every token). Advisory; never required.
    pub const MEM_HINT: &str = "mem_hint";
    /// `file_open(path: u32, path_len: u32) -> i32`: open a file the host granted
    /// (the model path, or a file inside the model directory); returns a handle >= 0.
    pub const FILE_OPEN: &str = "file_open";
    /// `file_size(handle: u32) -> i64`: size in bytes, or a negative status.
    pub const FILE_SIZE: &str = "file_size";
    /// `file_read(handle: u32, file_offset: u64, dst: u32, len: u32) -> i32`: read bytes
    /// straight into guest memory.
    pub const FILE_READ: &str = "file_read";
    /// `file_map(handle: u32, file_offset: u64, dst: u32, len: u32) -> i32`: place file
    /// bytes into guest memory without a second resident copy where the backend can
    /// (CPU: `mmap(MAP_FIXED|MAP_PRIVATE)` of the page-aligned part). `dst` and
    /// `file_offset` must be congruent modulo 4096. Falls back to a read.
    pub const FILE_MAP: &str = "file_map";
    /// `emit(kind: u32, ptr: u32, len: u32) -> i32`: hand output to the host (see
    /// [`crate::emit`]); a non-zero return asks the guest to stop generating.
    pub const EMIT: &str = "emit";
    /// `clock_ns() -> u64`: monotonic nanoseconds.
    pub const CLOCK_NS: &str = "clock_ns";
    /// `backend_name(buf: u32, cap: u32) -> i32`.
    pub const BACKEND_NAME: &str = "backend_name";
}

/// Names of the functions a guest exports.
pub mod exports {
    /// `samepage_abi_version() -> u32`.
    pub const ABI_VERSION: &str = "samepage_abi_version";
    /// The guest's memory 0 must be exported under this name.
    pub const MEMORY: &str = "memory";
}

/// Kinds of [`imports::EMIT`] output.
pub mod emit {
    /// Generated text (UTF-8, may be a partial stream).
    pub const TEXT: u32 = 0;
    /// A JSON message (progress, stats, responses).
    pub const JSON: u32 = 1;
    /// A log line.
    pub const LOG: u32 = 2;
}

/// Kinds of [`imports::MEM_HINT`].
pub mod hint {
    /// Read-only model weights: place on the device.
    pub const WEIGHTS: u32 = 0;
    /// Activations and the KV cache: device-resident, written by kernels.
    pub const DEVICE: u32 = 1;
    /// A small range the guest reads or writes every token (token ids, positions,
    /// sampled output): keep it host-resident, mapped for the device.
    pub const HOST: u32 = 2;
}

/// Status codes returned by imports.
pub mod status {
    pub const OK: i32 = 0;
    /// An `(offset, length)` is outside the guest memory.
    pub const OUT_OF_BOUNDS: i32 = -1;
    /// An offset or size computation overflowed.
    pub const OVERFLOW: i32 = -2;
    /// An offset is not aligned for its dtype.
    pub const MISALIGNED: i32 = -3;
    /// A dtype is unknown or not allowed for this operand.
    pub const BAD_DTYPE: i32 = -4;
    /// Shapes are zero, too large, or inconsistent.
    pub const BAD_SHAPE: i32 = -5;
    /// Unknown op code.
    pub const BAD_OP: i32 = -6;
    /// The descriptor length does not match the op.
    pub const BAD_DESCRIPTOR: i32 = -7;
    /// The call is not allowed in the current state (graph already open, submitted
    /// twice without a wait, memory.grow while in flight, ...).
    pub const BAD_STATE: i32 = -8;
    /// Unknown graph id or file handle.
    pub const BAD_HANDLE: i32 = -9;
    /// The backend does not support this op or dtype.
    pub const UNSUPPORTED: i32 = -10;
    /// A kernel found a bad per-token value at run time (e.g. a position past the
    /// cache, a token id past the vocabulary); it wrote nothing out of bounds.
    pub const RUNTIME: i32 = -11;
    /// File access failed or was denied.
    pub const IO: i32 = -12;
    /// An argument is invalid (e.g. a parameter out of range, overlapping operands).
    pub const BAD_ARGUMENT: i32 = -13;

    /// A short name for a status code.
    pub const fn name(code: i32) -> &'static str {
        match code {
            OK => "ok",
            OUT_OF_BOUNDS => "out of bounds",
            OVERFLOW => "overflow",
            MISALIGNED => "misaligned",
            BAD_DTYPE => "bad dtype",
            BAD_SHAPE => "bad shape",
            BAD_OP => "bad op",
            BAD_DESCRIPTOR => "bad descriptor",
            BAD_STATE => "bad state",
            BAD_HANDLE => "bad handle",
            UNSUPPORTED => "unsupported",
            RUNTIME => "runtime error",
            IO => "i/o error",
            BAD_ARGUMENT => "bad argument",
            _ => "unknown status",
        }
    }
}

/// Element types. Weights may be any of these; activations are [`DType::F32`];
/// token ids and positions are [`DType::U32`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names: Q4_K, not Q4K
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    Q8_0 = 3,
    Q4_0 = 4,
    Q4_1 = 5,
    Q5_0 = 6,
    Q4_K = 7,
    Q5_K = 8,
    Q6_K = 9,
    U32 = 10,
}

impl DType {
    pub const ALL: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::U32,
    ];

    /// The weight types a matmul/embedding accepts.
    pub const WEIGHTS: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ];

    pub const fn from_u32(v: u32) -> Option<DType> {
        Some(match v {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::Q8_0,
            4 => DType::Q4_0,
            5 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q4_K,
            8 => DType::Q5_K,
            9 => DType::Q6_K,
            10 => DType::U32,
            _ => return None,
        })
    }

    /// Elements per block (1 for plain types).
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::U32 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 => 32,
            DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
        }
    }

    /// Bytes per block, exactly as ggml lays them out.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,  // f16 d; i8 qs[32]
            DType::Q4_0 => 18,  // f16 d; u8 qs[16]
            DType::Q4_1 => 20,  // f16 d, m; u8 qs[16]
            DType::Q5_0 => 22,  // f16 d; u8 qh[4]; u8 qs[16]
            DType::Q4_K => 144, // f16 d, dmin; u8 scales[12]; u8 qs[128]
            DType::Q5_K => 176, // f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
            DType::Q6_K => 210, // u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
        }
    }

    /// Required byte alignment of a tensor of this type.
    pub const fn align(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            _ => 2,
        }
    }

    /// Bytes of one row of `cols` elements, or `None` if `cols` is not a whole number
    /// of blocks or the size overflows.
    pub const fn row_bytes(self, cols: usize) -> Option<usize> {
        let be = self.block_elems();
        if !cols.is_multiple_of(be) {
            return None;
        }
        (cols / be).checked_mul(self.block_bytes())
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q4_K => "q4_K",
            DType::Q5_K => "q5_K",
            DType::Q6_K => "q6_K",
            DType::U32 => "u32",
        }
    }
}

/// Op codes for [`imports::OP`]; each names its descriptor type.
pub mod op {
    /// [`crate::Embed`]
    pub const EMBED: u32 = 1;
    /// [`crate::RmsNorm`]
    pub const RMSNORM: u32 = 2;
    /// [`crate::Matmul`]
    pub const MATMUL: u32 = 3;
    /// [`crate::Rope`]
    pub const ROPE: u32 = 4;
    /// [`crate::KvStore`]
    pub const KV_STORE: u32 = 5;
    /// [`crate::Attention`]
    pub const ATTENTION: u32 = 6;
    /// [`crate::SwiGlu`]
    pub const SWIGLU: u32 = 7;
    /// [`crate::Add`]
    pub const ADD: u32 = 8;
    /// [`crate::Scale`]
    pub const SCALE: u32 = 9;
    /// [`crate::Softmax`]
    pub const SOFTMAX: u32 = 10;
    /// [`crate::Argmax`]
    pub const ARGMAX: u32 = 11;
    /// [`crate::Sample`]
    pub const SAMPLE: u32 = 12;

    pub const fn name(code: u32) -> &'static str {
        match code {
            EMBED => "embed",
            RMSNORM => "rmsnorm",
            MATMUL => "matmul",
            ROPE => "rope",
            KV_STORE => "kv_store",
            ATTENTION => "attention",
            SWIGLU => "swiglu",
            ADD => "add",
            SCALE => "scale",
            SOFTMAX => "softmax",
            ARGMAX => "argmax",
            SAMPLE => "sample",
            _ => "unknown",
        }
    }
}

/// Flag for [`Matmul::flags`]: add a bias vector `(m,)` f32 at [`Matmul::bias`].
pub const MATMUL_BIAS: u32 = 1;
/// Flag for [`Matmul::flags`]: accumulate, `out += x W^T` (a fused residual add).
pub const MATMUL_ACCUMULATE: u32 = 2;

/// [`Rope::mode`]: rotate adjacent pairs `(x[2i], x[2i+1])` (llama.cpp's GGUF layout).
pub const ROPE_INTERLEAVED: u32 = 0;
/// [`Rope::mode`]: rotate `(x[i], x[i + d/2])` (Hugging Face / NeoX layout).
pub const ROPE_HALF: u32 = 1;

/// Embedding gather: `out[i, :] = dequant(table[ids[i], :])`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Embed {
    /// `(vocab, dim)`, any weight dtype.
    pub table: u32,
    pub dtype: u32,
    pub vocab: u32,
    pub dim: u32,
    /// `(n,)` u32 token ids, read at execution time; an id >= vocab is a runtime error.
    pub ids: u32,
    pub n: u32,
    /// `(n, dim)` f32.
    pub out: u32,
}

/// RMSNorm: `out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RmsNorm {
    /// `(n, dim)` f32.
    pub x: u32,
    /// `(dim,)` f32.
    pub weight: u32,
    /// `(n, dim)` f32, may equal `x`.
    pub out: u32,
    pub n: u32,
    pub dim: u32,
    pub eps: f32,
}

/// Matrix multiply with a weight matrix: `out[i, j] (+)= sum_l x[i, l] * W[j, l] (+ bias[j])`.
/// With `n == 1` it is the decode matvec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Matmul {
    /// `(m, k)` in `dtype` (a row is `k` elements in whole blocks).
    pub w: u32,
    pub dtype: u32,
    pub m: u32,
    pub k: u32,
    /// `(n, k)` f32.
    pub x: u32,
    pub n: u32,
    /// `(n, m)` f32; must not overlap `x` or `w`.
    pub out: u32,
    /// `(m,)` f32 when `flags & MATMUL_BIAS`.
    pub bias: u32,
    pub flags: u32,
}

/// Rotary position embedding, in place, on `(n, n_heads, head_dim)` f32.
/// Token `i` is at position `positions[i]` (u32, read at execution time).
/// Frequencies: `theta_j = freq_base^(-2j/n_rot)` for `j < n_rot/2`; with
/// `scaling_factor > 0`, Llama-3 frequency scaling is applied (`low_freq_factor`,
/// `high_freq_factor`, `original_context`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rope {
    pub x: u32,
    pub n: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    /// Rotated dims per head (<= head_dim, even); the rest pass through.
    pub n_rot: u32,
    /// [`ROPE_INTERLEAVED`] or [`ROPE_HALF`].
    pub mode: u32,
    pub positions: u32,
    pub freq_base: f32,
    /// 0 = no scaling; otherwise the Llama-3 `factor`.
    pub scaling_factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_context: u32,
}

/// Store new keys and values into the cache at positions `pos .. pos + n`, where
/// `pos` is the u32 at offset `pos` (read at execution time; `pos + n > ctx` is a
/// runtime error and nothing is written).
/// Cache layout: `(n_kv_heads, ctx, head_dim)` in `cache_dtype` (f32 or f16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvStore {
    /// `(n, n_kv_heads * head_dim)` f32.
    pub k: u32,
    /// `(n, n_kv_heads * head_dim)` f32.
    pub v: u32,
    pub n: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub k_cache: u32,
    pub v_cache: u32,
    pub cache_dtype: u32,
    pub ctx: u32,
    pub pos: u32,
}

/// Causal attention with grouped-query heads over the cache: query `i` (at position
/// `pos + i`) attends to cache positions `0 ..= pos + i`. Query head `h` uses KV head
/// `h / (n_heads / n_kv_heads)`. `pos` is read from guest memory like [`KvStore`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Attention {
    /// `(n, n_heads, head_dim)` f32.
    pub q: u32,
    pub n: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    /// `(n_kv_heads, ctx, head_dim)` in `cache_dtype`.
    pub k_cache: u32,
    pub v_cache: u32,
    pub cache_dtype: u32,
    pub ctx: u32,
    pub pos: u32,
    /// `(n, n_heads, head_dim)` f32; must not overlap `q` or the caches.
    pub out: u32,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// `out = silu(gate) * up`, elementwise over `len` f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SwiGlu {
    pub gate: u32,
    pub up: u32,
    pub out: u32,
    pub len: u32,
}

/// `out = a + b`, elementwise over `len` f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Add {
    pub a: u32,
    pub b: u32,
    pub out: u32,
    pub len: u32,
}

/// `out = x * scale`, elementwise over `len` f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scale {
    pub x: u32,
    pub out: u32,
    pub len: u32,
    pub scale: f32,
}

/// Row-wise softmax of `(rows, cols)` f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Softmax {
    pub x: u32,
    pub out: u32,
    pub rows: u32,
    pub cols: u32,
}

/// Row-wise argmax of `(rows, cols)` f32 into `(rows,)` u32 (first index on ties).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Argmax {
    pub x: u32,
    pub out: u32,
    pub rows: u32,
    pub cols: u32,
}

/// Sampling parameters, read by [`Sample`] from guest memory at execution time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// <= 0: greedy (argmax, after the repetition penalty).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off. Logits of tokens in the history are divided (if > 0) or multiplied
    /// (if < 0) by it, as in llama.cpp and HF.
    pub repeat_penalty: f32,
    /// How many of the history's tokens (its last ones) the penalty looks at.
    pub history_len: u32,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            history_len: 0,
        }
    }
}

/// Sample one token from `(vocab,)` f32 logits, which are not modified. The pipeline,
/// on a copy of the logits (NaN counts as -inf):
/// 1. Repetition penalty (llama.cpp style), when `repeat_penalty != 1`: the window is
///    the last `history_len` entries of the history, `history[history_cap - history_len
///    .. history_cap]` (keep the newest token last); each *distinct* token `t` in it gets
///    `l[t] = l[t] > 0 ? l[t] / repeat_penalty : l[t] * repeat_penalty`.
/// 2. `temperature <= 0`: greedy, the argmax (first index on ties); the RNG is not
///    advanced. Otherwise every logit is divided by `temperature`.
/// 3. Top-k (`top_k > 0` and `< vocab`): keep the `top_k` largest (ties: lower id first).
/// 4. Softmax over the kept tokens.
/// 5. Top-p (`top_p < 1`): in descending probability (ties: lower id first), keep the
///    smallest prefix whose cumulative probability is `>= top_p`, at least one token.
/// 6. Min-p (`min_p > 0`): drop tokens whose probability is `< min_p * max_prob`.
/// 7. Renormalise; draw `u` in `[0, 1)`; walking the kept tokens in ascending id,
///    pick the first whose cumulative probability exceeds `u * total` (else the last).
///
/// The RNG is the u64 (little-endian) at `rng`: a splitmix64 state. A draw does
/// `state += 0x9E3779B97F4A7C15; z = mix(state)` (splitmix64's output mix:
/// `z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
/// z ^= z >> 31`), `u = (z >> 40) as f32 / 2^24`, and writes `state` back. To seed,
/// the guest writes the seed itself (any value, 0 included); runs are reproducible.
///
/// Run-time errors (status RUNTIME, nothing written): a non-finite `temperature`,
/// `top_p` or `min_p` outside `[0, 1]`, `repeat_penalty` not positive and finite,
/// `history_len > history_cap`, a token id in the window `>= vocab`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub logits: u32,
    pub vocab: u32,
    /// A [`SampleParams`] (24 bytes).
    pub params: u32,
    /// `(history_cap,)` u32 token ids; the last `params.history_len` are penalised.
    pub history: u32,
    pub history_cap: u32,
    /// u64 RNG state, 8-byte aligned.
    pub rng: u32,
    /// u32 output token id.
    pub out: u32,
}

/// A descriptor's byte length, for each op code (`None` for an unknown code).
pub const fn descriptor_len(code: u32) -> Option<usize> {
    use core::mem::size_of;
    Some(match code {
        op::EMBED => size_of::<Embed>(),
        op::RMSNORM => size_of::<RmsNorm>(),
        op::MATMUL => size_of::<Matmul>(),
        op::ROPE => size_of::<Rope>(),
        op::KV_STORE => size_of::<KvStore>(),
        op::ATTENTION => size_of::<Attention>(),
        op::SWIGLU => size_of::<SwiGlu>(),
        op::ADD => size_of::<Add>(),
        op::SCALE => size_of::<Scale>(),
        op::SOFTMAX => size_of::<Softmax>(),
        op::ARGMAX => size_of::<Argmax>(),
        op::SAMPLE => size_of::<Sample>(),
        _ => return None,
    })
}

/// Marker for plain-old-data descriptors: every field is a `u32` or `f32`, so any
/// bit pattern is a valid value and the struct has no padding.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs made of 4-byte scalar fields.
pub unsafe trait Pod: Copy + 'static {}
unsafe impl Pod for Embed {}
unsafe impl Pod for RmsNorm {}
unsafe impl Pod for Matmul {}
unsafe impl Pod for Rope {}
unsafe impl Pod for KvStore {}
unsafe impl Pod for Attention {}
unsafe impl Pod for SwiGlu {}
unsafe impl Pod for Add {}
unsafe impl Pod for Scale {}
unsafe impl Pod for Softmax {}
unsafe impl Pod for Argmax {}
unsafe impl Pod for SampleParams {}
unsafe impl Pod for Sample {}

/// Read a descriptor from bytes (any alignment). Returns `None` on a length mismatch.
pub fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is Pod (any bit pattern valid), the length matches, and
    // read_unaligned has no alignment requirement.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// View a descriptor as bytes.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod: no padding, every byte initialised.
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_sizes_are_whole_words() {
        for code in 1..=12 {
            let len = descriptor_len(code).unwrap();
            assert_eq!(len % 4, 0, "{}", op::name(code));
        }
        assert_eq!(core::mem::size_of::<SampleParams>(), 24);
        assert!(descriptor_len(0).is_none());
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(DType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(DType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(DType::Q4_0.row_bytes(33), None);
        for d in DType::ALL {
            assert_eq!(DType::from_u32(d as u32), Some(d));
        }
    }

    #[test]
    fn pod_roundtrip() {
        let m = Matmul {
            w: 64,
            dtype: 3,
            m: 2,
            k: 32,
            x: 8,
            n: 1,
            out: 256,
            bias: 0,
            flags: 0,
        };
        assert_eq!(read_pod::<Matmul>(pod_bytes(&m)), Some(m));
        assert_eq!(read_pod::<Matmul>(&pod_bytes(&m)[1..]), None);
    }
}
