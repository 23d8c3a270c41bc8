// kv_store: cache[h, pos + i, :] = k[i, h, :] (and v), cache (n_kv_heads, ctx, head_dim).
// pos is read here, at execution time: pos + n > ctx sets status bit 1 and writes nothing.
struct Params {
    k_off: u32,
    v_off: u32,
    kc_off: u32, // in cache elements (f32: words; f16: halves) from its binding start
    vc_off: u32,
    pos_off: u32,
    n: u32,
    n_kv: u32,
    head_dim: u32,
    ctx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> k: array<f32>; // (n, n_kv, head_dim)
@group(0) @binding(2) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> pos: array<u32>;
@group(0) @binding(7) var<storage, read_write> status: array<atomic<u32>>;

// @cache f32
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;
fn put(dst: u32, e: u32) {
    kc[p.kc_off + dst] = k[p.k_off + e];
    vc[p.vc_off + dst] = v[p.v_off + e];
}

// @cache f16
// Two halves share a word that another invocation may own: write halves atomically.
@group(0) @binding(3) var<storage, read_write> kc: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> vc: array<atomic<u32>>;
fn half_bits(val: f32, idx: u32) -> vec2<u32> {
    let shift = (idx & 1u) * 16u;
    return vec2<u32>(~(0xffffu << shift), (pack2x16float(vec2<f32>(val, 0.0)) & 0xffffu) << shift);
}
fn put(dst: u32, e: u32) {
    let ki = p.kc_off + dst;
    let kb = half_bits(k[p.k_off + e], ki);
    atomicAnd(&kc[ki >> 1u], kb.x);
    atomicOr(&kc[ki >> 1u], kb.y);
    let vi = p.vc_off + dst;
    let vb = half_bits(v[p.v_off + e], vi);
    atomicAnd(&vc[vi >> 1u], vb.x);
    atomicOr(&vc[vi >> 1u], vb.y);
}

// @main
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let at = pos[p.pos_off];
    let total = p.n * p.n_kv * p.head_dim;
    let first = gid.x + gid.y * nwg.x * 256u;
    if (at > p.ctx || p.n > p.ctx - at) {
        if (first == 0u) {
            atomicOr(&status[0], 1u);
        }
        return;
    }
    let stride = nwg.x * nwg.y * 256u;
    for (var e = first; e < total; e += stride) {
        let d = e % p.head_dim;
        let h = (e / p.head_dim) % p.n_kv;
        let i = e / (p.head_dim * p.n_kv);
        put((h * p.ctx + at + i) * p.head_dim + d, e);
    }
}
