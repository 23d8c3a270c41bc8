//! The app protocol (`sp_alloc`, `sp_call`, `sp_free`) and streaming through `emit`.
use std::sync::{Arc, Mutex};

use samepage_runtime::{HostConfig, Instance};

use crate::support::*;

#[test]
fn call_json_round_trips_and_streams() {
    let rt = runtime();
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let mut config = HostConfig::new();
    config.on_emit(move |kind, bytes| {
        assert_eq!(kind, samepage_abi::emit::TEXT);
        sink.lock().unwrap().push_str(std::str::from_utf8(bytes).unwrap());
        false
    });
    let mut inst = Instance::new(&rt, &testops_module(&rt), config).unwrap();
    // The first call sets up the guest's allocator (it may grow the memory once).
    inst.call_json("{}").unwrap();
    text.lock().unwrap().clear();
    let before = inst.memory_size();
    for i in 0..100 {
        let resp = inst.call_json(&format!(r#"{{"n":{i}}}"#)).unwrap();
        assert_eq!(resp, format!(r#"{{"echo":{{"n":{i}}},"chunks":3,"backend":"cpu"}}"#));
    }
    assert_eq!(text.lock().unwrap().as_str(), "hello, world".repeat(100));
    // Requests and responses are freed: 100 calls do not grow the memory.
    assert_eq!(inst.memory_size(), before);
}

#[test]
fn the_host_can_stop_a_stream() {
    let rt = runtime();
    let mut inst = Instance::new(&rt, &testops_module(&rt), HostConfig::new()).unwrap();
    let mut chunks = 0;
    // No receiver: output is dropped, the guest keeps going.
    assert!(inst.call_json("[]").unwrap().contains(r#""chunks":3"#));
    inst.set_emit(Box::new(move |_, _| {
        chunks += 1;
        chunks == 2
    }));
    let resp = inst.call_json("null").unwrap();
    assert!(resp.contains(r#""chunks":2"#), "{resp}");
}
