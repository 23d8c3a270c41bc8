// embed: out[i, :] = dequant(table[ids[i], :]) for the ids in [r0, r1), the table rows
// this dispatch has bound (a table larger than one binding takes several dispatches).
// An id >= vocab sets status bit 2 and writes nothing.
struct Params {
    table_off: u32, // byte offset of row r0 in `wq`
    row_bytes: u32,
    ids_off: u32,
    out_off: u32,
    dim: u32,
    n: u32,
    r0: u32,
    r1: u32,
    vocab: u32,
    groups: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> wq: array<u32>;  // (r1 - r0, dim) in the dtype
@group(0) @binding(2) var<storage, read_write> ids: array<u32>; // (n,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (n, dim)
@group(0) @binding(7) var<storage, read_write> status: array<atomic<u32>>;

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let count = nwg.x * nwg.y;
    for (var i = wid.x + wid.y * nwg.x; i < p.n; i += count) {
        let id = ids[p.ids_off + i];
        if (id >= p.vocab) {
            if (lid == 0u && p.r0 == 0u) {
                atomicOr(&status[0], 2u);
            }
            continue;
        }
        if (id < p.r0 || id >= p.r1) {
            continue;
        }
        let row = p.table_off + (id - p.r0) * p.row_bytes;
        let ob = p.out_off + i * p.dim;
        for (var g = lid; g < p.groups; g += WG) {
            var v: array<f32, 32>;
            dequant32(row, g, &v);
            let cnt = min(32u, p.dim - g * 32u);
            for (var e = 0u; e < cnt; e++) {
                out[ob + g * 32u + e] = v[e];
            }
        }
    }
}
