// Shared definitions for every samepage CUDA kernel. Compiled by NVRTC, no headers.
// Descriptors mirror `samepage_abi` (#[repr(C)], all u32/f32): a kernel gets the
// validated descriptor by value and a `Ctx` with the region's device base address.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
#define INFINITY __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90+): the host may launch a kernel while the one
// before it on the stream is still running. Every kernel's first statement, before any
// read, write or early return, waits until the previous grid has completed and its
// writes are visible; then it lets the next kernel start launching (its blocks wait the
// same way). Without the launch attribute both instructions are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_WAIT_ONLY() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT_ONLY() do {} while (0)
#define PDL_TRIGGER() do {} while (0)
#endif
#define PDL_ENTER() TlGuard tl_guard_(c); PDL_WAIT_ONLY(); tl_guard_.waited(); PDL_TRIGGER()
// The wait alone: the next kernel launches only as this one's blocks exit. For grids of
// many waves (prefill GEMMs), where early-launched waiting blocks would hold SM slots.
#define PDL_WAIT() TlGuard tl_guard_(c); PDL_WAIT_ONLY(); tl_guard_.waited()

struct Ctx {
    u8* base;       // the region: guest offset 0
    u32* status;    // [flag, op index, reason, a, b]: host-mapped, read after wait
    float* scratch; // backend-owned device scratch (attention partials, sampler)
    u32* counters;  // backend-owned zeroed device words, left zero by every kernel (attention)
    u32 op;         // index of this op in its list, for error reports
    u32 aux;        // op-specific launch parameter (attention: splits)
    u32* tok;       // per-token words staged on the device (stage.rs), or null
    u32 tmap;       // byte s: index in tok of the op's s-th per-token word; 0xff: read the region
    u32 pad_;
    u64* tl;        // SAMEPAGE_CUDA_TRACE=3: the decode step's timeline (TlGuard), or null
};

__device__ __forceinline__ u64 gtime() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The timeline of one launch (graph.rs, SAMEPAGE_CUDA_TRACE=3): per op index, the first
// block's start, the first and last release from the PDL wait, the last block's end, and
// up to 4 kernel-specific marks (ns, each block's thread 0; 8 words). A no-op unless the
// context carries a timeline.
struct TlGuard {
    u64* p;
    __device__ TlGuard(const Ctx& c) : p(c.tl ? c.tl + 8ull * c.op : (u64*)0) {
        if (p && threadIdx.x == 0) atomicMin(p, gtime());
    }
    __device__ void waited() const {
        if (p && threadIdx.x == 0) {
            const u64 t = gtime();
            atomicMin(p + 1, t);
            atomicMax(p + 2, t);
        }
    }
    // Kernel-specific marks 4..7 (the latest over blocks).
    __device__ void mark(u32 i) const {
        if (p && threadIdx.x == 0) atomicMax(p + i, gtime());
    }
    __device__ ~TlGuard() {
        if (p && threadIdx.x == 0) atomicMax(p + 3, gtime());
    }
};

// The op's `slot`-th per-token word (a position, a token id) at region offset `off`: the
// copy staged at the start of a decode step where there is one (one read of the host page
// per step instead of one per op), else the region itself.
__device__ __forceinline__ u32 tok_word(const Ctx& c, u32 slot, u32 off) {
    const u32 i = (c.tmap >> (8 * slot)) & 0xff;
    return i != 0xff ? c.tok[i] : *(const u32*)(c.base + off);
}

// Runtime errors found on the GPU: the first one wins, nothing is written out of bounds.
#define ERR_KV_POS 1
#define ERR_ATTN_POS 2
#define ERR_EMBED_ID 3
#define ERR_SAMPLE_PARAMS 4
#define ERR_SAMPLE_HISTORY_ID 5

__device__ void report(const Ctx& c, u32 reason, u32 a, u32 b) {
    if (atomicCAS(&c.status[0], 0u, 1u) == 0u) {
        c.status[1] = c.op;
        c.status[2] = reason;
        c.status[3] = a;
        c.status[4] = b;
        __threadfence_system();
    }
}

struct Embed { u32 table, dtype, vocab, dim, ids, n, out; };
struct RmsNorm { u32 x, weight, out, n, dim; float eps; };
struct Matmul { u32 w, dtype, m, k, x, n, out, bias, flags; };
struct Rope { u32 x, n, n_heads, head_dim, n_rot, mode, positions; float freq_base, scaling_factor, low_freq_factor, high_freq_factor; u32 original_context; };
struct KvStore { u32 k, v, n, n_kv_heads, head_dim, k_cache, v_cache, cache_dtype, ctx, pos; };
struct Attention { u32 q, n, n_heads, n_kv_heads, head_dim, k_cache, v_cache, cache_dtype, ctx, pos, out; float scale; };
struct SwiGlu { u32 gate, up, out, len; };
struct Add { u32 a, b, out, len; };
struct Scale { u32 x, out, len; float scale; };
struct Softmax { u32 x, out, rows, cols; };
struct Argmax { u32 x, out, rows, cols; };
struct SampleParams { float temperature; u32 top_k; float top_p, min_p, repeat_penalty; u32 history_len; };
struct Sample { u32 logits, vocab, params, history, history_cap, rng, out; };

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5
#define DT_Q5_0 6
#define DT_Q4_K 7
#define DT_Q5_K 8
#define DT_Q6_K 9
#define MATMUL_BIAS 1u
#define MATMUL_ACCUMULATE 2u

template <typename T> __device__ __forceinline__ T* at(const Ctx& c, u32 off) { return (T*)(c.base + off); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
// A 2-byte-aligned little-endian f16 inside a block.
__device__ __forceinline__ float ld_f16(const u8* p) { return f16_to_f32(*(const u16*)p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum/max for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float s[32];
    __shared__ float r;
    v = warp_sum(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = l < (int)(blockDim.x >> 5) ? s[l] : 0.0f;
        t = warp_sum(t);
        if (l == 0) r = t;
    }
    __syncthreads();
    return r;
}
__device__ float block_max(float v) {
    __shared__ float s[32];
    __shared__ float r;
    v = warp_max(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = l < (int)(blockDim.x >> 5) ? s[l] : -INFINITY;
        t = warp_max(t);
        if (l == 0) r = t;
    }
    __syncthreads();
    return r;
}
__device__ double block_sum_d(double v) {
    __shared__ double s[32];
    __shared__ double r;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        double t = l < (int)(blockDim.x >> 5) ? s[l] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (l == 0) r = t;
    }
    __syncthreads();
    return r;
}

// Argmax over a block: the largest value, the first index on ties. NaN never wins.
__device__ void argmax_merge(float& bv, u32& bi, float v, u32 i) {
    if (v > bv || (v == bv && i < bi) || (bi == 0xffffffffu && !(v != v))) { bv = v; bi = i; }
}
__device__ u32 block_argmax(float bv, u32 bi) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ u32 r;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != 0xffffffffu) argmax_merge(bv, bi, ov, oi);
    }
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) { sv[w] = bv; si[w] = bi; }
    __syncthreads();
    if (w == 0) {
        float v = -INFINITY;
        u32 i = 0xffffffffu;
        if (l < (int)(blockDim.x >> 5)) { v = sv[l]; i = si[l]; }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            u32 oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (oi != 0xffffffffu) argmax_merge(v, i, ov, oi);
        }
        if (l == 0) r = i;
    }
    __syncthreads();
    return r;
}

// After a block wrote its part of a result (every thread of the block calls this):
// whether it is the last of `n` blocks to get here, counted in `*cnt`. The last re-arms
// the counter (zero again for the next launch) and then sees the others' writes.
// `sync`: the barrier of the threads taking part (the whole block by default; the
// megakernel's consumer warps, `rka_sync`).
struct BlockSync { __device__ void operator()() const { __syncthreads(); } };
template <class Sync = BlockSync> __device__ bool last_block(u32* cnt, u32 n, Sync sync = Sync()) {
    __shared__ u32 last;
    __threadfence();
    sync();
    if (threadIdx.x == 0) {
        const u32 old = atomicAdd(cnt, 1u);
        last = old == n - 1;
        if (last) *cnt = 0;
    }
    sync();
    if (!last) return false;
    __threadfence();
    return true;
}

// Bulk copies global -> shared (TMA, sm_90) completing on an mbarrier (mvp.cu, gemv_quant).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Weights are read once a token: their lines are the first L2 evicts, so what the
// steps read again (the KV cache, activations, logits, split partials) stays in L2
// across the 2.5 GB stream instead of coming back from HBM.
__device__ __forceinline__ void mvp_bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
#ifndef SP_NO_EVICT_FIRST
    asm volatile("{\n\t.reg .b64 pol;\n\tcreatepolicy.fractional.L2::evict_first.b64 pol, 1.0;\n\t"
                 "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], pol;\n\t}"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#else
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mvp_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mvp_wait_bar(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
#endif
