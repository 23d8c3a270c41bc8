//! The zero-copy proof: the GPU buffer is the region's own pages. The host writes, a
//! shader reads and writes in place, the host reads the result through the region's
//! pointer; the import maps pages, it does not allocate a copy (RSS stays flat).
use samepage_abi as abi;
use samepage_backend::{Backend, Op, Region};

use crate::common::gpu;

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = s.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

#[test]
fn gpu_works_in_place_on_the_guest_pages() {
    let Some(gpu) = gpu() else { return };
    const MIB: usize = 1 << 20;
    let size = 96 * MIB;
    let region = gpu.new_wgpu_region(size, 256 * MIB).unwrap();
    let base = region.base();
    assert_eq!(base as usize % 4096, 0, "the region is aligned for import");
    let rss0 = rss_bytes();

    // The host writes through its own pointer...
    let (off, n) = (5 * MIB as u32 + 4, 1024u32);
    let mem = region.mem();
    for i in 0..n {
        // SAFETY: inside the accessible region.
        unsafe { *(base.add(off as usize) as *mut f32).add(i as usize) = i as f32 };
    }
    // ...a shader doubles the values in place...
    let op = Op::Scale(abi::Scale {
        x: off,
        out: off,
        len: n,
        scale: 2.0,
    });
    op.validate(mem.len()).unwrap();
    gpu.run(mem, &[op]).unwrap();
    // ...and the host reads the result through the same pointer.
    // SAFETY: as above; the GPU is idle after run.
    let got = unsafe { std::slice::from_raw_parts(base.add(off as usize) as *const f32, n as usize) };
    assert!(got.iter().enumerate().all(|(i, &v)| v == 2.0 * i as f32));

    // The buffer the GPU used was imported from the region's own address.
    let views = region.imported_views();
    assert!(!views.is_empty());
    assert_eq!(views[0].0, base, "view 0 is the region base");
    assert!(views
        .iter()
        .all(|&(p, len)| p >= base && p as usize + len <= base as usize + region.capacity()));

    // A host write after the import is seen by the GPU with no upload.
    // SAFETY: inside the region; the GPU is idle.
    unsafe { *(base.add(off as usize) as *mut f32) = 21.0 };
    gpu.run(mem, &[op]).unwrap();
    assert_eq!(got[0], 42.0);

    // Growing in place: the base never moves, and the new pages are imported too.
    region.grow_to(200 * MIB).unwrap();
    assert_eq!(region.base(), base);
    let far = 190 * MIB as u32;
    // SAFETY: inside the grown region.
    unsafe { *(base.add(far as usize) as *mut f32) = 1.5 };
    let op = Op::Scale(abi::Scale {
        x: far,
        out: far,
        len: 1,
        scale: 4.0,
    });
    gpu.run(region.mem(), &[op]).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { *(base.add(far as usize) as *const f32) }, 6.0);

    // No copy of the region was made. A software device touches only what it uses, so RSS
    // grows by far less than the imported size. A hardware driver pins the imported pages,
    // making the region itself resident (measured on the H100: +200 MiB for 200 MiB), but
    // a copy would add a second region's worth on top.
    let grew = rss_bytes().saturating_sub(rss0);
    eprintln!(
        "zero-copy: RSS grew {} KiB while {} MiB were imported",
        grew / 1024,
        region.size() / MIB
    );
    let bound = if gpu.is_software() {
        size / 4
    } else {
        region.size() + size / 4
    };
    assert!(grew < bound, "RSS grew {grew} bytes: the import copied?");
}
