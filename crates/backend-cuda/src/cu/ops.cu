// Row and elementwise ops: embed, rmsnorm, rope, kv_store, swiglu, add, scale,
// softmax, argmax. Each checks the per-token values it reads (ids, pos) itself.

extern "C" __global__ void embed(const Ctx c, const Embed e) {
    PDL_ENTER();
    const u32* ids = at<u32>(c, e.ids);
    // Any bad id fails the whole op before anything is written (as on the CPU).
    int bad = 0;
    for (u32 i = threadIdx.x; i < e.n; i += blockDim.x) {
        u32 id = e.n == 1 ? tok_word(c, 0, e.ids) : ids[i];
        if (id >= e.vocab) { bad = 1; report(c, ERR_EMBED_ID, id, i); }
    }
    if (__syncthreads_or(bad)) return;
    // Block b: row b / nc, its elements (b % nc) * blockDim.x .. (one each: a lookup is
    // a few dependent loads per element, so a row is spread over blocks, not looped).
    const u32 nc = (e.dim + blockDim.x - 1) / blockDim.x, i = blockIdx.x / nc;
    const u32 d = (blockIdx.x % nc) * blockDim.x + threadIdx.x;
    u32 id = e.n == 1 ? tok_word(c, 0, e.ids) : ids[i];
    const u8* row = c.base + e.table + (u64)id * row_bytes(e.dtype, e.dim);
    if (d < e.dim) at<float>(c, e.out)[(u64)i * e.dim + d] = dq_elem(e.dtype, row, d);
}

// One block per row. A row of up to RMS_R * blockDim.x elements is loaded into
// registers at once (every load in flight together: the op is latency-bound at n == 1),
// reduced, then scaled from the registers; longer rows loop.
#define RMS_R 8
extern "C" __global__ void rmsnorm(const Ctx c, const RmsNorm r) {
    PDL_ENTER();
    const float* x = at<float>(c, r.x) + (u64)blockIdx.x * r.dim;
    const float* w = at<float>(c, r.weight);
    float* out = at<float>(c, r.out) + (u64)blockIdx.x * r.dim;
    const u32 B = blockDim.x;
    if (r.dim <= RMS_R * B) {
        float xv[RMS_R], wv[RMS_R], ss = 0.0f;
#pragma unroll
        for (u32 j = 0; j < RMS_R; j++) {
            u32 d = threadIdx.x + j * B;
            xv[j] = d < r.dim ? x[d] : 0.0f;
            wv[j] = d < r.dim ? w[d] : 0.0f;
        }
#pragma unroll
        for (u32 j = 0; j < RMS_R; j++) ss += xv[j] * xv[j];
        ss = block_sum(ss); // ends with a barrier: every read of x is done before any write
        float inv = 1.0f / sqrtf(ss / (float)r.dim + r.eps);
#pragma unroll
        for (u32 j = 0; j < RMS_R; j++) {
            u32 d = threadIdx.x + j * B;
            if (d < r.dim) out[d] = xv[j] * inv * wv[j];
        }
        return;
    }
    float ss = 0.0f;
    for (u32 d = threadIdx.x; d < r.dim; d += B) ss += x[d] * x[d];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)r.dim + r.eps);
    for (u32 d = threadIdx.x; d < r.dim; d += B) out[d] = x[d] * inv * w[d];
}

// The elements of rotated pair j of a head: (2j, 2j + 1) interleaved, (j, j + half) split.
__device__ __forceinline__ void rope_pair(const Rope& r, u32 j, u32& a, u32& b) {
    const u32 half = r.n_rot / 2;
    a = r.mode == 0 ? 2 * j : j;
    b = r.mode == 0 ? 2 * j + 1 : j + half;
}

// sin and cos of p * freq in f64 (as Hugging Face computes them) rounded to f32, without
// pow, divisions or a library sincos (their dependent f64 latency was ~2 us of a decode
// step): freq comes from the host (`samepage_backend::rope::rope_freqs`), the angle is reduced
// by pi / 2 in f64 (Cody-Waite, two parts), and sin and cos of the remainder
// (|r| <= pi / 4) are their Taylor series to r^15 and r^16 (truncation below 1e-16),
// swapped and negated by the quadrant.
__device__ __forceinline__ void rope_sincos(double freq, u32 p, float& sn, float& cs) {
    const double a = (double)p * freq;
    const double n = rint(a * 0.63661977236758134308);
    const double r = fma(-n, 6.123233995736766036e-17, fma(-n, 1.5707963267948965580, a)), r2 = r * r;
    double sv = -1.0 / 1307674368000.0;
    sv = fma(sv, r2, 1.0 / 6227020800.0);
    sv = fma(sv, r2, -1.0 / 39916800.0);
    sv = fma(sv, r2, 1.0 / 362880.0);
    sv = fma(sv, r2, -1.0 / 5040.0);
    sv = fma(sv, r2, 1.0 / 120.0);
    sv = fma(sv, r2, -1.0 / 6.0);
    sv = fma(sv * r2, r, r);
    double cv = 1.0 / 20922789888000.0;
    cv = fma(cv, r2, -1.0 / 87178291200.0);
    cv = fma(cv, r2, 1.0 / 479001600.0);
    cv = fma(cv, r2, -1.0 / 3628800.0);
    cv = fma(cv, r2, 1.0 / 40320.0);
    cv = fma(cv, r2, -1.0 / 720.0);
    cv = fma(cv, r2, 1.0 / 24.0);
    cv = fma(cv, r2, -0.5);
    cv = fma(cv, r2, 1.0);
    const u32 q = (u32)(long long)n & 3u;
    const double sa = q & 1u ? cv : sv, ca = q & 1u ? sv : cv;
    sn = (float)(q == 1u || q == 0u ? sa : -sa);
    cs = (float)(q == 0u || q == 3u ? ca : -ca);
}

// The cosines and sines of position p for pairs j < half, from pair j's frequency hi[j] +
// lo[j] (two f32 of the host's f64, exec.rs `freq_table`), into cs / sn: thread t takes
// pairs t, t + stride, ...; the caller synchronises before reading them.
__device__ __forceinline__ void rope_angles(const float* hi, const float* lo, u32 half, u32 p, float* cs, float* sn,
                                            u32 stride) {
    for (u32 j = threadIdx.x; j < half; j += stride) rope_sincos((double)hi[j] + (double)lo[j], p, sn[j], cs[j]);
}

// rope's launch parameters: the op, and its pairs' frequencies (`rope_angles`; n_rot <= 256).
struct RopeT { Rope r; float hi[128], lo[128]; };

// grid: n blocks, one per token. The token's n_rot / 2 sines and cosines are computed
// once into shared memory (`rope_sincos`), then the block's threads rotate every head's
// pairs.
extern "C" __global__ void rope(const Ctx c, const RopeT t) {
    PDL_ENTER();
    const Rope& r = t.r;
    __shared__ float cs[128], sn[128];
    const u32 i = blockIdx.x, half = r.n_rot / 2;
    const u32 p = r.n == 1 ? tok_word(c, 0, r.positions) : at<u32>(c, r.positions)[i];
    rope_angles(t.hi, t.lo, half, p, cs, sn, blockDim.x);
    __syncthreads();
    float* v0 = at<float>(c, r.x) + (u64)i * r.n_heads * r.head_dim;
    for (u32 k = threadIdx.x; k < r.n_heads * half; k += blockDim.x) {
        const u32 h = k / half, j = k % half;
        float* v = v0 + (u64)h * r.head_dim;
        u32 a, b;
        rope_pair(r, j, a, b);
        const float x0 = v[a], x1 = v[b], fc = cs[j], fs = sn[j];
        v[a] = x0 * fc - x1 * fs;
        v[b] = x0 * fs + x1 * fc;
    }
}

// One head of one token: rotate the pairs of v, pair j's frequency hi[j] + lo[j] (two f32
// of the host's f64). The pair is loaded before its sine and cosine are computed.
__device__ void rope_head(const Rope& r, const float* hi, const float* lo, u32 p, float* v) {
    for (u32 j = threadIdx.x; j < r.n_rot / 2; j += blockDim.x) {
        u32 a, b;
        rope_pair(r, j, a, b);
        const float x0 = v[a], x1 = v[b];
        float fs, fc;
        rope_sincos((double)hi[j] + (double)lo[j], p, fs, fc);
        v[a] = x0 * fc - x1 * fs;
        v[b] = x0 * fs + x1 * fc;
    }
}

// Copy one head's k and v (f32, at element `src`) into the caches at element `dst`,
// converting to the cache dtype. The block's threads share the head.
__device__ void store_kv_head(const Ctx& c, const KvStore& s, u64 src, u64 dst) {
    const float* k = at<float>(c, s.k) + src;
    const float* v = at<float>(c, s.v) + src;
    for (u32 d = threadIdx.x; d < s.head_dim; d += blockDim.x) {
        if (s.cache_dtype == DT_F16) {
            at<u16>(c, s.k_cache)[dst + d] = f32_to_f16(k[d]);
            at<u16>(c, s.v_cache)[dst + d] = f32_to_f16(v[d]);
        } else {
            at<float>(c, s.k_cache)[dst + d] = k[d];
            at<float>(c, s.v_cache)[dst + d] = v[d];
        }
    }
}

// Record-time fusion of rope(q), rope(k), kv_store(k, v) for one token (graph.rs
// `plan`, exec.rs `rope_kv_fusable`): q.n_heads + k.n_heads blocks; a k block rotates its
// head in place, then (after a barrier: the block's own writes are visible) copies the
// k and v head into the cache, exactly as the three ops one after another would. The
// frequencies of q's and k's pairs come from the host (`rope_head`).
struct RopeKv { Rope q, k; KvStore s; float qhi[128], qlo[128], khi[128], klo[128]; };
extern "C" __global__ void rope_kv(const Ctx c, const RopeKv f) {
    PDL_ENTER();
    u32 b = blockIdx.x;
    if (b < f.q.n_heads) {
        u32 p = tok_word(c, 0, f.q.positions);
        rope_head(f.q, f.qhi, f.qlo, p, at<float>(c, f.q.x) + (u64)b * f.q.head_dim);
        return;
    }
    const KvStore& s = f.s;
    // Both per-token words (host pages) are read together: one bus round trip, not two.
    u32 p = tok_word(c, 1, f.k.positions);
    u32 pos = tok_word(c, 2, s.pos);
    u32 h = b - f.q.n_heads;
    float* kh = at<float>(c, f.k.x) + (u64)h * f.k.head_dim;
    rope_head(f.k, f.khi, f.klo, p, kh);
    __syncthreads();
    if ((u64)pos + 1 > s.ctx) {
        if (threadIdx.x == 0) report(c, ERR_KV_POS, pos, 1);
        return;
    }
    u64 src = (u64)h * s.head_dim;
    u64 dst = ((u64)h * s.ctx + pos) * s.head_dim;
    store_kv_head(c, s, src, dst);
}

// The first kernel of a decode step with staged words (stage.rs): copies the step's
// per-token words from the region (host pages) into `tok`, once.
struct TokStage { u32 n, off[16]; };
extern "C" __global__ void stage_tok(const Ctx c, const TokStage s) {
    PDL_ENTER();
    if (threadIdx.x < s.n) c.tok[threadIdx.x] = *at<u32>(c, s.off[threadIdx.x]);
}

// grid: n * n_kv_heads blocks.
extern "C" __global__ void kv_store(const Ctx c, const KvStore s) {
    PDL_ENTER();
    u32 pos = tok_word(c, 0, s.pos);
    if ((u64)pos + s.n > s.ctx) {
        if (threadIdx.x == 0) report(c, ERR_KV_POS, pos, s.n);
        return;
    }
    u32 i = blockIdx.x / s.n_kv_heads, h = blockIdx.x % s.n_kv_heads;
    u64 src = ((u64)i * s.n_kv_heads + h) * s.head_dim;
    u64 dst = ((u64)h * s.ctx + pos + i) * s.head_dim;
    store_kv_head(c, s, src, dst);
}

extern "C" __global__ void swiglu(const Ctx c, const SwiGlu s) {
    PDL_ENTER();
    const float* g = at<float>(c, s.gate);
    const float* u = at<float>(c, s.up);
    float* o = at<float>(c, s.out);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < s.len; i += gridDim.x * blockDim.x) {
        float gv = g[i];
        o[i] = gv / (1.0f + expf(-gv)) * u[i];
    }
}

extern "C" __global__ void add(const Ctx c, const Add s) {
    PDL_ENTER();
    const float* a = at<float>(c, s.a);
    const float* b = at<float>(c, s.b);
    float* o = at<float>(c, s.out);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < s.len; i += gridDim.x * blockDim.x) o[i] = a[i] + b[i];
}

extern "C" __global__ void scale(const Ctx c, const Scale s) {
    PDL_ENTER();
    const float* x = at<float>(c, s.x);
    float* o = at<float>(c, s.out);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < s.len; i += gridDim.x * blockDim.x) o[i] = x[i] * s.scale;
}

// grid: rows blocks.
extern "C" __global__ void softmax(const Ctx c, const Softmax s) {
    PDL_ENTER();
    const float* x = at<float>(c, s.x) + (u64)blockIdx.x * s.cols;
    float* o = at<float>(c, s.out) + (u64)blockIdx.x * s.cols;
    float m = -INFINITY;
    for (u32 i = threadIdx.x; i < s.cols; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    float sum = 0.0f;
    for (u32 i = threadIdx.x; i < s.cols; i += blockDim.x) sum += expf(x[i] - m);
    sum = block_sum(sum);
    float inv = 1.0f / sum;
    for (u32 i = threadIdx.x; i < s.cols; i += blockDim.x) o[i] = expf(x[i] - m) * inv;
}

// grid: rows blocks. First index on ties; NaN never wins.
extern "C" __global__ void argmax(const Ctx c, const Argmax s) {
    PDL_ENTER();
    const float* x = at<float>(c, s.x) + (u64)blockIdx.x * s.cols;
    float bv = -INFINITY;
    u32 bi = 0xffffffffu;
    for (u32 i = threadIdx.x; i < s.cols; i += blockDim.x) argmax_merge(bv, bi, x[i], i);
    u32 r = block_argmax(bv, bi);
    if (threadIdx.x == 0) at<u32>(c, s.out)[blockIdx.x] = r == 0xffffffffu ? 0u : r;
}
