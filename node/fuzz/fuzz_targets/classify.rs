//! Arbitrary text through the PostgreSQL parser, the classifier and a decision: errors are
//! fine, panics (and stack overflows, however deep the tree) are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::policy::{classify, Policy, PolicyConfig};
use vigil_proto::record::Principal;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let class = classify::classify(sql);
    let policy = Policy::new(PolicyConfig::default());
    let d = policy.decide(class.as_deref(), &Principal::default(), "app", true);
    match &class {
        Err(_) => assert!(d.blocks(), "a statement that does not parse is blocked"),
        Ok(statements) => {
            for s in statements {
                // A possible switch away from UTF-8 is always flagged.
                if s.leaves_utf8() {
                    assert!(s.flags.contains(&classify::Flag::ClientEncodingChange));
                }
            }
        }
    }
});
