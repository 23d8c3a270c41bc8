// Causal GQA attention over the cache, split over positions ("flash decoding").
// grid.x = n * n_heads * S blocks of 4 warps (S fixed when the op is recorded: aux bits
// 0-15; a graph is replayed at every position). The split actually used is chosen on the
// device from the length: chunks of at least ATT_MIN positions, so a short context runs
// in few blocks (one pass when len <= ATT_MIN) and a long one fills the GPU; blocks past
// the last chunk exit at once. Each warp keeps an online softmax over its positions,
// ATT_G of them in flight at a time; lane l holds output dims l, l + 32, ... (head_dim
// <= 256). With one active split the block writes the output; otherwise it writes
// (max, sum, acc[head_dim]) to scratch and the last split of the (query, head) to finish
// (a counter in c.counters, aux bit 16) merges them; without counters a separate
// `attention_combine` launch does.
#define ATT_WARPS 4
#define ATT_R 8
#define ATT_G 4
#define ATT_MIN 16

__device__ __forceinline__ float ld_cache(const Ctx& c, u32 off, u32 dt, u64 i) {
    return dt == DT_F16 ? f16_to_f32(at<u16>(c, off)[i]) : at<float>(c, off)[i];
}

// Positions per split and active splits for a query that sees `len` positions.
__device__ __forceinline__ void att_split(u32 len, u32 S, u32& chunk, u32& sa) {
    if (S <= 1) { chunk = len; sa = 1; return; }
    chunk = max((len + S - 1) / S, (u32)ATT_MIN);
    sa = (len + chunk - 1) / chunk;
}

// Merge `sa` partials of one (query, head) at `part` into `out` (threads of one block).
__device__ void att_combine(const float* part, u32 sa, u32 hd, float* out) {
    float M = -INFINITY;
    for (u32 s = 0; s < sa; s++) M = fmaxf(M, __ldcg(part + s * (hd + 2)));
    float L = 0.0f;
    for (u32 s = 0; s < sa; s++) {
        float ms = __ldcg(part + s * (hd + 2));
        if (ms > -INFINITY) L += __ldcg(part + s * (hd + 2) + 1) * expf(ms - M);
    }
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < sa; s++) {
            float ms = __ldcg(part + s * (hd + 2));
            if (ms > -INFINITY) o += __ldcg(part + s * (hd + 2) + 2 + d) * expf(ms - M);
        }
        out[d] = o / L;
    }
}

extern "C" __global__ void __launch_bounds__(128) attention(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux & 0xffff;
    const bool fused = (c.aux >> 16) & 1;
    u32 pos = *at<u32>(c, a.pos);
    if ((u64)pos + a.n > a.ctx) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report(c, ERR_ATTN_POS, pos, a.n);
        return;
    }
    const u32 s = blockIdx.x % S, h = (blockIdx.x / S) % a.n_heads, i = blockIdx.x / S / a.n_heads;
    const u32 hd = a.head_dim, kvh = h / (a.n_heads / a.n_kv_heads);
    const u32 len = pos + i + 1;
    u32 chunk, sa;
    att_split(len, S, chunk, sa);
    if (s >= sa) return;
    const u32 t0 = s * chunk, t1 = min(len, t0 + chunk);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* q = at<float>(c, a.q) + ((u64)i * a.n_heads + h) * hd;
    float qr[ATT_R], acc[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; r++) {
        u32 d = lane + 32 * r;
        qr[r] = d < hd ? q[d] * a.scale : 0.0f;
        acc[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const u64 cbase = (u64)kvh * a.ctx * hd;
    for (u32 t = t0 + warp; t < t1; t += ATT_WARPS * ATT_G) {
        float sd[ATT_G];
#pragma unroll
        for (int g = 0; g < ATT_G; g++) {
            const u32 tt = t + g * ATT_WARPS;
            const u64 rowo = cbase + (u64)tt * hd;
            float sdot = 0.0f;
#pragma unroll
            for (int r = 0; r < ATT_R; r++) {
                u32 d = lane + 32 * r;
                if (tt < t1 && d < hd) sdot += qr[r] * ld_cache(c, a.k_cache, a.cache_dtype, rowo + d);
            }
            sd[g] = sdot;
        }
        float mn = m;
#pragma unroll
        for (int g = 0; g < ATT_G; g++) {
            sd[g] = warp_sum(sd[g]);
            if (t + g * ATT_WARPS < t1) mn = fmaxf(mn, sd[g]);
        }
        const float corr = expf(m - mn);
        float p[ATT_G];
#pragma unroll
        for (int g = 0; g < ATT_G; g++) p[g] = t + g * ATT_WARPS < t1 ? expf(sd[g] - mn) : 0.0f;
        l *= corr;
#pragma unroll
        for (int g = 0; g < ATT_G; g++) l += p[g];
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            u32 d = lane + 32 * r;
            float v = acc[r] * corr;
#pragma unroll
            for (int g = 0; g < ATT_G; g++) {
                const u32 tt = t + g * ATT_WARPS;
                if (tt < t1 && d < hd) v += p[g] * ld_cache(c, a.v_cache, a.cache_dtype, cbase + (u64)tt * hd + d);
            }
            acc[r] = v;
        }
        m = mn;
    }
    // Merge the warps.
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][32 * ATT_R];
    __shared__ u32 last;
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int r = 0; r < ATT_R; r++) sacc[warp][lane + 32 * r] = acc[r];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) L += sl[w] * expf(sm[w] - M);
    float* out = at<float>(c, a.out) + ((u64)i * a.n_heads + h) * hd;
    if (sa == 1) {
        for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) o += sacc[w][d] * expf(sm[w] - M);
            out[d] = o / L;
        }
        return;
    }
    float* part0 = c.scratch + ((u64)i * a.n_heads + h) * S * (hd + 2);
    float* part = part0 + (u64)s * (hd + 2);
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) o += sacc[w][d] * expf(sm[w] - M);
        part[2 + d] = o;
    }
    if (threadIdx.x == 0) { part[0] = M; part[1] = L; }
    if (!fused) return;
    // The last of the sa splits to get here merges them (and re-arms the counter).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* cnt = c.counters + (u64)i * a.n_heads + h;
        u32 old = atomicAdd(cnt, 1u);
        last = old == sa - 1;
        if (last) *cnt = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    att_combine(part0, sa, hd, out);
}

// grid.x = n * n_heads; merges the active splits of one (query, head) when the
// attention launch could not (no counters).
extern "C" __global__ void attention_combine(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux & 0xffff;
    u32 pos = *at<u32>(c, a.pos);
    if ((u64)pos + a.n > a.ctx) return; // reported by `attention`
    const u32 i = blockIdx.x / a.n_heads;
    u32 chunk, sa;
    att_split(pos + i + 1, S, chunk, sa);
    if (sa == 1) return; // written by `attention`
    const u32 hd = a.head_dim;
    att_combine(c.scratch + (u64)blockIdx.x * S * (hd + 2), sa, hd, at<float>(c, a.out) + (u64)blockIdx.x * hd);
}
