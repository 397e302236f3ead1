//! Arbitrary bodies through the audit copy of Kubernetes bodies (`kube::redact`), which reads
//! JSON (and the JSON text inside `kubectl apply`'s annotation) to take Secret values and
//! tokens out. The first byte chooses what the body's resource holds and the limit; the rest
//! is the body. Panics are not fine, and neither is a copy longer than the limit (a body that
//! is not text is only described), nor a Secret's value or a token in a copy: the body is
//! also put in a list beside a Secret, a TokenRequest and a TokenReview whose values are
//! canaries, and no copy of that list may hold a canary (unless the body itself does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::redact::{audit_copy, audit_copy_of_start, Holds};

const CANARY: &str = "Q0FOQVJZLXZhbHVl";

const HOLDS: [Holds; 4] = [
    Holds::Nothing,
    Holds::Secrets,
    Holds::TokenRequest,
    Holds::TokenReview,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let holds = HOLDS[usize::from(first & 3)];
    let limit = [16, 256, 4096, 1 << 20][usize::from(first >> 2) % 4];
    for copy in [
        audit_copy(body, holds, limit),
        audit_copy_of_start(body.to_vec(), holds, limit),
    ]
    .into_iter()
    .flatten()
    {
        // A body that is not text is described (`<N bytes, not UTF-8>`), not copied.
        let described = copy.starts_with('<') && copy.ends_with(" bytes, not UTF-8>");
        assert!(
            copy.len() <= limit || described,
            "a copy of {} bytes, limit {limit}",
            copy.len()
        );
    }
    if body.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()) {
        return;
    }
    let mut list = format!(
        r#"{{"kind":"List","items":[{{"kind":"Secret","data":{{"k":"{CANARY}"}}}},{{"kind":"TokenRequest","status":{{"token":"{CANARY}"}}}},{{"kind":"TokenReview","spec":{{"token":"{CANARY}"}}}},"#
    )
    .into_bytes();
    list.extend_from_slice(body);
    list.extend_from_slice(b"]}");
    for holds in HOLDS {
        if let Some(copy) = audit_copy(&list, holds, 1 << 20) {
            assert!(!copy.contains(CANARY), "a value in the copy: {copy}");
        }
    }
});
