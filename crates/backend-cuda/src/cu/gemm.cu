// Prefill GEMM (matmul with n > 1) on tensor cores through cuBLAS: the helpers around it.
//
// out (n, m) f32 (+)= x (n, k) f32 . W (m, k)^T (+ bias). The host (src/prefill.rs)
// calls cublasGemmEx with 16-bit inputs and f32 accumulation and output:
//   - x is rounded to 16 bits into scratch (`gemm_x_*`): bf16 for BF16 weights (as
//     PyTorch runs a bf16 model), f16 for F16 and quantized weights (as llama.cpp's
//     cuBLAS path does). Rows are padded to `ld` (a multiple of 8 elements), so every
//     row starts 16-byte aligned.
//   - W is used in place when it is F16/BF16 with 16-byte aligned rows; otherwise
//     (quantized, or dense rows only 2/8-byte aligned as in real safetensors files) a
//     chunk of rows is dequantized (or copied) into scratch by `gemm_w_*`, with exactly
//     the arithmetic of `dq_elem` then rounded to f16 (a BF16 copy stays bf16).
//   - F32 weights need none of this: cublasSgemm on x and W as they are.
//   - the bias is added after the GEMM(s) by `gemm_bias`; MATMUL_ACCUMULATE is beta = 1.
// The scratch pointer of the Ctx is set by the host to the sub-buffer each launch writes.

// f32 -> bf16, round to nearest even (integer arithmetic: no sm_80-only instruction).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <bool BF>
__device__ __forceinline__ u32 pack2(float a, float b) {
    u16 lo = BF ? f32_to_bf16(a) : f32_to_f16(a), hi = BF ? f32_to_bf16(b) : f32_to_f16(b);
    return (u32)lo | ((u32)hi << 16);
}

template <bool BF>
__device__ __forceinline__ uint4 pack8(const float* v) {
    return make_uint4(pack2<BF>(v[0], v[1]), pack2<BF>(v[2], v[3]), pack2<BF>(v[4], v[5]), pack2<BF>(v[6], v[7]));
}

// x rows n0 .. n0 + rows (k f32 each) -> scratch [rows][ld] 16-bit. A thread per 8
// elements of a row (ld / 8 per row).
struct GemmX { u32 x, k, ld, n0, rows; };
template <bool BF>
__device__ void gemm_x(const Ctx& c, const GemmX g) {
    const u32 gpr = g.ld / 8;
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)g.rows * gpr) return;
    const u32 r = (u32)(t / gpr), c0 = (u32)(t % gpr) * 8;
    const float* x = at<float>(c, g.x) + (u64)(g.n0 + r) * g.k;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = c0 + e < g.k ? x[c0 + e] : 0.0f;
    ((uint4*)c.scratch)[t] = pack8<BF>(v);
}
extern "C" __global__ void __launch_bounds__(256) gemm_x_f16(const Ctx c, const GemmX g) { PDL_ENTER(); gemm_x<false>(c, g); }
extern "C" __global__ void __launch_bounds__(256) gemm_x_bf16(const Ctx c, const GemmX g) { PDL_ENTER(); gemm_x<true>(c, g); }

// Eight elements j0 .. j0 + 7 (j0 a multiple of 8) of the block at b, as dq_elem computes
// them. Quant blocks are 2-byte aligned and every offset read here is even.
__device__ __forceinline__ u32 byte_of(u32 w, int e) { return (w >> (8 * e)) & 0xFFu; }
__device__ __forceinline__ void ld_bytes8(const u8* p, u32& a, u32& b) { a = ld_u32_2(p); b = ld_u32_2(p + 4); }
__device__ __forceinline__ u32 byte8(u32 a, u32 b, int e) { return e < 4 ? byte_of(a, e) : byte_of(b, e - 4); }

template <u32 DT> __device__ __forceinline__ void dq8(const u8* b, u32 j0, float* v);

template <> __device__ __forceinline__ void dq8<DT_Q8_0>(const u8* b, u32 j0, float* v) {
    u32 a, c;
    ld_bytes8(b + 2 + j0, a, c);
    const float d = ld_f16(b);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = d * (float)(i8)byte8(a, c, e);
}
template <> __device__ __forceinline__ void dq8<DT_Q4_0>(const u8* b, u32 j0, float* v) {
    u32 a, c;
    ld_bytes8(b + 2 + (j0 & 15), a, c);
    const int sh = j0 < 16 ? 0 : 4;
    const float d = ld_f16(b);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = d * (float)((int)((byte8(a, c, e) >> sh) & 0xF) - 8);
}
template <> __device__ __forceinline__ void dq8<DT_Q4_1>(const u8* b, u32 j0, float* v) {
    u32 a, c;
    ld_bytes8(b + 4 + (j0 & 15), a, c);
    const int sh = j0 < 16 ? 0 : 4;
    const float d = ld_f16(b), m = ld_f16(b + 2);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = d * (float)((byte8(a, c, e) >> sh) & 0xF) + m;
}
template <> __device__ __forceinline__ void dq8<DT_Q5_0>(const u8* b, u32 j0, float* v) {
    u32 a, c;
    ld_bytes8(b + 6 + (j0 & 15), a, c);
    const int sh = j0 < 16 ? 0 : 4;
    const u32 qh = ld_u32_2(b + 2);
    const float d = ld_f16(b);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int q = (int)(((byte8(a, c, e) >> sh) & 0xF) | (((qh >> (j0 + e)) & 1) << 4));
        v[e] = d * (float)(q - 16);
    }
}
template <> __device__ __forceinline__ void dq8<DT_Q4_K>(const u8* b, u32 j0, float* v) {
    const u32 sub = j0 / 32, l0 = j0 % 32;
    float sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    u32 a, c;
    ld_bytes8(b + 16 + (sub / 2) * 32 + l0, a, c);
    const int sh = (sub & 1) ? 4 : 0;
    const float d = ld_f16(b), dmin = ld_f16(b + 2);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = d * sc * (float)((byte8(a, c, e) >> sh) & 0xF) - dmin * m;
}
template <> __device__ __forceinline__ void dq8<DT_Q5_K>(const u8* b, u32 j0, float* v) {
    const u32 sub = j0 / 32, l0 = j0 % 32;
    float sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    u32 a, c, ha, hc;
    ld_bytes8(b + 48 + (sub / 2) * 32 + l0, a, c);
    ld_bytes8(b + 16 + l0, ha, hc);
    const int sh = (sub & 1) ? 4 : 0;
    const float d = ld_f16(b), dmin = ld_f16(b + 2);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int q = (int)(((byte8(a, c, e) >> sh) & 0xF) | (((byte8(ha, hc, e) >> sub) & 1) << 4));
        v[e] = d * sc * (float)q - dmin * m;
    }
}
template <> __device__ __forceinline__ void dq8<DT_Q6_K>(const u8* b, u32 j0, float* v) {
    const u32 h = j0 / 128, r = j0 % 128, qq = r / 32, l0 = r % 32;
    u32 a, c, ha, hc;
    ld_bytes8(b + 64 * h + ((qq & 1) ? 32 : 0) + l0, a, c);
    ld_bytes8(b + 128 + 32 * h + l0, ha, hc);
    const int sh = (qq & 2) ? 4 : 0;
    const float sc = (float)(i8)b[192 + 8 * h + l0 / 16 + 2 * qq];
    const float d = ld_f16(b + 208);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int q = (int)(((byte8(a, c, e) >> sh) & 0xF) | (((byte8(ha, hc, e) >> (2 * qq)) & 3) << 4)) - 32;
        v[e] = d * sc * (float)q;
    }
}

// W rows r0 .. r0 + rows -> scratch [rows][ld] 16-bit (f16; BF16 weights stay bf16). A
// thread per 8 elements of a row; columns k .. ld are zero.
struct GemmW { Matmul mm; u32 r0, rows, ld; };
template <u32 DT>
__device__ void gemm_w(const Ctx& c, const GemmW g) {
    const u32 gpr = g.ld / 8, k = g.mm.k;
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)g.rows * gpr) return;
    const u32 r = (u32)(t / gpr), c0 = (u32)(t % gpr) * 8;
    const u8* row = c.base + g.mm.w + (u64)(g.r0 + r) * row_bytes(DT, k);
    uint4 o;
    if constexpr (DT == DT_F16 || DT == DT_BF16) {
        // A 16-bit copy (rows only 2-byte aligned).
        u16 h[8];
        const u16* src = (const u16*)row;
#pragma unroll
        for (int e = 0; e < 8; e++) h[e] = c0 + e < k ? src[c0 + e] : (u16)0;
        o = make_uint4(h[0] | (u32)h[1] << 16, h[2] | (u32)h[3] << 16, h[4] | (u32)h[5] << 16, h[6] | (u32)h[7] << 16);
    } else {
        // k is a whole number of blocks, so the 8 elements lie in one block.
        constexpr u32 BE = blk_elems(DT), BB = blk_bytes(DT);
        float v[8];
        dq8<DT>(row + (u64)(c0 / BE) * BB, c0 % BE, v);
        o = pack8<false>(v);
    }
    ((uint4*)c.scratch)[t] = o;
}
#define GEMM_W(NAME, DT) \
    extern "C" __global__ void __launch_bounds__(256) gemm_w_##NAME(const Ctx c, const GemmW g) { PDL_ENTER(); gemm_w<DT>(c, g); }
GEMM_W(f16, DT_F16)
GEMM_W(bf16, DT_BF16)
GEMM_W(q8_0, DT_Q8_0)
GEMM_W(q4_0, DT_Q4_0)
GEMM_W(q4_1, DT_Q4_1)
GEMM_W(q5_0, DT_Q5_0)
GEMM_W(q4_k, DT_Q4_K)
GEMM_W(q5_k, DT_Q5_K)
GEMM_W(q6_k, DT_Q6_K)

// out[t, r] += bias[r] over all n x m outputs (after the GEMMs), grid-stride.
extern "C" __global__ void __launch_bounds__(256) gemm_bias(const Ctx c, const Matmul mm) {
    PDL_ENTER();
    const float* bias = at<float>(c, mm.bias);
    float* out = at<float>(c, mm.out);
    const u64 total = (u64)mm.n * mm.m;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x)
        out[i] += bias[i % mm.m];
}
