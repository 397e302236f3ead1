//! Arbitrary text through the masking of an approver's copy and of a record's copy, with every
//! detector and every method: errors are fine (the statement is then refused), panics are not;
//! and a copy that is shown or recorded reads like the statement: the same line breaks, and as
//! many comments as it has (for a text the scanner reads).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_query::protobuf::Token;
use vigil_node::policy::masking::{
    mask_recorded, mask_statement, Counts, DetectorRule, Masker, MaskingConfig, Method,
};

fn comments(sql: &str) -> Option<usize> {
    let tokens = pg_query::scan_tokens(sql).ok()?;
    Some(
        tokens
            .iter()
            .filter(|t| t.token == Token::SqlComment as i32 || t.token == Token::CComment as i32)
            .count(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    if sql.contains('\0') {
        return;
    }
    for method in [Method::Redact, Method::KeepLast, Method::Token] {
        let masker = Masker::new(
            MaskingConfig {
                columns: Vec::new(),
                detectors: DetectorRule::every_kind(method, false),
            },
            b"fuzz".to_vec(),
        );
        // A record's copy is never refused, and reads like the statement too.
        if let Some(recorded) = mask_recorded(&masker, sql, &mut Counts::new()) {
            if comments(sql).is_some() {
                assert_eq!(
                    recorded.matches('\n').count(),
                    sql.matches('\n').count(),
                    "{sql:?} -> {recorded:?}"
                );
                assert_eq!(comments(&recorded), comments(sql), "{sql:?} -> {recorded:?}");
            }
        }
        let Ok(shown) = mask_statement(&masker, sql, &mut Counts::new()) else {
            continue;
        };
        assert_eq!(shown.matches('\n').count(), sql.matches('\n').count(), "{sql:?} -> {shown:?}");
        assert_eq!(comments(&shown), comments(sql), "{sql:?} -> {shown:?}");
    }
});
