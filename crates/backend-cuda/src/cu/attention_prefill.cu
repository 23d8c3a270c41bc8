// Tiled causal GQA attention for prefill (n >= ATTENTION_PREFILL_MIN_N in src/prefill.rs).
//
// The decode kernel (`attention`) gives every (query, head) its own block, which re-reads
// all K/V of its positions: at n = 512 that is ~2 GB of L2 traffic per layer. Here the
// "rows" of one KV head are its (query, head of the group) pairs, row = qi * G + g for
// G = n_heads / n_kv_heads, so the heads that share a KV head share every K/V tile. A
// block of APF_WARPS warps takes APF_R consecutive rows of one KV head (APF_RW rows per
// warp) and walks the positions 0 .. pos + qi_max in tiles of APF_KT:
//   1. K and V of the tile are staged in shared memory (f32, from an F32 or F16 cache);
//   2. lane l scores position t0 + l against each of the warp's rows (q pre-scaled,
//      held in shared memory; float4 reads, K rows padded by 4 so they are conflict-free);
//   3. an online softmax per row (the max is warp-uniform; each lane keeps a partial
//      sum), p written to shared memory;
//   4. lane l accumulates output dims l, l + 32, ... of each row from p and V.
// Causality: row (qi, g) sees positions 0 ..= pos + qi; pos is read on the device, and
// pos + n > ctx reports ERR_ATTN_POS and writes nothing (as `attention` does). Blocks
// are numbered heaviest (latest queries) first. fp32 throughout, like the decode kernel.
// HDT (64, 128, 256) is head_dim rounded up; dims past head_dim are zero in q and K.
#define APF_WARPS 4
#define APF_RW 8
#define APF_R (APF_WARPS * APF_RW)
#define APF_KT 32

template <int HDT>
__device__ void attention_prefill(const Ctx& c, const Attention& a) {
    extern __shared__ __align__(16) float apf_smem[];
    constexpr int DPL = HDT / 32;     // output dims per lane
    constexpr int KLD = HDT + 4;      // padded K row
    float* Qs = apf_smem;             // [APF_R][HDT]
    float* Ks = Qs + APF_R * HDT;     // [APF_KT][KLD]
    float* Vs = Ks + APF_KT * KLD;    // [APF_KT][HDT]
    float* Ps = Vs + APF_KT * HDT;    // [APF_WARPS][APF_RW][APF_KT]
    const u32 pos = tok_word(c, 0, a.pos);
    if ((u64)pos + a.n > a.ctx) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report(c, ERR_ATTN_POS, pos, a.n);
        return;
    }
    const u32 G = a.n_heads / a.n_kv_heads, hd = a.head_dim;
    const u32 rows = a.n * G, tiles = (rows + APF_R - 1) / APF_R;
    const u32 kvh = blockIdx.x % a.n_kv_heads;
    const u32 tile = tiles - 1 - blockIdx.x / a.n_kv_heads;
    const u32 row0 = tile * APF_R;
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // The queries of this block see up to `len_max` positions.
    const u32 len_max = pos + (min(rows, row0 + APF_R) - 1) / G + 1;

    const float* q = at<float>(c, a.q);
    for (u32 i = tid; i < APF_R * HDT; i += blockDim.x) {
        const u32 rr = i / HDT, d = i % HDT, row = row0 + rr;
        float v = 0.0f;
        if (row < rows && d < hd) {
            const u32 qi = row / G, h = kvh * G + row % G;
            v = q[((u64)qi * a.n_heads + h) * hd + d] * a.scale;
        }
        Qs[i] = v;
    }
    // This warp's rows: how many positions each sees (0: no such row).
    u32 len[APF_RW];
    u32 wlen = 0;
#pragma unroll
    for (int r = 0; r < APF_RW; r++) {
        const u32 row = row0 + warp * APF_RW + r;
        len[r] = row < rows ? pos + row / G + 1 : 0;
        wlen = max(wlen, len[r]);
    }
    float m[APF_RW], l[APF_RW], acc[APF_RW][DPL];
#pragma unroll
    for (int r = 0; r < APF_RW; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; j++) acc[r][j] = 0.0f;
    }
    const u64 cbase = (u64)kvh * a.ctx * hd;
    const bool f16 = a.cache_dtype == DT_F16;
    const u32 hd4 = (hd + 3) & ~3u;
    float* P = Ps + warp * APF_RW * APF_KT;
    for (u32 t0 = 0; t0 < len_max; t0 += APF_KT) {
        __syncthreads(); // the previous tile (and the q staging) is done with
        // APF_B elements of K and of V per thread in flight at a time.
        constexpr u32 NT = APF_WARPS * 32, ITERS = APF_KT * HDT / NT, APF_B = 8;
        for (u32 i0 = 0; i0 < ITERS; i0 += APF_B) {
            float kv[APF_B], vv[APF_B];
#pragma unroll
            for (u32 b = 0; b < APF_B; b++) {
                const u32 i = (i0 + b) * NT + tid, tt = i / HDT, d = i % HDT, t = t0 + tt;
                kv[b] = 0.0f;
                vv[b] = 0.0f;
                if (t < len_max && d < hd) {
                    const u64 e = cbase + (u64)t * hd + d;
                    kv[b] = f16 ? f16_to_f32(at<u16>(c, a.k_cache)[e]) : at<float>(c, a.k_cache)[e];
                    vv[b] = f16 ? f16_to_f32(at<u16>(c, a.v_cache)[e]) : at<float>(c, a.v_cache)[e];
                }
            }
#pragma unroll
            for (u32 b = 0; b < APF_B; b++) {
                const u32 i = (i0 + b) * NT + tid, tt = i / HDT, d = i % HDT;
                Ks[tt * KLD + d] = kv[b];
                Vs[tt * HDT + d] = vv[b];
            }
        }
        __syncthreads();
        if (t0 >= wlen) continue; // every row of this warp is done (warp-uniform)
        // Scores: lane <-> position t0 + lane.
        float s[APF_RW];
#pragma unroll
        for (int r = 0; r < APF_RW; r++) s[r] = 0.0f;
        const float* kr = Ks + lane * KLD;
        const float* qw = Qs + warp * APF_RW * HDT;
#pragma unroll 2
        for (u32 d = 0; d < hd4; d += 4) {
            const float4 k4 = *(const float4*)(kr + d);
#pragma unroll
            for (int r = 0; r < APF_RW; r++) {
                const float4 q4 = *(const float4*)(qw + r * HDT + d);
                s[r] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
            }
        }
        // Online softmax.
        const u32 t = t0 + lane;
#pragma unroll
        for (int r = 0; r < APF_RW; r++) {
            const bool ok = t < len[r];
            const float mt = warp_max(ok ? s[r] : -INFINITY);
            const float mn = fmaxf(m[r], mt);
            const float corr = mn == -INFINITY ? 1.0f : expf(m[r] - mn);
            const float p = ok ? expf(s[r] - mn) : 0.0f;
            m[r] = mn;
            l[r] = l[r] * corr + p;
            P[r * APF_KT + lane] = p;
#pragma unroll
            for (int j = 0; j < DPL; j++) acc[r][j] *= corr;
        }
        __syncwarp();
        // acc += p . V over the tile's positions this warp can see.
        const u32 tn = min((u32)APF_KT, wlen - t0);
        for (u32 tt = 0; tt < tn; tt += 4) {
            float4 p4[APF_RW];
#pragma unroll
            for (int r = 0; r < APF_RW; r++) p4[r] = *(const float4*)(P + r * APF_KT + tt);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                float v[DPL];
#pragma unroll
                for (int j = 0; j < DPL; j++) v[j] = Vs[(tt + u) * HDT + lane + 32 * j];
#pragma unroll
                for (int r = 0; r < APF_RW; r++) {
                    const float pr = u == 0 ? p4[r].x : u == 1 ? p4[r].y : u == 2 ? p4[r].z : p4[r].w;
#pragma unroll
                    for (int j = 0; j < DPL; j++) acc[r][j] += pr * v[j];
                }
            }
        }
        __syncwarp();
    }
    float* out = at<float>(c, a.out);
#pragma unroll
    for (int r = 0; r < APF_RW; r++) {
        const float L = warp_sum(l[r]);
        const u32 row = row0 + warp * APF_RW + r;
        if (row >= rows) continue;
        const u32 qi = row / G, h = kvh * G + row % G;
        float* o = out + ((u64)qi * a.n_heads + h) * hd;
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            if (d < hd) o[d] = acc[r][j] / L;
        }
    }
}

// Dynamic shared memory bytes of attention_prefill<HDT> (mirrored in src/prefill.rs).
#define APF_SMEM(HDT) ((APF_R * (HDT) + APF_KT * ((HDT) + 4) + APF_KT * (HDT) + APF_WARPS * APF_RW * APF_KT) * 4)

#define ATTENTION_PREFILL(HDT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(APF_WARPS * 32) attention_prefill_##HDT(const Ctx c, const Attention a) { \
        PDL_ENTER();                                                                                              \
        attention_prefill<HDT>(c, a);                                                                             \
    }
ATTENTION_PREFILL(64)
ATTENTION_PREFILL(128)
ATTENTION_PREFILL(256)
