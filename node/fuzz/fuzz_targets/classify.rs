//! Arbitrary text through the PostgreSQL parser, the classifier and a decision: errors are
//! fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::policy::{classify, Policy, PolicyConfig};
use vigil_proto::record::Principal;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let class = classify::classify(sql);
    let policy = Policy::new(PolicyConfig::default());
    let d = policy.decide(class.as_deref(), &Principal::default(), "app", true);
    if class.is_err() {
        assert!(d.blocks(), "a statement that does not parse is blocked");
    }
});
