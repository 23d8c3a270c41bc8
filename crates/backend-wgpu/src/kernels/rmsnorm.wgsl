// rmsnorm: out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight. One workgroup per row.
struct Params {
    x_off: u32,
    w_off: u32,
    out_off: u32,
    n: u32,
    dim: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (n, dim)
@group(0) @binding(2) var<storage, read_write> weight: array<f32>; // (dim,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // (n, dim), may be x

const WG: u32 = 256u;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    for (var i = wid.x + wid.y * nwg.x; i < p.n; i += count) {
        let xb = p.x_off + i * p.dim;
        var ss = 0.0;
        for (var e = lid; e < p.dim; e += WG) {
            let v = x[xb + e];
            ss += v * v;
        }
        red[lid] = ss;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                red[lid] += red[lid + s];
            }
            workgroupBarrier();
        }
        let scale = 1.0 / sqrt(red[0] / f32(p.dim) + p.eps);
        workgroupBarrier();
        let ob = p.out_off + i * p.dim;
        for (var e = lid; e < p.dim; e += WG) {
            out[ob + e] = x[xb + e] * scale * weight[p.w_off + e];
        }
    }
}
