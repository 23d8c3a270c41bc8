//! Modules that are not samepage guests are refused with a clear reason.
use samepage_runtime::{HostConfig, Instance, RuntimeError};

use crate::support::*;

#[test]
fn abi_version_mismatch_is_refused() {
    let rt = runtime();
    let m = wat(
        &rt,
        r#"(module
            (memory (export "memory") 1)
            (func (export "samepage_abi_version") (result i32) i32.const 2))"#,
    )
    .unwrap();
    let err = Instance::new(&rt, &m, HostConfig::new())
        .err()
        .expect("a version-2 guest was accepted");
    assert!(
        matches!(err, RuntimeError::AbiMismatch { guest: 2, host: 1 }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("version 2") && msg.contains("version 1") && msg.contains("rebuild"),
        "{msg}"
    );
}

#[test]
fn non_guests_are_refused_at_compile_time() {
    let rt = runtime();
    let cases = [
        (
            r#"(module (import "env" "memory" (memory 1))
                (func (export "samepage_abi_version") (result i32) i32.const 1))"#,
            "imports its memory",
        ),
        (
            r#"(module (memory 1) (func (export "samepage_abi_version") (result i32) i32.const 1))"#,
            "does not export its memory",
        ),
        (r#"(module (memory (export "memory") 1))"#, "samepage_abi_version"),
        (
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "samepage_abi_version") (result i32) i32.const 1))"#,
            "wasi_snapshot_preview1::fd_write",
        ),
        (
            r#"(module (import "samepage" "no_such_import" (func))
                (memory (export "memory") 1)
                (func (export "samepage_abi_version") (result i32) i32.const 1))"#,
            "samepage::no_such_import",
        ),
        ("not wasm", "compile"),
    ];
    for (text, want) in cases {
        let err = wat(&rt, text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {text}"))
            .to_string();
        assert!(err.contains(want), "{err:?} does not mention {want:?}");
    }
}

#[test]
fn a_wrong_import_signature_fails_at_instantiation() {
    let rt = runtime();
    let m = wat(
        &rt,
        r#"(module (import "samepage" "op" (func (param i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "samepage_abi_version") (result i32) i32.const 1))"#,
    )
    .unwrap();
    let err = Instance::new(&rt, &m, HostConfig::new()).err().unwrap().to_string();
    assert!(err.contains("samepage::op") || err.contains("incompatible"), "{err}");
}
