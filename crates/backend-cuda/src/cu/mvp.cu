// Pipelined dense matvec for decode steps ("mvp", exec.rs `mvp_plan`; sm_90): n == 1,
// f16/bf16 W with 16-byte aligned rows, k = 256 * J * P (J <= 8 chunks of 8 elements per
// lane and part, P <= 8 parts per row). A block of 8 warps per SM (sized so that two fit:
// the next launch's block starts its stream while this one ends); the launch's virtual
// rows (up to 3 matrices over one x, concatenated; or gate/up paired) are cut into
// stages of R = 8 / P rows, and block b takes stages b, b + G, ... (all blocks sweep W
// front to back together). A stage is copied from HBM into shared memory by one thread
// with bulk copies (TMA, `cp.async.bulk`: one per run of rows of one matrix), completing
// on the buffer's mbarrier; `stages` buffers are in flight. Each warp then takes one part
// of one row of the stage (256 J elements) and the parts' sums meet in shared memory.
//
// The point is what happens before `griddepcontrol.wait`. No op of the graph writes W
// (checked on the host), so a block issues its first stages while the kernels before it
// still run, and lets its own dependents launch at once: the weight stream overlaps the
// latency-bound small kernels between matvecs and the previous matvec's tail.
//
// After the wait each warp loads its part of x into registers (the columns its lanes
// read in every stage). With `norm`, x is the rmsnorm's input and the registers hold
// rmsnorm(x) * weight: every block recomputes the sum of squares while it copies x (k
// floats from L2; no barrier of its own), the norm weight was read before the wait
// (`nw_early`: no op writes it), and the normalised row is also written to the rmsnorm's
// out, each 8-float chunk by one block. Timeline marks (SAMEPAGE_CUDA_TRACE=3): 7 x is
// in shared memory, 5 the remaining stages are issued, 4 x is in registers, 6 the last
// stage is done. With `pair`, a stage holds R / 2 gate rows, then the same R / 2 up rows; the
// block writes both outputs and silu(g) * u to sw_out[j] (which may be gate's or up's
// out: the same thread writes both, in order).
//
// Quantized W (`mvp_<q8_0|..|q6_k>`, exec.rs `mvq_shape`): the same stages, rows and
// epilogue; a row's bytes are its ggml blocks (16-byte multiple), a part is k / P
// elements of whole blocks, a stage buffer has 16 bytes of slack for the decoders' word
// reads. After the wait every block quantizes x (or rmsnorm(x) * weight, `quantize_x`
// with the norm fused, the weight read before the wait) into shared memory once. A stage
// holds R = 16 / P rows (or 8 / P, `SAMEPAGE_CUDA_MVQ_RW=1`): each warp takes part
// warp % P of two rows, its lanes the part's units (`QUnit<DT>::dot`, integer dot
// products against the quantized x), two independent chains a lane. One bulk copy per
// run of rows, instead of one per warp and chunk (`gemv_quant`'s ring). A launch may
// hold two dtypes (`mvp_q4_k_q6_k`, `mvp_q5_k_q6_k`: the K-quant mixes' q/k + v), each
// stage of one; Q8_0 (`mvp_q8_0_rest`) issues its later stages right behind x's loads.
#define MVP_SMAX 8
struct MvPipe {
    Matmul m[3];
    u32 count, rend[3];
    u32 P, R, stages, pair, sw_out;
    u32 norm, nx, nw, nout;
    float eps;
    u32 pre;  // 1: some matvec has a bias or accumulates; the block's rows' values are read first
    u32 early; // stages issued before the PDL wait (the rest right after x is read)
    u32 nw_early; // 1: no op writes the norm weight: it is read before the PDL wait
    u32 vmix; // quantized, two dtypes (`mvp_<DT>_<DT2>`): the first virtual row of DT2 (stages never straddle it)
};

// Stage position t (0 .. R) of the stage starting at virtual row v0: its matrix and row,
// or false past the end (pairs: R / 2 gate rows, then the same up rows).
__device__ __forceinline__ bool mvp_pos(const MvPipe& g, u32 N, u32 v0, u32 t, u32& mi, u32& row) {
    if (g.pair) {
        const u32 h = g.R / 2, j = v0 / 2 + (t < h ? t : t - h);
        mi = t < h ? 0u : 1u;
        row = j;
        return v0 + 2 * (t < h ? t : t - h) < N;
    }
    const u32 v = v0 + t;
    if (v >= N) return false;
    mi = 0;
    while (mi + 1 < g.count && v >= g.rend[mi]) mi++;
    row = v - (mi ? g.rend[mi - 1] : 0u);
    return true;
}


// Bias + the accumulated outputs' old values of the block's rows (`pre` > 0), read with x
// rather than one round trip per stage in the epilogue: prev[s * R + t] for stage s.
__device__ __forceinline__ void mvp_pre(const Ctx& c, const MvPipe& g, u32 N, u32 G, u32 nst, float* prev) {
    if (!g.pre) return;
    const u32 R = g.R;
    for (u32 i = threadIdx.x; i < nst * R; i += 256) {
        u32 mi, row;
        float v = 0.0f;
        if (mvp_pos(g, N, ((i / R) * G + blockIdx.x) * R, i % R, mi, row)) {
            const Matmul& mm = g.m[mi];
            if (mm.flags & MATMUL_BIAS) v += __ldcg(at<float>(c, mm.bias) + row);
            if (mm.flags & MATMUL_ACCUMULATE) v += __ldcg(at<float>(c, mm.out) + row);
        }
        prev[i] = v;
    }
}

template <u32 DT>
__device__ __forceinline__ float mvp_dot8(const uint4& w, const float* x, float acc) {
    const u32 p[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const u16 lo = p[e] & 0xFFFF, hi = p[e] >> 16;
        const float w0 = DT == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
        const float w1 = DT == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        acc = fmaf(w0, x[2 * e], acc);
        acc = fmaf(w1, x[2 * e + 1], acc);
    }
    return acc;
}

// One stage of quantized W in shared memory (rows of rb bytes): rows warp / P and, with
// R * P = 16 (two rows a warp), warp / P + 8 / P: part p = warp % P of each, (k / P) / BE
// blocks from element p * (k / P); the warps' sums into pt.
template <u32 DT>
__device__ __forceinline__ void mvq_stage(const u8* sbuf, u32 rb, u32 k, u32 P, u32 RP, const XQ& X, float* pt) {
    constexpr u32 BE = blk_elems(DT), BB = blk_bytes(DT), UPB = QUnit<DT>::PER_BLOCK;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, p = warp % P;
    const u32 kp = k / P, units = kp / BE * UPB;
    const u8* s0 = sbuf + (warp / P) * rb + p * (kp / BE) * BB;
    const u8* s1 = s0 + (8 / P) * rb;
    const bool two = RP > 8;
    float a0 = 0.0f, a1 = 0.0f;
    if (warp < RP)
        for (u32 u = lane; u < units; u += 32) {
            a0 += QUnit<DT>::dot(s0, u, X, p * kp);
            if (two) a1 += QUnit<DT>::dot(s1, u, X, p * kp);
        }
    a0 = warp_sum(a0);
    if (two) a1 = warp_sum(a1);
    if (lane == 0 && warp < RP) {
        pt[warp] = a0;
        if (two) pt[warp + 8] = a1;
    }
}

// DT2 (quantized only): the dtype of the virtual rows from g.vmix on (Q4_K_M's Q6_K v
// after Q4_K q and k); a stage is of one dtype, its buffer as long as the longer rows.
// REST (quantized only): the stages after the early ones are issued as soon as every
// thread's loads of x are (behind them), not once x is quantized (`mvp_q8_0_rest`).
template <u32 DT, u32 J, u32 DT2 = DT, bool REST = false>
__device__ __forceinline__ void mvp_body(const Ctx& c, const MvPipe& g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) u8 mvp_smem[];
    __shared__ __align__(8) u64 bars[MVP_SMAX];
    __shared__ float red[8], part[2][16];
    constexpr bool Q = DT >= DT_Q8_0;
    constexpr u32 L = 256 * J; // elements of a part (f16/bf16)
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u32 P = g.P, R = g.R, NS = g.stages, RP = R * P;
    const u32 k = g.m[0].k, rb = Q ? (u32)row_bytes(DT, k) : k * 2, rb2 = Q ? (u32)row_bytes(DT2, k) : rb;
    const u32 SB = R * max(rb, rb2) + (Q ? 16u : 0u);
    // The row bytes of the stage that starts at virtual row v0.
    auto srb = [&](u32 v0) { return DT2 != DT && v0 >= g.vmix ? rb2 : rb; };
    const u32 N = g.rend[g.count - 1], T = (N + R - 1) / R, G = gridDim.x;
    const u32 nst = blockIdx.x < T ? (T - blockIdx.x + G - 1) / G : 0u;
    const u32 sbase = (u32)__cvta_generic_to_shared(mvp_smem);
    const u32 bbase = (u32)__cvta_generic_to_shared(bars);
    TlGuard tl_guard_(c);
    PDL_TRIGGER();
    // Stage s (thread 0) into buffer s % NS: one bulk copy per run of rows of one matrix.
    auto issue = [&](u32 s) {
        if (s >= nst) return;
        const u32 buf = s % NS, bar = bbase + 8 * buf, dst = sbase + buf * SB;
        const u32 v0 = (s * G + blockIdx.x) * R;
        if (g.pair) {
            const u32 j0 = v0 / 2, h = min(R / 2, (N - v0) / 2); // N, v0 even
            mvp_expect(bar, 2 * h * rb);
            mvp_bulk(dst, c.base + g.m[0].w + (u64)j0 * rb, h * rb, bar);
            mvp_bulk(dst + (R / 2) * rb, c.base + g.m[1].w + (u64)j0 * rb, h * rb, bar);
            return;
        }
        const u32 v1 = min(v0 + R, N), rs = srb(v0);
        mvp_expect(bar, (v1 - v0) * rs);
        u32 v = v0, at = dst;
        for (u32 mi = 0; mi < g.count && v < v1; mi++) {
            const u32 lo = mi ? g.rend[mi - 1] : 0u, hi = g.rend[mi];
            if (v >= hi) continue;
            const u32 e = min(v1, hi);
            mvp_bulk(at, c.base + g.m[mi].w + (u64)(v - lo) * rs, (e - v) * rs, bar);
            at += (e - v) * rs;
            v = e;
        }
    };
    if (tid == 0) {
        for (u32 i = 0; i < NS; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bbase + 8 * i) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 s = 0; s < min(NS, g.early); s++) issue(s);
    }
    const u32 p = warp % P;
    float xr[Q ? 1 : J][8];
    XQ X = {nullptr, nullptr, nullptr};
    float* prev;
    if constexpr (Q) {
        // x quantized per 32 elements into shared memory (rmsnorm(x) * weight with the norm,
        // whose out this also writes, chunk e / 8 by block (e / 8) % G), and the rows'
        // bias / old values, as below.
        uint4* xq = (uint4*)(mvp_smem + NS * SB);
        float* xd = (float*)(xq + xpos(k / 8));
        int* xsum = (int*)(xd + k / 32);
        prev = (float*)(xsum + k / 16);
        X = {xq, xd, xsum};
        // The norm weight at this thread's elements (quantize_x's layout), before the wait.
        float wpre[4][8];
        const bool pre_w = g.norm && g.nw_early;
        if (pre_w)
#pragma unroll
            for (u32 i = 0; i < 4; i++) {
                const u32 e = 8 * (tid + 256 * i);
                if (e < k) load_x8(at<float>(c, g.nw) + e, wpre[i], true);
            }
        __syncthreads(); // the barriers are initialised before anyone waits on them
        PDL_WAIT_ONLY();
        tl_guard_.waited();
        const XNorm nm = {g.norm, g.nx, g.nw, g.nout, g.eps};
        quantize_x(at<float>(c, g.norm ? g.nx : g.m[0].x), true, k, xq, xd, xsum, c, nm, wpre, pre_w, [&] {
            if constexpr (REST) {
                __syncthreads(); // every thread's loads of x are ahead of the stages' copies
                if (tid == 0)
                    for (u32 s = g.early; s < NS; s++) issue(s);
            }
        });
        mvp_pre(c, g, N, G, nst, prev);
    } else {
        // x (or rmsnorm(x) * weight) at this warp's columns: part p = warp % P. The block
        // first copies x (and the norm weight) into shared memory with coalesced loads, once:
        // read by every warp straight from L2, the few lines of x were a hot spot that
        // 132 x 8 warps queued on (4 us for x, 12 with the weight, on an H100). The norm
        // weight is a weight: read before the wait where no op writes it.
        float* xs = (float*)(mvp_smem + NS * SB);
        float* ws = xs + k;
        const float4* w4 = (const float4*)at<float>(c, g.nw);
        if (g.norm && g.nw_early)
            for (u32 i = tid; i < k / 4; i += 256) ((float4*)ws)[i] = __ldg(w4 + i);
        __syncthreads(); // the barriers are initialised before anyone waits on them
        PDL_WAIT_ONLY();
        tl_guard_.waited();

        // Bias + the accumulated outputs' old values of the block's rows (`pre` > 0), read
        // now with x rather than one round trip per stage in the epilogue.
        prev = ws + (g.norm ? k : 0u);
        {
            // With the norm, the sum of squares is taken here too (each element once per
            // block; warp sums in red[], added after the barrier below).
            const float4* x4 = (const float4*)at<float>(c, g.norm ? g.nx : g.m[0].x);
            float ssq = 0.0f;
            for (u32 i = tid; i < k / 4; i += 256) {
                const float4 v = __ldcg(x4 + i);
                ((float4*)xs)[i] = v;
                if (g.norm) {
                    ssq = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ssq))));
                    if (!g.nw_early) ((float4*)ws)[i] = __ldcg(w4 + i);
                }
            }
            if (g.norm) {
                ssq = warp_sum(ssq);
                if (lane == 0) red[warp] = ssq;
            }
            mvp_pre(c, g, N, G, nst, prev);
        }
    }
    __syncthreads();
    if (warp == 0) tl_guard_.mark(7);
    if (tid == 0) {
        if (!REST)
            for (u32 s = g.early; s < NS; s++) issue(s);
        tl_guard_.mark(5);
    }
    if constexpr (!Q) {
        const float* xs = (const float*)(mvp_smem + NS * SB);
        const float* ws = xs + k;
#pragma unroll
        for (u32 j = 0; j < J; j++) {
            const u32 col = p * L + (j * 32 + lane) * 8;
            const float4 a = *(const float4*)(xs + col), b = *((const float4*)(xs + col) + 1);
            xr[j][0] = a.x; xr[j][1] = a.y; xr[j][2] = a.z; xr[j][3] = a.w;
            xr[j][4] = b.x; xr[j][5] = b.y; xr[j][6] = b.z; xr[j][7] = b.w;
        }
        if (g.norm) {
            float t = 0.0f;
#pragma unroll
            for (u32 q = 0; q < 8; q++) t += red[q];
            const float inv = 1.0f / sqrtf(t / (float)k + g.eps);
            float* no = at<float>(c, g.nout);
#pragma unroll
            for (u32 j = 0; j < J; j++) {
                const u32 col = p * L + (j * 32 + lane) * 8;
                const float4 wa = *(const float4*)(ws + col), wb = *((const float4*)(ws + col) + 1);
                const float w[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
                for (u32 e = 0; e < 8; e++) xr[j][e] = xr[j][e] * inv * w[e];
                // Segment (p, j) of the row (256 elements) is written by block p * J + j
                // (the host launches at least J * P blocks), by warp p.
                if (warp == p && p * J + j == blockIdx.x) {
                    *(float4*)(no + col) = make_float4(xr[j][0], xr[j][1], xr[j][2], xr[j][3]);
                    *((float4*)(no + col) + 1) = make_float4(xr[j][4], xr[j][5], xr[j][6], xr[j][7]);
                }
            }
        }
    }
    if (warp == 0) tl_guard_.mark(4);
    for (u32 s = 0; s < nst; s++) {
        const u32 buf = s % NS;
        if constexpr (Q) {
            mvp_wait_bar(bbase + 8 * buf, (s / NS) & 1);
            const u8* sbuf = mvp_smem + buf * SB;
            if constexpr (DT2 != DT) {
                if ((s * G + blockIdx.x) * R >= g.vmix) mvq_stage<DT2>(sbuf, rb2, k, P, RP, X, part[s & 1]);
                else mvq_stage<DT>(sbuf, rb, k, P, RP, X, part[s & 1]);
            } else {
                mvq_stage<DT>(sbuf, rb, k, P, RP, X, part[s & 1]);
            }
        } else if (warp < RP) {
            mvp_wait_bar(bbase + 8 * buf, (s / NS) & 1);
            float acc = 0.0f;
            // Part `warp` of the stage: row warp / P, part warp % P (= p).
            const uint4* w = (const uint4*)(mvp_smem + buf * SB + (warp / P) * rb + p * L * 2) + lane;
            // Loads four at a time, each feeding its own chain of 8 FMAs (registers: two
            // blocks of 256 threads share an SM, 128 a thread).
#pragma unroll
            for (u32 j0 = 0; j0 < J; j0 += 4) {
                uint4 wr[4];
#pragma unroll
                for (u32 j = 0; j < 4; j++)
                    if (j0 + j < J) wr[j] = w[(j0 + j) * 32];
                float accj[4];
#pragma unroll
                for (u32 j = 0; j < 4; j++) accj[j] = j0 + j < J ? mvp_dot8<DT>(wr[j], xr[j0 + j], 0.0f) : 0.0f;
                acc += (accj[0] + accj[1]) + (accj[2] + accj[3]);
            }
            acc = warp_sum(acc);
            if (lane == 0) part[s & 1][warp] = acc;
        }
        __syncthreads(); // every warp is done with this buffer; the parts are in
        if (tid == 0) issue(s + NS);
        const float* pt = part[s & 1];
        const u32 v0 = (s * G + blockIdx.x) * R;
        const float* pv = prev + s * R;
        u32 mi, row;
        if (!g.pair) {
            if (tid < R && mvp_pos(g, N, v0, tid, mi, row)) {
                float a = g.pre ? pv[tid] : 0.0f;
                for (u32 q = 0; q < P; q++) a += pt[tid * P + q];
                at<float>(c, g.m[mi].out)[row] = a;
            }
        } else if (tid < R / 2 && mvp_pos(g, N, v0, tid, mi, row)) {
            const u32 h = R / 2;
            float a = g.pre ? pv[tid] : 0.0f, b = g.pre ? pv[tid + h] : 0.0f;
            for (u32 q = 0; q < P; q++) {
                a += pt[tid * P + q];
                b += pt[(tid + h) * P + q];
            }
            at<float>(c, g.m[0].out)[row] = a;
            at<float>(c, g.m[1].out)[row] = b;
            at<float>(c, g.sw_out)[row] = a / (1.0f + expf(-a)) * b;
        }
        if (s + 1 == nst && tid == 0) tl_guard_.mark(6);
    }
#endif
}

#define MVP_KERNEL(NAME, DT, J) \
    extern "C" __global__ void __launch_bounds__(256, 2) mvp_##NAME##_##J(const Ctx c, const MvPipe g) { mvp_body<DT, J>(c, g); }
#define MVP_KERNELS(NAME, DT) \
    MVP_KERNEL(NAME, DT, 1) MVP_KERNEL(NAME, DT, 2) MVP_KERNEL(NAME, DT, 3) MVP_KERNEL(NAME, DT, 4) \
    MVP_KERNEL(NAME, DT, 5) MVP_KERNEL(NAME, DT, 6) MVP_KERNEL(NAME, DT, 7) MVP_KERNEL(NAME, DT, 8)
MVP_KERNELS(f16, DT_F16)
MVP_KERNELS(bf16, DT_BF16)
#define MVQ_KERNEL(NAME, DT) \
    extern "C" __global__ void __launch_bounds__(256, 3) mvp_##NAME(const Ctx c, const MvPipe g) { mvp_body<DT, 1>(c, g); }
MVQ_KERNEL(q8_0, DT_Q8_0)
MVQ_KERNEL(q4_0, DT_Q4_0)
MVQ_KERNEL(q4_1, DT_Q4_1)
MVQ_KERNEL(q5_0, DT_Q5_0)
MVQ_KERNEL(q4_k, DT_Q4_K)
MVQ_KERNEL(q5_k, DT_Q5_K)
MVQ_KERNEL(q6_k, DT_Q6_K)
extern "C" __global__ void __launch_bounds__(256, 3) mvp_q8_0_rest(const Ctx c, const MvPipe g) {
    mvp_body<DT_Q8_0, 1, DT_Q8_0, true>(c, g);
}
// Two dtypes in one launch (the llama.cpp K-quant mixes' q/k + v groups).
#define MVQ_MIX_KERNEL(NAME, DT, DT2) \
    extern "C" __global__ void __launch_bounds__(256, 3) mvp_##NAME(const Ctx c, const MvPipe g) { mvp_body<DT, 1, DT2>(c, g); }
MVQ_MIX_KERNEL(q4_k_q6_k, DT_Q4_K, DT_Q6_K)
MVQ_MIX_KERNEL(q5_k_q6_k, DT_Q5_K, DT_Q6_K)
