//! File grants: a guest opens what the host granted and nothing else.
use std::path::{Path, PathBuf};

use samepage_abi::status;
use samepage_runtime::{HostConfig, Instance, RuntimeError};

use crate::support::*;

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Ask the guest to read and map `path`; its hash or a negative status.
fn checksum(inst: &mut Instance, path: &str) -> i64 {
    let ptr: u32 = inst.call("sp_alloc", path.len() as u32).unwrap();
    inst.memory_mut()[ptr as usize..][..path.len()].copy_from_slice(path.as_bytes());
    let r = inst.call("file_checksum", (ptr, path.len() as u32)).unwrap();
    inst.call::<_, ()>("sp_free", (ptr, path.len() as u32)).unwrap();
    r
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("samepage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("model")).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn granted_files_are_read_and_mapped_others_are_refused() {
    let tmp = TempDir::new("files");
    let model = tmp.path().join("model");
    // Two pages and a bit: map_file maps the aligned part and reads the tail.
    let data: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(model.join("weights.bin"), &data).unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    std::fs::write(tmp.path().join("secret.txt"), b"no").unwrap();

    let rt = runtime();
    let (mut inst, _) = testops(&rt, granting(&model));
    assert_eq!(checksum(&mut inst, "weights.bin"), fnv1a(&data) as i64);
    let abs = model.join("config.json");
    assert_eq!(checksum(&mut inst, abs.to_str().unwrap()), fnv1a(b"{}") as i64);
    for outside in [
        "../secret.txt",
        tmp.path().join("secret.txt").to_str().unwrap(),
        "/etc/passwd",
    ] {
        assert_eq!(checksum(&mut inst, outside), status::IO as i64, "{outside} was opened");
        assert!(inst.last_error().contains("outside"), "{}", inst.last_error());
    }
    assert_eq!(checksum(&mut inst, "missing.bin"), status::IO as i64);

    // A granted file: only that file, found by its name beside it.
    let (mut inst, _) = testops(&rt, granting(model.join("weights.bin")));
    assert_eq!(checksum(&mut inst, "weights.bin"), fnv1a(&data) as i64);
    assert_eq!(checksum(&mut inst, "config.json"), status::IO as i64);

    // No grants: nothing.
    let (mut inst, _) = testops(&rt, HostConfig::new());
    assert_eq!(checksum(&mut inst, "weights.bin"), status::IO as i64);
}

#[test]
fn granting_a_missing_path_is_an_error() {
    let rt = runtime();
    let m = testops_module(&rt);
    let err = Instance::new(&rt, &m, granting("/no/such/samepage/path"))
        .err()
        .unwrap();
    assert!(matches!(err, RuntimeError::Grant { .. }), "{err:?}");
}
