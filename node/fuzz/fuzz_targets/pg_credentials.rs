//! Arbitrary text through the taking out of credentials from a statement's audit copy
//! (`policy::masking::without_credentials`), which reads the statement token by token and
//! the connection strings inside its literals. Panics are not fine; and whatever follows, a
//! role's password and a connection string's password put before the text are in no copy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::policy::masking::{without_credentials, Counts};

const CANARY: &str = "Q0FOQVJZ";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains('\0') {
        return;
    }
    let mut counts = Counts::new();
    let _ = without_credentials(text, &mut counts);
    if text.contains(CANARY) {
        return;
    }
    for sql in [
        format!("ALTER ROLE a PASSWORD '{CANARY}'; {text}"),
        format!("SELECT dblink('host=h password={CANARY} x', {text}"),
        format!("SELECT dblink('postgresql://u:{CANARY}@h/d', {text}"),
    ] {
        let copy = without_credentials(&sql, &mut counts)
            .unwrap_or_else(|| panic!("nothing taken out of {sql:?}"));
        assert!(!copy.text.contains(CANARY), "{sql:?} -> {copy:?}");
        assert!(
            copy.values.iter().any(|v| v.contains(CANARY)),
            "{sql:?}: the canary is not among the values taken out: {copy:?}"
        );
    }
});
