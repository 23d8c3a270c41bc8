// Elementwise ops over len f32 (in place allowed): swiglu, add, scale.
struct Params {
    a_off: u32,
    b_off: u32,
    out_off: u32,
    len: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn linear(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// out = silu(a) * b
@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * nwg.y * 256u;
    for (var e = linear(gid, nwg); e < p.len; e += stride) {
        let g = a[p.a_off + e];
        out[p.out_off + e] = g / (1.0 + exp(-g)) * b[p.b_off + e];
    }
}

// out = a + b
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * nwg.y * 256u;
    for (var e = linear(gid, nwg); e < p.len; e += stride) {
        out[p.out_off + e] = a[p.a_off + e] + b[p.b_off + e];
    }
}

// out = a * scale
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * nwg.y * 256u;
    for (var e = linear(gid, nwg); e < p.len; e += stride) {
        out[p.out_off + e] = a[p.a_off + e] * p.scale;
    }
}
