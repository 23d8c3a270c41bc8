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
    let lo = wq[i];
    let hi = wq[min(i + 1u, arrayLength(&wq) - 1u)];
    return select(lo, (lo >> 16u) | (hi << 16u), (off & 2u) != 0u);
}

// The word at byte 4 j (even) or 4 j + 2 (odd) of the consecutive words a, b.
fn fsh(a: u32, b: u32, odd: bool) -> u32 {
    return select(a, (a >> 16u) | (b << 16u), odd);
}

// The word at byte 4 j + 2 (`shifted`) or 4 j + 4 of the consecutive words a, b.
fn fsh2(a: u32, b: u32, shifted: bool) -> u32 {
    return select(b, (a >> 16u) | (b << 16u), shifted);
}

// The four bytes of `w` as vec4 lanes (byte 0 first), masked to `m` after `s` more bits.
fn nib4(w: u32, s: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(w) >> (vec4<u32>(0u, 8u, 16u, 24u) + s)) & vec4<u32>(15u));
}

fn sb4(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// Bit `s + 8 k` of `w` for bytes k = 0..3, as 0 or 16.
fn hib4(w: u32, s: u32) -> vec4<f32> {
    return vec4<f32>(((vec4<u32>(w) >> (vec4<u32>(0u, 8u, 16u, 24u) + s)) & vec4<u32>(1u)) << vec4<u32>(4u));
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

// deq(row, g): elements [32 g, 32 g + 32) of a row as 8 vec4s (whole groups only).
fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = (row >> 2u) + g * 32u;
    for (var w = 0u; w < 8u; w++) {
        let i = b + 4u * w;
        o[w] = bitcast<vec4<f32>>(vec4<u32>(wq[i], wq[i + 1u], wq[i + 2u], wq[i + 3u]));
    }
    return o;
}

// welem(row, e): element e of a row, for a partial last group (f32/f16/bf16 only).
fn welem(row: u32, e: u32) -> f32 {
    return bitcast<f32>(wq[(row >> 2u) + e]);
}
// @dtype f16
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let base = row + g * 64u;
    let n = arrayLength(&wq) * 4u - 2u;
    for (var e = 0u; e < 32u; e++) {
        (*v)[e] = wf16(min(base + 2u * e, n));
    }
}

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + g * 64u;
    for (var w = 0u; w < 8u; w++) {
        let a = wu32(b + 8u * w);
        let c = wu32(b + 8u * w + 4u);
        o[w] = vec4<f32>(unpack2x16float(a), unpack2x16float(c));
    }
    return o;
}

fn welem(row: u32, e: u32) -> f32 {
    return wf16(row + 2u * e);
}
// @dtype bf16
fn dequant32(row: u32, g: u32, v: ptr<function, array<f32, 32>>) {
    let base = row + g * 64u;
    let n = arrayLength(&wq) * 4u - 2u;
    for (var e = 0u; e < 32u; e++) {
        (*v)[e] = bitcast<f32>(wu16(min(base + 2u * e, n)) << 16u);
    }
}

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + g * 64u;
    for (var w = 0u; w < 8u; w++) {
        let a = wu32(b + 8u * w);
        let c = wu32(b + 8u * w + 4u);
        o[w] = bitcast<vec4<f32>>(vec4<u32>(a << 16u, a & 0xffff0000u, c << 16u, c & 0xffff0000u));
    }
    return o;
}

fn welem(row: u32, e: u32) -> f32 {
    return bitcast<f32>(wu16(row + 2u * e) << 16u);
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

// Nine word loads per block: the block starts at 0 or 2 mod 4, its quants at 2 or 0.
fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    let b = row + g * 34u;
    let i = b >> 2u;
    let ev = (b & 2u) == 0u; // quants at 2 mod 4
    let w0 = wq[i];
    let w1 = wq[i + 1u];
    let w2 = wq[i + 2u];
    let w3 = wq[i + 3u];
    let w4 = wq[i + 4u];
    let w5 = wq[i + 5u];
    let w6 = wq[i + 6u];
    let w7 = wq[i + 7u];
    let w8 = wq[i + 8u];
    let d = unpack2x16float(select(w0 >> 16u, w0, ev)).x;
    return array<vec4<f32>, 8>(
        d * sb4(fsh2(w0, w1, ev)), d * sb4(fsh2(w1, w2, ev)), d * sb4(fsh2(w2, w3, ev)), d * sb4(fsh2(w3, w4, ev)),
        d * sb4(fsh2(w4, w5, ev)), d * sb4(fsh2(w5, w6, ev)), d * sb4(fsh2(w6, w7, ev)), d * sb4(fsh2(w7, w8, ev)));
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + g * 18u;
    let d = wf16(b);
    for (var w = 0u; w < 4u; w++) {
        let q = wu32(b + 2u + 4u * w);
        o[w] = d * (nib4(q, 0u) - 8.0);
        o[w + 4u] = d * (nib4(q, 4u) - 8.0);
    }
    return o;
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

// Six word loads per block (the block may start at 2 mod 4), funnel-shifted.
fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    let b = row + g * 20u;
    let i = b >> 2u;
    let odd = (b & 2u) != 0u;
    let last = arrayLength(&wq) - 1u;
    let w0 = wq[i];
    let w1 = wq[i + 1u];
    let w2 = wq[i + 2u];
    let w3 = wq[i + 3u];
    let w4 = wq[i + 4u];
    let w5 = wq[min(i + 5u, last)];
    let dm = unpack2x16float(fsh(w0, w1, odd));
    let q0 = fsh(w1, w2, odd);
    let q1 = fsh(w2, w3, odd);
    let q2 = fsh(w3, w4, odd);
    let q3 = fsh(w4, w5, odd);
    return array<vec4<f32>, 8>(
        dm.x * nib4(q0, 0u) + dm.y, dm.x * nib4(q1, 0u) + dm.y, dm.x * nib4(q2, 0u) + dm.y, dm.x * nib4(q3, 0u) + dm.y,
        dm.x * nib4(q0, 4u) + dm.y, dm.x * nib4(q1, 4u) + dm.y, dm.x * nib4(q2, 4u) + dm.y, dm.x * nib4(q3, 4u) + dm.y);
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + g * 22u;
    let d = wf16(b);
    let qh = wu32(b + 2u);
    for (var w = 0u; w < 4u; w++) {
        let q = wu32(b + 6u + 4u * w);
        // bit i of qh for element i = 4 w + k: spread the 4 bits over the bytes.
        let h = (qh >> (4u * w)) & 0xfu;
        let hh = (qh >> (4u * w + 16u)) & 0xfu;
        let hs = (h & 1u) | ((h & 2u) << 7u) | ((h & 4u) << 14u) | ((h & 8u) << 21u);
        let hhs = (hh & 1u) | ((hh & 2u) << 7u) | ((hh & 4u) << 14u) | ((hh & 8u) << 21u);
        o[w] = d * (nib4(q, 0u) + hib4(hs, 0u) - 16.0);
        o[w + 4u] = d * (nib4(q, 4u) + hib4(hhs, 0u) - 16.0);
    }
    return o;
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + (g >> 3u) * 144u;
    let s = g & 7u;
    let sm = scale_min_k4(b + 4u, s);
    let dm = unpack2x16float(wu32(b));
    let d = dm.x * sm.x;
    let m = dm.y * sm.y;
    let q = b + 16u + 32u * (s >> 1u);
    let shift = 4u * (s & 1u);
    for (var w = 0u; w < 8u; w++) {
        o[w] = d * nib4(wu32(q + 4u * w), shift) - m;
    }
    return o;
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + (g >> 3u) * 176u;
    let s = g & 7u;
    let sm = scale_min_k4(b + 4u, s);
    let dm = unpack2x16float(wu32(b));
    let d = dm.x * sm.x;
    let m = dm.y * sm.y;
    let q = b + 48u + 32u * (s >> 1u);
    let shift = 4u * (s & 1u);
    for (var w = 0u; w < 8u; w++) {
        o[w] = d * (nib4(wu32(q + 4u * w), shift) + hib4(wu32(b + 16u + 4u * w), s)) - m;
    }
    return o;
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
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

fn deq(row: u32, g: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    let b = row + (g >> 3u) * 210u;
    let s = g & 7u;
    let h = s >> 2u;
    let r = s & 3u;
    let d = wf16(b + 208u);
    let ql = b + 64u * h + 32u * (r & 1u);
    let qh = b + 128u + 32u * h;
    let lshift = 4u * (r >> 1u);
    let scw = wu16(b + 192u + 8u * h + 2u * r);
    let sc0 = d * sbyte(scw, 0u);
    let sc1 = d * sbyte(scw, 1u);
    for (var w = 0u; w < 8u; w++) {
        let lo = nib4(wu32(ql + 4u * w), lshift);
        let hw = wu32(qh + 4u * w) >> (2u * r);
        let hi = vec4<f32>(((vec4<u32>(hw) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(3u)) << vec4<u32>(4u));
        o[w] = select(sc1, sc0, w < 4u) * (lo + hi - 32.0);
    }
    return o;
}

// Rows of block-quantised dtypes are whole groups: the matmul never asks.
fn welem(row: u32, e: u32) -> f32 {
    return 0.0;
}
