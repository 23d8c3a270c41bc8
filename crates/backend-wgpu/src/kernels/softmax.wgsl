// softmax over each row of (rows, cols). One workgroup per row.
struct Params {
    x_off: u32,
    out_off: u32,
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;   // (rows, cols)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (rows, cols), may be x

const WG: u32 = 256u;
var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    for (var i = wid.x + wid.y * nwg.x; i < p.rows; i += count) {
        let xb = p.x_off + i * p.cols;
        let ob = p.out_off + i * p.cols;
        var m = -3.402823e38;
        for (var e = lid; e < p.cols; e += WG) {
            m = max(m, x[xb + e]);
        }
        red[lid] = m;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                red[lid] = max(red[lid], red[lid + s]);
            }
            workgroupBarrier();
        }
        m = red[0];
        workgroupBarrier();
        var sum = 0.0;
        for (var e = lid; e < p.cols; e += WG) {
            sum += exp(x[xb + e] - m);
        }
        red[lid] = sum;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                red[lid] += red[lid + s];
            }
            workgroupBarrier();
        }
        let inv = 1.0 / red[0];
        workgroupBarrier();
        for (var e = lid; e < p.cols; e += WG) {
            out[ob + e] = exp(x[xb + e] - m) * inv;
        }
    }
}
