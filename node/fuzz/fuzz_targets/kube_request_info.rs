//! Arbitrary requests through the Kubernetes request classifier. The input is
//! `METHOD '\n' PATH ['?' QUERY]` (no newline: all of it is a GET's target). Refusals are fine;
//! panics are not, and neither is a classification that does not hold together: the same
//! answer twice, the fields consistent with each other, and the classified pieces
//! re-assembling into the classified path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_node::kube::request_info::{classify, RequestInfo};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method, target) = text.split_once('\n').unwrap_or(("GET", &text));
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let first = classify(method, path, query);
    assert_eq!(
        first,
        classify(method, path, query),
        "classification is deterministic"
    );
    if let Ok(info) = first {
        check(&info, method, query.is_some());
    }
});

/// A segment as the classifier may report it: non-empty, not a dot segment, no separator
/// and no control character.
fn assert_segment(what: &str, segment: &str) {
    assert!(!segment.is_empty(), "{what} is empty");
    assert!(segment != "." && segment != "..", "{what} is a dot segment");
    assert!(!segment.contains('/'), "{what} {segment:?} holds a '/'");
    assert!(
        !segment.chars().any(char::is_control),
        "{what} {segment:?} holds a control"
    );
}

fn check(info: &RequestInfo, method: &str, has_query: bool) {
    assert!(info.path.starts_with('/'));
    assert!(!info.path.contains("//"), "{:?}", info.path);
    assert!(!info.path.chars().any(char::is_control));

    if !info.is_resource_request {
        assert_eq!(info.verb, method.to_ascii_lowercase());
        assert!(info.api_prefix.is_empty() || info.api_prefix == "apis");
        assert!(info.api_group.is_empty() && info.api_version.is_empty());
        assert!(info.namespace.is_empty() && info.resource.is_empty());
        assert!(info.subresource.is_empty() && info.name.is_empty());
        assert!(info.parts.is_empty());
        assert!(!info.path.ends_with('/') || info.path == "/");
        return;
    }

    assert!(info.api_prefix == "api" || info.api_prefix == "apis");
    assert_eq!(info.api_group.is_empty(), info.api_prefix == "api");
    if !info.api_group.is_empty() {
        assert_segment("group", &info.api_group);
    }
    assert_segment("version", &info.api_version);
    assert!(!info.parts.is_empty());
    for part in &info.parts {
        assert_segment("part", part);
    }
    assert_eq!(info.resource, info.parts[0]);
    if !info.namespace.is_empty() {
        assert_segment("namespace", &info.namespace);
    }

    // The name is the second part, or (for a list or watch only) a field selector's name,
    // which is a path-segment name; the subresource is the third part unless the verb is
    // proxy.
    match info.parts.get(1) {
        Some(name) => assert_eq!(&info.name, name),
        None if info.name.is_empty() => {}
        None => {
            assert!(has_query, "a name without a path segment or a query");
            assert!(info.verb == "list" || info.verb == "watch", "{info:?}");
            assert_segment("selector name", &info.name);
            assert!(!info.name.contains('%'));
        }
    }
    match info.parts.get(2) {
        Some(sub) if info.verb != "proxy" => assert_eq!(&info.subresource, sub),
        _ => assert!(info.subresource.is_empty()),
    }

    // The verb fits the rest.
    let named = !info.name.is_empty();
    match info.verb.as_str() {
        "get" | "delete" => assert!(named),
        "list" | "deletecollection" => assert!(!named || info.verb == "list"),
        "create" | "update" | "patch" | "watch" | "proxy" => {}
        other => panic!("unexpected verb {other:?}"),
    }
    if info.verb == "deletecollection" {
        assert!(!named);
    }
    if !has_query && info.verb == "watch" {
        assert!(
            info.path.contains("/watch/"),
            "a watch without a query comes from the path"
        );
    }

    // The pieces re-assemble into the path, in one of the ways the resolver reads paths:
    // with or without a verb segment, the namespace segments consumed or kept in the parts,
    // a trailing slash only under a proxy subresource.
    let mut head = format!("/{}", info.api_prefix);
    if !info.api_group.is_empty() {
        head = format!("{head}/{}", info.api_group);
    }
    head = format!("{head}/{}", info.api_version);
    let verbs: &[&str] = match info.verb.as_str() {
        "proxy" => &["/proxy"],
        "watch" => &["", "/watch"],
        _ => &[""],
    };
    let mut namespaces = vec![String::new()];
    if !info.namespace.is_empty() {
        namespaces.push(format!("/namespaces/{}", info.namespace));
    }
    let tails: &[&str] = if info.subresource == "proxy" {
        &["", "/"]
    } else {
        &[""]
    };
    let parts = info.parts.join("/");
    let reassembles = verbs.iter().any(|verb| {
        namespaces.iter().any(|ns| {
            tails
                .iter()
                .any(|tail| info.path == format!("{head}{verb}{ns}/{parts}{tail}"))
        })
    });
    assert!(reassembles, "{info:?} does not re-assemble into its path");
    // And where the namespace was not consumed, the parts name it.
    if !info.namespace.is_empty()
        && !info
            .path
            .contains(&format!("/namespaces/{}/{parts}", info.namespace))
    {
        assert_eq!(info.parts[0], "namespaces");
        assert_eq!(info.parts[1], info.namespace);
    }
}
