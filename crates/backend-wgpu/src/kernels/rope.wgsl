// rope, in place on (n, n_heads, head_dim): token i is at position positions[i].
//
// The angle pos * theta_j is reduced exactly: the host passes theta_j / 2 pi (turns per
// position, < 1) as a 64-bit binary fraction, the kernel multiplies it by the integer
// position in u32 arithmetic modulo 1 turn, so sin/cos see an angle in [-pi, pi) with
// f32 accuracy however large the position (an f32 product would be off by ~1e-4 rad at
// position 4096).
struct Params {
    x_off: u32,
    pos_off: u32,
    n: u32,
    n_heads: u32,
    head_dim: u32,
    n_rot: u32,
    half_mode: u32, // 0: pairs (2j, 2j + 1); 1: pairs (j, j + n_rot / 2)
    _pad: u32,
    turns: array<vec4<u32>, 128>, // pair j: (hi, lo) words of the fraction at [2j], [2j + 1]
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;         // (n, n_heads, head_dim)
@group(0) @binding(2) var<storage, read_write> positions: array<u32>; // (n,)

// The high 32 bits of the 64-bit product a * b.
fn mul_hi(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = ((a0 * b0) >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
}

// pos * theta_j as an angle in [-pi, pi).
fn angle(pos: u32, j: u32) -> f32 {
    let w = p.turns[j / 2u];
    let hi = select(w.z, w.x, (j & 1u) == 0u);
    let lo = select(w.w, w.y, (j & 1u) == 0u);
    // (pos * (hi * 2^32 + lo)) mod 2^64, as turns * 2^64.
    let top = pos * hi + mul_hi(pos, lo);
    let low = pos * lo;
    let t = f32(bitcast<i32>(top)) + f32(low) * 2.3283064e-10;
    return t * 1.4629180792671596e-9; // 2 pi / 2^32
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.n_rot / 2u;
    let total = p.n * p.n_heads * half;
    let stride = nwg.x * nwg.y * 256u;
    for (var e = gid.x + gid.y * nwg.x * 256u; e < total; e += stride) {
        let j = e % half;
        let h = (e / half) % p.n_heads;
        let i = e / (half * p.n_heads);
        let theta = angle(positions[p.pos_off + i], j);
        let c = cos(theta);
        let s = sin(theta);
        let base = p.x_off + (i * p.n_heads + h) * p.head_dim;
        var ia = base + 2u * j;
        var ib = ia + 1u;
        if (p.half_mode != 0u) {
            ia = base + j;
            ib = base + j + half;
        }
        let x0 = x[ia];
        let x1 = x[ib];
        x[ia] = x0 * c - x1 * s;
        x[ib] = x0 * s + x1 * c;
    }
}
