// Causal GQA attention for prefill (n >= ATTENTION_PREFILL_MIN_N in src/prefill.rs), two
// kernels: `attention_prefill_<HDT>` on tensor cores (sm_80+, the default; below) and
// `attention_prefill_simt_<HDT>`, exact fp32 (older GPUs, and SAMEPAGE_CUDA_ATTN=simt).
//
// ---- attention_prefill_simt_<HDT> ----
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
__device__ void attention_prefill_simt(const Ctx& c, const Attention& a) {
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

// Dynamic shared memory bytes of attention_prefill_simt<HDT> (mirrored in src/prefill.rs).
#define APF_SMEM(HDT) ((APF_R * (HDT) + APF_KT * ((HDT) + 4) + APF_KT * (HDT) + APF_WARPS * APF_RW * APF_KT) * 4)

#define ATTENTION_PREFILL_SIMT(HDT)                                                               \
    extern "C" __global__ void __launch_bounds__(APF_WARPS * 32)                                  \
        attention_prefill_simt_##HDT(const Ctx c, const Attention a) {                             \
        PDL_ENTER();                                                                              \
        attention_prefill_simt<HDT>(c, a);                                                        \
    }
ATTENTION_PREFILL_SIMT(64)
ATTENTION_PREFILL_SIMT(128)
ATTENTION_PREFILL_SIMT(256)

// ---- attention_prefill_<HDT>: tensor cores (mma.sync m16n8k16, f16 in, f32 accumulate) ----
//
// Flash-attention 2 style. Rows are (query, group head) pairs of one KV head as above,
// row = qi * G + g, so the G query heads of a KV head share its K/V tiles. A block of
// APT_WARPS warps takes APT_BM = 16 * APT_WARPS consecutive rows (heaviest blocks, i.e.
// latest queries, first); warp w owns rows 16w .. 16w + 15 of them, the M of its MMAs.
//   - Q (scaled by scale * log2 e, rounded to f16) is staged once in shared memory, padded
//     rows of HDT + 8 halves (ldmatrix is conflict-free), and for HDT <= 128 kept in
//     registers as A fragments.
//   - K and V go through shared memory in tiles of KT positions, double buffered: tile
//     j + 1 is copied while tile j is used. F16 caches with 16-byte aligned rows: cp.async
//     straight into the f16 tiles. F32 caches with 16-byte aligned rows: cp.async into an
//     f32 staging area, which the thread that copied a chunk converts (round to nearest)
//     into the f16 tile after the wait. Anything else (odd head sizes, unaligned caches):
//     element loads converted on the way. Positions past the block's last query and dims
//     past head_dim are zero.
//   - S = Q K^T (16 x KT per warp, f32 in the accumulator fragments; K as B via ldmatrix),
//     causal mask, online softmax per row in base 2 (row max over the 4 lanes that share a
//     row; each lane keeps a partial sum), P rounded to f16 and reused as the A fragment
//     of O += P V (V as B via ldmatrix.trans). Fully masked tiles and 16-position steps
//     past a warp's last visible position are skipped.
// Precision: q * scale, K, V and P each rounded to f16 once (unit roundoff 2^-11; K and V
// are exact for an F16 cache), every sum in f32, exp2 by ex2.approx (~2^-22 relative).
// f16 overflows past 65504: |q * scale| and |K| beyond that give inf / NaN.
#define APT_WARPS 4
#define APT_BM (APT_WARPS * 16)
// K/V tile length: 64 positions, 32 for HDT 256 (registers: O alone is 128 per thread).
#define APT_KT(HDT) ((HDT) <= 128 ? 64 : 32)
// Dynamic shared memory bytes (mirrored in src/prefill.rs): Q [BM][HDT + 8] and K, V
// [2][KT][HDT + 8] in f16; an F32 cache adds the staging area [2][KT][HDT] f32.
#define APT_SMEM16(HDT) ((APT_BM + 4 * APT_KT(HDT)) * ((HDT) + 8) * 2)
#define APT_SMEM32(HDT) (APT_SMEM16(HDT) + 2 * APT_KT(HDT) * (HDT) * 4)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ u32 apt_smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
// Two floats to f16x2 (round to nearest): `lo` in the low half.
__device__ __forceinline__ u32 apt_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float apt_ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void apt_ldsm(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void apt_ldsm_t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// d += a (16x16, row) * b (16x8, col).
__device__ __forceinline__ void apt_mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global -> shared, the bytes past `n` (0 or 16) zero.
__device__ __forceinline__ void apt_cp16(u32 dst, const void* src, u32 n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void apt_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void apt_cp_wait() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

template <int HDT>
__device__ void attention_prefill_tc(const Ctx& c, const Attention& a) {
    constexpr u32 KT = APT_KT(HDT), LD = HDT + 8, NT = APT_WARPS * 32;
    constexpr u32 KS = HDT / 16; // k-steps of S = Q K^T over the head dims
    constexpr u32 SN = KT / 8;   // n-tiles of S (positions)
    constexpr u32 ON = HDT / 8;  // n-tiles of O (dims)
    constexpr bool QREG = HDT <= 128;
    constexpr u32 ROWB = LD * 2; // bytes per shared row
    extern __shared__ __align__(16) u8 apt_smem[];
    u16* Qs = (u16*)apt_smem;      // [BM][LD]
    u16* Ks = Qs + APT_BM * LD;    // [2][KT][LD]
    u16* Vs = Ks + 2 * KT * LD;    // [2][KT][LD]
    float* St = (float*)(Vs + 2 * KT * LD); // F32 cache: [2 (K, V)][KT][HDT]

    const u32 pos = tok_word(c, 0, a.pos);
    if ((u64)pos + a.n > a.ctx) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report(c, ERR_ATTN_POS, pos, a.n);
        return;
    }
    const u32 G = a.n_heads / a.n_kv_heads, hd = a.head_dim;
    const u32 rows = a.n * G, tiles = (rows + APT_BM - 1) / APT_BM;
    const u32 kvh = blockIdx.x % a.n_kv_heads;
    const u32 row0 = (tiles - 1 - blockIdx.x / a.n_kv_heads) * APT_BM;
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // The block's queries see positions 0 .. len_max - 1: that many are loaded.
    const u32 len_max = pos + (min(rows, row0 + APT_BM) - 1) / G + 1;
    const u32 ntiles = (len_max + KT - 1) / KT;

    const bool f16 = a.cache_dtype == DT_F16;
    const u8* kc = at<u8>(c, a.k_cache);
    const u8* vc = at<u8>(c, a.v_cache);
    const u64 cbase = (u64)kvh * a.ctx * hd; // elements
    // 0: cp.async f16; 1: cp.async f32 via staging; 2: element loads.
    const u32 mode = ((((u64)kc | (u64)vc) & 15) == 0 && hd % (f16 ? 8 : 4) == 0) ? (f16 ? 0 : 1) : 2;

    auto load_tile = [&](u32 j) {
        const u32 t0 = j * KT;
        u16* Kb = Ks + (j & 1) * KT * LD;
        u16* Vb = Vs + (j & 1) * KT * LD;
        if (mode == 0) {
            constexpr u32 CPR = HDT / 8; // 16-byte chunks per row
#pragma unroll
            for (u32 it = 0; it < KT * CPR / NT; it++) {
                const u32 i = it * NT + tid, tt = i / CPR, d = (i % CPR) * 8, t = t0 + tt;
                const bool ok = t < len_max && d < hd;
                const u64 e = ok ? (cbase + (u64)t * hd + d) * 2 : 0;
                apt_cp16(apt_smem_addr(Kb + tt * LD + d), kc + e, ok ? 16 : 0);
                apt_cp16(apt_smem_addr(Vb + tt * LD + d), vc + e, ok ? 16 : 0);
            }
        } else if (mode == 1) {
            constexpr u32 CPR = HDT / 4;
#pragma unroll 4
            for (u32 it = 0; it < KT * CPR / NT; it++) {
                const u32 i = it * NT + tid, tt = i / CPR, d = (i % CPR) * 4, t = t0 + tt;
                const bool ok = t < len_max && d < hd;
                const u64 e = ok ? (cbase + (u64)t * hd + d) * 4 : 0;
                apt_cp16(apt_smem_addr(St + tt * HDT + d), kc + e, ok ? 16 : 0);
                apt_cp16(apt_smem_addr(St + (KT + tt) * HDT + d), vc + e, ok ? 16 : 0);
            }
        } else {
#pragma unroll 4
            for (u32 i = tid; i < KT * HDT / 2; i += NT) {
                const u32 tt = i / (HDT / 2), d = (i % (HDT / 2)) * 2, t = t0 + tt;
                float k0 = 0.0f, k1 = 0.0f, v0 = 0.0f, v1 = 0.0f;
                if (t < len_max) {
                    const u64 e = cbase + (u64)t * hd + d;
                    if (d < hd) {
                        k0 = f16 ? f16_to_f32(((const u16*)kc)[e]) : ((const float*)kc)[e];
                        v0 = f16 ? f16_to_f32(((const u16*)vc)[e]) : ((const float*)vc)[e];
                    }
                    if (d + 1 < hd) {
                        k1 = f16 ? f16_to_f32(((const u16*)kc)[e + 1]) : ((const float*)kc)[e + 1];
                        v1 = f16 ? f16_to_f32(((const u16*)vc)[e + 1]) : ((const float*)vc)[e + 1];
                    }
                }
                *(u32*)(Kb + tt * LD + d) = apt_pack(k0, k1);
                *(u32*)(Vb + tt * LD + d) = apt_pack(v0, v1);
            }
        }
        apt_cp_commit();
    };

    load_tile(0);
    // Q of the block's rows, scaled to base 2, to f16.
    {
        const float qsc = a.scale * 1.4426950408889634f;
        const float* q = at<float>(c, a.q);
        for (u32 i = tid; i < APT_BM * HDT / 2; i += NT) {
            const u32 rr = i / (HDT / 2), d = (i % (HDT / 2)) * 2, row = row0 + rr;
            float x0 = 0.0f, x1 = 0.0f;
            if (row < rows) {
                const float* qr = q + ((u64)(row / G) * a.n_heads + kvh * G + row % G) * hd;
                if (d < hd) x0 = qr[d] * qsc;
                if (d + 1 < hd) x1 = qr[d + 1] * qsc;
            }
            *(u32*)(Qs + rr * LD + d) = apt_pack(x0, x1);
        }
    }

    // This lane's rows (fragment rows g and g + 8 of the warp's 16) and their lengths.
    const u32 g = lane >> 2, tig = lane & 3;
    const u32 wr0 = row0 + warp * 16, ra = wr0 + g, rb = ra + 8;
    const u32 lena = ra < rows ? pos + ra / G + 1 : 0;
    const u32 lenb = rb < rows ? pos + rb / G + 1 : 0;
    // Positions every row of the warp sees (no mask below it), and any row sees.
    const u32 wmin = wr0 + 15 < rows ? pos + wr0 / G + 1 : 0;
    const u32 wmax = wr0 < rows ? pos + (min(rows, wr0 + 16) - 1) / G + 1 : 0;

    // ldmatrix lane addresses. Q (A, x4): rows lane & 15, dims 8 * (lane >> 4). K (B of
    // two n-tiles, x4): positions (lane & 7) + 8 * (lane >> 4), dims 8 * ((lane >> 3) & 1).
    // V (B of two n-tiles, x4 trans): positions lane & 15, dims 8 * (lane >> 4).
    const u32 qaddr = apt_smem_addr(Qs) + (warp * 16 + (lane & 15)) * ROWB + (lane >> 4) * 16;
    const u32 kaddr = apt_smem_addr(Ks) + ((lane & 7) + ((lane >> 4) << 3)) * ROWB + ((lane >> 3) & 1) * 16;
    const u32 vaddr = apt_smem_addr(Vs) + (lane & 15) * ROWB + (lane >> 4) * 16;

    float o[ON][4];
#pragma unroll
    for (u32 n = 0; n < ON; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
    u32 qf[QREG ? KS : 1][4];

    for (u32 j = 0; j < ntiles; j++) {
        apt_cp_wait();
        if (mode == 1) {
            // This thread's staged chunks of tile j to f16.
            constexpr u32 CPR = HDT / 4;
            u16* Kb = Ks + (j & 1) * KT * LD;
            u16* Vb = Vs + (j & 1) * KT * LD;
#pragma unroll 4
            for (u32 it = 0; it < KT * CPR / NT; it++) {
                const u32 i = it * NT + tid, tt = i / CPR, d = (i % CPR) * 4;
                const float4 k4 = *(const float4*)(St + tt * HDT + d);
                const float4 v4 = *(const float4*)(St + (KT + tt) * HDT + d);
                *(uint2*)(Kb + tt * LD + d) = make_uint2(apt_pack(k4.x, k4.y), apt_pack(k4.z, k4.w));
                *(uint2*)(Vb + tt * LD + d) = make_uint2(apt_pack(v4.x, v4.y), apt_pack(v4.z, v4.w));
            }
        }
        // Tile j (and Q) is in; every warp is done with tile j - 1, whose buffer is next.
        __syncthreads();
        if (j + 1 < ntiles) load_tile(j + 1);
        if constexpr (QREG) {
            if (j == 0) {
#pragma unroll
                for (u32 ks = 0; ks < KS; ks++) apt_ldsm(qf[ks], qaddr + ks * 32);
            }
        }
        const u32 t0 = j * KT;
        if (t0 >= wmax) continue; // no row of this warp sees the tile (warp-uniform)
        const u32 kb = kaddr + (j & 1) * KT * ROWB, vb = vaddr + (j & 1) * KT * ROWB;

        // S = Q K^T.
        float s[SN][4];
#pragma unroll
        for (u32 n = 0; n < SN; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (u32 ks = 0; ks < KS; ks++) {
            u32 qa[4];
            if constexpr (QREG) {
                qa[0] = qf[ks][0];
                qa[1] = qf[ks][1];
                qa[2] = qf[ks][2];
                qa[3] = qf[ks][3];
            } else {
                apt_ldsm(qa, qaddr + ks * 32);
            }
#pragma unroll
            for (u32 np = 0; np < KT / 16; np++) {
                if (t0 + np * 16 >= wmax) break; // masked below anyway
                u32 b[4];
                apt_ldsm(b, kb + np * 16 * ROWB + ks * 32);
                apt_mma(s[2 * np], qa, b[0], b[1]);
                apt_mma(s[2 * np + 1], qa, b[2], b[3]);
            }
        }
        // Causal mask: row r sees positions < len(r).
        if (t0 + KT > wmin) {
#pragma unroll
            for (u32 n = 0; n < SN; n++) {
                const u32 t = t0 + n * 8 + tig * 2;
                if (t >= lena) s[n][0] = -INFINITY;
                if (t + 1 >= lena) s[n][1] = -INFINITY;
                if (t >= lenb) s[n][2] = -INFINITY;
                if (t + 1 >= lenb) s[n][3] = -INFINITY;
            }
        }
        // Online softmax (base 2). A row without a visible position yet keeps m = -inf;
        // its reference is then 0, so its p and correction are 0, not NaN.
        float mxa = ma, mxb = mb;
#pragma unroll
        for (u32 n = 0; n < SN; n++) {
            mxa = fmaxf(mxa, fmaxf(s[n][0], s[n][1]));
            mxb = fmaxf(mxb, fmaxf(s[n][2], s[n][3]));
        }
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
        const float fa = mxa == -INFINITY ? 0.0f : mxa, fb = mxb == -INFINITY ? 0.0f : mxb;
        const float ca = apt_ex2(ma - fa), cb = apt_ex2(mb - fb);
        ma = mxa;
        mb = mxb;
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (u32 n = 0; n < SN; n++) {
            s[n][0] = apt_ex2(s[n][0] - fa);
            s[n][1] = apt_ex2(s[n][1] - fa);
            s[n][2] = apt_ex2(s[n][2] - fb);
            s[n][3] = apt_ex2(s[n][3] - fb);
            sa += s[n][0] + s[n][1];
            sb += s[n][2] + s[n][3];
        }
        la = la * ca + sa;
        lb = lb * cb + sb;
#pragma unroll
        for (u32 n = 0; n < ON; n++) {
            o[n][0] *= ca;
            o[n][1] *= ca;
            o[n][2] *= cb;
            o[n][3] *= cb;
        }
        // O += P V: the S fragments of n-tiles 2kk, 2kk + 1 are the A fragment of step kk.
#pragma unroll
        for (u32 kk = 0; kk < KT / 16; kk++) {
            if (t0 + kk * 16 >= wmax) break; // p = 0 there
            u32 pa[4];
            pa[0] = apt_pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = apt_pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = apt_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = apt_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (u32 dp = 0; dp < HDT / 16; dp++) {
                u32 b[4];
                apt_ldsm_t(b, vb + kk * 16 * ROWB + dp * 32);
                apt_mma(o[2 * dp], pa, b[0], b[1]);
                apt_mma(o[2 * dp + 1], pa, b[2], b[3]);
            }
        }
    }

    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    float* out = at<float>(c, a.out);
    if (ra < rows) {
        float* orow = out + ((u64)(ra / G) * a.n_heads + kvh * G + ra % G) * hd;
        const float il = 1.0f / la;
#pragma unroll
        for (u32 n = 0; n < ON; n++) {
            const u32 d = n * 8 + tig * 2;
            if (d < hd) orow[d] = o[n][0] * il;
            if (d + 1 < hd) orow[d + 1] = o[n][1] * il;
        }
    }
    if (rb < rows) {
        float* orow = out + ((u64)(rb / G) * a.n_heads + kvh * G + rb % G) * hd;
        const float il = 1.0f / lb;
#pragma unroll
        for (u32 n = 0; n < ON; n++) {
            const u32 d = n * 8 + tig * 2;
            if (d < hd) orow[d] = o[n][2] * il;
            if (d + 1 < hd) orow[d + 1] = o[n][3] * il;
        }
    }
}
#else
template <int HDT>
__device__ void attention_prefill_tc(const Ctx&, const Attention&) {
    __trap(); // never launched below sm_80 (src/kernels.rs loads the SIMT kernel there)
}
#endif

#define ATTENTION_PREFILL_TC(HDT)                                                                 \
    extern "C" __global__ void __launch_bounds__(APT_WARPS * 32)                                  \
        attention_prefill_##HDT(const Ctx c, const Attention a) {                                  \
        PDL_ENTER();                                                                              \
        attention_prefill_tc<HDT>(c, a);                                                          \
    }
ATTENTION_PREFILL_TC(64)
ATTENTION_PREFILL_TC(128)
ATTENTION_PREFILL_TC(256)
