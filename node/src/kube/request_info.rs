//! What a Kubernetes API request is — verb, API group and version, resource, subresource,
//! namespace, name — read from its method, path and query the way the API server's own
//! resolver reads them (`RequestInfoFactory.NewRequestInfo` in
//! `k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`). The API server authorizes and
//! audits a request by that resolver's answer; the gateway decides on [`classify`]'s answer.
//! The two must agree, so this module follows the resolver rule for rule, and refuses
//! ([`RequestInfoError`]) the requests where it cannot be sure that they do.
//!
//! # The resolver's rules, followed here
//!
//! - The path is cut at `/`. A path of fewer than three segments, or whose first segment is
//!   neither `api` nor `apis`, is a *non-resource* request (`/`, `/healthz`, `/version`,
//!   `/openapi/v2`, `/api`, `/api/v1`, `/apis`, `/apis/apps`): its verb is the HTTP method in
//!   lower case, and RBAC decides it by path. `/apis/GROUP/VERSION` (API discovery) is
//!   non-resource too, but keeps `api_prefix = "apis"`: the resolver records the prefix before
//!   it finds the path too short to carry a resource, and this module reports what it reports.
//! - `/api/VERSION/…` is the core group (no group segment, `api_group` empty);
//!   `/apis/GROUP/VERSION/…` every other group, custom resources included.
//! - After the version, a `watch` or `proxy` segment is a verb given by the path (the legacy
//!   `/api/v1/watch/pods`, `/api/v1/proxy/…` forms; the resolver still knows both). `proxy`
//!   takes no subresource: everything after the name stays in `parts`. A prefix verb with
//!   nothing after it is an error in the resolver (the API server answers 500), and here.
//! - Otherwise the method gives the verb: POST `create`, GET and HEAD `get`, PUT `update`,
//!   PATCH `patch`, DELETE `delete`. The resolver knows no "connect": `exec`, `attach` and
//!   `portforward` are `create` when they arrive as POST (SPDY) and `get` as GET (WebSocket).
//! - `namespaces/NS/…` sets the namespace and the rest is read relative to it, except when the
//!   segment after NS is `status` or `finalize`: those are subresources of the namespace
//!   object itself. `namespaces/NS` alone is the `namespaces` resource named NS — and its
//!   namespace is NS as well.
//! - `parts` is then `RESOURCE[/NAME[/SUBRESOURCE[/…]]]`.
//! - A `get` without a name is a `list`, or a `watch` when the query's first `watch` value is
//!   anything but `0` or `false` (an empty value counts as true). A list or watch whose
//!   `fieldSelector` requires `metadata.name` to equal a value takes that value as its name
//!   (`kubectl get pod NAME -w` watches this way). The resolver only does so when the whole
//!   list-options query decodes — the field and label selectors parse, `limit` and
//!   `timeoutSeconds` are integers — and when the value is a valid path-segment name; when
//!   the query does not decode it keeps the verb from `watch` and no name. This module
//!   implements that decoding: the field-selector and label-selector grammars of
//!   `k8s.io/apimachinery` (`fields.ParseSelector`, `labels.Parse` with its key and value
//!   validation) and Go's integer syntax, down to the resolver's two subtly different readings
//!   of `watch` (`strings.EqualFold` when the query decodes, so `falſe` is false;
//!   `strings.ToLower` when it does not, so `falſe` is true).
//! - A `delete` without a name is a `deletecollection`.
//!
//! The resolver classifies the *decoded* path (Go decodes `%XX` before any handler looks), so
//! this module decodes too; [`RequestInfo::path`] is the decoded path. The proxy must forward
//! the path and query exactly as received, never re-encode `path`.
//!
//! # Where this is stricter than the API server, and why
//!
//! The gateway is a security boundary: it must never allow a request as one thing that the
//! API server (or any hop in front of it) then serves as another. Each refusal below closes a
//! way for the two readings to differ.
//!
//! - **Methods**: only `GET`, `HEAD`, `POST`, `PUT`, `PATCH` and `DELETE`, spelled in upper
//!   case (methods are case-sensitive). On a resource path the resolver gives any other method
//!   an empty verb, which no rule can name; no Kubernetes client sends one.
//! - **Sizes**: the path is at most [`MAX_PATH_BYTES`], the query at most [`MAX_QUERY_BYTES`]
//!   and [`MAX_QUERY_PARAMS`] parameters. Beyond bounding the work, the parameter cap keeps
//!   clear of Go's own: recent Go releases stop parsing a query past a configurable number of
//!   parameters (`urlmaxqueryparams`, after CVE-2025-61726), so API servers built with
//!   different Go versions would read a huge query differently.
//! - **Raw characters**: the path must start with `/` and hold only RFC 3986 path characters
//!   (letters, digits, ``-._~!$&'()*+,=:@/`` and `%` escapes). Refused: NUL and every control
//!   byte; raw non-ASCII; space and ``"#<>?[\]^`{|}``; and `;`. Go passes most of these
//!   through literally, but the hops around it do not agree: a backslash is a separator to
//!   some servers, `;` starts a path parameter (`/pods/a;x=y`) that some proxies strip, raw
//!   non-ASCII gets re-encoded, `#` and `?` end the path for anyone re-parsing a URL.
//! - **Percent-encoding**: the API server routes on the decoded path, so what matters is that
//!   decoding cannot change the path's *structure*. Refused: `%2F` (a slash that is a segment
//!   boundary to every reader that decodes before splitting and part of a name to every
//!   reader that does not), `%5C` (a backslash, a separator to some), `%25` (double
//!   encoding: a hop that decodes twice sees another path), encoded control bytes, and
//!   encodings of RFC 3986 unreserved characters (`%61` for `a`, `%2E` for `.`): RFC 3986 makes
//!   them equal to the raw character, so they are never needed, and a path that spells
//!   `namespaces` or `..` in escapes exists only to look different to different readers.
//!   Malformed escapes (`%`, `%4`, `%zz`) are refused (Go's server answers 400). Every other
//!   escape — space, `:`, `@`, `;`, UTF-8 — is what Go's own client writes for an object name
//!   that needs it, and is decoded. The decoded path must be UTF-8 with no control character
//!   (C1 controls included).
//! - **Segments**: no empty segment (`//`) and no `.` or `..` segment. The resolver drops
//!   leading and trailing slashes and would take `..` for a name, Go's server does not clean
//!   paths, but clients, proxies and URL libraries (including whoever reads the audit log)
//!   resolve dot segments and merge slashes: one path, several meanings.
//! - **Trailing slash**: refused, except in the path under a `proxy` subresource. The
//!   resolver ignores a trailing slash, but the API server's router (go-restful) stopped
//!   ignoring it in v3.10 and ignores it again by default since v3.11, behind a global switch:
//!   `/api/v1/pods/` is the pod list on some API servers and nothing on others, depending on
//!   how they were built. Under `…/services/web:80/proxy/` the slash belongs to the proxied
//!   path (the service's root), and both router behaviours reach the same proxy handler.
//! - **Query syntax**: refused are control bytes, raw non-ASCII, characters RFC 3986 does not
//!   allow in a query (space, ``"#<>[\]^`{|}``), malformed escapes, and `;`. Go's query parser
//!   silently drops a pair that holds a malformed escape or a raw `;` (and Go before 1.17
//!   split pairs at `;`), so such a query means different things to different readers; every
//!   Kubernetes client encodes what it sends.
//! - **A selector-given name** that is not UTF-8 or holds a control character is refused: the
//!   API server would authorize that exact name, and it cannot be decided or recorded
//!   faithfully.
//! - **Version-dependent label selectors**: the label parsers of Kubernetes 1.34 and earlier
//!   read a value set with consecutive commas (`x in (a,,)`) differently from later ones
//!   (they consumed one comma too many), which changes whether the list options decode, and
//!   so whether a `fieldSelector` name counts (and how `watch` is read). Such a request is
//!   refused when the two readings classify it differently.
//!
//! # What this does not guarantee
//!
//! - `RequestInfo` is what the API server authorizes and audits; which handler serves the
//!   request is decided by its router. They agree for everything Kubernetes clients send, but
//!   this module does not model the router: a path the server does not serve (an unknown
//!   resource, an unknown version) is still classified, and the server answers 404.
//! - It models the kube-apiserver's resolver configuration (`api` and `apis` prefixes, `api`
//!   without a group). Aggregated API servers configure theirs the same way.
//! - Names and namespaces from the path may contain any printable Unicode that the rules above
//!   let through (RBAC object names are path segments with few rules): policy must compare
//!   them exactly, not after normalisation.
//! - Newer API servers also hand the raw `fieldSelector` and `labelSelector` to selector-aware
//!   authorization; they are not reported here.

use serde::Serialize;

/// The longest path accepted, in bytes (before decoding). Real API paths are a few hundred
/// bytes at most (a group, a namespace, a name of up to 253 bytes, a subresource).
pub const MAX_PATH_BYTES: usize = 8 * 1024;

/// The longest query accepted, in bytes. An `exec` carries its command line in the query, one
/// `command=` parameter per word, so this allows for long scripts.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;

/// The most `&`-separated parameters a query may hold (empty ones counted).
pub const MAX_QUERY_PARAMS: usize = 1000;

/// A request as the API server's resolver classifies it. Field by field, the same values as
/// the Go `RequestInfo` for the same request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestInfo {
    /// Whether the request is for an API resource (or one of its subresources), rather than a
    /// non-resource URL (`/healthz`, `/version`, discovery, OpenAPI).
    pub is_resource_request: bool,
    /// The path as classified: percent-decoded, without the query.
    pub path: String,
    /// The Kubernetes verb for resource requests (`get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`, `deletecollection`, `proxy`); the HTTP method in lower case for
    /// non-resource requests.
    pub verb: String,
    /// `api` or `apis` for resource requests; empty for non-resource requests except
    /// `/apis/GROUP/VERSION`, where the resolver leaves `apis`.
    pub api_prefix: String,
    /// The API group, empty for the core group.
    pub api_group: String,
    /// The API version (`v1`, `v1beta1`).
    pub api_version: String,
    /// The namespace, empty for cluster-scoped requests and requests across all namespaces.
    /// For `namespaces/NS` itself (and its `status` and `finalize`), NS.
    pub namespace: String,
    /// The resource (`pods`, `deployments`, `widgets`), not the kind.
    pub resource: String,
    /// The subresource (`status`, `log`, `exec`, `scale`), empty when there is none.
    pub subresource: String,
    /// The object's name, from the path or from a `fieldSelector=metadata.name=NAME` on a list
    /// or watch; empty when the request names no single object.
    pub name: String,
    /// The path segments from the resource on: `RESOURCE[/NAME[/SUBRESOURCE[/…]]]`; empty
    /// for non-resource requests.
    pub parts: Vec<String>,
}

/// Why a request is refused rather than classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestInfoError {
    /// A method other than GET, HEAD, POST, PUT, PATCH or DELETE (at most 16 bytes of it are
    /// kept, escaped).
    #[error("HTTP method {0} is not one the Kubernetes API serves (GET, HEAD, POST, PUT, PATCH, DELETE)")]
    UnsupportedMethod(String),
    #[error("path of {len} bytes is longer than the limit of {max} bytes")]
    PathTooLong { len: usize, max: usize },
    #[error("query of {len} bytes is longer than the limit of {max} bytes")]
    QueryTooLong { len: usize, max: usize },
    #[error("query has more than {max} parameters")]
    TooManyQueryParameters { max: usize },
    #[error("path does not start with '/'")]
    NotAbsolutePath,
    #[error("path has the control byte {byte:#04x} at offset {offset}")]
    PathControlByte { offset: usize, byte: u8 },
    #[error(
        "path has the byte {byte:#04x} at offset {offset}, which a path may not carry unencoded"
    )]
    PathDisallowedByte { offset: usize, byte: u8 },
    #[error("path has a malformed percent-encoding at offset {offset}")]
    PathBadPercentEncoding { offset: usize },
    #[error("path has %{byte:02X} at offset {offset}: {reason}")]
    PathForbiddenEncoding {
        offset: usize,
        byte: u8,
        reason: &'static str,
    },
    #[error("path does not decode to UTF-8")]
    PathNotUtf8,
    #[error("path decodes to a control character")]
    PathControlCharacter,
    #[error("path has an empty segment ('//')")]
    EmptySegment,
    #[error("path has the dot segment {0:?}")]
    DotSegment(&'static str),
    #[error("path ends with '/' (only the path under a proxy subresource may)")]
    TrailingSlash,
    #[error("path gives the verb {0:?} but no resource after it")]
    MissingResource(&'static str),
    #[error("query has the control byte {byte:#04x} at offset {offset}")]
    QueryControlByte { offset: usize, byte: u8 },
    #[error(
        "query has the byte {byte:#04x} at offset {offset}, which a query may not carry unencoded"
    )]
    QueryDisallowedByte { offset: usize, byte: u8 },
    #[error(
        "query has a ';' at offset {offset}, which Go drops with its pair and others split at"
    )]
    QuerySemicolon { offset: usize },
    #[error("query has a malformed percent-encoding at offset {offset}")]
    QueryBadPercentEncoding { offset: usize },
    #[error("fieldSelector requires a metadata.name that is not UTF-8")]
    SelectorNameNotUtf8,
    #[error("fieldSelector requires a metadata.name with a control character")]
    SelectorNameControl,
    #[error("labelSelector parses differently across API server versions, and that changes what the request is")]
    VersionDependentSelector,
}

/// Classifies a request from its method, its path (as received: percent-encoded, without the
/// query) and its raw query (without the `?`), as the API server's resolver would, or says
/// why the request must be refused. See the module documentation for the rules.
pub fn classify(
    method: &str,
    path: &str,
    query: Option<&str>,
) -> Result<RequestInfo, RequestInfoError> {
    let method_verb = method_verb(method)?;
    let decoded = decode_path(path)?;
    let query = Query::parse(query.unwrap_or(""))?;
    let (segments, trailing_slash) = split_segments(&decoded)?;
    let mut info = RequestInfo {
        path: decoded.clone(),
        verb: method.to_ascii_lowercase(),
        ..RequestInfo::default()
    };
    resolve(&mut info, &segments, method_verb, &query)?;
    if trailing_slash && info.subresource != "proxy" {
        return Err(RequestInfoError::TrailingSlash);
    }
    Ok(info)
}

/// The verb a resource request gets from its method, for the methods the API serves.
fn method_verb(method: &str) -> Result<&'static str, RequestInfoError> {
    Ok(match method {
        "POST" => "create",
        "GET" | "HEAD" => "get",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => {
            let shown: String = method.chars().take(16).collect();
            return Err(RequestInfoError::UnsupportedMethod(format!("{shown:?}")));
        }
    })
}

/// The resolver proper, on the decoded segments of a path that passed every check.
fn resolve(
    info: &mut RequestInfo,
    segments: &[&str],
    method_verb: &'static str,
    query: &Query,
) -> Result<(), RequestInfoError> {
    if segments.len() < 3 {
        return Ok(());
    }
    let (prefix, rest) = match segments {
        [prefix @ ("api" | "apis"), rest @ ..] => (*prefix, rest),
        _ => return Ok(()),
    };
    info.api_prefix = prefix.to_owned();
    let rest = if prefix == "apis" {
        // A group needs three more segments: group, version, resource. The prefix stays
        // recorded on the non-resource answer, as the resolver leaves it.
        match rest {
            [group, rest @ ..] if rest.len() >= 2 => {
                info.api_group = (*group).to_owned();
                rest
            }
            _ => return Ok(()),
        }
    } else {
        rest
    };
    let [version, rest @ ..] = rest else {
        return Ok(());
    };
    info.is_resource_request = true;
    info.api_version = (*version).to_owned();

    let rest = match rest {
        [verb @ ("watch" | "proxy"), rest @ ..] => {
            let verb: &'static str = if *verb == "watch" { "watch" } else { "proxy" };
            if rest.is_empty() {
                return Err(RequestInfoError::MissingResource(verb));
            }
            info.verb = verb.to_owned();
            rest
        }
        _ => {
            info.verb = method_verb.to_owned();
            rest
        }
    };

    let parts = match rest {
        ["namespaces", namespace, more @ ..] => {
            info.namespace = (*namespace).to_owned();
            match more {
                [next, ..] if !matches!(*next, "status" | "finalize") => more,
                _ => rest,
            }
        }
        _ => rest,
    };
    info.parts = parts.iter().map(|p| (*p).to_owned()).collect();
    if let Some(resource) = parts.first() {
        info.resource = (*resource).to_owned();
    }
    if let Some(name) = parts.get(1) {
        info.name = (*name).to_owned();
    }
    if let Some(subresource) = parts.get(2) {
        if info.verb != "proxy" {
            info.subresource = (*subresource).to_owned();
        }
    }

    if info.name.is_empty() && info.verb == "get" {
        let (watch, name) = list_options(query)?;
        info.verb = if watch { "watch" } else { "list" }.to_owned();
        info.name = name;
    }
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_owned();
    }
    Ok(())
}

/// Why a percent-encoding of `byte` in a path is refused, or `None` when it is accepted.
fn forbidden_path_encoding(byte: u8) -> Option<&'static str> {
    match byte {
        b'/' => Some("an encoded slash is a segment boundary to some readers and part of a name to others"),
        b'\\' => Some("an encoded backslash is a path separator to some servers and proxies"),
        b'%' => Some("an encoded percent sign (double encoding) is another path to a hop that decodes twice"),
        0x00..=0x1f | 0x7f => Some("an encoded control byte"),
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
            Some("an unreserved character needs no encoding; encoding it only makes a path look different to different readers")
        }
        _ => None,
    }
}

/// The bytes RFC 3986 allows unencoded in a path (pchar and `/`), less `;` (see the module
/// documentation). `%` is handled by the caller.
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b)
}

/// The bytes RFC 3986 allows unencoded in a query, less `;`. `%` is handled by the caller.
fn is_query_byte(b: u8) -> bool {
    is_path_byte(b) || b == b'?'
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte that `%XX` at `at` stands for, if the two bytes after `at` are hex digits.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = hex_value(*bytes.get(at + 1)?)?;
    let lo = hex_value(*bytes.get(at + 2)?)?;
    Some(hi << 4 | lo)
}

/// Checks a raw path and decodes it as Go's server does (`%XX` only; `+` is a plus).
fn decode_path(raw: &str) -> Result<String, RequestInfoError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(RequestInfoError::PathTooLong {
            len: raw.len(),
            max: MAX_PATH_BYTES,
        });
    }
    if !raw.starts_with('/') {
        return Err(RequestInfoError::NotAbsolutePath);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        if b == b'%' {
            let byte = escape_at(bytes, at)
                .ok_or(RequestInfoError::PathBadPercentEncoding { offset: at })?;
            if let Some(reason) = forbidden_path_encoding(byte) {
                return Err(RequestInfoError::PathForbiddenEncoding {
                    offset: at,
                    byte,
                    reason,
                });
            }
            out.push(byte);
            at += 3;
        } else if b < 0x20 || b == 0x7f {
            return Err(RequestInfoError::PathControlByte {
                offset: at,
                byte: b,
            });
        } else if is_path_byte(b) {
            out.push(b);
            at += 1;
        } else {
            return Err(RequestInfoError::PathDisallowedByte {
                offset: at,
                byte: b,
            });
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| RequestInfoError::PathNotUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(RequestInfoError::PathControlCharacter);
    }
    Ok(decoded)
}

/// The segments of a decoded path that starts with `/`, and whether it ends with a `/`
/// (the root `/` does not count).
fn split_segments(path: &str) -> Result<(Vec<&str>, bool), RequestInfoError> {
    let body = path.strip_prefix('/').unwrap_or(path);
    if body.is_empty() {
        return Ok((Vec::new(), false));
    }
    let (body, trailing) = match body.strip_suffix('/') {
        Some(body) => (body, true),
        None => (body, false),
    };
    let mut segments = Vec::new();
    for segment in body.split('/') {
        match segment {
            "" => return Err(RequestInfoError::EmptySegment),
            "." => return Err(RequestInfoError::DotSegment(".")),
            ".." => return Err(RequestInfoError::DotSegment("..")),
            _ => segments.push(segment),
        }
    }
    Ok((segments, trailing))
}

/// A query split into decoded `(key, value)` pairs, in order, as Go's `url.ParseQuery`
/// splits it (after the checks that make that split unambiguous).
struct Query {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Query {
    fn parse(raw: &str) -> Result<Self, RequestInfoError> {
        if raw.len() > MAX_QUERY_BYTES {
            return Err(RequestInfoError::QueryTooLong {
                len: raw.len(),
                max: MAX_QUERY_BYTES,
            });
        }
        let bytes = raw.as_bytes();
        for (offset, &b) in bytes.iter().enumerate() {
            if b == b'%' {
                if escape_at(bytes, offset).is_none() {
                    return Err(RequestInfoError::QueryBadPercentEncoding { offset });
                }
            } else if b == b';' {
                return Err(RequestInfoError::QuerySemicolon { offset });
            } else if b < 0x20 || b == 0x7f {
                return Err(RequestInfoError::QueryControlByte { offset, byte: b });
            } else if !is_query_byte(b) {
                return Err(RequestInfoError::QueryDisallowedByte { offset, byte: b });
            }
        }
        if raw.is_empty() {
            return Ok(Query { pairs: Vec::new() });
        }
        if raw.split('&').count() > MAX_QUERY_PARAMS {
            return Err(RequestInfoError::TooManyQueryParameters {
                max: MAX_QUERY_PARAMS,
            });
        }
        let pairs = raw
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_query_component(key), decode_query_component(value))
            })
            .collect();
        Ok(Query { pairs })
    }

    /// The first value of `key`, as Go's conversions take it.
    fn first(&self, key: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// Decodes a query key or value already checked for well-formed escapes: `+` is a space.
pub(crate) fn decode_query_component(raw: &str) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        match (b, escape_at(bytes, at)) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                at += 1;
            }
            _ => {
                out.push(b);
                at += 1;
            }
        }
    }
    out
}

/// Whether the request is a watch, and the name its field selector gives, for a `get`
/// without a name: what the resolver takes from the list options it decodes from the query.
fn list_options(query: &Query) -> Result<(bool, String), RequestInfoError> {
    let watch = query.first("watch");
    let field = query.first("fieldSelector").map(field_selector_name);
    let label = query
        .first("labelSelector")
        .map_or(LabelSelector::Valid, check_label_selector);
    let integers = ["timeoutSeconds", "limit"]
        .iter()
        .all(|key| query.first(key).is_none_or(is_go_int64));
    let others_decode = integers && !matches!(field, Some(Err(Invalid)));
    let selector_name = match field {
        Some(Ok(Some(name))) if is_path_segment_name(&name) => Some(name),
        _ => None,
    };

    // The resolver's two readings: the list options decoded, or not (then only `watch` is
    // looked at, in its own way).
    let reading = |decodes: bool| -> (bool, Option<&[u8]>) {
        if decodes {
            let watch = watch.is_some_and(|v| !(v == b"0" || go_equal_fold(v, "false")));
            (watch, selector_name.as_deref())
        } else {
            let watch = watch.is_some_and(|v| !(v == b"0" || v.eq_ignore_ascii_case(b"false")));
            (watch, None)
        }
    };
    let (watch, name) = match label {
        LabelSelector::Valid => reading(others_decode),
        LabelSelector::Invalid => reading(false),
        LabelSelector::VersionDependent => {
            let read = reading(others_decode);
            if read != reading(false) {
                return Err(RequestInfoError::VersionDependentSelector);
            }
            read
        }
    };
    let name = match name {
        None => String::new(),
        Some(name) => {
            let name =
                std::str::from_utf8(name).map_err(|_| RequestInfoError::SelectorNameNotUtf8)?;
            if name.chars().any(char::is_control) {
                return Err(RequestInfoError::SelectorNameControl);
            }
            name.to_owned()
        }
    };
    Ok((watch, name))
}

/// Go's `strings.EqualFold(v, target)` for an ASCII lower-case `target`: Unicode simple case
/// folding, under which `ſ` (U+017F) is an `s` and `K` (U+212A) a `k`.
fn go_equal_fold(v: &[u8], target: &str) -> bool {
    let Ok(v) = std::str::from_utf8(v) else {
        return false;
    };
    let mut chars = v.chars();
    target.chars().all(|t| {
        chars.next().is_some_and(|c| {
            c.to_ascii_lowercase() == t
                || (t == 's' && c == '\u{17f}')
                || (t == 'k' && c == '\u{212a}')
        })
    }) && chars.next().is_none()
}

/// Go's `strconv.ParseInt(v, 10, 64)` succeeds: an optional sign, decimal digits, in range.
fn is_go_int64(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok_and(|s| s.parse::<i64>().is_ok())
}

/// apimachinery's `IsPathSegmentName`: not `.` or `..`, no `/` or `%`. (It allows empty.)
fn is_path_segment_name(name: &[u8]) -> bool {
    name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == b'%')
}

/// A selector that does not parse.
struct Invalid;

/// The value a field selector requires `metadata.name` to equal, as `fields.ParseSelector`
/// and then `RequiresExactMatch("metadata.name")` find it: the terms sorted, the first
/// `metadata.name=` or `metadata.name==` term's unescaped value.
fn field_selector_name(selector: &[u8]) -> Result<Option<Vec<u8>>, Invalid> {
    let mut terms = split_field_terms(selector);
    terms.sort_unstable();
    let mut name = None;
    for term in terms.into_iter().filter(|t| !t.is_empty()) {
        let (field, operator, value) = split_field_term(term).ok_or(Invalid)?;
        let value = unescape_field_value(value)?;
        if name.is_none() && field == b"metadata.name" && operator != b"!=" {
            name = Some(value);
        }
    }
    Ok(name)
}

/// Cuts a field selector at the commas not escaped by a backslash.
fn split_field_terms(selector: &[u8]) -> Vec<&[u8]> {
    if selector.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (at, &b) in selector.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b',' {
            terms.push(&selector[start..at]);
            start = at + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

/// Splits a field-selector term at the first operator (`!=`, then `==`, then `=` tried at each
/// position): field, operator, raw value.
fn split_field_term(term: &[u8]) -> Option<(&[u8], &'static [u8], &[u8])> {
    (0..term.len()).find_map(|at| {
        let rest = &term[at..];
        [b"!=" as &'static [u8], b"==", b"="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .map(|op| (&term[..at], op, &rest[op.len()..]))
    })
}

/// Undoes a field-selector value's escapes (`\\`, `\,`, `\=`); an unescaped `,` or `=`, or
/// any other escape, is invalid.
fn unescape_field_value(value: &[u8]) -> Result<Vec<u8>, Invalid> {
    let mut out = Vec::with_capacity(value.len());
    let mut escaped = false;
    for &b in value {
        match (escaped, b) {
            (true, b'\\' | b',' | b'=') => {
                out.push(b);
                escaped = false;
            }
            (true, _) | (false, b',' | b'=') => return Err(Invalid),
            (false, b'\\') => escaped = true,
            (false, _) => out.push(b),
        }
    }
    if escaped {
        return Err(Invalid);
    }
    Ok(out)
}

/// Whether a label selector parses (`labels.Parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelSelector {
    Valid,
    Invalid,
    /// Holds consecutive commas in a value set, which the label parsers of Kubernetes 1.34 and
    /// earlier read differently (they consumed one comma too many there).
    VersionDependent,
}

fn check_label_selector(selector: &[u8]) -> LabelSelector {
    let mut parser = LabelParser::new(selector);
    let parsed = parser.parse();
    match (parsed, parser.version_dependent) {
        (_, true) => LabelSelector::VersionDependent,
        (Ok(()), false) => LabelSelector::Valid,
        (Err(Invalid), false) => LabelSelector::Invalid,
    }
}

/// The label selector's tokens, as apimachinery's lexer makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    End,
    ClosePar,
    Comma,
    Not,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

fn is_label_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_label_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

fn special_token(text: &[u8]) -> Option<Token> {
    Some(match text {
        b")" => Token::ClosePar,
        b"," => Token::Comma,
        b"!" => Token::Not,
        b"==" => Token::DoubleEquals,
        b"=" => Token::Equals,
        b">" => Token::GreaterThan,
        b"<" => Token::LessThan,
        b"!=" => Token::NotEquals,
        b"(" => Token::OpenPar,
        _ => return None,
    })
}

/// apimachinery's label-selector lexer, byte for byte. Like the Go original, a NUL byte reads
/// as the end of the input where a token starts, and ends an identifier or operator where it
/// is inside one (and is skipped).
struct LabelLexer<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> LabelLexer<'a> {
    /// The next byte, or 0 at the end.
    fn read(&mut self) -> u8 {
        match self.input.get(self.at) {
            Some(&b) => {
                self.at += 1;
                b
            }
            None => 0,
        }
    }

    fn unread(&mut self) {
        self.at = self.at.saturating_sub(1);
    }

    fn lex(&mut self) -> (Token, &'a [u8]) {
        let mut b = self.read();
        while is_label_whitespace(b) {
            b = self.read();
        }
        if b == 0 {
            return (Token::End, b"");
        }
        self.unread();
        if is_label_special(b) {
            self.special()
        } else {
            self.identifier()
        }
    }

    fn identifier(&mut self) -> (Token, &'a [u8]) {
        let start = self.at;
        loop {
            let end = self.at;
            let b = self.read();
            if b != 0 && (is_label_special(b) || is_label_whitespace(b)) {
                self.unread();
            } else if b != 0 {
                continue;
            }
            let text = &self.input[start..end];
            let token = match text {
                b"in" => Token::In,
                b"notin" => Token::NotIn,
                _ => Token::Identifier,
            };
            return (token, text);
        }
    }

    /// The longest operator at the current position (every single special byte is one).
    fn special(&mut self) -> (Token, &'a [u8]) {
        let start = self.at;
        let mut last = None;
        loop {
            let b = self.read();
            if b == 0 {
                break;
            }
            if !is_label_special(b) {
                self.unread();
                break;
            }
            let text = &self.input[start..self.at];
            match special_token(text) {
                Some(token) => last = Some((token, text)),
                None if last.is_some() => {
                    self.unread();
                    break;
                }
                None => {}
            }
        }
        last.unwrap_or((Token::End, b""))
    }
}

/// apimachinery's label-selector parser (recursive descent over the scanned tokens), with
/// the validation `NewRequirement` applies. It only answers whether the selector parses.
struct LabelParser<'a> {
    tokens: Vec<(Token, &'a [u8])>,
    at: usize,
    version_dependent: bool,
}

impl<'a> LabelParser<'a> {
    fn new(selector: &'a [u8]) -> Self {
        let mut lexer = LabelLexer {
            input: selector,
            at: 0,
        };
        let mut tokens = Vec::new();
        loop {
            let (token, text) = lexer.lex();
            tokens.push((token, text));
            if token == Token::End {
                break;
            }
        }
        LabelParser {
            tokens,
            at: 0,
            version_dependent: false,
        }
    }

    /// The current token; where values are expected, `in` and `notin` are identifiers.
    fn peek(&self, values: bool) -> (Token, &'a [u8]) {
        let (token, text) = self
            .tokens
            .get(self.at)
            .copied()
            .unwrap_or((Token::End, b""));
        match token {
            Token::In | Token::NotIn if values => (Token::Identifier, text),
            _ => (token, text),
        }
    }

    fn next(&mut self, values: bool) -> (Token, &'a [u8]) {
        let token = self.peek(values);
        self.at += 1;
        token
    }

    fn parse(&mut self) -> Result<(), Invalid> {
        loop {
            match self.peek(true).0 {
                Token::Identifier | Token::Not => {
                    self.requirement()?;
                    match self.next(true).0 {
                        Token::End => return Ok(()),
                        Token::Comma => {
                            if !matches!(self.peek(true).0, Token::Identifier | Token::Not) {
                                return Err(Invalid);
                            }
                        }
                        _ => return Err(Invalid),
                    }
                }
                Token::End => return Ok(()),
                _ => return Err(Invalid),
            }
        }
    }

    fn requirement(&mut self) -> Result<(), Invalid> {
        // The key, with `!` in front for "does not exist"; a key alone means "exists".
        let (mut token, mut key) = self.next(true);
        let negated = token == Token::Not;
        if negated {
            (token, key) = self.next(true);
        }
        if token != Token::Identifier || !is_label_key(key) {
            return Err(Invalid);
        }
        if negated || matches!(self.peek(true).0, Token::End | Token::Comma) {
            return Ok(());
        }
        let values = match self.next(false).0 {
            Token::In | Token::NotIn => self.value_set()?,
            Token::Equals | Token::DoubleEquals | Token::NotEquals => vec![self.exact_value()?],
            Token::GreaterThan | Token::LessThan => {
                let value = self.exact_value()?;
                if !is_go_int64(value) {
                    return Err(Invalid);
                }
                vec![value]
            }
            _ => return Err(Invalid),
        };
        if values.iter().all(|v| is_label_value(v)) {
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    /// `( value, … )`; `()` is the set holding the empty value.
    fn value_set(&mut self) -> Result<Vec<&'a [u8]>, Invalid> {
        if self.next(true).0 != Token::OpenPar {
            return Err(Invalid);
        }
        match self.peek(true).0 {
            Token::Identifier | Token::Comma => {
                let values = self.identifiers()?;
                if self.next(true).0 != Token::ClosePar {
                    return Err(Invalid);
                }
                Ok(values)
            }
            Token::ClosePar => {
                self.next(true);
                Ok(vec![b""])
            }
            _ => Err(Invalid),
        }
    }

    /// A comma-separated list of possibly empty values, up to (not including) the `)`.
    fn identifiers(&mut self) -> Result<Vec<&'a [u8]>, Invalid> {
        let mut values = Vec::new();
        loop {
            match self.next(true) {
                (Token::Identifier, value) => {
                    values.push(value);
                    match self.peek(true).0 {
                        Token::Comma => {}
                        Token::ClosePar => return Ok(values),
                        _ => return Err(Invalid),
                    }
                }
                (Token::Comma, _) => {
                    if values.is_empty() {
                        values.push(b"");
                    }
                    match self.peek(true).0 {
                        Token::ClosePar => {
                            values.push(b"");
                            return Ok(values);
                        }
                        Token::Comma => {
                            self.version_dependent = true;
                            values.push(b"");
                        }
                        _ => {}
                    }
                }
                _ => return Err(Invalid),
            }
        }
    }

    /// The one value after `=`, `==`, `!=`, `>` or `<`: empty when nothing follows.
    fn exact_value(&mut self) -> Result<&'a [u8], Invalid> {
        if matches!(self.peek(true).0, Token::End | Token::Comma) {
            return Ok(b"");
        }
        match self.next(true) {
            (Token::Identifier, value) => Ok(value),
            _ => Err(Invalid),
        }
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`: a label name or a non-empty label value.
fn is_label_name_text(text: &[u8]) -> bool {
    match (text.first(), text.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && text
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 bytes.
fn is_label_key(key: &[u8]) -> bool {
    let mut pieces = key.split(|&b| b == b'/');
    let (prefix, name) = match (pieces.next(), pieces.next(), pieces.next()) {
        (Some(name), None, _) => (None, name),
        (Some(prefix), Some(name), None) => (Some(prefix), name),
        _ => return false,
    };
    prefix.is_none_or(is_dns1123_subdomain) && name.len() <= 63 && is_label_name_text(name)
}

/// A label value: empty, or at most 63 bytes of label-name text.
fn is_label_value(value: &[u8]) -> bool {
    value.is_empty() || (value.len() <= 63 && is_label_name_text(value))
}

/// A lower-case RFC 1123 subdomain of at most 253 bytes.
fn is_dns1123_subdomain(text: &[u8]) -> bool {
    text.len() <= 253
        && text.split(|&b| b == b'.').all(|label| {
            let end_ok =
                |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            end_ok(label.first())
                && end_ok(label.last())
                && label
                    .iter()
                    .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resource request and its expected classification: method, path with an optional
    /// `?query`, then verb, API prefix, group, version, namespace, resource, subresource,
    /// name and parts.
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    );

    fn split_target(target: &str) -> (&str, Option<&str>) {
        match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        }
    }

    fn run(method: &str, target: &str) -> Result<RequestInfo, RequestInfoError> {
        let (path, query) = split_target(target);
        classify(method, path, query)
    }

    #[track_caller]
    fn refused(method: &str, target: &str) -> RequestInfoError {
        match run(method, target) {
            Ok(info) => panic!("{method} {target} was classified, not refused: {info:?}"),
            Err(e) => e,
        }
    }

    #[track_caller]
    fn ok(method: &str, target: &str) -> RequestInfo {
        match run(method, target) {
            Ok(info) => info,
            Err(e) => panic!("{method} {target} was refused: {e}"),
        }
    }

    const NS_POD: &str = "/api/v1/namespaces/default/pods";

    /// Real resource requests: the cases of the Go resolver's own tests, then what kubectl and
    /// client libraries send.
    #[rustfmt::skip]
    const RESOURCE_CASES: &[Row] = &[
        // The Go resolver's test table.
        ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other", &["namespaces", "other"]),
        ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo", "subpath", "not", "a", "subresource"]),
        ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo", &["pods", "foo", "status"]),
        ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo", &["pods", "foo", "proxy", "subpath"]),
        ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other", &["namespaces", "other", "finalize"]),
        ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other", &["namespaces", "other", "status"]),
        ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo", &["pods", "foo"]),
        ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", "", &["nodes"]),
        ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", "", &["namespaces"]),
        ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", "", &["pods"]),
        ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", "", &["pods"]),
        ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", "", &["pods"]),
        ("GET", "/apis/batch/v1/job/foo/scale", "get", "apis", "batch", "v1", "", "job", "scale", "foo", &["job", "foo", "scale"]),
        // kubectl get / describe / -w.
        ("GET", "/api/v1/namespaces/default/pods?limit=500", "list", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/default/pods?resourceVersion=12345&watch=true", "watch", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0", "get", "api", "", "v1", "default", "pods", "", "web-0", &["pods", "web-0"]),
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb-0&resourceVersion=12345&watch=true", "watch", "api", "", "v1", "default", "pods", "", "web-0", &["pods"]),
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb-0&limit=500", "list", "api", "", "v1", "default", "pods", "", "web-0", &["pods"]),
        ("GET", "/api/v1/pods?allowWatchBookmarks=true&resourceVersion=1&timeoutSeconds=540&watch=true", "watch", "api", "", "v1", "", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dweb-0%2CinvolvedObject.namespace%3Ddefault%2CinvolvedObject.uid%3D1f2e&limit=500", "list", "api", "", "v1", "default", "events", "", "", &["events"]),
        ("GET", "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb%2Ctier+in+%28front%2Cback%29&limit=500", "list", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0?pretty=true", "get", "api", "", "v1", "default", "pods", "", "web-0", &["pods", "web-0"]),
        // kubectl logs, exec, attach, port-forward, debug, evict.
        ("GET", "/api/v1/namespaces/default/pods/web-0/log?container=app&follow=true", "get", "api", "", "v1", "default", "pods", "log", "web-0", &["pods", "web-0", "log"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0/log?container=app&tailLines=10", "get", "api", "", "v1", "default", "pods", "log", "web-0", &["pods", "web-0", "log"]),
        ("POST", "/api/v1/namespaces/default/pods/shell/exec?command=sh&command=-c&command=echo+hi&container=shell&stdin=true&stdout=true&stderr=true&tty=true", "create", "api", "", "v1", "default", "pods", "exec", "shell", &["pods", "shell", "exec"]),
        ("GET", "/api/v1/namespaces/default/pods/shell/exec?command=ls&command=-l&container=shell&stdout=true&stderr=true", "get", "api", "", "v1", "default", "pods", "exec", "shell", &["pods", "shell", "exec"]),
        ("POST", "/api/v1/namespaces/default/pods/shell/attach?container=shell&stdin=true&stdout=true&tty=true", "create", "api", "", "v1", "default", "pods", "attach", "shell", &["pods", "shell", "attach"]),
        ("POST", "/api/v1/namespaces/default/pods/shell/portforward", "create", "api", "", "v1", "default", "pods", "portforward", "shell", &["pods", "shell", "portforward"]),
        ("GET", "/api/v1/namespaces/default/pods/shell/portforward?ports=8080", "get", "api", "", "v1", "default", "pods", "portforward", "shell", &["pods", "shell", "portforward"]),
        ("PATCH", "/api/v1/namespaces/default/pods/web-0/ephemeralcontainers?fieldManager=kubectl-debug", "patch", "api", "", "v1", "default", "pods", "ephemeralcontainers", "web-0", &["pods", "web-0", "ephemeralcontainers"]),
        ("POST", "/api/v1/namespaces/default/pods/web-0/eviction", "create", "api", "", "v1", "default", "pods", "eviction", "web-0", &["pods", "web-0", "eviction"]),
        ("POST", "/api/v1/namespaces/default/pods/web-0/binding", "create", "api", "", "v1", "default", "pods", "binding", "web-0", &["pods", "web-0", "binding"]),
        // kubectl scale, apply, create, replace, delete, rollout.
        ("GET", "/apis/apps/v1/namespaces/staging/deployments/web/scale", "get", "apis", "apps", "v1", "staging", "deployments", "scale", "web", &["deployments", "web", "scale"]),
        ("PATCH", "/apis/apps/v1/namespaces/staging/deployments/web/scale", "patch", "apis", "apps", "v1", "staging", "deployments", "scale", "web", &["deployments", "web", "scale"]),
        ("PUT", "/apis/apps/v1/namespaces/staging/deployments/web/scale", "update", "apis", "apps", "v1", "staging", "deployments", "scale", "web", &["deployments", "web", "scale"]),
        ("PATCH", "/apis/apps/v1/namespaces/default/deployments/web?fieldManager=kubectl&fieldValidation=Strict&force=false", "patch", "apis", "apps", "v1", "default", "deployments", "", "web", &["deployments", "web"]),
        ("POST", "/apis/apps/v1/namespaces/default/deployments?fieldManager=kubectl-create&fieldValidation=Strict", "create", "apis", "apps", "v1", "default", "deployments", "", "", &["deployments"]),
        ("PUT", "/apis/apps/v1/namespaces/default/deployments/web", "update", "apis", "apps", "v1", "default", "deployments", "", "web", &["deployments", "web"]),
        ("DELETE", "/apis/apps/v1/namespaces/default/deployments/web", "delete", "apis", "apps", "v1", "default", "deployments", "", "web", &["deployments", "web"]),
        ("PATCH", "/apis/apps/v1/namespaces/default/deployments/web?fieldManager=kubectl-rollout", "patch", "apis", "apps", "v1", "default", "deployments", "", "web", &["deployments", "web"]),
        ("GET", "/apis/apps/v1/namespaces/default/deployments/web/status", "get", "apis", "apps", "v1", "default", "deployments", "status", "web", &["deployments", "web", "status"]),
        ("DELETE", "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb", "deletecollection", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        ("DELETE", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb-0", "deletecollection", "api", "", "v1", "default", "pods", "", "", &["pods"]),
        // Custom resources.
        ("GET", "/apis/example.com/v1/namespaces/ns/widgets/w", "get", "apis", "example.com", "v1", "ns", "widgets", "", "w", &["widgets", "w"]),
        ("GET", "/apis/example.com/v1/widgets", "list", "apis", "example.com", "v1", "", "widgets", "", "", &["widgets"]),
        ("PUT", "/apis/example.com/v1/namespaces/ns/widgets/w/status", "update", "apis", "example.com", "v1", "ns", "widgets", "status", "w", &["widgets", "w", "status"]),
        ("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "create", "apis", "apiextensions.k8s.io", "v1", "", "customresourcedefinitions", "", "", &["customresourcedefinitions"]),
        // Cluster-scoped resources.
        ("GET", "/api/v1/nodes", "list", "api", "", "v1", "", "nodes", "", "", &["nodes"]),
        ("GET", "/api/v1/nodes/node-1", "get", "api", "", "v1", "", "nodes", "", "node-1", &["nodes", "node-1"]),
        ("GET", "/api/v1/nodes/node-1/proxy/metrics", "get", "api", "", "v1", "", "nodes", "proxy", "node-1", &["nodes", "node-1", "proxy", "metrics"]),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:controller:deployment-controller", "get", "apis", "rbac.authorization.k8s.io", "v1", "", "clusterroles", "", "system:controller:deployment-controller", &["clusterroles", "system:controller:deployment-controller"]),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", "create", "apis", "rbac.authorization.k8s.io", "v1", "", "clusterrolebindings", "", "", &["clusterrolebindings"]),
        ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "create", "apis", "authorization.k8s.io", "v1", "", "selfsubjectaccessreviews", "", "", &["selfsubjectaccessreviews"]),
        // Namespaces themselves.
        ("DELETE", "/api/v1/namespaces/staging", "delete", "api", "", "v1", "staging", "namespaces", "", "staging", &["namespaces", "staging"]),
        ("GET", "/api/v1/watch/namespaces/staging", "watch", "api", "", "v1", "staging", "namespaces", "", "staging", &["namespaces", "staging"]),
        ("GET", "/api/v1/namespaces/status", "get", "api", "", "v1", "status", "namespaces", "", "status", &["namespaces", "status"]),
        ("GET", "/api/v1/namespaces/status/pods", "list", "api", "", "v1", "status", "pods", "", "", &["pods"]),
        ("GET", "/apis/example.com/v1/namespaces/ns/finalize", "get", "apis", "example.com", "v1", "ns", "namespaces", "finalize", "ns", &["namespaces", "ns", "finalize"]),
        ("GET", "/api/v1/namespaces/ns/namespaces/x", "get", "api", "", "v1", "ns", "namespaces", "", "x", &["namespaces", "x"]),
        // Other namespaced resources kubectl and controllers reach.
        ("GET", "/api/v1/namespaces/default/secrets/db", "get", "api", "", "v1", "default", "secrets", "", "db", &["secrets", "db"]),
        ("POST", "/api/v1/namespaces/default/serviceaccounts/builder/token", "create", "api", "", "v1", "default", "serviceaccounts", "token", "builder", &["serviceaccounts", "builder", "token"]),
        ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-scheduler", "get", "apis", "coordination.k8s.io", "v1", "kube-system", "leases", "", "kube-scheduler", &["leases", "kube-scheduler"]),
        ("GET", "/api/v1/namespaces/default/services/http:web:80/proxy/healthz", "get", "api", "", "v1", "default", "services", "proxy", "http:web:80", &["services", "http:web:80", "proxy", "healthz"]),
        ("GET", "/api/v1/namespaces/default/services/web:80/proxy/", "get", "api", "", "v1", "default", "services", "proxy", "web:80", &["services", "web:80", "proxy"]),
        ("GET", "/api/v1/namespaces/default/pods/web-0/proxy/a/b/", "get", "api", "", "v1", "default", "pods", "proxy", "web-0", &["pods", "web-0", "proxy", "a", "b"]),
    ];

    /// Real non-resource requests (discovery, OpenAPI, health, version): method, path with an
    /// optional `?query`, verb, API prefix.
    #[rustfmt::skip]
    const NON_RESOURCE_CASES: &[(&str, &str, &str, &str)] = &[
        ("GET", "/", "get", ""),
        ("GET", "/api", "get", ""),
        ("GET", "/api/v1", "get", ""),
        ("GET", "/apis", "get", ""),
        ("GET", "/apis/apps", "get", ""),
        ("GET", "/apis/apps/v1", "get", "apis"),
        ("GET", "/apis/example.com/v1?timeout=32s", "get", "apis"),
        ("GET", "/openapi/v2", "get", ""),
        ("GET", "/openapi/v3", "get", ""),
        ("GET", "/openapi/v3/apis/apps/v1?hash=8F3A", "get", ""),
        ("GET", "/version", "get", ""),
        ("GET", "/healthz", "get", ""),
        ("GET", "/readyz?verbose", "get", ""),
        ("HEAD", "/livez", "head", ""),
        ("GET", "/metrics", "get", ""),
        ("POST", "/healthz", "post", ""),
        ("GET", "/badprefix/version/resource", "get", ""),
        ("GET", "/apis/version/resource", "get", "apis"),
        ("GET", "/API/v1/pods", "get", ""),
    ];

    #[test]
    fn classifies_real_requests_as_the_api_server_does() {
        assert!(RESOURCE_CASES.len() + NON_RESOURCE_CASES.len() >= 60);
        let owned = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect();
        for &(
            method,
            target,
            verb,
            prefix,
            group,
            version,
            namespace,
            resource,
            subresource,
            name,
            parts,
        ) in RESOURCE_CASES
        {
            let expected = RequestInfo {
                is_resource_request: true,
                path: split_target(target).0.to_owned(),
                verb: verb.to_owned(),
                api_prefix: prefix.to_owned(),
                api_group: group.to_owned(),
                api_version: version.to_owned(),
                namespace: namespace.to_owned(),
                resource: resource.to_owned(),
                subresource: subresource.to_owned(),
                name: name.to_owned(),
                parts: owned(parts),
            };
            assert_eq!(ok(method, target), expected, "{method} {target}");
        }
        for &(method, target, verb, prefix) in NON_RESOURCE_CASES {
            let expected = RequestInfo {
                path: split_target(target).0.to_owned(),
                verb: verb.to_owned(),
                api_prefix: prefix.to_owned(),
                ..RequestInfo::default()
            };
            assert_eq!(ok(method, target), expected, "{method} {target}");
        }
    }

    #[test]
    fn field_selector_names_follow_the_resolver() {
        let name = |target: &str| ok("GET", target).name;
        let base = "/apis/group/version/resource";
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name=name1")),
            "name1"
        );
        assert_eq!(
            ok(
                "GET",
                &format!("{base}?watch=true&fieldSelector=metadata.name=name1")
            )
            .verb,
            "watch"
        );
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name%3D%3Dname1")),
            "name1"
        );
        // Not an exact match, or not on metadata.name.
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name!%3Dname1")),
            ""
        );
        assert_eq!(
            name(&format!(
                "{base}?fieldSelector=foo=bar&labelSelector=baz=qux"
            )),
            ""
        );
        assert_eq!(
            name(&format!("{base}?fieldSelector=+metadata.name%3Dx")),
            ""
        );
        // A selector that does not parse gives no name, whichever way watch reads.
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name=name1,foo")),
            ""
        );
        let info = ok(
            "GET",
            &format!("{base}?fieldSelector=metadata.name=name1,foo&watch=true"),
        );
        assert_eq!((info.verb.as_str(), info.name.as_str()), ("watch", ""));
        // The first fieldSelector counts; within one, the terms sorted.
        assert_eq!(
            name(&format!(
                "{base}?fieldSelector=metadata.name=foo&fieldSelector=metadata.name=bar"
            )),
            "foo"
        );
        assert_eq!(
            name(&format!(
                "{base}?fieldSelector=metadata.name%3Db%2Cmetadata.name%3Da"
            )),
            "a"
        );
        assert_eq!(
            name(&format!(
                "{base}?fieldSelector=metadata.namespace%3Dx%2Cmetadata.name%3Dw"
            )),
            "w"
        );
        // Escapes in the value; an escaped comma does not split.
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name%3Da%5C%2Cb")),
            "a,b"
        );
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name%3Da%5Cxb")),
            ""
        );
        // Names that are not valid path segments are not taken.
        for bad in ["a%2Fb", "..", ".", "a%25b"] {
            assert_eq!(
                name(&format!("{base}?fieldSelector=metadata.name%3D{bad}")),
                "",
                "{bad}"
            );
        }
        assert_eq!(name(&format!("{base}?fieldSelector=metadata.name%3D")), "");
        // Any other list option that does not decode loses the name.
        for broken in [
            "limit=abc",
            "limit=",
            "timeoutSeconds=9223372036854775808",
            "labelSelector=%3D%3D",
        ] {
            assert_eq!(
                name(&format!("{base}?{broken}&fieldSelector=metadata.name%3Dw")),
                "",
                "{broken}"
            );
        }
        for fine in [
            "limit=%2B5",
            "timeoutSeconds=-1",
            "labelSelector=app",
            "resourceVersionMatch=x",
            "continue=%3D",
        ] {
            assert_eq!(
                name(&format!("{base}?{fine}&fieldSelector=metadata.name%3Dw")),
                "w",
                "{fine}"
            );
        }
        // Not for a named get, a delete, or the legacy watch prefix.
        let info = ok(
            "GET",
            &format!("{base}/name?fieldSelector=metadata.name%3Dother"),
        );
        assert_eq!((info.verb.as_str(), info.name.as_str()), ("get", "name"));
        let info = ok("DELETE", &format!("{base}?fieldSelector=metadata.name%3Dw"));
        assert_eq!(
            (info.verb.as_str(), info.name.as_str()),
            ("deletecollection", "")
        );
        let info = ok(
            "GET",
            "/apis/group/version/watch/resource?fieldSelector=metadata.name%3Dfoo",
        );
        assert_eq!((info.verb.as_str(), info.name.as_str()), ("watch", ""));
        // Unicode names are names.
        assert_eq!(
            name(&format!("{base}?fieldSelector=metadata.name%3Dcaf%C3%A9")),
            "café"
        );
    }

    #[test]
    fn watch_values_read_as_the_resolver_reads_them() {
        let verb = |query: &str| ok("GET", &format!("{NS_POD}?{query}")).verb;
        for watch in [
            "watch=true",
            "watch=1",
            "watch=",
            "watch",
            "watch=yes",
            "watch=TRUE",
            "%77atch=true",
            "watch=true&watch=false",
        ] {
            assert_eq!(verb(watch), "watch", "{watch}");
        }
        for list in [
            "watch=false",
            "watch=0",
            "watch=FALSE",
            "watch=False",
            "watch=false&watch=true",
            "watchx=true",
            "",
        ] {
            assert_eq!(verb(list), "list", "{list}");
        }
        // `falſe` folds to `false` when the list options decode (strings.EqualFold), and does
        // not when they do not (strings.ToLower).
        assert_eq!(verb("watch=fal%C5%BFe"), "list");
        assert_eq!(verb("watch=fal%C5%BFe&limit=x"), "watch");
        assert_eq!(verb("watch=FALSE&limit=x"), "list");
        // The query is not looked at for a named get.
        assert_eq!(ok("GET", &format!("{NS_POD}/web-0?watch=true")).verb, "get");
    }

    #[test]
    fn percent_encoding_that_cannot_change_the_path_is_decoded() {
        let info = ok(
            "GET",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles/a%20b",
        );
        assert_eq!(info.name, "a b");
        assert_eq!(
            info.path,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles/a b"
        );
        assert_eq!(
            ok(
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3Aauth"
            )
            .name,
            "system:auth"
        );
        assert_eq!(
            ok(
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/caf%C3%A9"
            )
            .name,
            "café"
        );
        assert_eq!(
            ok(
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/a%3Bb%3Fc%23d"
            )
            .name,
            "a;b?c#d"
        );
        // `+` in a path is a plus.
        assert_eq!(
            ok("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/a+b").name,
            "a+b"
        );
    }

    #[test]
    fn refuses_methods_the_api_does_not_serve() {
        for method in ["OPTIONS", "TRACE", "CONNECT", "get", "Post", "FOO", ""] {
            assert!(
                matches!(
                    refused(method, NS_POD),
                    RequestInfoError::UnsupportedMethod(_)
                ),
                "{method:?}"
            );
            assert!(matches!(
                refused(method, "/healthz"),
                RequestInfoError::UnsupportedMethod(_)
            ));
        }
        let long = "X".repeat(1000);
        let RequestInfoError::UnsupportedMethod(shown) = refused(&long, NS_POD) else {
            unreachable!()
        };
        assert!(shown.len() < 24);
    }

    #[test]
    fn refuses_overlong_paths_and_queries() {
        let at_limit = format!(
            "/api/v1/namespaces/default/pods/{}",
            "a".repeat(MAX_PATH_BYTES - 32)
        );
        assert_eq!(at_limit.len(), MAX_PATH_BYTES);
        assert_eq!(ok("GET", &at_limit).name.len(), MAX_PATH_BYTES - 32);
        let over = format!("{at_limit}b");
        assert_eq!(
            refused("GET", &over),
            RequestInfoError::PathTooLong {
                len: MAX_PATH_BYTES + 1,
                max: MAX_PATH_BYTES
            }
        );
        let query = format!("command={}", "x".repeat(MAX_QUERY_BYTES));
        assert!(matches!(
            classify(
                "POST",
                "/api/v1/namespaces/default/pods/shell/exec",
                Some(&query)
            ),
            Err(RequestInfoError::QueryTooLong { .. })
        ));
        let many = vec!["command=x"; MAX_QUERY_PARAMS + 1].join("&");
        assert_eq!(
            classify(
                "POST",
                "/api/v1/namespaces/default/pods/shell/exec",
                Some(&many)
            ),
            Err(RequestInfoError::TooManyQueryParameters {
                max: MAX_QUERY_PARAMS
            })
        );
        let empties = "&".repeat(MAX_QUERY_PARAMS);
        assert!(matches!(
            classify("GET", NS_POD, Some(&empties)),
            Err(RequestInfoError::TooManyQueryParameters { .. })
        ));
        let enough = vec!["command=x"; MAX_QUERY_PARAMS].join("&");
        assert!(classify(
            "POST",
            "/api/v1/namespaces/default/pods/shell/exec",
            Some(&enough)
        )
        .is_ok());
    }

    #[test]
    fn refuses_paths_that_are_not_absolute() {
        for path in ["", "api/v1/pods", "*", "http://kube/api/v1/pods"] {
            assert_eq!(
                classify("GET", path, None),
                Err(RequestInfoError::NotAbsolutePath),
                "{path:?}"
            );
        }
    }

    #[test]
    fn refuses_control_and_disallowed_bytes_in_paths() {
        for (path, offset, byte) in [
            ("/api/v1/pods\0", 12, 0u8),
            ("/api/v1/namespaces/a\tb/pods", 20, b'\t'),
            ("/api/v1/pods/x\r\n", 14, b'\r'),
            ("/api/v1/pods/\x7f", 13, 0x7f),
        ] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::PathControlByte { offset, byte },
                "{path:?}"
            );
        }
        for (path, byte) in [
            ("/api/v1/namespaces/caf\u{e9}/pods", 0xc3),
            ("/api/v1/pods/a b", b' '),
            ("/api/v1/namespaces/a\\..\\kube-system/pods", b'\\'),
            ("/api/v1/pods/a#b", b'#'),
            ("/api/v1/pods/a?b", b'?'),
            ("/api/v1/pods/a\"b", b'"'),
            ("/api/v1/pods/<b>", b'<'),
            ("/api/v1/pods/{b}", b'{'),
            ("/api/v1/pods/a|b", b'|'),
            ("/api/v1/pods/a^b", b'^'),
            ("/api/v1/pods/a`b", b'`'),
            ("/api/v1/pods/[b]", b'['),
            ("/api/v1/namespaces/default/pods/web;x=y", b';'),
        ] {
            // Called directly: the test helper would take a `?` for the start of the query.
            assert!(
                matches!(classify("GET", path, None), Err(RequestInfoError::PathDisallowedByte { byte: b, .. }) if b == byte),
                "{path:?}"
            );
        }
    }

    #[test]
    fn refuses_percent_encodings_that_could_change_the_path() {
        for (path, byte) in [
            ("/api/v1/namespaces/kube-system%2Fpods", b'/'),
            ("/api/v1/namespaces/default/pods/a%2fb", b'/'),
            ("/api/v1/namespaces/default/pods/a%5Cb", b'\\'),
            ("/api/v1/namespaces/default/pods/a%252Fb", b'%'),
            ("/api/v1/namespaces/default/pods/a%00", 0),
            ("/api/v1/namespaces/default/pods/a%0Ab", b'\n'),
            ("/api/v1/namespaces/default/pods/a%7F", 0x7f),
            ("/api/v1/namespaces/%2E%2E/pods", b'.'),
            ("/api/v1/%6Eamespaces/kube-system/secrets", b'n'),
            ("/api/v1/%77atch/pods", b'w'),
            ("/api/v1/pods/a%2Db", b'-'),
            ("/api/v1/pods/a%5Fb", b'_'),
            ("/api/v1/pods/a%7Eb", b'~'),
            ("/api/v1/pods/%30", b'0'),
        ] {
            assert!(
                matches!(refused("GET", path), RequestInfoError::PathForbiddenEncoding { byte: b, .. } if b == byte),
                "{path:?}"
            );
        }
        for path in [
            "/api/v1/pods/a%",
            "/api/v1/pods/a%2",
            "/api/v1/pods/a%zz",
            "/api/v1/pods/a%2G",
            "/api/v1/pods/%%41",
        ] {
            assert!(
                matches!(
                    refused("GET", path),
                    RequestInfoError::PathBadPercentEncoding { .. }
                ),
                "{path:?}"
            );
        }
        for path in [
            "/api/v1/pods/%FF",
            "/api/v1/pods/%C3",
            "/api/v1/pods/%C3%28",
            "/api/v1/pods/%ED%A0%80",
        ] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::PathNotUtf8,
                "{path:?}"
            );
        }
        // C1 controls (U+0085 NEL, U+009B CSI) are control characters too.
        for path in ["/api/v1/pods/a%C2%85b", "/api/v1/pods/%C2%9B31m"] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::PathControlCharacter,
                "{path:?}"
            );
        }
    }

    #[test]
    fn refuses_dot_and_empty_segments_and_trailing_slashes() {
        for (path, dot) in [
            ("/api/v1/namespaces/default/pods/../secrets", ".."),
            ("/api/v1/namespaces/../kube-system/secrets", ".."),
            ("/..", ".."),
            ("/api/./v1/pods", "."),
            ("/api/v1/pods/.", "."),
            (
                "/api/v1/namespaces/default/services/web/proxy/../../secrets",
                "..",
            ),
        ] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::DotSegment(dot),
                "{path:?}"
            );
        }
        // Dots that are not whole segments are names.
        assert_eq!(ok("GET", "/api/v1/namespaces/default/pods/...").name, "...");
        assert_eq!(ok("GET", "/api/v1/namespaces/default/pods/.x").name, ".x");
        for path in [
            "//api/v1/pods",
            "/api//v1/pods",
            "/api/v1/pods//x",
            "/api/v1/pods//",
            "//",
            "/api/v1/namespaces/default/pods/web-0/proxy//",
        ] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::EmptySegment,
                "{path:?}"
            );
        }
        for path in [
            "/api/v1/pods/",
            "/api/v1/namespaces/default/pods/web-0/",
            "/apis/",
            "/api/",
            "/healthz/",
            "/apis/apps/v1/",
            "/api/v1/proxy/namespaces/default/pods/web-0/",
            "/api/v1/namespaces/default/proxy/",
        ] {
            assert_eq!(
                refused("GET", path),
                RequestInfoError::TrailingSlash,
                "{path:?}"
            );
        }
    }

    #[test]
    fn refuses_a_verb_prefix_without_a_resource() {
        assert_eq!(
            refused("GET", "/api/v1/watch"),
            RequestInfoError::MissingResource("watch")
        );
        assert_eq!(
            refused("GET", "/api/v1/proxy"),
            RequestInfoError::MissingResource("proxy")
        );
        assert_eq!(
            refused("GET", "/apis/apps/v1/watch"),
            RequestInfoError::MissingResource("watch")
        );
        // As a resource of a namespace, `watch` is just a name.
        assert_eq!(
            ok("GET", "/api/v1/namespaces/default/watch").resource,
            "watch"
        );
    }

    #[test]
    fn refuses_ambiguous_queries() {
        let query = |q: &str| classify("GET", NS_POD, Some(q));
        assert_eq!(
            query("watch=true;x=1"),
            Err(RequestInfoError::QuerySemicolon { offset: 10 })
        );
        assert_eq!(
            query("watch=%zz"),
            Err(RequestInfoError::QueryBadPercentEncoding { offset: 6 })
        );
        assert_eq!(
            query("watch=%4"),
            Err(RequestInfoError::QueryBadPercentEncoding { offset: 6 })
        );
        assert_eq!(
            query("watch=true\0"),
            Err(RequestInfoError::QueryControlByte {
                offset: 10,
                byte: 0
            })
        );
        assert_eq!(
            query("a=\n"),
            Err(RequestInfoError::QueryControlByte {
                offset: 2,
                byte: b'\n'
            })
        );
        for (q, offset, byte) in [
            ("a=b c", 3, b' '),
            ("a=#", 2, b'#'),
            ("a=caf\u{e9}", 5, 0xc3),
            ("a=\\", 2, b'\\'),
            ("a={}", 2, b'{'),
            ("a=[0]", 2, b'['),
            ("a=\"", 2, b'"'),
        ] {
            assert_eq!(
                query(q),
                Err(RequestInfoError::QueryDisallowedByte { offset, byte }),
                "{q:?}"
            );
        }
        // Encoded, all of these are fine.
        assert!(query("a=b%20c&b=%3B&c=%23&d=%5C&e=%00").is_ok());
        // `?` and `/` are allowed in a query.
        assert!(query("a=b?c/d").is_ok());
    }

    #[test]
    fn refuses_selector_names_that_cannot_be_recorded() {
        let query = |q: &str| classify("GET", NS_POD, Some(q));
        assert_eq!(
            query("fieldSelector=metadata.name%3D%FF"),
            Err(RequestInfoError::SelectorNameNotUtf8)
        );
        assert_eq!(
            query("fieldSelector=metadata.name%3Da%0Ab"),
            Err(RequestInfoError::SelectorNameControl)
        );
        assert_eq!(
            query("fieldSelector=metadata.name%3Da%C2%85"),
            Err(RequestInfoError::SelectorNameControl)
        );
        // The same bytes where no name is taken are not the classifier's business.
        assert!(query("fieldSelector=spec.nodeName%3D%FF").is_ok());
        assert!(classify(
            "GET",
            &format!("{NS_POD}/web-0"),
            Some("fieldSelector=metadata.name%3D%FF")
        )
        .is_ok());
    }

    #[test]
    fn refuses_label_selectors_that_versions_read_differently_only_when_it_matters() {
        let query = |q: &str| classify("GET", NS_POD, Some(q));
        assert_eq!(
            query("labelSelector=x+in+%28a%2C%2C%29&fieldSelector=metadata.name%3Dweb-0"),
            Err(RequestInfoError::VersionDependentSelector)
        );
        assert_eq!(
            query("labelSelector=x+in+%28a%2C%2C%29&watch=fal%C5%BFe"),
            Err(RequestInfoError::VersionDependentSelector)
        );
        // Without a name to take (or a watch to read), both readings agree.
        let info = ok(
            "GET",
            &format!("{NS_POD}?labelSelector=x+in+%28a%2C%2C%29&watch=true"),
        );
        assert_eq!((info.verb.as_str(), info.name.as_str()), ("watch", ""));
        // When something else already fails to decode, both readings agree too.
        let info = ok(
            "GET",
            &format!(
                "{NS_POD}?labelSelector=x+in+%28a%2C%2C%29&limit=x&fieldSelector=metadata.name%3Dw"
            ),
        );
        assert_eq!((info.verb.as_str(), info.name.as_str()), ("list", ""));
    }

    #[test]
    fn label_selectors_parse_as_apimachinery_parses_them() {
        let valid = [
            "",
            "x=a,y=b,z=c",
            "x!=a,y=b",
            "x=",
            "x= ",
            "x=,z= ",
            "x= ,z= ",
            "!x",
            "x>1",
            "x>1,z<5",
            "x in (a)",
            "x notin (a,b)",
            "x in ()",
            "x in (,a)",
            "x in (a,)",
            "in in (in)",
            "example.com/app==web",
            "a.b-c_d",
            " x ",
            "x\tin\t(a)",
            "x=a\0",
            "x=a \0garbage((",
            "x \0 garbage((",
            "x=\0",
            "notin notin (notin)",
            "x",
            "x,y",
            "x<9223372036854775807",
        ];
        let invalid = [
            "x=a||y=b",
            "x==a==b",
            "!x=a",
            "x<a",
            "x>-1",
            ",",
            "x,",
            "x=a,",
            "(",
            "x in",
            "x in (a",
            "x in a",
            "x in (a b)",
            "x=(a)",
            "-x",
            "x-",
            "Example.com/x",
            "/x",
            "a/b/c",
            "x=a=b",
            "x=-a",
            "x>1.5",
            "x>",
            "!",
            "!!x",
            "x!",
            "x in ((a))",
            "x=\u{e9}",
            "x=a\0garbage(",
            "x=a\0,",
            "x=\0(",
            "x>9223372036854775808",
            "!x in (a)",
        ];
        for s in valid {
            assert_eq!(
                check_label_selector(s.as_bytes()),
                LabelSelector::Valid,
                "{s:?}"
            );
        }
        for s in invalid {
            assert_eq!(
                check_label_selector(s.as_bytes()),
                LabelSelector::Invalid,
                "{s:?}"
            );
        }
        let long_name = format!("x={}", "a".repeat(63));
        assert_eq!(
            check_label_selector(long_name.as_bytes()),
            LabelSelector::Valid
        );
        let too_long = format!("x={}", "a".repeat(64));
        assert_eq!(
            check_label_selector(too_long.as_bytes()),
            LabelSelector::Invalid
        );
        for s in ["x in (a,,)", "x in (,,)", "x in (a,,b)"] {
            assert_eq!(
                check_label_selector(s.as_bytes()),
                LabelSelector::VersionDependent,
                "{s:?}"
            );
        }
    }

    #[test]
    fn field_selectors_parse_as_apimachinery_parses_them() {
        let name = |s: &str| {
            field_selector_name(s.as_bytes())
                .map(|n| n.map(|n| String::from_utf8_lossy(&n).into_owned()))
        };
        for s in [
            "",
            "x=a,y=b,z=c",
            "x!=a,y=b",
            r"x=a||y\=b",
            r"x=a\=\=b",
            ",",
            "x=",
            "=",
        ] {
            assert!(matches!(name(s), Ok(None)), "{s:?}");
        }
        for s in [
            "x=a||y=b",
            "x==a==b",
            "x=a,b",
            "x in (a)",
            "x in (a,b,c)",
            "x",
            r"x=a\",
            r"x=\q",
        ] {
            assert!(name(s).is_err(), "{s:?}");
        }
        assert!(matches!(
            name("metadata.name=a,x=b").as_ref().map(|n| n.as_deref()),
            Ok(Some("a"))
        ));
        assert!(matches!(
            name("metadata.name!=a,metadata.name=b")
                .as_ref()
                .map(|n| n.as_deref()),
            Ok(Some("b"))
        ));
        assert!(matches!(
            name(r"metadata.name=a\\b").as_ref().map(|n| n.as_deref()),
            Ok(Some(r"a\b"))
        ));
        assert!(matches!(
            name("metadata.name=a,metadata.name=")
                .as_ref()
                .map(|n| n.as_deref()),
            Ok(Some(""))
        ));
    }

    #[test]
    fn go_integer_and_fold_rules() {
        for v in [
            "0",
            "-0",
            "+5",
            "-9223372036854775808",
            "9223372036854775807",
        ] {
            assert!(is_go_int64(v.as_bytes()), "{v}");
        }
        for v in [
            "",
            "+",
            "-",
            "1_000",
            " 1",
            "1 ",
            "0x10",
            "9223372036854775808",
            "1.0",
            "\u{661}",
        ] {
            assert!(!is_go_int64(v.as_bytes()), "{v}");
        }
        assert!(go_equal_fold(b"FaLsE", "false"));
        assert!(go_equal_fold("fal\u{17f}e".as_bytes(), "false"));
        assert!(!go_equal_fold(b"fals", "false"));
        assert!(!go_equal_fold(b"falsee", "false"));
        assert!(!go_equal_fold(b"f\xffalse", "false"));
    }

    #[test]
    fn classification_reassembles_into_its_path() {
        for &(method, target, ..) in RESOURCE_CASES {
            let info = ok(method, target);
            let joined = info.parts.join("/");
            assert!(
                info.path
                    .trim_end_matches('/')
                    .ends_with(&format!("/{joined}")),
                "{target}"
            );
            let head = match info.api_group.as_str() {
                "" => format!("/{}/{}/", info.api_prefix, info.api_version),
                group => format!("/{}/{group}/{}/", info.api_prefix, info.api_version),
            };
            assert!(info.path.starts_with(&head), "{target}");
        }
    }
}
