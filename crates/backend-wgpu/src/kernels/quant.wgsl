// Weight access for every ggml dtype. The tensor is bound as `array<u32>` (binding 1,
// `wq`) and addressed in bytes: blocks are 18, 20, 22, 34, 144, 176 or 210 bytes, so
// they are not word-aligned; every field we read is at an even byte offset.
//
// `dequant32(row, g, v)` writes elements [32 g, 32 g + 32) of the row that starts at
// byte `row` into `v` (for f32/f16/bf16, elements past the row end read as garbage and
// the caller ignores them). The section for the tensor's dtype is spliced in after
// the shared helpers; sections start with `// @dtype NAME`.

fn wbyte(off: u32) -> u32 {
    return (wq[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

// 16 bits at an even offset.
fn wu16(off: u32) -> u32 {
    return (wq[off >> 2u] >> ((off & 2u) * 8u)) & 0xffffu;
}

fn wf16(off: u32) -> f32 {
    return unpack2x16float(wu16(off)).x;
}

// 32 bits at an even offset.
fn wu32(off: u32) -> u32 {
    let i = off >> 2u;
    if ((off & 2u) == 0u) {
        return wq[i];
    }
    return (wq[i] >> 16u) | (wq[i + 1u] << 16u);
}

// Signed byte `b` of `w`.
fn sbyte(w: u32, b: u32) -> f32 {
    return f32(bitcast<i32>(w << (24u - 8u * b)) >> 24u);
}

// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block `j` (0..8).
fn scale_min_k4(q: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(wbyte(q + j) & 63u), f32(wbyte(q + j + 4u) & 63u));
    }
    let d = (wbyte(q + j + 4u) & 0xfu) | ((wbyte(q + j - 4u) >> 6u) << 4u);
    let m = (wbyte(q + j + 4u) >> 4u) | ((wbyte(q + j) >> 6u) << 4u);
    return vec2<f32>(f32(d), f32(m));
}

// @dtype f32
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let base = (row >> 2u) + g * 32u;
    let n = arrayLength(&wq);
    for (var e = 0u; e < 32u; e++) {
        (*v)[e] = bitcast<f32>(wq[min(base + e, n - 1u)]);
    }
}

// @dtype f16
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let base = row + g * 64u;
    let n = arrayLength(&wq) * 4u - 2u;
    for (var e = 0u; e < 32u; e++) {
        (*v)[e] = wf16(min(base + 2u * e, n));
    }
}

// @dtype bf16
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let base = row + g * 64u;
    let n = arrayLength(&wq) * 4u - 2u;
    for (var e = 0u; e < 32u; e++) {
        (*v)[e] = bitcast<f32>(wu16(min(base + 2u * e, n)) << 16u);
    }
}

// @dtype q8_0
// block: f16 d; i8 qs[32]  (34 bytes)
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + g * 34u;
    let d = wf16(b);
    for (var w = 0u; w < 8u; w++) {
        let q = wu32(b + 2u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            (*v)[4u * w + k] = d * sbyte(q, k);
        }
    }
}

// @dtype q4_0
// block: f16 d; u8 qs[16]  (18 bytes); x = d * (nibble - 8), low nibbles first
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + g * 18u;
    let d = wf16(b);
    for (var w = 0u; w < 4u; w++) {
        let q = wu32(b + 2u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let c = (q >> (8u * k)) & 0xffu;
            (*v)[4u * w + k] = d * (f32(c & 0xfu) - 8.0);
            (*v)[4u * w + k + 16u] = d * (f32(c >> 4u) - 8.0);
        }
    }
}

// @dtype q4_1
// block: f16 d, m; u8 qs[16]  (20 bytes); x = d * nibble + m
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + g * 20u;
    let d = wf16(b);
    let m = wf16(b + 2u);
    for (var w = 0u; w < 4u; w++) {
        let q = wu32(b + 4u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let c = (q >> (8u * k)) & 0xffu;
            (*v)[4u * w + k] = d * f32(c & 0xfu) + m;
            (*v)[4u * w + k + 16u] = d * f32(c >> 4u) + m;
        }
    }
}

// @dtype q5_0
// block: f16 d; u8 qh[4]; u8 qs[16]  (22 bytes); x = d * ((nibble | high bit << 4) - 16)
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + g * 22u;
    let d = wf16(b);
    let qh = wu32(b + 2u);
    for (var w = 0u; w < 4u; w++) {
        let q = wu32(b + 6u + 4u * w);
        for (var k = 0u; k < 4u; k++) {
            let i = 4u * w + k;
            let c = (q >> (8u * k)) & 0xffu;
            let h0 = ((qh >> i) << 4u) & 0x10u;
            let h1 = (qh >> (i + 12u)) & 0x10u;
            (*v)[i] = d * (f32((c & 0xfu) | h0) - 16.0);
            (*v)[i + 16u] = d * (f32((c >> 4u) | h1) - 16.0);
        }
    }
}

// @dtype q4_K
// block of 256: f16 d, dmin; u8 scales[12]; u8 qs[128]  (144 bytes).
// Group g (0..8) uses scale/min g and the low (even g) or high nibbles of qs[32 (g/2) ..].
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + (g >> 3u) * 144u;
    let s = g & 7u;
    let sm = scale_min_k4(b + 4u, s);
    let d = wf16(b) * sm.x;
    let m = wf16(b + 2u) * sm.y;
    let q = b + 16u + 32u * (s >> 1u);
    let shift = 4u * (s & 1u);
    for (var w = 0u; w < 8u; w++) {
        let word = wu32(q + 4u * w) >> shift;
        for (var k = 0u; k < 4u; k++) {
            (*v)[4u * w + k] = d * f32((word >> (8u * k)) & 0xfu) - m;
        }
    }
}

// @dtype q5_K
// block of 256: f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]  (176 bytes).
// Group g adds bit g of qh[l] as the fifth bit.
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + (g >> 3u) * 176u;
    let s = g & 7u;
    let sm = scale_min_k4(b + 4u, s);
    let d = wf16(b) * sm.x;
    let m = wf16(b + 2u) * sm.y;
    let q = b + 48u + 32u * (s >> 1u);
    let shift = 4u * (s & 1u);
    for (var w = 0u; w < 8u; w++) {
        let word = wu32(q + 4u * w) >> shift;
        let hw = wu32(b + 16u + 4u * w) >> s;
        for (var k = 0u; k < 4u; k++) {
            let lo = (word >> (8u * k)) & 0xfu;
            let hi = ((hw >> (8u * k)) & 1u) << 4u;
            (*v)[4u * w + k] = d * f32(lo | hi) - m;
        }
    }
}

// @dtype q6_K
// block of 256: u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d  (210 bytes).
// Group g: half h = g/4 (128 elements each), r = g%4 picks the nibble of
// ql[64 h + 32 (r & 1) + l] (high if r >= 2) and bits 2r of qh[128 + 32 h + l].
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let b = row + (g >> 3u) * 210u;
    let s = g & 7u;
    let h = s >> 2u;
    let r = s & 3u;
    let d = wf16(b + 208u);
    let ql = b + 64u * h + 32u * (r & 1u);
    let qh = b + 128u + 32u * h;
    let lshift = 4u * (r >> 1u);
    let sc0 = d * sbyte(wu16(b + 192u + 8u * h + 2u * r), 0u);
    let sc1 = d * sbyte(wu16(b + 192u + 8u * h + 2u * r), 1u);
    for (var w = 0u; w < 8u; w++) {
        let lw = wu32(ql + 4u * w) >> lshift;
        let hw = wu32(qh + 4u * w) >> (2u * r);
        let sc = select(sc1, sc0, w < 4u);
        for (var k = 0u; k < 4u; k++) {
            let lo = (lw >> (8u * k)) & 0xfu;
            let hi = ((hw >> (8u * k)) & 3u) << 4u;
            (*v)[4u * w + k] = sc * (f32(lo | hi) - 32.0);
        }
    }
}
