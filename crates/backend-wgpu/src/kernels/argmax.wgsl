// argmax of each row of (rows, cols) into a u32 (the first index on ties).
struct Params {
    x_off: u32,
    out_off: u32,
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;   // (rows, cols)
@group(0) @binding(2) var<storage, read_write> out: array<u32>; // (rows,)

const WG: u32 = 256u;
var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    for (var i = wid.x + wid.y * nwg.x; i < p.rows; i += count) {
        let xb = p.x_off + i * p.cols;
        // As the CPU reference: NaNs are never chosen; 0 when every value is NaN.
        var bv = bitcast<f32>(0xff800000u);
        var bi = 0xffffffffu;
        for (var e = lid; e < p.cols; e += WG) {
            let v = x[xb + e];
            if (v > bv || (bi == 0xffffffffu && v == bv)) {
                bv = v;
                bi = e;
            }
        }
        best_v[lid] = bv;
        best_i[lid] = bi;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                let v = best_v[lid + s];
                let k = best_i[lid + s];
                let takes = k != 0xffffffffu && (best_i[lid] == 0xffffffffu || v > best_v[lid]
                    || (v == best_v[lid] && k < best_i[lid]));
                if (takes) {
                    best_v[lid] = v;
                    best_i[lid] = k;
                }
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            out[p.out_off + i] = select(best_i[0], 0u, best_i[0] == 0xffffffffu);
        }
        workgroupBarrier();
    }
}
