//! Arbitrary bytes as a compiled policy (as if from a snapshot): loading either
//! fails cleanly or yields a program that evaluates without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_policy::{CompiledPolicy, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = CompiledPolicy::from_bytes(data) {
        let req = Request::anonymous("GET", "/", 0);
        let _ = policy.evaluate(&req);
        let _ = policy.explain(&req);
    }
});
