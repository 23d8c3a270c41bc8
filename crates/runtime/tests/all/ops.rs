//! Every op and weight dtype, immediate and as a replayed graph, checked inside the guest
//! against scalar references (see guests/testops/src/ops.rs and graph.rs for the ids).
use samepage_runtime::HostConfig;

use crate::support::*;

#[test]
fn all_ops_match_the_guest_references() {
    let rt = runtime();
    let (mut inst, logs) = testops(&rt, HostConfig::new());
    let failed: i32 = inst.call("all_ops", ()).unwrap();
    let logs = logs.lock().unwrap();
    assert_eq!(
        failed,
        0,
        "check {failed} failed: {:?}",
        logs.iter().find(|l| l.starts_with("FAIL"))
    );
    assert!(
        logs.iter().any(|l| l.contains("graph replayed")),
        "the graph test did not run"
    );
}

#[test]
fn all_ops_without_guard_pages() {
    let rt = runtime_no_guard();
    let (mut inst, logs) = testops(&rt, HostConfig::new());
    let failed: i32 = inst.call("all_ops", ()).unwrap();
    assert_eq!(
        failed,
        0,
        "check {failed} failed: {:?}",
        logs.lock().unwrap().iter().find(|l| l.starts_with("FAIL"))
    );
}
