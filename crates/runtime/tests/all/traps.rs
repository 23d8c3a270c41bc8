//! A guest trap is an error; the instance is done, the runtime is not.
use samepage_runtime::{HostConfig, RuntimeError};

use crate::support::*;

#[test]
fn a_trap_is_an_error_and_the_runtime_stays_usable() {
    let rt = runtime();
    let (mut inst, _) = testops(&rt, HostConfig::new());
    let err = inst.call::<(), ()>("trap_now", ()).unwrap_err();
    match &err {
        RuntimeError::Trap { func, message } => {
            assert_eq!(func, "trap_now");
            assert!(message.contains("unreachable"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(matches!(
        inst.call::<(), u32>("zc_roundtrip", ()),
        Err(RuntimeError::Poisoned)
    ));

    let (mut fresh, _) = testops(&rt, HostConfig::new());
    assert_eq!(fresh.call::<(), u32>("zc_roundtrip", ()).unwrap(), 0);
}

#[test]
fn a_missing_export_is_an_error() {
    let rt = runtime();
    let (mut inst, _) = testops(&rt, HostConfig::new());
    let err = inst.call::<(), ()>("no_such_export", ()).unwrap_err();
    assert!(matches!(err, RuntimeError::MissingExport { .. }), "{err:?}");
    // The wrong signature too, and neither poisons the instance.
    let err = inst.call::<u32, u32>("zc_roundtrip", 1).unwrap_err();
    assert!(matches!(err, RuntimeError::MissingExport { .. }), "{err:?}");
    assert_eq!(inst.call::<(), u32>("zc_roundtrip", ()).unwrap(), 0);
}
