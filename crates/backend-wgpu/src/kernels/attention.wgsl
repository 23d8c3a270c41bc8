// attention: causal, grouped-query, over the cache (n_kv_heads, ctx, head_dim). One
// workgroup per (query i, head h); it streams the positions 0 ..= pos + i in chunks of
// WG with an online softmax, each thread owning head dims lid, lid + WG, ...
// pos is read at execution time: pos + n > ctx sets status bit 1 and writes nothing.
struct Params {
    q_off: u32,
    kc_off: u32, // in cache elements from its binding start
    vc_off: u32,
    out_off: u32,
    pos_off: u32,
    n: u32,
    n_heads: u32,
    n_kv: u32,
    head_dim: u32,
    ctx: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;   // (n, n_heads, head_dim)
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // (n, n_heads, head_dim)
@group(0) @binding(5) var<storage, read_write> pos: array<u32>;
@group(0) @binding(7) var<storage, read_write> status: array<atomic<u32>>;

// @cache f32
@group(0) @binding(2) var<storage, read_write> kc: array<f32>;
@group(0) @binding(3) var<storage, read_write> vc: array<f32>;
fn kload(idx: u32) -> f32 {
    return kc[p.kc_off + idx];
}
fn vload(idx: u32) -> f32 {
    return vc[p.vc_off + idx];
}

// @cache f16
@group(0) @binding(2) var<storage, read_write> kc: array<u32>;
@group(0) @binding(3) var<storage, read_write> vc: array<u32>;
fn kload(idx: u32) -> f32 {
    let e = p.kc_off + idx;
    return unpack2x16float(kc[e >> 1u] >> ((e & 1u) * 16u)).x;
}
fn vload(idx: u32) -> f32 {
    let e = p.vc_off + idx;
    return unpack2x16float(vc[e >> 1u] >> ((e & 1u) * 16u)).x;
}

// @main
const WG: u32 = 128u;
const DMAX: u32 = 4u; // head_dim <= WG * DMAX
var<workgroup> qv: array<f32, 512>;
var<workgroup> sc: array<f32, WG>;
var<workgroup> wg_pos: u32;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        wg_pos = pos[p.pos_off];
    }
    let at = workgroupUniformLoad(&wg_pos);
    let count = nwg.x * nwg.y;
    let first = wid.x + wid.y * nwg.x;
    if (at > p.ctx || p.n > p.ctx - at) {
        if (first == 0u && lid == 0u) {
            atomicOr(&status[0], 1u);
        }
        return;
    }
    let group = p.n_heads / p.n_kv;
    for (var task = first; task < p.n * p.n_heads; task += count) {
        let i = task / p.n_heads;
        let h = task % p.n_heads;
        let cache = (h / group) * p.ctx * p.head_dim;
        let qb = p.q_off + task * p.head_dim;
        for (var d = lid; d < p.head_dim; d += WG) {
            qv[d] = q[qb + d];
        }
        workgroupBarrier();
        let len = at + i + 1u;
        var m = -3.402823e38;
        var s = 0.0;
        var acc: array<f32, DMAX>;
        for (var c0 = 0u; c0 < len; c0 += WG) {
            let t = c0 + lid;
            var score = -3.402823e38;
            if (t < len) {
                var dot = 0.0;
                let kb = cache + t * p.head_dim;
                for (var d = 0u; d < p.head_dim; d++) {
                    dot += qv[d] * kload(kb + d);
                }
                score = dot * p.scale;
            }
            sc[lid] = score;
            workgroupBarrier();
            let cnt = min(WG, len - c0);
            var cm = m;
            for (var tt = 0u; tt < cnt; tt++) {
                cm = max(cm, sc[tt]);
            }
            workgroupBarrier();
            sc[lid] = select(0.0, exp(score - cm), t < len);
            workgroupBarrier();
            let corr = exp(m - cm);
            s *= corr;
            for (var r = 0u; r < DMAX; r++) {
                acc[r] *= corr;
            }
            for (var tt = 0u; tt < cnt; tt++) {
                let w = sc[tt];
                s += w;
                let vb = cache + (c0 + tt) * p.head_dim;
                for (var r = 0u; r < DMAX; r++) {
                    let d = lid + r * WG;
                    if (d < p.head_dim) {
                        acc[r] += w * vload(vb + d);
                    }
                }
            }
            m = cm;
            workgroupBarrier();
        }
        let ob = p.out_off + task * p.head_dim;
        for (var r = 0u; r < DMAX; r++) {
            let d = lid + r * WG;
            if (d < p.head_dim) {
                out[ob + d] = acc[r] / s;
            }
        }
        workgroupBarrier();
    }
}
