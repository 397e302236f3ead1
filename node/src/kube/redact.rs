//! The audit copy of a request or response body: Secret values and tokens never in it.
//!
//! A body of the secrets resource (a Secret, a list of them, a watch event about one, and any
//! request body sent to it: a create, an update, a merge, strategic-merge or JSON patch, with
//! or without `kind`) keeps in the record only what cannot hold a Secret's values: `kind`,
//! `apiVersion`, `type`, `immutable`, `metadata` (with `kubectl apply`'s copy of the Secret in
//! it treated the same way), a JSON patch's `op`, `path` and `from`, and the columns and cells
//! of the API server's table of Secrets (`kubectl get secrets`). Every other field keeps
//! its name and the names of its keys, and its values become `"<redacted>"` (`data`,
//! `stringData`, a patch's `value`, and whatever else a client sends). In any other body, an
//! object of kind `Secret` or `SecretList` (in a watch event, in a `kubectl apply` annotation)
//! is kept the same way.
//!
//! Two other APIs carry credentials in their bodies: a TokenRequest
//! (`serviceaccounts/NAME/token`, what `kubectl create token` asks for) has the token the API
//! server mints in its `status`, and a TokenReview (`tokenreviews`) has the token under review
//! in its `spec`. Their bodies keep `kind`, `apiVersion`, `metadata` (`kubectl apply`'s copy
//! treated the same way), the fields of `spec` and `status` that hold no token (a
//! TokenRequest's audiences, lifetime, bound object and expiry; a TokenReview's audiences and
//! its answer: whether the token is good, and whose it is), and an error `Status`; anything
//! else is redacted. An object of kind `TokenRequest` or `TokenReview` in any other body is
//! kept the same way.
//!
//! A body of these resources that cannot be read as JSON whole (cut at the record's size
//! limit, protobuf, a stream) is not recorded at all: the gateway cannot prove it holds no
//! value.
//!
//! JSON may give a key twice, and then its text holds a value its tree (which keeps the last)
//! does not show: a body that gives a key twice, or that had anything redacted, is recorded
//! from its tree; any other is recorded as it was sent.

use serde_json::Value;

pub(super) const REDACTED: &str = "<redacted>";

/// `kubectl apply`'s copy of the object it applied, as JSON text.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What a body may hold that no record may, by the resource it is a body of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holds {
    /// Any other resource (a Secret or token object inside such a body is still found by its
    /// kind).
    Nothing,
    /// The secrets resource: Secret values.
    Secrets,
    /// `serviceaccounts/NAME/token`: a TokenRequest, whose status has the token minted.
    TokenRequest,
    /// `tokenreviews`: the token under review.
    TokenReview,
}

impl Holds {
    /// By resource and subresource, whatever the API group (a resource of another group with
    /// the same name is kept the same way: the safe side).
    pub fn of(resource: &str, subresource: &str) -> Self {
        match (resource, subresource) {
            ("secrets", _) => Self::Secrets,
            ("serviceaccounts", "token") => Self::TokenRequest,
            ("tokenreviews", _) => Self::TokenReview,
            _ => Self::Nothing,
        }
    }
}

/// What a record keeps of a whole body: `None` when nothing may be kept.
pub fn audit_copy(bytes: &[u8], holds: Holds, limit: usize) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let whole = std::str::from_utf8(bytes).ok();
    // No Secret or token object can be in JSON that neither names one nor escapes a character
    // (a `\u` escape could spell `Secret`): such a body is kept as it is, without its tree.
    if holds == Holds::Nothing
        && !names_a_holder(bytes)
        && memchr::memmem::find(bytes, b"\\u").is_none()
    {
        if let Some(text) = whole {
            return Some(cut(text.to_string(), limit));
        }
    }
    let parsed = whole.and_then(|t| serde_json::from_str::<Value>(t).ok());
    match parsed {
        Some(mut v) => {
            let before = (holds == Holds::Nothing).then(|| v.clone());
            match holds {
                Holds::Nothing => redact(&mut v),
                Holds::Secrets => secrets_body(&mut v),
                Holds::TokenRequest => token_request(&mut v),
                Holds::TokenReview => token_review(&mut v),
            }
            let text = match (before, whole) {
                (Some(before), Some(text)) if before == v && super::keys::fault(text).is_none() => {
                    text.to_string()
                }
                _ => v.to_string(),
            };
            Some(cut(text, limit))
        }
        None => audit_copy_of_start(bytes.to_vec(), holds, limit),
    }
}

/// What a record keeps of a body that is not JSON, or of the first bytes of a longer one
/// (never JSON whole, so not parsed): only what cannot hold a Secret's values or a token.
/// The bytes become the copy (no copy of them is made).
pub fn audit_copy_of_start(bytes: Vec<u8>, holds: Holds, limit: usize) -> Option<String> {
    // A `\u` escape of a letter could spell `Secret` (the API server never escapes letters).
    if bytes.is_empty()
        || holds != Holds::Nothing
        || names_a_holder(&bytes)
        || escapes_a_letter(&bytes)
    {
        return None;
    }
    Some(match String::from_utf8(bytes) {
        Ok(t) => cut(t, limit),
        // Cut in the middle of a character: up to it.
        Err(e) if e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            cut(String::from_utf8(bytes).unwrap_or_default(), limit)
        }
        Err(e) => format!("<{} bytes, not UTF-8>", e.as_bytes().len()),
    })
}

/// Redacts every Secret and token object in `v` (at any depth): an object of kind `Secret` or
/// `SecretList` (whose items name no kind of their own) keeps only what a body of the secrets
/// resource keeps, one of kind `TokenRequest` or `TokenReview` what a body of its resource keeps.
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            match map.get("kind").and_then(Value::as_str) {
                Some("Secret" | "SecretList") => return secret_object(v),
                Some("TokenRequest") => return token_request(v),
                Some("TokenReview") => return token_review(v),
                _ => {}
            }
            for (key, value) in map.iter_mut() {
                // `kubectl apply` keeps the whole object it applied, as JSON text, in this
                // annotation: a Secret inside it is a Secret too.
                if key == LAST_APPLIED {
                    if let Value::String(text) = value {
                        match serde_json::from_str::<Value>(text) {
                            Ok(mut inner) => {
                                redact(&mut inner);
                                *text = inner.to_string();
                            }
                            Err(_) if text.contains("Secret") => *text = REDACTED.into(),
                            Err(_) => {}
                        }
                    }
                    continue;
                }
                redact(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A body of the secrets resource: a JSON patch keeps what each operation does and where,
/// never its value; anything else is read as a Secret, a list of them or a watch event.
fn secrets_body(v: &mut Value) {
    match v {
        Value::Array(ops) => {
            for op in ops {
                match op {
                    Value::Object(fields) => {
                        for (key, value) in fields.iter_mut() {
                            let kept = matches!(key.as_str(), "op" | "path" | "from");
                            if !(kept && value.is_string()) {
                                hide(value);
                            }
                        }
                    }
                    other => hide(other),
                }
            }
        }
        other => secret_object(other),
    }
}

/// A Secret (or a list of them, or a watch event about one, or a patch of one, which may name
/// no kind): only the fields that cannot hold its values are kept.
fn secret_object(v: &mut Value) {
    let Value::Object(map) = v else {
        return hide(v);
    };
    // What `kubectl get secrets` asks for: the API server's table of them (name, type, how
    // many keys, age), each row with the Secret's metadata or the Secret itself. A body of
    // another kind is never taken for a Secret by the API server.
    let table = map.get("kind").and_then(Value::as_str) == Some("Table");
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "kind" | "apiVersion" | "type" if value.is_string() => {}
            "immutable" if value.is_boolean() => {}
            "metadata" => metadata(value, secret_object),
            // A list's items, a watch event's object.
            "items" => each(value, secret_object),
            "object" => secret_object(value),
            "columnDefinitions" if table => {}
            "rows" if table => each(value, table_row),
            _ => hide(value),
        }
    }
}

/// A row of the table of Secrets: its cells (what the API server prints: name, type, how many
/// keys, age) and the Secret it is about.
fn table_row(v: &mut Value) {
    let Value::Object(map) = v else {
        return hide(v);
    };
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "cells" => {}
            "object" => secret_object(value),
            _ => hide(value),
        }
    }
}

/// `f` on each element of an array; anything else hidden.
fn each(v: &mut Value, f: fn(&mut Value)) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(f),
        other => hide(other),
    }
}

/// An object's metadata: its own, but for `kubectl apply`'s copy of the object, which is kept
/// as `object` keeps the object itself.
fn metadata(v: &mut Value, object: fn(&mut Value)) {
    let Some(Value::Object(annotations)) = v.get_mut("annotations") else {
        return;
    };
    if let Some(Value::String(text)) = annotations.get_mut(LAST_APPLIED) {
        *text = match serde_json::from_str::<Value>(text) {
            Ok(mut inner) => {
                object(&mut inner);
                inner.to_string()
            }
            Err(_) => REDACTED.into(),
        };
    }
}

/// A TokenRequest: the token the API server minted is in its status; the rest says for whom
/// and for how long.
fn token_request(v: &mut Value) {
    token_object(
        v,
        token_request,
        &["audiences", "expirationSeconds", "boundObjectRef"],
        &["expirationTimestamp"],
    );
}

/// A TokenReview: the token under review is in its spec; its status is the API server's
/// answer (whether the token is good, whose it is, for which audiences).
fn token_review(v: &mut Value) {
    token_object(
        v,
        token_review,
        &["audiences"],
        &["authenticated", "user", "audiences", "error"],
    );
}

/// An object of a resource that carries a token (`this` keeps it): the fields of `spec` and
/// `status` named, and an error `Status` from the API server; anything else redacted.
fn token_object(v: &mut Value, this: fn(&mut Value), spec: &[&str], status: &[&str]) {
    let Value::Object(map) = v else {
        return hide(v);
    };
    let error = map.get("kind").and_then(Value::as_str) == Some("Status");
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "kind" | "apiVersion" if value.is_string() => {}
            "metadata" => metadata(value, this),
            "spec" => only(value, spec),
            "status" if error && value.is_string() => {}
            "status" => only(value, status),
            // Not its message or details: they may quote the token (a body the API server
            // could not decode, around the fault).
            "reason" | "code" if error => {}
            _ => hide(value),
        }
    }
}

/// An object's fields named in `kept` as they are, the others redacted.
fn only(v: &mut Value, kept: &[&str]) {
    let Value::Object(map) = v else {
        return hide(v);
    };
    for (key, value) in map.iter_mut() {
        if !kept.contains(&key.as_str()) {
            hide(value);
        }
    }
}

/// Keeps the shape (an object's keys), not the values.
fn hide(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for value in map.values_mut() {
                *value = Value::String(REDACTED.into());
            }
        }
        _ => *v = Value::String(REDACTED.into()),
    }
}

/// Whether the text may name a kind whose objects are redacted (`Secret`, `SecretList`,
/// `TokenRequest`, `TokenReview`).
fn names_a_holder(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, b"Secret").is_some()
        || memchr::memmem::find(bytes, b"TokenRe").is_some()
}

/// Whether JSON text holds a `\u` escape of an ASCII letter.
fn escapes_a_letter(bytes: &[u8]) -> bool {
    memchr::memmem::find_iter(bytes, b"\\u").any(|at| {
        let hex = bytes
            .get(at + 2..at + 6)
            .and_then(|h| std::str::from_utf8(h).ok());
        hex.and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32)
            .is_some_and(|c| c.is_ascii_alphabetic())
    })
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
    fn the_start_of_a_long_body_that_escapes_a_letter_is_not_kept() {
        // The first bytes of a body too long to be parsed are kept, unless a letter is
        // escaped (`\u0053ecret` is `Secret` to the API server).
        let hidden = r#"{"kind":"\u0053ecret","data":{"password":"aHVudGVyMg=="},"pad":"xxx"#;
        assert_eq!(
            audit_copy_of_start(hidden.into(), Holds::Nothing, 1 << 20),
            None
        );
        // The escapes the API server writes (`<`, `>`, `&`) keep the start as it is.
        let html = r#"{"kind":"Pod","note":"a \u003c b","pad":"xxx"#;
        let copy = audit_copy_of_start(html.into(), Holds::Nothing, 1 << 20);
        assert_eq!(copy.as_deref(), Some(html));
    }

    #[test]
    fn secret_values_are_redacted_wherever_they_are() {
        let secret = r#"{"kind":"Secret","metadata":{"name":"db"},"data":{"password":"aHVudGVyMg=="},"stringData":{"token":"t0ps3cret"}}"#;
        let copy = audit_copy(secret.as_bytes(), Holds::Secrets, 1 << 20).unwrap();
        assert!(
            !copy.contains("aHVudGVyMg") && !copy.contains("t0ps3cret"),
            "{copy}"
        );
        assert!(copy.contains("\"password\":\"<redacted>\""), "{copy}");
        let list = format!(r#"{{"kind":"SecretList","items":[{secret}]}}"#);
        let copy = audit_copy(list.as_bytes(), Holds::Secrets, 1 << 20).unwrap();
        assert!(!copy.contains("t0ps3cret"), "{copy}");
        let event = format!(r#"{{"type":"ADDED","object":{secret}}}"#);
        let copy = audit_copy(event.as_bytes(), Holds::Nothing, 1 << 20).unwrap();
        assert!(!copy.contains("t0ps3cret"), "{copy}");
        let applied = serde_json::json!({
            "kind": "Secret",
            "metadata": {"annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": secret,
            }},
        })
        .to_string();
        let copy = audit_copy(applied.as_bytes(), Holds::Secrets, 1 << 20).unwrap();
        assert!(
            !copy.contains("t0ps3cret") && !copy.contains("aHVudGVyMg"),
            "{copy}"
        );
    }

    /// Bodies of the secrets resource as clients and the API server send them, with no `kind`
    /// on the object or its items: none of them leaves a value in the copy.
    #[test]
    fn a_body_of_the_secrets_resource_keeps_no_value_whatever_its_shape() {
        let value = "aHVudGVyMg==";
        let applied = serde_json::json!({
            "data": {"password": value},
            "metadata": {"annotations": {
                LAST_APPLIED: format!(r#"{{"apiVersion":"v1","data":{{"password":"{value}"}}}}"#),
            }},
        })
        .to_string();
        for body in [
            // A list (its items name no kind), a merge or strategic-merge patch, a create
            // without kind, a JSON patch, a kind given twice, a field in another case, an
            // apply's patch with its annotation, a watch event.
            format!(
                r#"{{"kind":"SecretList","apiVersion":"v1","metadata":{{"resourceVersion":"8"}},"items":[{{"metadata":{{"name":"db"}},"data":{{"password":"{value}"}},"type":"Opaque"}}]}}"#
            ),
            format!(r#"{{"data":{{"password":"{value}"}}}}"#),
            format!(r#"{{"metadata":{{"name":"db"}},"stringData":{{"password":"{value}"}}}}"#),
            format!(r#"[{{"op":"replace","path":"/data/password","value":"{value}"}}]"#),
            format!(r#"[{{"op":"add","path":"/data","value":{{"password":"{value}"}}}}]"#),
            format!(r#"{{"kind":"Secret","kind":"Status","data":{{"password":"{value}"}}}}"#),
            format!(r#"{{"Data":{{"password":"{value}"}}}}"#),
            applied,
            format!(
                r#"{{"type":"MODIFIED","object":{{"kind":"Secret","data":{{"password":"{value}"}}}}}}"#
            ),
        ] {
            let copy = audit_copy(body.as_bytes(), Holds::Secrets, 1 << 20).expect("a copy");
            assert!(!copy.contains(value), "{body}\n-> {copy}");
            assert!(copy.contains(REDACTED), "{copy}");
        }
        // What is kept: the kind, names, type, and where a JSON patch writes.
        let copy = audit_copy(
            format!(r#"[{{"op":"replace","path":"/data/password","value":"{value}"}}]"#).as_bytes(),
            Holds::Secrets,
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            copy,
            r#"[{"op":"replace","path":"/data/password","value":"<redacted>"}]"#
        );
        let copy = audit_copy(
            format!(r#"{{"kind":"SecretList","items":[{{"metadata":{{"name":"db"}},"type":"Opaque","data":{{"password":"{value}"}}}}]}}"#).as_bytes(),
            Holds::Secrets,
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            copy,
            r#"{"items":[{"data":{"password":"<redacted>"},"metadata":{"name":"db"},"type":"Opaque"}],"kind":"SecretList"}"#
        );
    }

    /// `kubectl get secrets`: the API server's table keeps its columns and cells (no value is
    /// in them), and a row's object is read as a Secret.
    #[test]
    fn the_table_of_secrets_keeps_its_cells_and_no_value() {
        let table = r#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":"9"},"columnDefinitions":[{"name":"Name","type":"string"}],"rows":[{"cells":["db","Opaque",1,"5m"],"object":{"kind":"Secret","metadata":{"name":"db"},"data":{"password":"aHVudGVyMg=="}}}]}"#;
        let copy = audit_copy(table.as_bytes(), Holds::Secrets, 1 << 20).unwrap();
        assert!(copy.contains(r#""cells":["db","Opaque",1,"5m"]"#), "{copy}");
        assert!(
            copy.contains(r#""columnDefinitions":[{"name":"Name""#),
            "{copy}"
        );
        assert!(!copy.contains("aHVudGVyMg=="), "{copy}");
        // Rows in a body of another kind are not a table's.
        let not = r#"{"rows":[{"cells":["aHVudGVyMg=="]}],"data":{"k":"aHVudGVyMg=="}}"#;
        let copy = audit_copy(not.as_bytes(), Holds::Secrets, 1 << 20).unwrap();
        assert!(!copy.contains("aHVudGVyMg=="), "{copy}");
    }

    /// JSON that gives a key twice holds more in its text than in its tree: the copy is the
    /// tree, so a Secret the tree lost is not in it either.
    #[test]
    fn a_key_given_twice_hides_no_secret_from_the_copy() {
        let body =
            r#"{"kind":"List","items":[{"kind":"Secret","data":{"k":"c2VjcmV0"}}],"items":[]}"#;
        let copy = audit_copy(body.as_bytes(), Holds::Nothing, 1 << 20).unwrap();
        assert!(!copy.contains("c2VjcmV0"), "{copy}");
        let inner =
            r#"{"kind":"List","items":[{"kind":"Secret","data":{"k":"c2VjcmV0"}}],"items":[]}"#;
        let applied = serde_json::json!({
            "kind": "ConfigMap",
            "metadata": {"annotations": {LAST_APPLIED: inner}},
        })
        .to_string();
        let copy = audit_copy(applied.as_bytes(), Holds::Nothing, 1 << 20).unwrap();
        assert!(!copy.contains("c2VjcmV0"), "{copy}");
        // A body read (it has an escape) but given each key once, with nothing redacted, is
        // kept as it was sent; the same keys twice, and it is the tree.
        let once = r#"{"kind":"ConfigMap","data":{"run":"a \u0026\u0026 b","\u0061":"1","b":"2"}}"#;
        assert_eq!(
            audit_copy(once.as_bytes(), Holds::Nothing, 1 << 20).as_deref(),
            Some(once)
        );
        let twice =
            r#"{"kind":"ConfigMap","data":{"run":"a \u0026\u0026 b","\u0061":"1","a":"2"}}"#;
        assert_eq!(
            audit_copy(twice.as_bytes(), Holds::Nothing, 1 << 20).as_deref(),
            Some(r#"{"data":{"a":"2","run":"a && b"},"kind":"ConfigMap"}"#)
        );
    }

    /// `kubectl create token`'s TokenRequest and a TokenReview: the token minted and the
    /// token reviewed are in no copy, whatever body they come in; what they were for is.
    #[test]
    fn tokens_minted_or_reviewed_are_in_no_copy() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";
        let minted = format!(
            r#"{{"kind":"TokenRequest","apiVersion":"authentication.k8s.io/v1","metadata":{{"name":"default","namespace":"ns"}},"spec":{{"audiences":["https://kubernetes.default.svc"],"expirationSeconds":3600,"boundObjectRef":null}},"status":{{"token":"{token}","expirationTimestamp":"2026-12-05T23:00:00Z"}}}}"#
        );
        let copy = audit_copy(minted.as_bytes(), Holds::TokenRequest, 1 << 20).unwrap();
        assert_eq!(
            copy,
            r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","metadata":{"name":"default","namespace":"ns"},"spec":{"audiences":["https://kubernetes.default.svc"],"boundObjectRef":null,"expirationSeconds":3600},"status":{"expirationTimestamp":"2026-12-05T23:00:00Z","token":"<redacted>"}}"#
        );
        let review = format!(
            r#"{{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1","spec":{{"token":"{token}","audiences":["api"]}},"status":{{"authenticated":true,"user":{{"username":"system:serviceaccount:ns:default","groups":["system:serviceaccounts"]}}}}}}"#
        );
        let copy = audit_copy(review.as_bytes(), Holds::TokenReview, 1 << 20).unwrap();
        assert!(!copy.contains(token), "{copy}");
        assert!(
            copy.contains(r#""authenticated":true"#)
                && copy.contains("system:serviceaccount:ns:default")
                && copy.contains(r#""audiences":["api"]"#),
            "the review's answer stays: {copy}"
        );
        let applied = serde_json::json!({
            "kind": "TokenReview",
            "metadata": {"annotations": {LAST_APPLIED: review}},
            "spec": {"token": token},
        })
        .to_string();
        for (body, holds) in [
            // The same bodies without kind, with the token elsewhere, in other bodies.
            (
                format!(r#"{{"status":{{"token":"{token}"}}}}"#),
                Holds::TokenRequest,
            ),
            (
                format!(r#"{{"spec":{{"token":"{token}"}}}}"#),
                Holds::TokenReview,
            ),
            (format!(r#"{{"token":"{token}"}}"#), Holds::TokenReview),
            (format!(r#"{{"spec":"{token}"}}"#), Holds::TokenReview),
            (applied.clone(), Holds::TokenReview),
            (applied, Holds::Nothing),
            (
                format!(r#"{{"kind":"List","items":[{minted}]}}"#),
                Holds::Nothing,
            ),
            (
                format!(r#"{{"type":"ADDED","object":{review}}}"#),
                Holds::Nothing,
            ),
        ] {
            let copy = audit_copy(body.as_bytes(), holds, 1 << 20).expect("a copy");
            assert!(!copy.contains(token), "{body}\n-> {copy}");
        }
        // An error from the API server keeps its reason and code, not its message (which may
        // quote a body it could not decode, token and all).
        let error = format!(
            r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"couldn't decode around \"{token}\"","reason":"BadRequest","code":400}}"#
        );
        let copy = audit_copy(error.as_bytes(), Holds::TokenReview, 1 << 20).unwrap();
        assert!(
            copy.contains(r#""reason":"BadRequest""#)
                && copy.contains(r#""code":400"#)
                && !copy.contains(token),
            "{copy}"
        );
        // What cannot be read whole is not kept.
        assert_eq!(
            audit_copy(&minted.as_bytes()[..40], Holds::TokenRequest, 1 << 20),
            None
        );
        assert_eq!(
            audit_copy_of_start(minted.as_bytes().to_vec(), Holds::Nothing, 1 << 20),
            None
        );
        assert_eq!(Holds::of("serviceaccounts", "token"), Holds::TokenRequest);
        assert_eq!(Holds::of("serviceaccounts", ""), Holds::Nothing);
        assert_eq!(Holds::of("tokenreviews", ""), Holds::TokenReview);
        assert_eq!(Holds::of("secrets", ""), Holds::Secrets);
    }

    #[test]
    fn a_secrets_body_that_cannot_be_read_whole_is_not_kept() {
        let secret = r#"{"kind":"Secret","data":{"k":"dmFsdWU="}}"#;
        // A Secret spelled with escapes is still found and redacted.
        let escaped = r#"{"kind":"List","items":[{"kind":"\u0053ecret","data":{"k":"czNjcjN0"}}]}"#;
        let copy = audit_copy(escaped.as_bytes(), Holds::Nothing, 1 << 20).unwrap();
        assert!(!copy.contains("czNjcjN0"), "{copy}");
        assert_eq!(
            audit_copy_of_start(
                b"{\"kind\":\"Secret\",\"da".to_vec(),
                Holds::Nothing,
                1 << 20
            ),
            None
        );
        assert_eq!(
            audit_copy_of_start(
                "{\"kind\":\"Pod\",\"é".as_bytes().to_vec(),
                Holds::Nothing,
                1 << 20
            )
            .as_deref(),
            Some("{\"kind\":\"Pod\",\"é")
        );
        let cut_in_char = &"{\"a\":\"é".as_bytes()[..7];
        assert_eq!(
            audit_copy_of_start(cut_in_char.to_vec(), Holds::Nothing, 1 << 20).as_deref(),
            Some("{\"a\":\"")
        );
        assert_eq!(
            audit_copy(&secret.as_bytes()[..20], Holds::Secrets, 1 << 20),
            None
        );
        assert_eq!(
            audit_copy(b"\x0a\x02k8s\x00Secret", Holds::Nothing, 1 << 20),
            None
        );
        // Other bodies are kept, cut at the limit on a character boundary.
        assert_eq!(
            audit_copy("{\"kind\":\"Pod\"}".as_bytes(), Holds::Nothing, 5).as_deref(),
            Some("{\"kin")
        );
        assert_eq!(
            audit_copy("é".repeat(4).as_bytes(), Holds::Nothing, 3).as_deref(),
            Some("é")
        );
    }
}
