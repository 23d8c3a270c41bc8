//! One region, never copied, never moved: the guest's writes are in the backend's region,
//! a kernel's writes are in the guest's memory, and Wasmtime's memory is the region.
use samepage_abi as abi;
use samepage_backend::Op;
use samepage_runtime::{HostConfig, Instance, Runtime};

use crate::support::*;

fn value(i: usize) -> f32 {
    i as f32 * 0.25 + 1.0
}

/// Read `n` f32s at `off` straight from the region, not through Wasmtime.
fn region_f32s(inst: &Instance, off: u32, n: usize) -> Vec<f32> {
    let region = inst.region();
    assert!(off as usize + n * 4 <= region.size());
    // SAFETY: the range is inside the accessible region (asserted); the guest is not running.
    unsafe { std::slice::from_raw_parts(region.base().add(off as usize) as *const f32, n) }.to_vec()
}

fn round_trip(rt: &Runtime) {
    let (mut inst, _) = testops(rt, HostConfig::new());
    let region = inst.region().clone();
    assert_eq!(inst.data_ptr(), region.base(), "Wasmtime's memory is not the region");
    assert_eq!(inst.memory_size(), region.size());

    // The guest writes; the host reads the region directly (upstream issue 12053).
    let n = 4096;
    let off: u32 = inst.call("zc_fill", n as u32).unwrap();
    let seen = region_f32s(&inst, off, n);
    assert!(
        seen.iter().enumerate().all(|(i, &v)| v == value(i)),
        "guest writes did not land in the region"
    );

    // A CPU kernel writes the region; the guest reads it through its own pointer.
    let op = Op::Scale(abi::Scale {
        x: off,
        out: off,
        len: n as u32,
        scale: 3.0,
    });
    op.validate(region.size()).unwrap();
    rt.backend().run(region.mem(), &[op]).unwrap();
    let bad: u32 = inst.call("zc_check", (off, n as u32, 3.0f32)).unwrap();
    assert_eq!(bad, 0, "the guest did not see the kernel's writes");

    // The host writes through the region pointer; the guest sees it too.
    // SAFETY: inside the accessible region; the guest is not running.
    let dst = unsafe { std::slice::from_raw_parts_mut(region.base().add(off as usize) as *mut f32, n) };
    for (i, v) in dst.iter_mut().enumerate() {
        *v = value(i) * 7.0;
    }
    let bad: u32 = inst.call("zc_check", (off, n as u32, 7.0f32)).unwrap();
    assert_eq!(bad, 0);

    // The guest writes, an op through the import doubles, the guest reads back.
    let bad: u32 = inst.call("zc_roundtrip", ()).unwrap();
    assert_eq!(bad, 0);

    // Growth happens in place.
    let before = inst.memory_size();
    let old_pages: i32 = inst.call("grow", 16u32).unwrap();
    assert_eq!(old_pages as usize * 65536, before);
    assert_eq!(inst.memory_size(), before + 16 * 65536);
    assert_eq!(region.size(), inst.memory_size());
    assert_eq!(inst.data_ptr(), region.base(), "growth moved the memory");
    assert_eq!(region_f32s(&inst, off, 1)[0], value(0) * 7.0);
}

#[test]
fn guest_and_kernels_share_the_region() {
    round_trip(&runtime());
}

#[test]
fn guest_and_kernels_share_the_region_without_guard_pages() {
    round_trip(&runtime_no_guard());
}

#[test]
fn each_instance_gets_its_own_region() {
    let rt = runtime();
    let (a, _) = testops(&rt, HostConfig::new());
    let (b, _) = testops(&rt, HostConfig::new());
    assert_ne!(a.region().base(), b.region().base());
    assert_eq!(a.data_ptr(), a.region().base());
    assert_eq!(b.data_ptr(), b.region().base());
}

#[test]
fn out_of_bounds_guest_access_traps_without_guard_pages() {
    let rt = runtime_no_guard();
    let m = wat(
        &rt,
        r#"(module
            (memory (export "memory") 1)
            (func (export "samepage_abi_version") (result i32) i32.const 1)
            (func (export "load") (param i32) (result i32) local.get 0 i32.load))"#,
    )
    .unwrap();
    let mut inst = Instance::new(&rt, &m, HostConfig::new()).unwrap();
    assert_eq!(inst.call::<u32, i32>("load", 65532).unwrap(), 0);
    let err = inst.call::<u32, i32>("load", 65533).unwrap_err().to_string();
    assert!(err.contains("out of bounds"), "{err}");
}

#[test]
fn runtimes_and_instances_can_move_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Runtime>();
    send_sync::<samepage_runtime::Module>();
    send::<Instance>();
}
