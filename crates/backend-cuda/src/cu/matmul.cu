// Matmul: out (n, m) (+)= x (n, k) . W (m, k)^T (+ bias).
// n == 1 (decode) is memory-bound: a warp per row, 16-byte loads, several in flight.
// n > 1 (prefill) uses a shared-memory tiled kernel.

// Writes (and returns) the output element: bias added, accumulated into out if asked.
__device__ __forceinline__ float store_out(const Ctx& c, const Matmul& mm, u32 token, u32 row, float v) {
    if (mm.flags & MATMUL_BIAS) v += at<float>(c, mm.bias)[row];
    float* o = at<float>(c, mm.out) + (u64)token * mm.m + row;
    if (mm.flags & MATMUL_ACCUMULATE) v += *o;
    *o = v;
    return v;
}

// aux bit 9 (quantized only; the host sets it where no op of the graph writes W): the
// block waits on the previous kernel (PDL) only after its warps' first two chunks of W
// are in flight (`gemv_quant`), as the pipelined dense matvec issues its first stage.
#define MV_EARLY 512u
// aux bit 10 (quantized, sm_90, k <= QKW, 16-byte aligned rows; the host grants the
// dynamic shared memory `QRing`): W's chunks reach shared memory by bulk copies (TMA)
// into a ring of NB buffers per warp instead of through registers, so each warp keeps NB
// chunks in flight (the register path holds two).
#define MV_TMA 1024u
// aux bit 11 (with MV_TMA, one warp per row, a single matvec or a gate/up pair): tiles
// after the first are taken from a counter (c.counters[QMV_COUNTER], and the next word
// counts the blocks done; the last re-arms both).
#define MV_DYN 2048u
#define QMV_COUNTER 4093

// 8 activations from x (aligned: two float4 loads).
__device__ __forceinline__ void load_x8(const float* x, float* xs, bool xa) {
    if (xa) {
        float4 a = __ldg((const float4*)x), b = __ldg((const float4*)x + 1);
        xs[0] = a.x; xs[1] = a.y; xs[2] = a.z; xs[3] = a.w;
        xs[4] = b.x; xs[5] = b.y; xs[6] = b.z; xs[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) xs[i] = __ldg(x + i);
    }
}

// Split rows (aux bits 4-5 = log2 warps per row, "wpr"): a block of 8 warps holds
// 8 / wpr rows; the wpr warps of a row stride over its k and their sums meet in shared
// memory. Long rows (down: k = 8192, m = 2048) so get enough warps to fill every SM.
__device__ __forceinline__ float row_reduce(float acc, u32 warp, u32 lane, u32 ls) {
    __shared__ float red[8];
    if (ls == 0) return acc;
    if (lane == 0) red[warp] = acc;
    __syncthreads();
    float t = 0.0f;
    if ((warp & ((1u << ls) - 1)) == 0)
        for (u32 w = 0; w < (1u << ls); w++) t += red[warp + w];
    return t;
}

// Dense f32/f16/bf16 matvec. aux bits 2-3: the widest load each lane streams W with
// (3: 16 bytes, 2: 8, 1: 4; 0: element by element), from the alignment of W's rows
// (checked on the host: safetensors data is often only 8-byte aligned); aux bit 1: x
// 16-byte aligned (float4 loads). UNROLL loads in flight per lane.
template <u32 VB> struct VecT;
template <> struct VecT<16> { typedef uint4 T; };
template <> struct VecT<8> { typedef uint2 T; };
template <> struct VecT<4> { typedef u32 T; };

template <u32 DT, u32 VB, bool XA>
__device__ __forceinline__ float dense_chunk(const typename VecT<VB>::T& r, const float* xp) {
    constexpr u32 NW = VB / 4, EPC = DT == DT_F32 ? NW : 2 * NW;
    const u32* p = (const u32*)&r;
    float xs[EPC];
    if (EPC % 4 == 0 && XA) {
#pragma unroll
        for (u32 j = 0; j < EPC / 4; j++) {
            float4 v = __ldg((const float4*)xp + j);
            xs[4 * j] = v.x; xs[4 * j + 1] = v.y; xs[4 * j + 2] = v.z; xs[4 * j + 3] = v.w;
        }
    } else {
#pragma unroll
        for (u32 j = 0; j < EPC; j++) xs[j] = __ldg(xp + j);
    }
    float acc = 0.0f;
#pragma unroll
    for (u32 e = 0; e < NW; e++) {
        if (DT == DT_F32) {
            acc += __uint_as_float(p[e]) * xs[e];
        } else {
            u16 lo = p[e] & 0xFFFF, hi = p[e] >> 16;
            float w0 = DT == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            float w1 = DT == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
            acc += w0 * xs[2 * e] + w1 * xs[2 * e + 1];
        }
    }
    return acc;
}

template <u32 DT, u32 VB, bool XA>
__device__ __forceinline__ float dense_row(const u8* w, const float* x, u32 k, u32 sub, u32 lane, u32 wpr) {
    typedef typename VecT<VB>::T V;
    constexpr u32 EPC = DT == DT_F32 ? VB / 4 : VB / 2;
    constexpr int UNROLL = 8;
    const u32 chunks = k / EPC, S = 32 * wpr;
    const V* wv = (const V*)w;
    float acc = 0.0f;
    u32 ch = sub * 32 + lane;
    for (; ch + S * (UNROLL - 1) < chunks; ch += S * UNROLL) {
        V r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) r[u] = __ldg(wv + ch + S * u);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) acc += dense_chunk<DT, VB, XA>(r[u], x + (u64)(ch + S * u) * EPC);
    }
    for (; ch < chunks; ch += S) acc += dense_chunk<DT, VB, XA>(__ldg(wv + ch), x + (u64)ch * EPC);
    return acc;
}

template <u32 DT>
__device__ void gemv_dense(const Ctx& c, const Matmul& mm, bool, u32 bx) {
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 ls = (c.aux >> 4) & 3, wpr = 1u << ls, sub = warp & (wpr - 1);
    const u32 row = bx * (8u >> ls) + (warp >> ls);
    const bool ok = row < mm.m;
    if (ls == 0 && !ok) return;
    float acc = 0.0f;
    if (ok) {
        const u8* w = c.base + mm.w + (u64)row * row_bytes(DT, mm.k);
        const float* x = at<float>(c, mm.x);
        const bool xa = c.aux & 2;
        switch ((c.aux >> 2) & 3) {
        case 3:
            acc = xa ? dense_row<DT, 16, true>(w, x, mm.k, sub, lane, wpr)
                     : dense_row<DT, 16, false>(w, x, mm.k, sub, lane, wpr);
            break;
        case 2:
            acc = xa ? dense_row<DT, 8, true>(w, x, mm.k, sub, lane, wpr)
                     : dense_row<DT, 8, false>(w, x, mm.k, sub, lane, wpr);
            break;
        case 1: acc = dense_row<DT, 4, false>(w, x, mm.k, sub, lane, wpr); break;
        default:
            if (sub == 0)
                for (u32 i = lane; i < mm.k; i += 32) acc += dq_elem(DT, w, i) * x[i];
        }
    }
    acc = warp_sum(acc);
    acc = row_reduce(acc, warp, lane, ls);
    if (ok && sub == 0 && lane == 0) store_out(c, mm, 0, row, acc);
}

// Quantized matvec. A block of 8 warps takes RB consecutive rows (aux bits 16-23; the launch
// has ceil(m / RB) blocks) and first quantizes x to i16 per 32 elements into shared memory
// (`XQ` in quant.cuh), in windows of QKW elements; the dot products are then integer (dp2a).
// Each warp takes rows rl, rl + 8 / wpr, ... of the block and, with wpr warps per row (aux
// bits 4-5), every wpr-th chunk of each. A chunk is CB quant blocks (32 lane units, a
// multiple of 16 bytes) staged through the warp's shared memory: the warp's next two chunks
// are in flight in registers while one is decoded (the first two before x is quantized).
// A warp's sum per row goes to `part[row][sub]`, summed in a fixed order at the end.
template <u32 DT> struct QChunk { static constexpr u32 CB = 32 / QUnit<DT>::PER_BLOCK; };
// The TMA path's ring (MV_TMA): per warp NB buffers of CP bytes (a chunk and 16 bytes of
// slack for the decoders' word reads), NB as many as fit 56 KiB for the block's 8 warps,
// at most 8. exec.rs `qmv_ring_bytes` computes the same.
template <u32 DT> struct QRing {
    static constexpr u32 CHUNK = QChunk<DT>::CB * blk_bytes(DT);
    static constexpr u32 CP = (CHUNK + 16 + 15) / 16 * 16;
    static constexpr u32 NB = 57344u / (8u * CP) < 8u ? 57344u / (8u * CP) : 8u;
};
#define QEARLY 2 // TMA path: chunks per warp issued before the PDL wait (MV_EARLY)
#define QKW 8192
#define QPART 512 // RB * wpr at most

// The rmsnorm before a quantized matvec group, fused (exec.rs `launch_mv`): x is the
// rmsnorm's input (one window: k <= QKW, 16-byte aligned x, weight and out); every block
// normalises it itself and block b also writes the 8-element chunks c with c % G == b of
// the rmsnorm's out.
struct XNorm { u32 on, x, w, out; float eps; };

// With `pre`, `wpre` holds the norm weight at this thread's elements, read already (before
// the PDL wait: no op writes it).
// `loaded()` runs (every thread) once the loads of x are issued, before their values are used.
template <typename F>
__device__ __forceinline__ void quantize_x(const float* x, bool xa, u32 kw, uint4* xq, float* xd, int* xs,
                                           const Ctx& c, const XNorm& nm, const float (&wpre)[4][8], bool pre,
                                           F&& loaded) {
    // Thread t: 8 activations at 8 (t + 256 i); lanes t & ~3 .. t | 3 hold one 32-block.
    float v[4][8];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 e = 8 * (threadIdx.x + 256 * i);
        if (8 * 256 * i < kw) {
            if (e < kw) {
                load_x8(x + e, v[i], xa);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) v[i][j] = 0.0f;
            }
        }
    }
    loaded();
    if (nm.on) { // uniform
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (8 * 256 * i < kw)
#pragma unroll
                for (int j = 0; j < 8; j++) ss += v[i][j] * v[i][j];
        ss = block_sum(ss);
        const float inv = 1.0f / sqrtf(ss / (float)kw + nm.eps);
        const float* w = at<float>(c, nm.w);
        float* out = at<float>(c, nm.out);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 e = 8 * (threadIdx.x + 256 * i);
            if (8 * 256 * i < kw && e < kw) {
                float wv[8];
                if (pre) {
#pragma unroll
                    for (int j = 0; j < 8; j++) wv[j] = wpre[i][j];
                } else {
                    load_x8(w + e, wv, true);
                }
#pragma unroll
                for (int j = 0; j < 8; j++) v[i][j] = v[i][j] * inv * wv[j];
                if ((e / 8) % gridDim.x == blockIdx.x) {
                    *(float4*)(out + e) = make_float4(v[i][0], v[i][1], v[i][2], v[i][3]);
                    *((float4*)(out + e) + 1) = make_float4(v[i][4], v[i][5], v[i][6], v[i][7]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (8 * 256 * i >= kw) break; // uniform
        const u32 e = 8 * (threadIdx.x + 256 * i);
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(v[i][j]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        // q = round(v / d) to nearest even, by the float magic 1.5 * 2^23: the bits of
        // v * id + 1.5 * 2^23 are 0x4B400000 + q for |q| < 2^22, so their low 16 bits are q's
        // and the sum of 8 is sum(q) + 8 * 0x4B400000 (mod 2^32). |v * id| <= 32767.01.
        const float d = amax * (1.0f / 32767.0f), id = amax > 0.0f ? __fdividef(32767.0f, amax) : 0.0f;
        u32 q[8], qs = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            q[j] = __float_as_uint(fmaf(v[i][j], id, 12582912.0f));
            qs += q[j];
        }
        int sum = (int)(qs - 8u * 0x4B400000u);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        if (e < kw) {
            uint4 p;
            p.x = __byte_perm(q[0], q[1], 0x5410);
            p.y = __byte_perm(q[2], q[3], 0x5410);
            p.z = __byte_perm(q[4], q[5], 0x5410);
            p.w = __byte_perm(q[6], q[7], 0x5410);
            xq[xpos(e >> 3)] = p;
            if ((threadIdx.x & 1) == 0) xs[e >> 4] = sum;
            if ((threadIdx.x & 3) == 0) xd[e >> 5] = d;
        }
    }
}

__device__ __forceinline__ void quantize_x(const float* x, bool xa, u32 kw, uint4* xq, float* xd, int* xs,
                                           const Ctx& c, const XNorm& nm) {
    const float none[4][8] = {};
    quantize_x(x, xa, kw, xq, xd, xs, c, nm, none, false, [] {});
}

// `up` (TMA path only; exec.rs `launch_matvecs_swiglu`): the block takes RB / 2 rows of
// mm (gate) and the same rows of upm, and writes silu(gate) * up to sw_out as well (the
// swiglu op after them), each element by the thread that stored its gate and up values.
template <u32 DT>
__device__ void gemv_quant(const Ctx& c, const Matmul& mm, bool vec, bool xa, u32 bx, const TlGuard& tg,
                           const XNorm& nm, const bool up = false, const Matmul upm = Matmul{}, u32 sw_out = 0) {
    constexpr u32 CB = QChunk<DT>::CB, BB = blk_bytes(DT), BE = blk_elems(DT), UPB = QUnit<DT>::PER_BLOCK;
    constexpr u32 CHUNK = CB * BB, CE = CB * BE, CPW = QKW / CE, QREG = (CHUNK / 16 + 31) / 32;
    __shared__ __align__(16) u8 stage[8][CHUNK + 16];
    __shared__ uint4 xq[xpos(QKW / 8)];
    __shared__ float xd[QKW / 32];
    __shared__ int xs[QKW / 16];
    __shared__ float part[QPART];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 ls = (c.aux >> 4) & 3, wpr = 1u << ls, sub = warp & (wpr - 1), rl = warp >> ls, RG = 8u >> ls;
    const u32 RB = (c.aux >> 16) & 0xFF, RBh = up ? RB / 2 : RB, r0 = bx * RBh;
    const u32 Rh = min(RBh, mm.m - r0), R = up ? 2 * Rh : Rh; // virtual rows: gate, then up
    const u32 nrows = rl < R ? (R - rl + RG - 1) / RG : 0u; // this warp's rows
    const u32 rb = mm.k / BE * BB; // row bytes (a row lies inside the 4 GiB region)
    const u8* w = c.base + mm.w + (u64)r0 * rb;
    u8* s = stage[warp];
    const XQ X = {xq, xd, xs};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (vec && (c.aux & MV_TMA) && mm.k <= QKW) {
        // Tiles of RBh rows of mm (and with `up` the same rows of upm: 2 RBh virtual rows,
        // gate then up). The block takes tile bx; with MV_DYN (one warp per row) it then
        // takes tiles G, G + 1, ... from a counter, whoever asks first, so blocks that
        // started late (their SM still held the previous kernel's blocks) do fewer, and x is
        // quantized once per block. Tile ids: tq[k % 4] for the block's k-th tile; the id of
        // tile k + 2 is fetched during tile k and published by the barrier that ends it.
        // Each warp's items (row of the tile, chunk) run through a ring of NB buffers; lane
        // 0 keeps NB of them in flight, into the next tile as well, item i in buffer i % NB.
        constexpr u32 CP = QRing<DT>::CP, NB = QRing<DT>::NB;
        extern __shared__ __align__(128) u8 qring[];
        __shared__ __align__(8) u64 qbar[8][NB];
        __shared__ u32 tq[4];
        const bool dyn = c.aux & MV_DYN;
        const u32 kw = mm.k, nch = (kw / BE + CB - 1) / CB, G = gridDim.x;
        const u32 ntiles = (mm.m + RBh - 1) / RBh;
        const u32 ring = (u32)__cvta_generic_to_shared(qring + warp * NB * CP);
        const u32 bars = (u32)__cvta_generic_to_shared(&qbar[warp][0]);
        u32* ctr = c.counters + QMV_COUNTER;
        // Virtual rows of tile id t.
        auto rows_of = [&](u32 t) {
            const u32 h = t < ntiles ? min(RBh, mm.m - t * RBh) : 0u;
            return up ? 2 * h : h;
        };
        // The producer: tile sequence pk, row and chunk in it.
        u32 pk = 0, prow = rl, pci = sub, issued = 0;
        auto issue = [&](u32 known) -> bool { // tiles below sequence `known` have ids
            for (;;) {
                if (pk >= known) return false;
                const u32 t = tq[pk & 3], R = rows_of(t);
                if (t >= ntiles) return false;
                if (sub < nch && prow < R) break;
                pk++;
                prow = rl;
                pci = sub;
            }
            const u32 t = tq[pk & 3], h = min(RBh, mm.m - t * RBh), r0t = t * RBh;
            const u32 off = pci * CHUNK, bytes = min(CHUNK, rb - off), b = issued % NB;
            const u8* src = c.base + (prow < h ? mm.w + (u64)(r0t + prow) * rb : upm.w + (u64)(r0t + prow - h) * rb);
            mvp_expect(bars + 8 * b, bytes);
            mvp_bulk(ring + b * CP, src + off, bytes, bars + 8 * b);
            pci += wpr;
            if (pci >= nch) { pci = sub; prow += RG; }
            issued++;
            return true;
        };
        if (threadIdx.x == 0) {
            tq[0] = bx;
            tq[1] = ntiles; // static: one tile (dynamic: fetched after the wait)
        }
        if (lane == 0) {
            for (u32 i = 0; i < NB; i++)
                asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bars + 8 * i) : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        if (c.aux & MV_EARLY) { // W's first chunks in flight, then wait
            const u32 qe = (c.aux >> 24) & 0xF; // chunks per warp (0: QEARLY)
            if (lane == 0)
                for (u32 i = 0; i < min(qe ? qe : QEARLY, NB) && issue(1); i++) {}
            PDL_WAIT_ONLY();
            tg.waited();
            PDL_TRIGGER();
        }
        if (dyn && threadIdx.x == 0) tq[1] = G + atomicAdd(ctr, 1u);
        if (nm.on) quantize_x(at<float>(c, nm.x), true, kw, xq, xd, xs, c, nm);
        else quantize_x(at<float>(c, mm.x), xa, kw, xq, xd, xs, c, nm);
        for (u32 i = threadIdx.x; i < QPART; i += blockDim.x) part[i] = 0.0f;
        __syncthreads(); // x, tq[1], part
        if (lane == 0)
            while (issued < NB && issue(2)) {}
        u32 done = 0;
        for (u32 k = 0;; k++) {
            const u32 t = tq[k & 3];
            if (t >= ntiles) break;
            const u32 R = rows_of(t), h = up ? R / 2 : R, r0t = t * RBh;
            float* pt = part + (k & 1) * (QPART / 2);
            if (dyn && threadIdx.x == 0) tq[(k + 2) & 3] = tq[(k + 1) & 3] < ntiles ? G + atomicAdd(ctr, 1u) : ntiles;
            float acc = 0.0f;
            for (u32 row = rl, ci = sub; sub < nch && row < R;) {
                const u32 b = done % NB;
                mvp_wait_bar(bars + 8 * b, (done / NB) & 1);
                const u8* sb = qring + (warp * NB + b) * CP;
                const u32 units = min(CHUNK, rb - ci * CHUNK) / BB * UPB;
                for (u32 u = lane; u < units; u += 32) acc += QUnit<DT>::dot(sb, u, X, ci * CE);
                __syncwarp(); // every lane is done with buffer b
                if (lane == 0) issue(k + 2);
                done++;
                const u32 r = row;
                ci += wpr;
                if (ci >= nch) { ci = sub; row += RG; }
                if (row != r) { // the row's last chunk of this warp
                    acc = warp_sum(acc);
                    if (lane == 0) pt[r * wpr + sub] += acc;
                    acc = 0.0f;
                }
            }
            __syncthreads(); // the tile's sums; tq[k + 2]
            for (u32 i = threadIdx.x; i < h; i += blockDim.x) {
                float v = 0.0f;
                for (u32 j = 0; j < wpr; j++) { v += pt[i * wpr + j]; pt[i * wpr + j] = 0.0f; }
                v = store_out(c, mm, 0, r0t + i, v);
                if (up) {
                    float u = 0.0f;
                    for (u32 j = 0; j < wpr; j++) { u += pt[(i + h) * wpr + j]; pt[(i + h) * wpr + j] = 0.0f; }
                    u = store_out(c, upm, 0, r0t + i, u);
                    at<float>(c, sw_out)[r0t + i] = v / (1.0f + expf(-v)) * u;
                }
            }
            if (lane == 0)
                while (issued < done + NB && issue(k + 3)) {}
        }
        if (dyn && threadIdx.x == 0) { // the last block out re-arms the counters
            __threadfence();
            if (atomicAdd(ctr + 1, 1u) == G - 1) {
                ctr[0] = 0;
                ctr[1] = 0;
            }
        }
        return;
    }
#endif
    if (up) return; // (the host pairs only where the TMA path runs)
    for (u32 i = threadIdx.x; i < R * wpr; i += blockDim.x) part[i] = 0.0f;
    uint4 ra[QREG], rc[QREG];
    const u32 nwin = (mm.k + QKW - 1) / QKW;
    for (u32 win = 0; win < nwin; win++) {
        const u32 kw = min((u32)QKW, mm.k - win * QKW);
        const u32 nch = (kw / BE + CB - 1) / CB; // chunks of a row in this window
        // This warp's items: (local row, window chunk), rows rl, rl + RG, ..., chunks sub,
        // sub + wpr, ... < nch. Two cursors: the item being decoded and the one being fetched.
        const bool any = sub < nch && nrows > 0;
        const u32 rend = rl + nrows * RG;
        struct Cur { u32 row, ci; };
        auto advance = [&](Cur& k) {
            k.ci += wpr;
            if (k.ci >= nch) { k.ci = sub; k.row += RG; }
        };
        auto fetch = [&](uint4 (&r)[QREG], const Cur& k) {
            if (!vec || k.row >= rend) return;
            const u32 off = (win * CPW + k.ci) * CHUNK, bytes = min(CHUNK, rb - off);
            const uint4* src = (const uint4*)(w + (u64)k.row * rb + off);
#pragma unroll
            for (int i = 0; i < QREG; i++) {
                const u32 idx = lane + 32 * i;
                if (idx * 16 < bytes) r[i] = __ldg(src + idx);
            }
        };
        Cur cur = {any ? rl : rend, sub}, pre = cur;
        fetch(ra, pre);
        advance(pre);
        fetch(rc, pre);
        advance(pre);
        if (win == 0 && (c.aux & MV_EARLY)) { // W's first chunks are in flight: now wait
            PDL_WAIT_ONLY();
            tg.waited();
            PDL_TRIGGER();
        }
        if (win) __syncthreads(); // every warp is done with the previous window's x
        if (nm.on) quantize_x(at<float>(c, nm.x), true, kw, xq, xd, xs, c, nm);
        else quantize_x(at<float>(c, mm.x) + (u64)win * QKW, xa, kw, xq, xd, xs, c, nm);
        __syncthreads();
        float acc = 0.0f;
        auto step = [&](uint4 (&r)[QREG]) {
            const u32 off = (win * CPW + cur.ci) * CHUNK, bytes = min(CHUNK, rb - off);
            __syncwarp();
            if (vec) {
#pragma unroll
                for (int i = 0; i < QREG; i++) {
                    const u32 idx = lane + 32 * i;
                    if (idx * 16 < bytes) ((uint4*)s)[idx] = r[i];
                }
                fetch(r, pre);
                advance(pre);
            } else {
                const u16* src = (const u16*)(w + (u64)cur.row * rb + off);
                for (u32 idx = lane; idx < bytes / 2; idx += 32) ((u16*)s)[idx] = src[idx];
            }
            __syncwarp();
            const u32 units = bytes / BB * UPB;
            for (u32 u = lane; u < units; u += 32) acc += QUnit<DT>::dot(s, u, X, cur.ci * CE);
            const u32 row = cur.row;
            advance(cur);
            if (cur.row != row) { // the row's last chunk (of this warp, in this window)
                acc = warp_sum(acc);
                if (lane == 0) part[row * wpr + sub] += acc;
                acc = 0.0f;
            }
        };
        while (cur.row < rend) {
            step(ra);
            if (cur.row >= rend) break;
            step(rc);
        }
    }
    __syncthreads();
    for (u32 t = threadIdx.x; t < R; t += blockDim.x) {
        float v = 0.0f;
        for (u32 i = 0; i < wpr; i++) v += part[t * wpr + i];
        store_out(c, mm, 0, r0 + t, v);
    }
}

// Tiled matmul for n > 1: 64 rows x 64 tokens per block, K in steps of 32, each of
// the 256 threads computes 4 x 4 outputs. Weights are dequantized into shared memory.
#define TM 64
#define TN 64
#define TK 32
template <u32 DT>
__device__ void gemm_tiled(const Ctx& c, const Matmul& mm) {
    __shared__ float ws[TK][TM + 4];
    __shared__ float xs[TK][TN + 4];
    const u32 t = threadIdx.x;
    const u32 m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    const u64 rb = row_bytes(DT, mm.k);
    const float* x = at<float>(c, mm.x);
    const u32 lr = t / 4, lk = (t % 4) * 8; // loader: row/token lr, k offset lk..lk+8
    const u32 tx = t % 16, ty = t / 16;     // compute: rows tx*4.., tokens ty*4..
    float acc[4][4] = {};
    for (u32 k0 = 0; k0 < mm.k; k0 += TK) {
        const u32 wr = m0 + lr, xr = n0 + lr;
        const u8* wrow = c.base + mm.w + (u64)wr * rb;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            u32 kk = k0 + lk + e;
            ws[lk + e][lr] = (wr < mm.m && kk < mm.k) ? dq_elem(DT, wrow, kk) : 0.0f;
            xs[lk + e][lr] = (xr < mm.n && kk < mm.k) ? x[(u64)xr * mm.k + kk] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < TK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = xs[kk][ty * 4 + i]; b[i] = ws[kk][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 tok = n0 + ty * 4 + i, row = m0 + tx * 4 + j;
            if (tok < mm.n && row < mm.m) store_out(c, mm, tok, row, acc[i][j]);
        }
}

// aux (quantized) bit 0: weights 16-byte aligned (vector path); bit 1: x 16-byte aligned;
// (dense) bit 1: x 16-byte aligned, bits 2-3: W load width (see gemv_dense);
// bits 4-5: log2 of the warps per row (the launch has ceil(m * wpr / 8) blocks).
// matvecs_<dtype>: up to 3 matvecs of one dtype in one launch (fused at record time:
// q/k/v or gate/up reading the same x); block b belongs to the first i with b < end[i].
// pair: gate (m[0]) and up (m[1]) rows side by side in each block with the swiglu into
// sw_out (gemv_quant's `up`).
struct MatvecGroup { Matmul m[3]; u32 count, end[3], aux[3]; XNorm nm; u32 pair, sw_out; };
// aux bit 8: before waiting on the previous kernel (PDL), a block asks L2 to prefetch its
// weight rows (one bulk prefetch per row per 64 KiB), so the stream from HBM overlaps the
// previous kernel's tail and the small latency-bound kernels between matvecs. Only L2 is
// filled, and L2 is where every write lands, so this cannot read a stale value even if an
// earlier kernel of the graph wrote W; the data itself is read after the wait.
#define MV_PREFETCH 256u
__device__ __forceinline__ void matvec_prefetch(const Ctx& c, const Matmul& mm, u32 dt, u32 bx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (!(c.aux & MV_PREFETCH)) return;
    // Rows per block: quantized matvecs carry it in aux bits 16-23 (gemv_quant), dense 8 / wpr.
    const u32 rq = (c.aux >> 16) & 0xFF, rows = rq ? rq : 8u >> ((c.aux >> 4) & 3), t = threadIdx.x;
    const u32 row = bx * rows + t;
    if (t >= rows || row >= mm.m) return;
    const u64 rb = row_bytes(dt, mm.k);
    const u64 a = (u64)(c.base + mm.w) + (u64)row * rb;
    // Whole 16-byte granules (inside the region: it is page-aligned and page-sized).
    const u64 a1 = (a + rb + 15) & ~15ull;
    for (u64 p = a & ~15ull; p < a1; p += 65536) {
        const u32 n = (u32)min(a1 - p, (u64)65536);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");
    }
#endif
}

#define MATMUL_KERNELS(NAME, DT, GEMV)                                                   \
    extern "C" __global__ void __launch_bounds__(256, 2) matvec_##NAME(const Ctx c, const Matmul mm) { \
        const u32 bx = blockIdx.x;                                                       \
        TlGuard tl_guard_(c);                                                            \
        const XNorm nm_ = {0, 0, 0, 0, 0.0f};                                            \
        const bool up_ = false;                                                          \
        const Matmul upm_ = mm;                                                          \
        const u32 sw_ = 0;                                                               \
        matvec_prefetch(c, mm, DT, bx);                                                  \
        if (!(c.aux & MV_EARLY)) { PDL_WAIT_ONLY(); tl_guard_.waited(); PDL_TRIGGER(); } \
        GEMV;                                                                            \
    }                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2) matvecs_##NAME(const Ctx c0, const MatvecGroup g) { \
        u32 i = 0;                                                                       \
        while (i + 1 < g.count && blockIdx.x >= g.end[i]) i++;                           \
        const u32 bx = blockIdx.x - (i ? g.end[i - 1] : 0u);                             \
        Ctx c = c0;                                                                      \
        c.aux = g.aux[i];                                                                \
        const Matmul mm = g.m[i];                                                        \
        TlGuard tl_guard_(c);                                                            \
        const XNorm nm_ = g.nm;                                                          \
        const bool up_ = g.pair != 0;                                                    \
        const Matmul upm_ = g.m[1];                                                      \
        const u32 sw_ = g.sw_out;                                                        \
        matvec_prefetch(c, mm, DT, bx);                                                  \
        if (!(c.aux & MV_EARLY)) { PDL_WAIT_ONLY(); tl_guard_.waited(); PDL_TRIGGER(); } \
        GEMV;                                                                            \
    }                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) matmul_##NAME(const Ctx c, const Matmul mm) { PDL_WAIT(); \
        gemm_tiled<DT>(c, mm);                                                           \
    }
MATMUL_KERNELS(f32, DT_F32, gemv_dense<DT_F32>(c, mm, c.aux & 1, bx))
MATMUL_KERNELS(f16, DT_F16, gemv_dense<DT_F16>(c, mm, c.aux & 1, bx))
MATMUL_KERNELS(bf16, DT_BF16, gemv_dense<DT_BF16>(c, mm, c.aux & 1, bx))
MATMUL_KERNELS(q8_0, DT_Q8_0, gemv_quant<DT_Q8_0>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q4_0, DT_Q4_0, gemv_quant<DT_Q4_0>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q4_1, DT_Q4_1, gemv_quant<DT_Q4_1>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q5_0, DT_Q5_0, gemv_quant<DT_Q5_0>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q4_k, DT_Q4_K, gemv_quant<DT_Q4_K>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q5_k, DT_Q5_K, gemv_quant<DT_Q5_K>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
MATMUL_KERNELS(q6_k, DT_Q6_K, gemv_quant<DT_Q6_K>(c, mm, c.aux & 1, c.aux & 2, bx, tl_guard_, nm_, up_, upm_, sw_))
