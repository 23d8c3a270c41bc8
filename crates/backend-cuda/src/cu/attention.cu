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

// After a split of one (query, head) wrote its partial (every thread of the block calls
// this): the last of the `sa` splits to get here merges them, then re-arms its counter
// `c.counters[idx]` (zero again for the next launch).
__device__ void att_merge_last(const Ctx& c, u64 idx, u32 sa, const float* part0, u32 hd, float* out) {
    if (last_block(c.counters + idx, sa)) att_combine(part0, sa, hd, out);
}

extern "C" __global__ void __launch_bounds__(128) attention(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux & 0xffff;
    const bool fused = (c.aux >> 16) & 1;
    u32 pos = tok_word(c, 0, a.pos);
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
    att_merge_last(c, (u64)i * a.n_heads + h, sa, part0, hd, out);
}

// grid.x = n * n_heads; merges the active splits of one (query, head) when the
// attention launch could not (no counters).
extern "C" __global__ void attention_combine(const Ctx c, const Attention a) {
    PDL_ENTER();
    const u32 S = c.aux & 0xffff;
    u32 pos = tok_word(c, 0, a.pos);
    if ((u64)pos + a.n > a.ctx) return; // reported by `attention`
    const u32 i = blockIdx.x / a.n_heads;
    u32 chunk, sa;
    att_split(pos + i + 1, S, chunk, sa);
    if (sa == 1) return; // written by `attention`
    const u32 hd = a.head_dim;
    att_combine(c.scratch + (u64)blockIdx.x * S * (hd + 2), sa, hd, at<float>(c, a.out) + (u64)blockIdx.x * hd);
}

// Decode attention (n == 1, head_dim a multiple of 4, cache rows 16-byte (f32) or 8-byte
// (f16) aligned), latency first: grid = n_heads * S blocks of ATD_T threads. A block
// takes a chunk of at least ATD_MIN positions, so a short context runs one block per head
// and needs no merge; a long one spreads over up to S splits, merged by the last split to
// finish (counters, as above). Per tile of ATD_T positions: each thread scores one
// position (its K row by 16/8-byte loads, q from shared memory, every load in flight at
// once), the block updates its running max and sum, then groups of head_dim/4 threads
// accumulate p * V four dims per thread, G = ATD_T / (head_dim/4) positions side by side.
// The pos word (a host page) is read once per block.
#define ATD_T 128
#define ATD_MIN 128

template <bool F16> __device__ __forceinline__ float4 ld_cache4(const Ctx& c, u32 off, u64 i) {
    if (F16) {
        uint2 u = *(const uint2*)(at<u16>(c, off) + i);
        return make_float4(f16_to_f32(u.x & 0xffff), f16_to_f32(u.x >> 16), f16_to_f32(u.y & 0xffff),
                           f16_to_f32(u.y >> 16));
    }
    return *(const float4*)(at<float>(c, off) + i);
}

template <bool F16> __device__ void attention_dec_body(const Ctx& c, const Attention& a) {
    __shared__ u32 spos;
    __shared__ __align__(16) float qs[256];
    __shared__ float sp[ATD_T];
    __shared__ __align__(16) float4 sacc[ATD_T];
    const u32 S = c.aux & 0xffff;
    const bool fused = (c.aux >> 16) & 1;
    const u32 tid = threadIdx.x, s = blockIdx.x % S, h = blockIdx.x / S;
    const u32 hd = a.head_dim, kvh = h / (a.n_heads / a.n_kv_heads);
    if (tid == 0) spos = tok_word(c, 0, a.pos);
    const float* q = at<float>(c, a.q) + (u64)h * hd;
    for (u32 d = tid; d < hd; d += ATD_T) qs[d] = q[d] * a.scale;
    __syncthreads();
    const u32 pos = spos;
    if ((u64)pos + 1 > a.ctx) {
        if (tid == 0 && blockIdx.x == 0) report(c, ERR_ATTN_POS, pos, 1);
        return;
    }
    const u32 len = pos + 1;
    u32 chunk = len, sa = 1;
    if (S > 1) {
        chunk = max((len + S - 1) / S, (u32)ATD_MIN);
        sa = (len + chunk - 1) / chunk;
    }
    if (s >= sa) return;
    const u32 t0 = s * chunk, t1 = min(len, t0 + chunk);
    const u64 cbase = (u64)kvh * a.ctx * hd;
    const u32 nd4 = hd / 4, G = ATD_T / nd4, g = tid / nd4, d4 = tid % nd4;
    float m = -INFINITY, l = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (u32 tb = t0; tb < t1; tb += ATD_T) {
        const u32 cnt = min((u32)ATD_T, t1 - tb);
        float sc = -INFINITY;
        if (tid < cnt) {
            const u64 row = cbase + (u64)(tb + tid) * hd;
            float dot = 0.0f;
#pragma unroll 8
            for (u32 j = 0; j < nd4; j++) {
                float4 k4 = ld_cache4<F16>(c, a.k_cache, row + 4 * j);
                float4 q4 = ((const float4*)qs)[j];
                dot += k4.x * q4.x + k4.y * q4.y + k4.z * q4.z + k4.w * q4.w;
            }
            sc = dot;
        }
        const float mn = fmaxf(m, block_max(sc));
        const float p = tid < cnt ? expf(sc - mn) : 0.0f;
        sp[tid] = p;
        const float lt = block_sum(p); // its barriers also publish sp
        const float corr = expf(m - mn);
        l = l * corr + lt;
        m = mn;
        acc.x *= corr; acc.y *= corr; acc.z *= corr; acc.w *= corr;
        if (g < G) {
#pragma unroll 8
            for (u32 t = g; t < cnt; t += G) {
                const float pt = sp[t];
                const float4 v4 = ld_cache4<F16>(c, a.v_cache, cbase + (u64)(tb + t) * hd + 4 * d4);
                acc.x += pt * v4.x; acc.y += pt * v4.y; acc.z += pt * v4.z; acc.w += pt * v4.w;
            }
        }
        __syncthreads(); // sp is rewritten by the next tile
    }
    sacc[tid] = acc;
    __syncthreads();
    float* out = at<float>(c, a.out) + (u64)h * hd;
    float* part0 = c.scratch + (u64)h * S * (hd + 2);
    float* part = part0 + (u64)s * (hd + 2);
    if (tid < nd4) {
        float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (u32 gg = 0; gg < G; gg++) {
            float4 v = sacc[gg * nd4 + tid];
            o.x += v.x; o.y += v.y; o.z += v.z; o.w += v.w;
        }
        if (sa == 1) {
            const float inv = 1.0f / l;
            out[4 * tid] = o.x * inv; out[4 * tid + 1] = o.y * inv;
            out[4 * tid + 2] = o.z * inv; out[4 * tid + 3] = o.w * inv;
        } else {
            part[2 + 4 * tid] = o.x; part[3 + 4 * tid] = o.y;
            part[4 + 4 * tid] = o.z; part[5 + 4 * tid] = o.w;
        }
    }
    if (sa == 1) return;
    if (tid == 0) { part[0] = m; part[1] = l; }
    if (!fused) return; // (exec.rs launches this kernel split only with counters)
    att_merge_last(c, h, sa, part0, hd, out);
}

extern "C" __global__ void __launch_bounds__(ATD_T) attention_dec_f32(const Ctx c, const Attention a) {
    PDL_ENTER();
    attention_dec_body<false>(c, a);
}
extern "C" __global__ void __launch_bounds__(ATD_T) attention_dec_f16(const Ctx c, const Attention a) {
    PDL_ENTER();
    attention_dec_body<true>(c, a);
}

// rope(q), rope(k), kv_store, attention of one token as one launch (record-time fusion,
// exec.rs `rope_kv_attn_fusable`), split over positions: grid = n_kv_heads * S blocks
// (S: aux bits 0-15, S * RKA_CH >= ctx). Block (h, s) takes chunk s of positions 0..=pos
// (chunks of at least RKA_MIN positions, RKA_MIN_LONG past RKA_SHORT: a short context
// runs few blocks, with fewer partials to merge; blocks past the last chunk exit). Every
// block computes the token's angles (`rka_angles`, from the host's f64 frequencies) and
// rotates its group's q heads into shared memory. The block of the last chunk (the one
// that holds pos) also rotates k in place, stores k and v into the cache (the kv_store
// op) and uses that row from shared memory, rounded as the cache holds it.
// Rows before pos were written by earlier steps and nothing in this step writes them, so
// when the per-token words are known to be staged already (aux bit 17, graph.rs) the
// angles and the K and V rows of the block's first positions are loaded before the PDL
// wait: they overlap the kernels before this one.
// Scores: four threads per position (one K row serves the group's heads); softmax a warp
// per head; p * V by threads over (position group, 4 dims). With one active chunk the
// block writes the output; else each writes (max, sum, acc) per head and the last block
// of the KV head to finish (counter c.counters[h]) merges them. The block that writes the
// output also writes the rotated q (the rope op's output): every block has read q by then.
// Timeline marks (SAMEPAGE_CUDA_TRACE=3, the latest over blocks): 4 q and k rotated, 5
// softmax done, 6 the block's output or partial written, 7 the merge done.
#define RKA_T 256
#define RKA_CH 256
#define RKA_MIN 64       // positions a split at least, up to RKA_SHORT positions
#define RKA_SHORT 256
#define RKA_MIN_LONG 32  // beyond
#define RKA_G 4
#define RKA_VP 4
// fhi[j] + flo[j]: pair j's frequency in f64 (exec.rs `RopeKvAttn::new`).
struct RopeKvAttn { Rope q, k; KvStore s; Attention a; float fhi[64], flo[64]; };

// The cosines and sines of position p into cs / sn, by threads 0 .. RKA_T (`rope_angles`).
__device__ __forceinline__ void rka_angles(const RopeKvAttn& f, u32 p, float* cs, float* sn) {
    rope_angles(f.fhi, f.flo, f.q.n_rot / 2, p, cs, sn, RKA_T);
}

template <bool F16> __device__ __forceinline__ float cache_round(float x) {
    return F16 ? f16_to_f32(f32_to_f16(x)) : x;
}

// One warp over v[0 .. n) (shared memory): m = the max, v[i] = exp(v[i] - m) (0 where
// v[i] is -inf); returns the sum of v[i] * s[i] (s[i] = 1 without s) to every lane.
__device__ __forceinline__ float warp_exp_row(float* v, const float* s, u32 n, u32 lane, float& m) {
    m = -INFINITY;
    for (u32 i = lane; i < n; i += 32) m = fmaxf(m, v[i]);
    m = warp_max(m);
    float l = 0.0f;
    for (u32 i = lane; i < n; i += 32) {
        const float e = v[i] > -INFINITY ? expf(v[i] - m) : 0.0f;
        v[i] = e;
        l += s ? s[i] * e : e;
    }
    return warp_sum(l);
}

// The block's threads 0 .. RKA_T meet: the whole block, or in the megakernel (MG, mega.cu)
// its consumer warps (named barrier 1; its producer warp never joins).
template <bool MG> __device__ __forceinline__ void rka_sync() {
    if (MG) asm volatile("bar.sync 1, %0;" ::"n"(RKA_T) : "memory");
    else __syncthreads();
}

// A value an earlier step of the launch may have written: ld.cg in the megakernel.
template <bool MG> __device__ __forceinline__ float rka_ld(const float* p) { return MG ? __ldcg(p) : *p; }

// KJ: float4 columns of a K row per thread (4 threads a position): head_dim <= 16 KJ.
// unit: the block's (KV head, split) = (unit / S, unit % S); aux as the launch's c.aux.
// wait(): the PDL wait (own launch), or the megakernel's barrier before the step. In the
// megakernel, values the steps before wrote (q, k, v) are read with ld.cg (`rka_ld`): an
// earlier layer read the same addresses, and L1 does not see other SMs' writes.
template <bool F16, u32 KJ, bool MG, class Wait>
__device__ void rope_kv_attn_body(const Ctx& c, const RopeKvAttn& f, u32 unit, u32 aux, Wait wait) {
    __shared__ float cs[64], sn[64];
    __shared__ __align__(16) float qs[RKA_G][128];
    __shared__ __align__(16) float qr[RKA_G][128];
    __shared__ __align__(16) float kvs[2][128];
    __shared__ float sc[RKA_G][RKA_CH];
    __shared__ __align__(16) float4 red[RKA_T][RKA_G];
    __shared__ float sm[RKA_G], sl[RKA_G];
    const Attention& a = f.a;
    const KvStore& s = f.s;
    const u32 S = aux & 0xffff;
    const bool early = (aux >> 17) & 1;
    const u32 t = threadIdx.x, h = unit / S, sp = unit % S;
    const u32 hd = a.head_dim, G = a.n_heads / a.n_kv_heads, half = f.q.n_rot / 2, rest = hd - 2 * half;
    const u32 nd4 = hd / 4, PG = RKA_T / nd4, pg = t / nd4, d4 = t % nd4;
    const u32 pi = t >> 2, qq = t & 3;
    const u64 cbase = (u64)h * a.ctx * hd;
    const float4 z4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    TlGuard tl_guard_(c);
    u32 p = 0, pos = 0, t0 = 0, n = 0, sa = 1;
    float4 kp[KJ], vp[RKA_VP];
    // Positions, chunk, angles and the first K / V rows (never the row at pos).
    auto prologue = [&]() {
        p = tok_word(c, 0, f.q.positions);
        pos = tok_word(c, 2, s.pos);
        if ((u64)pos + 1 > s.ctx) return;
        const u32 len = pos + 1;
        const u32 amin = aux >> 24 ? (aux >> 24) * 8 : len <= RKA_SHORT ? (u32)RKA_MIN : (u32)RKA_MIN_LONG;
        const u32 chunk = max((len + S - 1) / S, amin);
        sa = (len + chunk - 1) / chunk;
        if (sp >= sa) return;
        t0 = sp * chunk;
        n = min(len, t0 + chunk) - t0;
#pragma unroll
        for (u32 jj = 0; jj < KJ; jj++) {
            const u32 j = qq + 4 * jj, tp = t0 + pi;
            kp[jj] = j < nd4 && pi < n && tp != pos ? ld_cache4<F16>(c, a.k_cache, cbase + (u64)tp * hd + 4 * j) : z4;
        }
#pragma unroll
        for (u32 i = 0; i < RKA_VP; i++) {
            const u32 tp = pg + i * PG;
            vp[i] = pg < PG && tp < n && t0 + tp != pos ? ld_cache4<F16>(c, a.v_cache, cbase + (u64)(t0 + tp) * hd + 4 * d4) : z4;
        }
        rka_angles(f, p, cs, sn);
    };
    if (early) prologue();
    // A block past the last chunk has nothing to do: with the position known it leaves
    // now instead of holding its SM slot through the wait (short contexts use few chunks).
    if (early && (u64)pos + 1 <= s.ctx && sp >= sa) return;
    wait();
    tl_guard_.waited();
    if (!early) prologue();
    if ((u64)pos + 1 > s.ctx) {
        if (t == 0 && unit == 0) report(c, ERR_KV_POS, pos, 1);
        return;
    }
    if (sp >= sa) return;
    const bool writer = sp == sa - 1;
    rka_sync<MG>(); // cs / sn
    float* qx = at<float>(c, f.q.x) + (u64)h * G * hd;
    float* kx = at<float>(c, f.k.x) + (u64)h * hd;
    for (u32 i = t; i < (G + writer) * half; i += RKA_T) {
        const u32 hh = i / half, j = i % half;
        float* v = hh == G ? kx : qx + (u64)hh * hd;
        u32 ia, ib;
        rope_pair(f.q, j, ia, ib);
        const float x0 = rka_ld<MG>(v + ia), x1 = rka_ld<MG>(v + ib);
        const float y0 = x0 * cs[j] - x1 * sn[j], y1 = x0 * sn[j] + x1 * cs[j];
        if (hh < G) {
            qr[hh][ia] = y0;
            qr[hh][ib] = y1;
            qs[hh][ia] = y0 * a.scale;
            qs[hh][ib] = y1 * a.scale;
        } else {
            v[ia] = y0;
            v[ib] = y1;
            kvs[0][ia] = cache_round<F16>(y0);
            kvs[0][ib] = cache_round<F16>(y1);
        }
    }
    for (u32 i = t; i < (G + writer) * rest; i += RKA_T) {
        const u32 hh = i / rest, d = 2 * half + i % rest;
        if (hh < G) {
            const float x = rka_ld<MG>(qx + (u64)hh * hd + d);
            qr[hh][d] = x;
            qs[hh][d] = x * a.scale;
        } else {
            kvs[0][d] = cache_round<F16>(rka_ld<MG>(kx + d));
        }
    }
    if (writer) {
        const float* vx = at<float>(c, s.v) + (u64)h * hd;
        for (u32 d = t; d < hd; d += RKA_T) kvs[1][d] = cache_round<F16>(rka_ld<MG>(vx + d));
    }
    rka_sync<MG>(); // k rotated in place, kvs, qs
    tl_guard_.mark(4);
    // The kv_store: in the megakernel the rows as the cache holds them (kvs: k rotated,
    // both rounded; `store_kv_head` strides over the whole block, producer warp included).
    if (writer && !MG) store_kv_head(c, s, (u64)h * hd, ((u64)h * s.ctx + pos) * hd);
    if (writer && MG) {
        const u64 dst = ((u64)h * s.ctx + pos) * hd;
        for (u32 d = t; d < hd; d += RKA_T) {
            if (F16) {
                at<u16>(c, s.k_cache)[dst + d] = f32_to_f16(kvs[0][d]);
                at<u16>(c, s.v_cache)[dst + d] = f32_to_f16(kvs[1][d]);
            } else {
                at<float>(c, s.k_cache)[dst + d] = kvs[0][d];
                at<float>(c, s.v_cache)[dst + d] = kvs[1][d];
            }
        }
    }

    // Scores, RKA_T / 4 positions per tile; the first tile's K rows are in kp.
    for (u32 tb = 0; tb < n; tb += RKA_T / 4) {
        const u32 tp = tb + pi;
        const bool own = t0 + tp == pos;
        // Tiles after the first (chunks over RKA_T / 4 positions: long contexts): the
        // tile's K row in kp with all its loads in flight at once (the compiler, short of
        // registers, otherwise issued each load at its use: KJ round trips a tile).
        if (tb > 0) {
#pragma unroll
            for (u32 jj = 0; jj < KJ; jj++) {
                const u32 j = qq + 4 * jj;
                kp[jj] = j < nd4 && tp < n && !own ? ld_cache4<F16>(c, a.k_cache, cbase + (u64)(t0 + tp) * hd + 4 * j) : z4;
            }
        }
        float d[RKA_G];
#pragma unroll
        for (u32 g = 0; g < RKA_G; g++) d[g] = 0.0f;
#pragma unroll
        for (u32 jj = 0; jj < KJ; jj++) {
            const u32 j = qq + 4 * jj;
            if (j < nd4) {
                float4 k4 = kp[jj];
                if (own) k4 = ((const float4*)kvs[0])[j];
#pragma unroll
                for (u32 g = 0; g < RKA_G; g++) {
                    if (g < G) {
                        const float4 q4 = ((const float4*)qs[g])[j];
                        d[g] += k4.x * q4.x + k4.y * q4.y + k4.z * q4.z + k4.w * q4.w;
                    }
                }
            }
        }
#pragma unroll
        for (u32 g = 0; g < RKA_G; g++) {
            d[g] += __shfl_xor_sync(0xffffffffu, d[g], 1);
            d[g] += __shfl_xor_sync(0xffffffffu, d[g], 2);
            if (qq == 0 && tp < n && g < G) sc[g][tp] = d[g];
        }
    }
    rka_sync<MG>();
    const u32 warp = t >> 5, lane = t & 31;
    if (warp < G) {
        float m;
        const float l = warp_exp_row(sc[warp], nullptr, n, lane, m);
        if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    }
    rka_sync<MG>();
    tl_guard_.mark(5);
    float4 acc[RKA_G];
#pragma unroll
    for (u32 g = 0; g < RKA_G; g++) acc[g] = z4;
    if (pg < PG) {
        auto pv = [&](u32 tp, float4 v4) {
#pragma unroll
            for (u32 g = 0; g < RKA_G; g++) {
                const float pw = g < G ? sc[g][tp] : 0.0f;
                acc[g].x += pw * v4.x; acc[g].y += pw * v4.y; acc[g].z += pw * v4.z; acc[g].w += pw * v4.w;
            }
        };
#pragma unroll
        for (u32 i = 0; i < RKA_VP; i++) {
            const u32 tp = pg + i * PG;
            if (tp < n) pv(tp, t0 + tp == pos ? ((const float4*)kvs[1])[d4] : vp[i]);
        }
        // Longer chunks: VB rows' loads in flight at a time into vp (four; two in the
        // narrow kernel and the megakernel, which spill with four).
        constexpr u32 VB = KJ >= 8 && !MG ? RKA_VP : 2;
        for (u32 tb = pg + RKA_VP * PG; tb < n; tb += VB * PG) {
#pragma unroll
            for (u32 i = 0; i < VB; i++) {
                const u32 tp = tb + i * PG;
                vp[i] = tp < n && t0 + tp != pos ? ld_cache4<F16>(c, a.v_cache, cbase + (u64)(t0 + tp) * hd + 4 * d4) : z4;
            }
#pragma unroll
            for (u32 i = 0; i < VB; i++) {
                const u32 tp = tb + i * PG;
                if (tp < n) pv(tp, t0 + tp == pos ? ((const float4*)kvs[1])[d4] : vp[i]);
            }
        }
    }
#pragma unroll
    for (u32 g = 0; g < RKA_G; g++) red[t][g] = acc[g];
    rka_sync<MG>();
    float* out = at<float>(c, a.out) + (u64)h * G * hd;
    if (t < G * nd4) {
        const u32 g = t / nd4, e4 = t % nd4;
        float4 o = z4;
        for (u32 q = 0; q < PG; q++) {
            const float4 v = red[q * nd4 + e4][g];
            o.x += v.x; o.y += v.y; o.z += v.z; o.w += v.w;
        }
        if (sa == 1) {
            const float inv = 1.0f / sl[g];
            float* ob = out + (u64)g * hd + 4 * e4;
            ob[0] = o.x * inv; ob[1] = o.y * inv; ob[2] = o.z * inv; ob[3] = o.w * inv;
        } else {
            float* part = c.scratch + ((u64)(h * G + g) * S + sp) * (hd + 2);
            part[2 + 4 * e4] = o.x; part[3 + 4 * e4] = o.y; part[4 + 4 * e4] = o.z; part[5 + 4 * e4] = o.w;
            if (e4 == 0) { part[0] = sm[g]; part[1] = sl[g]; }
        }
    }
    tl_guard_.mark(6);
    if (sa > 1) {
        if (!last_block(c.counters + h, sa, [] { rka_sync<MG>(); })) return;
        // The merge: every split's (max, sum) of the group's heads into shared memory in
        // one round of independent loads (sc is free again, sa <= 64), the weights
        // exp(m_q - M) and the total sum per head, then each output element sums its
        // splits' values with eight loads in flight (was two chains of sa dependent
        // L2 round trips: ~4 us at sa = 16).
        for (u32 i = t; i < G * sa; i += RKA_T) {
            const u32 g = i / sa, q = i % sa;
            const float* pq = c.scratch + ((u64)(h * G + g) * S + q) * (hd + 2);
            sc[g][q] = __ldcg(pq);
            sc[g][RKA_CH / 2 + q] = __ldcg(pq + 1);
        }
        rka_sync<MG>();
        if (warp < G) {
            float m;
            const float l = warp_exp_row(sc[warp], sc[warp] + RKA_CH / 2, sa, lane, m);
            if (lane == 0) sl[warp] = l;
        }
        rka_sync<MG>();
        for (u32 i = t; i < G * hd; i += RKA_T) {
            const u32 g = i / hd, dd = i % hd, st = hd + 2;
            const float* p0 = c.scratch + (u64)(h * G + g) * S * st + 2 + dd;
            float o = 0.0f;
            u32 q = 0;
            for (; q + 8 <= sa; q += 8) {
                float v[8];
#pragma unroll
                for (u32 j = 0; j < 8; j++) v[j] = __ldcg(p0 + (q + j) * st);
#pragma unroll
                for (u32 j = 0; j < 8; j++) o = fmaf(v[j], sc[g][q + j], o);
            }
            for (; q < sa; q++) o = fmaf(__ldcg(p0 + q * st), sc[g][q], o);
            out[(u64)g * hd + dd] = o / sl[g];
        }
        tl_guard_.mark(7);
    }
    // The rope op's output: q rotated (every block of the group has read q).
    for (u32 i = t; i < G * hd; i += RKA_T) qx[i] = qr[i / hd][i % hd];
}

// Any head_dim up to 128, and head_dim <= 64 (`_64`: half the K registers, at most 80
// registers so that the block fits an SM beside two quantized matvec blocks, which hold
// their SM while this launch's blocks wait on them).
// The launch's own body: its PDL wait (and trigger), its block index as the unit.
template <bool F16, u32 KJ> __device__ __forceinline__ void rope_kv_attn_launch(const Ctx& c, const RopeKvAttn& f) {
    rope_kv_attn_body<F16, KJ, false>(c, f, blockIdx.x, c.aux, [] {
        PDL_WAIT_ONLY();
        PDL_TRIGGER();
    });
}
extern "C" __global__ void __launch_bounds__(RKA_T) rope_kv_attn_f32(const Ctx c, const RopeKvAttn f) {
    rope_kv_attn_launch<false, 8>(c, f);
}
extern "C" __global__ void __launch_bounds__(RKA_T) rope_kv_attn_f16(const Ctx c, const RopeKvAttn f) {
    rope_kv_attn_launch<true, 8>(c, f);
}
extern "C" __global__ void __launch_bounds__(RKA_T, 3) rope_kv_attn_64_f32(const Ctx c, const RopeKvAttn f) {
    rope_kv_attn_launch<false, 4>(c, f);
}
extern "C" __global__ void __launch_bounds__(RKA_T, 3) rope_kv_attn_64_f16(const Ctx c, const RopeKvAttn f) {
    rope_kv_attn_launch<true, 4>(c, f);
}
