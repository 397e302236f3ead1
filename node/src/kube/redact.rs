//! The audit copy of a request or response body: Secret values never in it.
//!
//! A body that is (or holds) a Secret — a Secret, a list of them, a watch event about one, a
//! `kubectl apply` annotation quoting one — keeps its shape in the record but every value of
//! `data` and `stringData` becomes `"<redacted>"`. A body of the secrets resource that cannot
//! be read as JSON whole (cut at the record's size limit, protobuf, a stream) is not recorded
//! at all: the gateway cannot prove it holds no value.

use serde_json::Value;

/// What a record keeps of a whole body: `None` when nothing may be kept.
pub fn audit_copy(bytes: &[u8], secrets: bool, limit: usize) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let whole = std::str::from_utf8(bytes).ok();
    // No Secret can be in JSON that neither names one nor escapes a character (a `\u` escape
    // could spell `Secret`): such a body is kept as it is, without building its tree.
    if !secrets && !mentions_secret(bytes) && !bytes.windows(2).any(|w| w == b"\\u") {
        if let Some(text) = whole {
            return Some(cut(text.to_string(), limit));
        }
    }
    let parsed = whole.and_then(|t| serde_json::from_str::<Value>(t).ok());
    match parsed {
        Some(mut v) => {
            let changed = redact(&mut v);
            let text = if changed || secrets {
                v.to_string()
            } else {
                whole.unwrap_or_default().to_string()
            };
            Some(cut(text, limit))
        }
        None => audit_copy_of_start(bytes, secrets, limit),
    }
}

/// What a record keeps of a body that is not JSON, or of the first bytes of a longer one
/// (never JSON whole, so not parsed): only what cannot hold a Secret's values.
pub fn audit_copy_of_start(bytes: &[u8], secrets: bool, limit: usize) -> Option<String> {
    if bytes.is_empty() || secrets || mentions_secret(bytes) {
        return None;
    }
    Some(match std::str::from_utf8(bytes) {
        Ok(t) => cut(t.to_string(), limit),
        // Cut in the middle of a character, or not text.
        Err(e) if e.error_len().is_none() => cut(
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
            limit,
        ),
        Err(_) => format!("<{} bytes, not UTF-8>", bytes.len()),
    })
}

/// Redacts every Secret in `v` (at any depth); whether anything changed.
fn redact(v: &mut Value) -> bool {
    let mut changed = false;
    match v {
        Value::Object(map) => {
            if map.get("kind").and_then(Value::as_str) == Some("Secret") {
                for field in ["data", "stringData"] {
                    if let Some(Value::Object(values)) = map.get_mut(field) {
                        for value in values.values_mut() {
                            *value = Value::String("<redacted>".into());
                            changed = true;
                        }
                    }
                }
            }
            for (key, value) in map.iter_mut() {
                // `kubectl apply` keeps the whole object it applied, as JSON text, in this
                // annotation: a Secret inside it is a Secret too.
                if key == "kubectl.kubernetes.io/last-applied-configuration" {
                    if let Value::String(text) = value {
                        if let Ok(mut inner) = serde_json::from_str::<Value>(text) {
                            if redact(&mut inner) {
                                *text = inner.to_string();
                                changed = true;
                            }
                        } else if text.contains("Secret") {
                            *text = "<redacted>".into();
                            changed = true;
                        }
                    }
                    continue;
                }
                changed |= redact(value);
            }
        }
        Value::Array(items) => {
            for item in items {
                changed |= redact(item);
            }
        }
        _ => {}
    }
    changed
}

fn mentions_secret(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| w == b"Secret")
}

/// Cuts at `limit` bytes, on a character boundary.
fn cut(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut at = limit;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted_wherever_they_are() {
        let secret = r#"{"kind":"Secret","metadata":{"name":"db"},"data":{"password":"aHVudGVyMg=="},"stringData":{"token":"t0ps3cret"}}"#;
        let copy = audit_copy(secret.as_bytes(), true, 1 << 20).unwrap();
        assert!(
            !copy.contains("aHVudGVyMg") && !copy.contains("t0ps3cret"),
            "{copy}"
        );
        assert!(copy.contains("\"password\":\"<redacted>\""), "{copy}");
        let list = format!(r#"{{"kind":"SecretList","items":[{secret}]}}"#);
        let copy = audit_copy(list.as_bytes(), true, 1 << 20).unwrap();
        assert!(!copy.contains("t0ps3cret"), "{copy}");
        let event = format!(r#"{{"type":"ADDED","object":{secret}}}"#);
        let copy = audit_copy(event.as_bytes(), false, 1 << 20).unwrap();
        assert!(!copy.contains("t0ps3cret"), "{copy}");
        let applied = serde_json::json!({
            "kind": "Secret",
            "metadata": {"annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": secret,
            }},
        })
        .to_string();
        let copy = audit_copy(applied.as_bytes(), true, 1 << 20).unwrap();
        assert!(
            !copy.contains("t0ps3cret") && !copy.contains("aHVudGVyMg"),
            "{copy}"
        );
    }

    #[test]
    fn a_secrets_body_that_cannot_be_read_whole_is_not_kept() {
        let secret = r#"{"kind":"Secret","data":{"k":"dmFsdWU="}}"#;
        // A Secret spelled with escapes is still found and redacted.
        let escaped = r#"{"kind":"List","items":[{"kind":"\u0053ecret","data":{"k":"czNjcjN0"}}]}"#;
        let copy = audit_copy(escaped.as_bytes(), false, 1 << 20).unwrap();
        assert!(!copy.contains("czNjcjN0"), "{copy}");
        assert_eq!(
            audit_copy_of_start(b"{\"kind\":\"Secret\",\"da", false, 1 << 20),
            None
        );
        assert_eq!(
            audit_copy_of_start("{\"kind\":\"Pod\",\"é".as_bytes(), false, 1 << 20).as_deref(),
            Some("{\"kind\":\"Pod\",\"é")
        );
        let cut_in_char = &"{\"a\":\"é".as_bytes()[..7];
        assert_eq!(
            audit_copy_of_start(cut_in_char, false, 1 << 20).as_deref(),
            Some("{\"a\":\"")
        );
        assert_eq!(audit_copy(&secret.as_bytes()[..20], true, 1 << 20), None);
        assert_eq!(audit_copy(b"\x0a\x02k8s\x00Secret", false, 1 << 20), None);
        // Other bodies are kept, cut at the limit on a character boundary.
        assert_eq!(
            audit_copy("{\"kind\":\"Pod\"}".as_bytes(), false, 5).as_deref(),
            Some("{\"kin")
        );
        assert_eq!(
            audit_copy("é".repeat(4).as_bytes(), false, 3).as_deref(),
            Some("é")
        );
    }
}
