//! The keys of a JSON request body, read the way the API server's JSON reader reads them.
//!
//! The API server (json-iterator, up to at least 1.20) does not always match an object's key
//! to a struct field by its text: for a struct of ten fields or fewer (the top level of most
//! kinds: `kind`, `apiVersion`, `metadata`, `spec`, `status`…) it compares a 64-bit hash of
//! the key with the hashes of the field names. A key that is not `metadata` but has its hash
//! is read *as* `metadata`: `{"metadata":{"name":"benign"},"<that key>":{"name":"other"}}`
//! creates `other`, while any other reader (Vigil's decision, an auditor reading the record)
//! sees `benign` and an odd extra key. It also merges a key given twice into a struct, where a
//! JSON tree keeps the last. A body with either kind of key is refused before it is decided:
//! what the record shows of a body is then what the API server reads.
//!
//! The field names are those of the Kubernetes 1.20 API types (`field_names.txt`). No two of
//! them share a hash (tested), and a key that is not one of them but has the hash of one is
//! refused whatever struct it is in: an ordinary key has that hash by chance with a probability
//! of about 800 in 2^64.

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::LazyLock;

/// What is wrong with a body's keys.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// The same key twice in one object.
    Twice(String),
    /// A key the API server reads as another field (`field`).
    Aliased { key: String, field: &'static str },
    /// The body is not JSON (nothing to say about its keys).
    NotJson,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Twice(key) => write!(
                f,
                "the body gives the key {key:?} twice in one object (the API server merges both where a JSON tree keeps the last)"
            ),
            Fault::Aliased { key, field } => write!(
                f,
                "the body has the key {key:?}, which the API server's JSON reader takes for the field {field:?} (it matches short structs' fields by a 64-bit hash of the key)"
            ),
            Fault::NotJson => f.write_str("the body is not JSON"),
        }
    }
}

/// json-iterator's hash of a field name or key (`calcHash`, case-sensitive as the API server
/// configures it): 32-bit FNV-1a's constants over 64 bits.
fn hash(key: &str) -> u64 {
    key.bytes().fold(0x811c_9dc5, |h: u64, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The field names by hash.
static FIELDS: LazyLock<HashMap<u64, &'static str>> = LazyLock::new(|| {
    include_str!("field_names.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|name| (hash(name), name))
        .collect()
});

/// The field the API server may read `key` as, when that is not `key` itself.
fn alias(key: &str) -> Option<&'static str> {
    FIELDS.get(&hash(key)).copied().filter(|f| *f != key)
}

/// The first fault of the JSON text's keys (compared unescaped), if it has one.
pub fn fault(text: &str) -> Option<Fault> {
    let mut found = None;
    let mut json = serde_json::Deserializer::from_str(text);
    // One value, and nothing after it.
    let walked = Keys { found: &mut found }
        .deserialize(&mut json)
        .and_then(|()| json.end());
    match (walked, found) {
        (_, Some(fault)) => Some(fault),
        (Ok(()), None) => None,
        (Err(_), None) => Some(Fault::NotJson),
    }
}

/// The first fault of a JSON patch's paths (`path` and `from` of each operation): a path
/// segment names a key the operation adds or moves, which the API server then reads as the
/// field whose hash it has. The values are checked by [`fault`].
pub fn patch_fault(text: &str) -> Option<Fault> {
    let Ok(serde_json::Value::Array(ops)) = serde_json::from_str::<serde_json::Value>(text) else {
        return None;
    };
    let paths = ops.iter().filter_map(|op| op.as_object()).flat_map(|op| {
        ["path", "from"]
            .into_iter()
            .filter_map(|k| op.get(k).and_then(serde_json::Value::as_str))
    });
    paths
        .flat_map(|p| p.split('/'))
        .map(|segment| segment.replace("~1", "/").replace("~0", "~"))
        .find_map(|key| alias(&key).map(|field| Fault::Aliased { key, field }))
}

/// Walks a JSON value, noting the first faulty key in `found` (and stopping there).
struct Keys<'a> {
    found: &'a mut Option<Fault>,
}

impl<'de> DeserializeSeed<'de> for Keys<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let fault = match alias(&key) {
                Some(field) => Some(Fault::Aliased {
                    key: key.to_string(),
                    field,
                }),
                None if seen.contains(&key) => Some(Fault::Twice(key.to_string())),
                None => None,
            };
            if let Some(fault) = fault {
                *self.found = Some(fault);
                return Err(A::Error::custom("a faulty key"));
            }
            seen.insert(key);
            map.next_value_seed(Keys {
                found: &mut *self.found,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Keys {
                found: &mut *self.found,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key with the hash of `metadata` (found by a lattice search): the real API server
    /// 1.20 creates the ConfigMap named under it (chaos/tests/kubernetes.rs).
    const METADATA_ALIAS: &str = "es\u{1}z\u{17}\u{10};\t2\u{14}%\u{16}\u{1f}5\u{8}\\";

    #[test]
    fn the_hash_is_json_iterators() {
        // calcHash("metadata") as the Go code computes it.
        assert_eq!(hash("metadata"), 0xcd77_f7c3_6622_5340);
        assert_eq!(hash(METADATA_ALIAS), hash("metadata"));
    }

    #[test]
    fn no_two_field_names_share_a_hash() {
        let names = include_str!("field_names.txt")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        assert!(names > 800, "{names}");
        assert_eq!(FIELDS.len(), names);
    }

    #[test]
    fn an_aliased_or_repeated_key_is_a_fault_at_any_depth() {
        let aliased = format!(
            r#"{{"kind":"ConfigMap","metadata":{{"name":"benign"}},{}:{{"name":"other"}}}}"#,
            serde_json::to_string(METADATA_ALIAS).unwrap()
        );
        assert_eq!(
            fault(&aliased),
            Some(Fault::Aliased {
                key: METADATA_ALIAS.into(),
                field: "metadata"
            })
        );
        let nested = format!(
            r#"{{"items":[{{"spec":{{{aliased_key}:1}}}}]}}"#,
            aliased_key = serde_json::to_string(METADATA_ALIAS).unwrap()
        );
        assert!(matches!(fault(&nested), Some(Fault::Aliased { .. })));
        // Written with escapes, the key is the same key.
        assert!(matches!(
            fault(r#"{"metadata":{},"m\u0065tadata":{}}"#),
            Some(Fault::Twice(k)) if k == "metadata"
        ));
        assert!(
            matches!(fault(r#"[{"a":1},{"b":{"c":1,"c":2}}]"#), Some(Fault::Twice(k)) if k == "c")
        );
        assert_eq!(fault(r#"{"metadata":{"name":"a"},"data":{"x":"y"}}"#), None);
        assert_eq!(fault(r#"{"a":1"#), Some(Fault::NotJson));
        assert_eq!(fault("name: a"), Some(Fault::NotJson));
        // Found by the fuzz target: a value with more after it is not JSON.
        assert_eq!(fault(r#""me{"metadata":{}}"#), Some(Fault::NotJson));
    }

    #[test]
    fn a_json_patch_path_may_not_add_an_aliased_key() {
        let escaped = METADATA_ALIAS.replace('~', "~0").replace('/', "~1");
        let ops = serde_json::json!([
            {"op": "add", "path": format!("/{escaped}"), "value": {"name": "other"}}
        ])
        .to_string();
        assert!(matches!(
            patch_fault(&ops),
            Some(Fault::Aliased {
                field: "metadata",
                ..
            })
        ));
        let ok = r#"[{"op":"replace","path":"/metadata/labels/a~1b","value":"x"}]"#;
        assert_eq!(patch_fault(ok), None);
        assert_eq!(patch_fault(r#"{"metadata":{}}"#), None, "not a JSON patch");
    }
}
