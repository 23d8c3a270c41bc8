// Causal GQA attention over the cache, split over positions ("flash decoding").
// grid.x = n * n_heads * S blocks of 4 warps; split s covers positions
// [s * chunk, (s + 1) * chunk) of query i's 0 ..= pos + i. Each warp keeps an online
// softmax over its positions; lane l holds output dims l, l + 32, ... (head_dim <= 256).
// With S == 1 the block writes the output; otherwise it writes (max, sum, acc[head_dim])
// to scratch and `attention_combine` merges the splits.
#define ATT_WARPS 4
#define ATT_R 8

__device__ __forceinline__ float ld_cache(const Ctx& c, u32 off, u32 dt, u64 i) {
    return dt == DT_F16 ? f16_to_f32(at<u16>(c, off)[i]) : at<float>(c, off)[i];
}

extern "C" __global__ void __launch_bounds__(128) attention(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux;
    u32 pos = *at<u32>(c, a.pos);
    if ((u64)pos + a.n > a.ctx) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report(c, ERR_ATTN_POS, pos, a.n);
        return;
    }
    const u32 s = blockIdx.x % S, h = (blockIdx.x / S) % a.n_heads, i = blockIdx.x / S / a.n_heads;
    const u32 hd = a.head_dim, kvh = h / (a.n_heads / a.n_kv_heads);
    const u32 len = pos + i + 1;
    const u32 chunk = (a.ctx + S - 1) / S;
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
    for (u32 t = t0 + warp; t < t1; t += ATT_WARPS) {
        u64 rowo = cbase + (u64)t * hd;
        float sdot = 0.0f;
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            u32 d = lane + 32 * r;
            if (d < hd) sdot += qr[r] * ld_cache(c, a.k_cache, a.cache_dtype, rowo + d);
        }
        sdot = warp_sum(sdot);
        float mn = fmaxf(m, sdot);
        float corr = expf(m - mn), p = expf(sdot - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < ATT_R; r++) {
            u32 d = lane + 32 * r;
            float v = d < hd ? ld_cache(c, a.v_cache, a.cache_dtype, rowo + d) : 0.0f;
            acc[r] = acc[r] * corr + p * v;
        }
        m = mn;
    }
    // Merge the warps.
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][32 * ATT_R];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int r = 0; r < ATT_R; r++) sacc[warp][lane + 32 * r] = acc[r];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) L += sl[w] * expf(sm[w] - M);
    if (S == 1) {
        float* out = at<float>(c, a.out) + ((u64)i * a.n_heads + h) * hd;
        for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) o += sacc[w][d] * expf(sm[w] - M);
            out[d] = o / L;
        }
    } else {
        float* part = c.scratch + (((u64)i * a.n_heads + h) * S + s) * (hd + 2);
        for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > -INFINITY) o += sacc[w][d] * expf(sm[w] - M);
            part[2 + d] = o;
        }
        if (threadIdx.x == 0) { part[0] = M; part[1] = L; }
    }
}

// grid.x = n * n_heads; merges the S split partials of one (query, head).
extern "C" __global__ void attention_combine(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux;
    u32 pos = *at<u32>(c, a.pos);
    if ((u64)pos + a.n > a.ctx) return; // reported by `attention`
    const u32 hd = a.head_dim;
    const float* part = c.scratch + (u64)blockIdx.x * S * (hd + 2);
    float M = -INFINITY;
    for (u32 s = 0; s < S; s++) M = fmaxf(M, part[s * (hd + 2)]);
    float L = 0.0f;
    for (u32 s = 0; s < S; s++) {
        float ms = part[s * (hd + 2)];
        if (ms > -INFINITY) L += part[s * (hd + 2) + 1] * expf(ms - M);
    }
    float* out = at<float>(c, a.out) + (u64)blockIdx.x * hd;
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < S; s++) {
            float ms = part[s * (hd + 2)];
            if (ms > -INFINITY) o += part[s * (hd + 2) + 2 + d] * expf(ms - M);
        }
        out[d] = o / L;
    }
}
