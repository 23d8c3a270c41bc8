//! The CPU region: grows in place, zero-filled, guarded, and maps files without
//! moving.
use std::io::Write;

use samepage_backend::{Backend, Region};
use samepage_backend_cpu::{CpuBackend, CpuRegion};

#[test]
fn grows_in_place_zero_filled() {
    let r = CpuRegion::new(65536, 1 << 30, 1 << 20).unwrap();
    let base = r.base();
    // SAFETY: inside the accessible prefix.
    unsafe { *base.add(65535) = 7 };
    r.grow_to(3 * 65536).unwrap();
    assert_eq!(r.base(), base);
    assert_eq!(r.size(), 3 * 65536);
    // SAFETY: inside the grown prefix.
    let grown = unsafe { std::slice::from_raw_parts(base.add(65536), 2 * 65536) };
    assert!(grown.iter().all(|&b| b == 0));
    assert_eq!(unsafe { *base.add(65535) }, 7);
    assert!(r.grow_to((1 << 30) + 1).is_err());
}

#[test]
fn backend_region_reserves_the_wasm_address_space() {
    let b = CpuBackend::new();
    let layout = b.memory_layout();
    assert!(layout.reservation + layout.guard >= 4 << 30);
    let r = b.new_region(1 << 16, 1 << 24).unwrap();
    assert_eq!(r.capacity(), 1 << 24);
    assert_eq!(r.size(), 1 << 16);
}

fn temp_file(bytes: &[u8]) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("samepage-region-{}-{}", std::process::id(), bytes.len()));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(bytes).unwrap();
    drop(f);
    let f = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

#[test]
fn map_file_places_the_bytes_without_moving() {
    let data: Vec<u8> = (0..5 * 4096 + 123).map(|i| (i * 31 % 251) as u8).collect();
    let f = temp_file(&data);
    let r = CpuRegion::new(1 << 20, 1 << 24, 1 << 20).unwrap();
    let base = r.base();
    // Congruent offsets: an unaligned head, whole pages (mmap), a tail.
    for (file_off, dst, len) in [
        (100u64, 8192 + 100, 4 * 4096 + 7),
        (0, 65536, data.len()),
        (5, 3 * 65536 + 9, 4000),
    ] {
        r.map_file(&f, file_off, dst, len).unwrap();
        assert_eq!(r.base(), base);
        // SAFETY: inside the accessible prefix.
        let got = unsafe { std::slice::from_raw_parts(base.add(dst), len) };
        assert_eq!(got, &data[file_off as usize..file_off as usize + len], "map at {dst}");
        // Mapped pages are private and writable.
        unsafe { *base.add(dst + len / 2) ^= 0xFF };
    }
    // The neighbours of a mapping are untouched, and a file can be mapped again.
    assert_eq!(unsafe { *base.add(8192 + 99) }, 0);
    r.map_file(&f, 0, 65536, data.len()).unwrap();
    let got = unsafe { std::slice::from_raw_parts(base.add(65536), data.len()) };
    assert_eq!(got, &data[..]);
    // Past the accessible size is refused.
    assert!(r.map_file(&f, 0, (1 << 20) - 10, 100).is_err());
}
