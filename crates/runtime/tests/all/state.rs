//! The graph state machine: in-flight graphs block memory.grow; a graph is submitted once
//! per wait.
use samepage_runtime::HostConfig;

use crate::support::*;

fn guest_check(name: &str) {
    let rt = runtime();
    let (mut inst, logs) = testops(&rt, HostConfig::new());
    let failed: i32 = inst.call(name, ()).unwrap();
    assert_eq!(failed, 0, "{name}: check {failed} failed: {:?}", logs.lock().unwrap());
}

#[test]
fn memory_grow_is_refused_while_a_graph_is_in_flight() {
    guest_check("grow_while_in_flight");
}

#[test]
fn a_graph_cannot_be_submitted_twice() {
    guest_check("submit_twice");
}
