//! Arbitrary bodies through the audit copy of Kubernetes bodies (`kube::redact`), which reads
//! JSON (and the JSON text inside `kubectl apply`'s annotation) to take Secret values out.
//! The first byte chooses the secrets flag and the limit; the rest is the body. Panics are
//! not fine, and neither is a copy longer than the limit (a body that is not text is only
//! described), nor a Secret's value in a copy: the
//! body is also put in a list beside a Secret whose value is a canary, and no copy of that
//! list may hold the canary (unless the body itself does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::redact::{audit_copy, audit_copy_of_start};

const CANARY: &str = "Q0FOQVJZLXZhbHVl";

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let secrets = first & 1 == 1;
    let limit = [16, 256, 4096, 1 << 20][usize::from(first >> 1) % 4];
    for copy in [
        audit_copy(body, secrets, limit),
        audit_copy_of_start(body, secrets, limit),
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
        r#"{{"kind":"List","items":[{{"kind":"Secret","data":{{"k":"{CANARY}"}}}},"#
    )
    .into_bytes();
    list.extend_from_slice(body);
    list.extend_from_slice(b"]}");
    for secrets in [false, true] {
        if let Some(copy) = audit_copy(&list, secrets, 1 << 20) {
            assert!(!copy.contains(CANARY), "a Secret's value in the copy: {copy}");
        }
    }
});
