// matmul: out[i, j] (+)= sum_l x[i, l] * W[j, l] (+ bias[j]) for rows j in [j0, j0 + rows).
// One workgroup per weight row (grid-stride); its threads split the row's 32-element
// groups, dequantise each group once and dot it with TN rows of x at a time.
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

const WG: u32 = 64u;
const TN: u32 = 4u;
var<workgroup> red: array<vec4<f32>, WG>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    for (var r = wid.x + wid.y * nwg.x; r < p.rows; r += count) {
        let row = p.w_off + r * p.row_bytes;
        let j = p.j0 + r;
        for (var i0 = 0u; i0 < p.n; i0 += TN) {
            var acc = vec4<f32>(0.0);
            for (var g = lid; g < p.groups; g += WG) {
                var v: array<f32, 32>;
                dequant32(row, g, &v);
                let e0 = g * 32u;
                let cnt = min(32u, p.k - e0);
                for (var t = 0u; t < TN; t++) {
                    if (i0 + t < p.n) {
                        let xb = p.x_off + (i0 + t) * p.k + e0;
                        var s = 0.0;
                        for (var e = 0u; e < cnt; e++) {
                            s += v[e] * x[xb + e];
                        }
                        acc[t] += s;
                    }
                }
            }
            red[lid] = acc;
            workgroupBarrier();
            for (var s = WG / 2u; s > 0u; s >>= 1u) {
                if (lid < s) {
                    red[lid] += red[lid + s];
                }
                workgroupBarrier();
            }
            if (lid == 0u) {
                let tot = red[0];
                for (var t = 0u; t < TN; t++) {
                    if (i0 + t < p.n) {
                        let o = p.out_off + (i0 + t) * p.m + j;
                        var y = tot[t];
                        if ((p.flags & 1u) != 0u) {
                            y += bias[p.bias_off + j];
                        }
                        if ((p.flags & 2u) != 0u) {
                            y += out[o];
                        }
                        out[o] = y;
                    }
                }
            }
            workgroupBarrier();
        }
    }
}
