// matmul: out[i, j] (+)= sum_l x[i, l] * W[j, l] (+ bias[j]) for rows j in [j0, j0 + rows).
// Each invocation computes R = 8 weight rows (rb + t WG + lid, t < 8) for every token;
// a workgroup covers WG * R consecutive rows and grid-strides over the rest. Per
// 32-element group it loads x once (8 vec4s) and dots it with the group of each of its
// rows, decoded into registers by the dtype's `deq`.
// No workgroup memory, no barriers, and every loop bound is uniform: on CPU
// implementations (lavapipe) every divergent load is costly, so x loads are shared by
// R rows and a weight block takes one load per word.
struct Params {
    w_off: u32,     // byte offset of row j0 in `wq`
    row_bytes: u32,
    x_off: u32,     // word offsets of x, out, bias in their bindings
    out_off: u32,
    bias_off: u32,
    k: u32,
    n: u32,
    m: u32,         // the row stride of out
    j0: u32,
    rows: u32,
    flags: u32,     // 1: bias, 2: accumulate
    groups: u32,    // ceil(k / 32)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> wq: array<u32>;   // (rows, k) in the dtype
@group(0) @binding(2) var<storage, read_write> x: array<f32>;    // (n, k)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // (n, m)
@group(0) @binding(4) var<storage, read_write> bias: array<f32>; // (m,)

const WG: u32 = 32u; // 8 on CPU devices (kernels.rs)
const R: u32 = 8u; // rows per invocation; plan.rs dispatches ceil(rows / (WG * R)) groups

fn xv(i: u32) -> vec4<f32> {
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}

fn xs32(i: u32) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(xv(i), xv(i + 4u), xv(i + 8u), xv(i + 12u), xv(i + 16u), xv(i + 20u), xv(i + 24u),
                               xv(i + 28u));
}

// The dot product of a decoded group with 32 elements of x.
fn dot32(w: array<vec4<f32>, 8>, v: array<vec4<f32>, 8>) -> f32 {
    let a = dot(w[0], v[0]) + dot(w[1], v[1]) + dot(w[2], v[2]) + dot(w[3], v[3]);
    let b = dot(w[4], v[4]) + dot(w[5], v[5]) + dot(w[6], v[6]) + dot(w[7], v[7]);
    return a + b;
}

// The partial last group g (only f32/f16/bf16 rows have k % 32 != 0) of the row at
// byte `row`, dotted with x[xb + 32 g ..], element by element (`welem`).
fn tail(row: u32, g: u32, xb: u32) -> f32 {
    var s = 0.0;
    for (var e = g * 32u; e < p.k; e++) {
        s += welem(row, e) * x[xb + e];
    }
    return s;
}

fn store(i: u32, r: u32, y0: f32) {
    let j = p.j0 + r;
    let o = p.out_off + i * p.m + j;
    var y = y0;
    if ((p.flags & 1u) != 0u) {
        y += bias[p.bias_off + j];
    }
    if ((p.flags & 2u) != 0u) {
        y += out[o];
    }
    out[o] = y;
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    let full = p.k / 32u;
    let last = p.rows - 1u;
    for (var rb = (wid.x + wid.y * nwg.x) * WG * R; rb < p.rows; rb += count * WG * R) {
        // Rows past the end repeat the last row (keeping control flow uniform) and
        // store nothing.
        let b0 = p.w_off + min(rb + 0u * WG + lid, last) * p.row_bytes;
        let b1 = p.w_off + min(rb + 1u * WG + lid, last) * p.row_bytes;
        let b2 = p.w_off + min(rb + 2u * WG + lid, last) * p.row_bytes;
        let b3 = p.w_off + min(rb + 3u * WG + lid, last) * p.row_bytes;
        let b4 = p.w_off + min(rb + 4u * WG + lid, last) * p.row_bytes;
        let b5 = p.w_off + min(rb + 5u * WG + lid, last) * p.row_bytes;
        let b6 = p.w_off + min(rb + 6u * WG + lid, last) * p.row_bytes;
        let b7 = p.w_off + min(rb + 7u * WG + lid, last) * p.row_bytes;
        for (var i = 0u; i < p.n; i++) {
            let xb = p.x_off + i * p.k;
            var a = vec4<f32>(0.0);
            var c = vec4<f32>(0.0);
            for (var g = 0u; g < full; g++) {
                let xs = xs32(xb + g * 32u);
                a.x += dot32(deq(b0, g), xs);
                a.y += dot32(deq(b1, g), xs);
                a.z += dot32(deq(b2, g), xs);
                a.w += dot32(deq(b3, g), xs);
                c.x += dot32(deq(b4, g), xs);
                c.y += dot32(deq(b5, g), xs);
                c.z += dot32(deq(b6, g), xs);
                c.w += dot32(deq(b7, g), xs);
            }
            // A loop rather than an `if`: it runs at most once, and costs nothing when not.
            for (var g = full; g < p.groups; g++) {
                a.x += tail(b0, g, xb);
                a.y += tail(b1, g, xb);
                a.z += tail(b2, g, xb);
                a.w += tail(b3, g, xb);
                c.x += tail(b4, g, xb);
                c.y += tail(b5, g, xb);
                c.z += tail(b6, g, xb);
                c.w += tail(b7, g, xb);
            }
            if (rb + 0u * WG + lid < p.rows) {
                store(i, rb + 0u * WG + lid, a.x);
            }
            if (rb + 1u * WG + lid < p.rows) {
                store(i, rb + 1u * WG + lid, a.y);
            }
            if (rb + 2u * WG + lid < p.rows) {
                store(i, rb + 2u * WG + lid, a.z);
            }
            if (rb + 3u * WG + lid < p.rows) {
                store(i, rb + 3u * WG + lid, a.w);
            }
            if (rb + 4u * WG + lid < p.rows) {
                store(i, rb + 4u * WG + lid, c.x);
            }
            if (rb + 5u * WG + lid < p.rows) {
                store(i, rb + 5u * WG + lid, c.y);
            }
            if (rb + 6u * WG + lid < p.rows) {
                store(i, rb + 6u * WG + lid, c.z);
            }
            if (rb + 7u * WG + lid < p.rows) {
                store(i, rb + 7u * WG + lid, c.w);
            }
        }
    }
}
