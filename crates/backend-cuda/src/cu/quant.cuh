// ggml block layouts (see samepage_abi::DType::block_bytes). Blocks are only 2-byte
// aligned, so multi-byte fields are read as u16 pieces.

__host__ __device__ constexpr u32 blk_elems(u32 dt) {
    return dt <= DT_BF16 ? 1 : (dt <= DT_Q5_0 ? 32 : 256);
}
__host__ __device__ constexpr u32 blk_bytes(u32 dt) {
    return dt == DT_F32 ? 4 : dt == DT_F16 ? 2 : dt == DT_BF16 ? 2 : dt == DT_Q8_0 ? 34 : dt == DT_Q4_0 ? 18
         : dt == DT_Q4_1 ? 20 : dt == DT_Q5_0 ? 22 : dt == DT_Q4_K ? 144 : dt == DT_Q5_K ? 176 : 210;
}
__device__ __forceinline__ u64 row_bytes(u32 dt, u32 cols) { return (u64)(cols / blk_elems(dt)) * blk_bytes(dt); }

__device__ __forceinline__ u32 ld_u32_2(const u8* p) {
    return (u32)((const u16*)p)[0] | ((u32)((const u16*)p)[1] << 16);
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..8) from the 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(q[j] & 63);
        m = (float)(q[j + 4] & 63);
    } else {
        sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// One element `i` of a row, any dtype (embedding gathers, the tiled matmul).
__device__ float dq_elem(u32 dt, const u8* row, u32 i) {
    switch (dt) {
    case DT_F32: return ((const float*)row)[i];
    case DT_F16: return f16_to_f32(((const u16*)row)[i]);
    case DT_BF16: return bf16_to_f32(((const u16*)row)[i]);
    case DT_Q8_0: {
        const u8* b = row + (i / 32) * 34;
        return ld_f16(b) * (float)(i8)b[2 + i % 32];
    }
    case DT_Q4_0: {
        const u8* b = row + (i / 32) * 18;
        u32 j = i % 32;
        int q = j < 16 ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
        return ld_f16(b) * (float)(q - 8);
    }
    case DT_Q4_1: {
        const u8* b = row + (i / 32) * 20;
        u32 j = i % 32;
        int q = j < 16 ? (b[4 + j] & 0xF) : (b[4 + j - 16] >> 4);
        return ld_f16(b) * (float)q + ld_f16(b + 2);
    }
    case DT_Q5_0: {
        const u8* b = row + (i / 32) * 22;
        u32 j = i % 32;
        u32 qh = ld_u32_2(b + 2);
        int q = (j < 16 ? (b[6 + j] & 0xF) : (b[6 + j - 16] >> 4)) | (((qh >> j) & 1) << 4);
        return ld_f16(b) * (float)(q - 16);
    }
    case DT_Q4_K: {
        const u8* b = row + (i / 256) * 144;
        u32 j = i % 256, sub = j / 32, l = j % 32;
        float sc, m;
        scale_min_k4(sub, b + 4, sc, m);
        u8 q = b[16 + (sub / 2) * 32 + l];
        int v = (sub & 1) ? (q >> 4) : (q & 0xF);
        return ld_f16(b) * sc * (float)v - ld_f16(b + 2) * m;
    }
    case DT_Q5_K: {
        const u8* b = row + (i / 256) * 176;
        u32 j = i % 256, sub = j / 32, l = j % 32;
        float sc, m;
        scale_min_k4(sub, b + 4, sc, m);
        u8 q = b[48 + (sub / 2) * 32 + l];
        int v = ((sub & 1) ? (q >> 4) : (q & 0xF)) | (((b[16 + l] >> sub) & 1) << 4);
        return ld_f16(b) * sc * (float)v - ld_f16(b + 2) * m;
    }
    default: { // DT_Q6_K
        const u8* b = row + (i / 256) * 210;
        u32 j = i % 256, h = j / 128, r = j % 128, qq = r / 32, l = r % 32;
        const u8* ql = b + 64 * h;
        const u8* qh = b + 128 + 32 * h;
        int lo = (qq & 1) ? ql[l + 32] : ql[l];
        lo = (qq & 2) ? (lo >> 4) : (lo & 0xF);
        int v = (lo | (((qh[l] >> (2 * qq)) & 3) << 4)) - 32;
        float sc = (float)(i8)b[192 + 8 * h + l / 16 + 2 * qq];
        return ld_f16(b + 208) * sc * (float)v;
    }
    }
}

// ---- Single-token quantized matvec (matmul.cu `gemv_quant`): integer dot products ----
// The activation is quantized once per block to i16 per 32-element block (d = amax / 32767,
// as the CPU backend's Q16Row; i8 activations cost a few percent of the logits end to end)
// into shared memory: `xq` granules of 8 i16 (16 bytes; granule g at `xpos(g)`, one
// granule of padding after every 8, so that the 8 lanes of a quarter warp reading granule t
// of their own 4- or 8-granule run hit distinct banks), `xd` the scale per 32
// elements and `xs` the integer sum per 16 (for the formats' offsets and mins). A weight
// byte times an i16 pair is one `dp2a` (two 16x8-bit products into 32 bits), exact; the
// float math is once per 16 or 32 elements. No int -> float conversion per element.
struct XQ { const uint4* q; const float* d; const int* s; };
__host__ __device__ constexpr u32 xpos(u32 g) { return g + (g >> 3); }
// Granule t of the run from activation e (window-relative, e + 8t .. e + 8t + 8), where
// the run does not cross a multiple of 64 ((e / 8) % 8 + t < 8): contiguous in `xq`.
struct XRun {
    const uint4* p;
    __device__ __forceinline__ XRun(const XQ& x, u32 e) : p(x.q + xpos(e >> 3)) {}
    __device__ __forceinline__ uint4 operator[](u32 t) const { return p[t]; }
};
// Sum of the 32 quantized activations from e (a multiple of 32).
__device__ __forceinline__ int xs32(const XQ& x, u32 e) { return x.s[e >> 4] + x.s[(e >> 4) + 1]; }

__device__ __forceinline__ int dp2lo(u32 x2, u32 w4, int c) {
    int d;
    asm("dp2a.lo.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(x2), "r"(w4), "r"(c));
    return d;
}
__device__ __forceinline__ int dp2hi(u32 x2, u32 w4, int c) {
    int d;
    asm("dp2a.hi.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(x2), "r"(w4), "r"(c));
    return d;
}
// c + the 8 signed weight bytes of w0, w1 . the 8 activations of granule x.
__device__ __forceinline__ int dot8i(u32 w0, u32 w1, uint4 x, int c) {
    return dp2hi(x.w, w1, dp2lo(x.z, w1, dp2hi(x.y, w0, dp2lo(x.x, w0, c))));
}
#define NIB 0x0F0F0F0Fu

// N little-endian words from p (2-byte aligned, shared memory): aligned loads and funnel
// shifts. Reads up to 4 bytes past the N words (the stage has padding).
template <int N> __device__ __forceinline__ void ld_words(const u8* p, u32 (&w)[N]) {
    const u32 mis = (u32)(size_t)p & 2u;
    const u32* q = (const u32*)(p - mis); // pointer arithmetic: stays a shared-memory access
    const u32 sh = mis * 8u;
    u32 u[N + 1];
#pragma unroll
    for (int i = 0; i <= N; i++) u[i] = q[i];
#pragma unroll
    for (int i = 0; i < N; i++) w[i] = __funnelshift_r(u[i], u[i + 1], sh);
}
// Bit i of the nibble n (i < 4) to bit 4 of byte i (Q5 fifth bits).
__device__ __forceinline__ u32 spread4(u32 n) { return (((n & 0xFu) * 0x00204081u) & 0x01010101u) << 4; }

// Units: the work of one lane for one chunk of staged blocks (32 units per chunk). `b`
// points at the staged block, `e` is the window-relative index of the unit's first
// activation. Returns the unit's contribution in f32.
template <u32 DT> struct QUnit;
// Q8_0: a unit is one block (32 elements).
template <> struct QUnit<DT_Q8_0> {
    static constexpr u32 PER_BLOCK = 1;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        const u8* b = s + 34 * u;
        const u32 e = e0 + 32 * u;
        u32 q[8];
        ld_words<8>(b + 2, q);
        const XRun xr(x, e);
        int a = 0;
#pragma unroll
        for (int t = 0; t < 4; t++) a = dot8i(q[2 * t], q[2 * t + 1], xr[t], a);
        return ld_f16(b) * x.d[e >> 5] * (float)a;
    }
};
// Q4_0 / Q4_1 / Q5_0: nibble j (< 16) is element j, its high nibble element j + 16.
template <> struct QUnit<DT_Q4_0> {
    static constexpr u32 PER_BLOCK = 1;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        const u8* b = s + 18 * u;
        const u32 e = e0 + 32 * u;
        u32 q[4];
        ld_words<4>(b + 2, q);
        const XRun xr(x, e);
        int a = dot8i(q[0] & NIB, q[1] & NIB, xr[0], 0);
        a = dot8i(q[2] & NIB, q[3] & NIB, xr[1], a);
        a = dot8i((q[0] >> 4) & NIB, (q[1] >> 4) & NIB, xr[2], a);
        a = dot8i((q[2] >> 4) & NIB, (q[3] >> 4) & NIB, xr[3], a);
        return ld_f16(b) * x.d[e >> 5] * (float)(a - 8 * xs32(x, e));
    }
};
template <> struct QUnit<DT_Q4_1> {
    static constexpr u32 PER_BLOCK = 1;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        const u8* b = s + 20 * u;
        const u32 e = e0 + 32 * u;
        const u32* q = (const u32*)(b + 4); // 20-byte blocks in a 16-byte aligned stage
        const u32 q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
        const XRun xr(x, e);
        int a = dot8i(q0 & NIB, q1 & NIB, xr[0], 0);
        a = dot8i(q2 & NIB, q3 & NIB, xr[1], a);
        a = dot8i((q0 >> 4) & NIB, (q1 >> 4) & NIB, xr[2], a);
        a = dot8i((q2 >> 4) & NIB, (q3 >> 4) & NIB, xr[3], a);
        return x.d[e >> 5] * (ld_f16(b) * (float)a + ld_f16(b + 2) * (float)xs32(x, e));
    }
};
template <> struct QUnit<DT_Q5_0> {
    static constexpr u32 PER_BLOCK = 1;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        const u8* b = s + 22 * u;
        const u32 e = e0 + 32 * u;
        u32 w[5]; // qh, then the 16 nibble bytes
        ld_words<5>(b + 2, w);
        const u32 h = w[0];
        u32 lo[4], hi[4];
#pragma unroll
        for (int t = 0; t < 4; t++) {
            lo[t] = (w[1 + t] & NIB) | spread4(h >> (4 * t));
            hi[t] = ((w[1 + t] >> 4) & NIB) | spread4(h >> (16 + 4 * t));
        }
        const XRun xr(x, e);
        int a = dot8i(lo[0], lo[1], xr[0], 0);
        a = dot8i(lo[2], lo[3], xr[1], a);
        a = dot8i(hi[0], hi[1], xr[2], a);
        a = dot8i(hi[2], hi[3], xr[3], a);
        return ld_f16(b) * x.d[e >> 5] * (float)(a - 16 * xs32(x, e));
    }
};
// Q4_K / Q5_K: a unit is the 32 bytes of sub-block pair (2g, 2g + 1) of a super-block:
// low nibbles are sub-block 2g, high nibbles 2g + 1 (64 elements; 4 units per block).
template <u32 DT>
__device__ __forceinline__ float k4_unit(const u8* s, u32 u, const XQ& x, u32 e0) {
    constexpr u32 BB = DT == DT_Q4_K ? 144 : 176, QS = DT == DT_Q4_K ? 16 : 48;
    const u32 sb = u >> 2, g = u & 3;
    const u8* b = s + BB * sb;
    const u32 e = e0 + 256 * sb + 64 * g;
    const uint4 A = *(const uint4*)(b + QS + 32 * g), B = *(const uint4*)(b + QS + 32 * g + 16);
    const u32 q[8] = {A.x, A.y, A.z, A.w, B.x, B.y, B.z, B.w};
    u32 lo[8], hi[8];
#pragma unroll
    for (int t = 0; t < 8; t++) {
        lo[t] = q[t] & NIB;
        hi[t] = (q[t] >> 4) & NIB;
    }
    if (DT == DT_Q5_K) { // fifth bit of element l of sub-block j: bit j of qh[l]
        const uint4 H0 = *(const uint4*)(b + 16), H1 = *(const uint4*)(b + 32);
        const u32 h[8] = {H0.x, H0.y, H0.z, H0.w, H1.x, H1.y, H1.z, H1.w};
#pragma unroll
        for (int t = 0; t < 8; t++) {
            lo[t] |= ((h[t] >> (2 * g)) & 0x01010101u) << 4;
            hi[t] |= ((h[t] >> (2 * g + 1)) & 0x01010101u) << 4;
        }
    }
    const XRun xr(x, e); // e is a multiple of 64
    int a0 = 0, a1 = 0;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        a0 = dot8i(lo[2 * t], lo[2 * t + 1], xr[t], a0);
        a1 = dot8i(hi[2 * t], hi[2 * t + 1], xr[4 + t], a1);
    }
    // 6-bit scales and mins of sub-blocks 2g, 2g + 1 (scale_min_k4 for a pair, branch-free):
    // two bytes each in sc, mn.
    const u32* k = (const u32*)(b + 4);
    const u32 sh = 16 * (g & 1), w0 = k[0] >> sh, w1 = k[1] >> sh, w2 = k[2] >> sh;
    const u32 sc = g < 2 ? w0 & 0x3F3F : (w2 & 0x0F0F) | ((w0 >> 2) & 0x3030);
    const u32 mn = g < 2 ? w1 & 0x3F3F : ((w2 >> 4) & 0x0F0F) | ((w1 >> 2) & 0x3030);
    // |sc * a| <= 63 * 31 * 32767 * 32 < 2^31 (Q5_K; Q4_K: 15).
    const float d0 = x.d[e >> 5], d1 = x.d[(e >> 5) + 1];
    const u32 dm = *(const u32*)b;
    return f16_to_f32(dm & 0xFFFF) * (d0 * (float)((int)(sc & 0xFF) * a0) + d1 * (float)((int)(sc >> 8) * a1))
         - f16_to_f32(dm >> 16) * (d0 * (float)((int)(mn & 0xFF) * xs32(x, e)) + d1 * (float)((int)(mn >> 8) * xs32(x, e + 32)));
}
template <> struct QUnit<DT_Q4_K> {
    static constexpr u32 PER_BLOCK = 4;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        return k4_unit<DT_Q4_K>(s, u, x, e0);
    }
};
template <> struct QUnit<DT_Q5_K> {
    static constexpr u32 PER_BLOCK = 4;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        return k4_unit<DT_Q5_K>(s, u, x, e0);
    }
};
// Q6_K: element 128h + 32qq + l (l < 32) is the nibble of ql[64h + 32(qq & 1) + l]
// (high if qq >= 2) with bits 2qq.. of qh[32h + l] above it, minus 32; scale
// sc[8h + l / 16 + 2qq] per 16. A unit is (h, l / 16): 16 l's x 4 quadrants (64 elements,
// every byte it reads used once; 4 units per block).
template <> struct QUnit<DT_Q6_K> {
    static constexpr u32 PER_BLOCK = 4;
    static __device__ __forceinline__ float dot(const u8* s, u32 u, const XQ& x, u32 e0) {
        const u32 sb = u >> 2, h = (u >> 1) & 1, lh = u & 1;
        const u8* b = s + 210 * sb;
        u32 A[4], B[4], C[4];
        ld_words<4>(b + 64 * h + 16 * lh, A);
        ld_words<4>(b + 64 * h + 32 + 16 * lh, B);
        ld_words<4>(b + 128 + 32 * h + 16 * lh, C);
        const u32 e = e0 + 256 * sb + 128 * h + 16 * lh;
        const i8* sc = (const i8*)(b + 192 + 8 * h + lh);
        float acc = 0.0f;
#pragma unroll
        for (int qq = 0; qq < 4; qq++) {
            u32 v[4];
#pragma unroll
            for (int t = 0; t < 4; t++) {
                const u32 n = qq == 0 ? A[t] : qq == 1 ? B[t] : qq == 2 ? A[t] >> 4 : B[t] >> 4;
                const u32 hb = qq == 0 ? C[t] << 4 : qq == 1 ? C[t] << 2 : qq == 2 ? C[t] : C[t] >> 2;
                v[t] = (n & NIB) | (hb & 0x30303030u);
            }
            const u32 eq = e + 32 * qq;
            const XRun xr(x, eq); // eq is a multiple of 16
            int a = dot8i(v[0], v[1], xr[0], 0);
            a = dot8i(v[2], v[3], xr[1], a);
            a -= 32 * x.s[eq >> 4];
            acc += x.d[eq >> 5] * (float)sc[2 * qq] * (float)a;
        }
        return ld_f16(b + 208) * acc;
    }
};
