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

// Dot product of 4 elements (4*sl .. 4*sl+3) of the 32-element unit `sub` of the block
// at `b` (shared memory, 2-byte aligned) with x4. Eight lanes cover a unit, so a warp
// reads 4 units' activations as one coalesced 512-byte load.
__device__ __forceinline__ float dot_q4(u32 q, int sh, float4 x, float off) {
    return ((float)((q >> sh) & 0xF) + off) * x.x + ((float)((q >> (sh + 8)) & 0xF) + off) * x.y
         + ((float)((q >> (sh + 16)) & 0xF) + off) * x.z + ((float)((q >> (sh + 24)) & 0xF) + off) * x.w;
}
__device__ __forceinline__ float xsum(float4 x) { return x.x + x.y + x.z + x.w; }

template <u32 DT> __device__ __forceinline__ float dot4(const u8* b, int sub, int sl, float4 x);

template <> __device__ __forceinline__ float dot4<DT_Q8_0>(const u8* b, int, int sl, float4 x) {
    u32 q = ld_u32_2(b + 2 + 4 * sl);
    return ld_f16(b) * ((float)(i8)(q & 0xFF) * x.x + (float)(i8)((q >> 8) & 0xFF) * x.y
                      + (float)(i8)((q >> 16) & 0xFF) * x.z + (float)(i8)(q >> 24) * x.w);
}
template <> __device__ __forceinline__ float dot4<DT_Q4_0>(const u8* b, int, int sl, float4 x) {
    return ld_f16(b) * dot_q4(ld_u32_2(b + 2 + 4 * (sl & 3)), (sl >> 2) * 4, x, -8.0f);
}
template <> __device__ __forceinline__ float dot4<DT_Q4_1>(const u8* b, int, int sl, float4 x) {
    return ld_f16(b) * dot_q4(ld_u32_2(b + 4 + 4 * (sl & 3)), (sl >> 2) * 4, x, 0.0f) + ld_f16(b + 2) * xsum(x);
}
template <> __device__ __forceinline__ float dot4<DT_Q5_0>(const u8* b, int, int sl, float4 x) {
    u32 q = ld_u32_2(b + 6 + 4 * (sl & 3)) >> ((sl >> 2) * 4);
    u32 h = ld_u32_2(b + 2) >> (4 * sl);
    float a = 0.0f;
    a += (float)((int)((q & 0xF) | ((h & 1) << 4)) - 16) * x.x;
    a += (float)((int)(((q >> 8) & 0xF) | (((h >> 1) & 1) << 4)) - 16) * x.y;
    a += (float)((int)(((q >> 16) & 0xF) | (((h >> 2) & 1) << 4)) - 16) * x.z;
    a += (float)((int)(((q >> 24) & 0xF) | (((h >> 3) & 1) << 4)) - 16) * x.w;
    return ld_f16(b) * a;
}
template <> __device__ __forceinline__ float dot4<DT_Q4_K>(const u8* b, int sub, int sl, float4 x) {
    float sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    u32 q = ld_u32_2(b + 16 + (sub / 2) * 32 + 4 * sl);
    return ld_f16(b) * sc * dot_q4(q, (sub & 1) * 4, x, 0.0f) - ld_f16(b + 2) * m * xsum(x);
}
template <> __device__ __forceinline__ float dot4<DT_Q5_K>(const u8* b, int sub, int sl, float4 x) {
    float sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    u32 q = ld_u32_2(b + 48 + (sub / 2) * 32 + 4 * sl) >> ((sub & 1) * 4);
    u32 h = ld_u32_2(b + 16 + 4 * sl) >> sub;
    float a = (float)((q & 0xF) | ((h & 1) << 4)) * x.x + (float)(((q >> 8) & 0xF) | (((h >> 8) & 1) << 4)) * x.y
            + (float)(((q >> 16) & 0xF) | (((h >> 16) & 1) << 4)) * x.z + (float)(((q >> 24) & 0xF) | (((h >> 24) & 1) << 4)) * x.w;
    return ld_f16(b) * sc * a - ld_f16(b + 2) * m * xsum(x);
}
template <> __device__ __forceinline__ float dot4<DT_Q6_K>(const u8* b, int sub, int sl, float4 x) {
    int h = sub / 4, qq = sub % 4;
    u32 ql = ld_u32_2(b + 64 * h + ((qq & 1) ? 32 : 0) + 4 * sl) >> ((qq & 2) ? 4 : 0);
    u32 qh = ld_u32_2(b + 128 + 32 * h + 4 * sl) >> (2 * qq);
    float a = (float)((int)((ql & 0xF) | ((qh & 3) << 4)) - 32) * x.x
            + (float)((int)(((ql >> 8) & 0xF) | (((qh >> 8) & 3) << 4)) - 32) * x.y
            + (float)((int)(((ql >> 16) & 0xF) | (((qh >> 16) & 3) << 4)) - 32) * x.z
            + (float)((int)(((ql >> 24) & 0xF) | (((qh >> 24) & 3) << 4)) - 32) * x.w;
    float sc = (float)(i8)b[192 + 8 * h + 2 * qq + (sl >> 2)];
    return ld_f16(b + 208) * sc * a;
}
