//! Arbitrary bodies through the check of a Kubernetes request body's keys (`kube::keys`): the
//! walk over every key of a JSON body (a key given twice, a key the API server's reader takes
//! for another field) and over a JSON patch's paths. Panics are not fine; a body the walk
//! finds nothing wrong with is JSON, and a body that is not JSON is never found sound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::keys::{fault, patch_fault};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let found = fault(text);
    let parses = serde_json::from_str::<serde_json::Value>(text).is_ok();
    assert!(found.is_some() || parses, "found sound but not JSON: {text:?}");
    if !parses {
        assert!(found.is_some());
    }
    let _ = patch_fault(text);
});
