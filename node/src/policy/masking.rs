//! Masking of values: column rules (connection, table and column globs) and value detectors
//! (email, card numbers with Luhn, US SSN, phone numbers, IBAN with its checksum, bearer
//! tokens and API keys). Pure: values in, masked values and counts out.
//!
//! The audit copy of results (and of bind parameters and statement text) is always masked by
//! every rule and detector; the client copy only by the rules marked `client = true`.
//!
//! What it does not guarantee: detectors are patterns, not understanding. A value split over
//! several columns, encoded (base64, hex) or written with unusual separators is not found.
//! Column rules follow the table and column a result column comes from (as PostgreSQL reports
//! them); an expression over a column (`lower(email)`) has no table and only the detectors
//! apply to it.

use hmac::{Hmac, Mac};
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Email,
    Card,
    UsSsn,
    Phone,
    Iban,
    Secret,
    /// A column rule (not a detector).
    Column,
}

impl EntityKind {
    /// Every kind a detector can find (all but `Column`).
    pub const DETECTED: [EntityKind; 6] = [
        EntityKind::Email,
        EntityKind::Card,
        EntityKind::UsSsn,
        EntityKind::Phone,
        EntityKind::Iban,
        EntityKind::Secret,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EntityKind::Email => "email",
            EntityKind::Card => "card",
            EntityKind::UsSsn => "us_ssn",
            EntityKind::Phone => "phone",
            EntityKind::Iban => "iban",
            EntityKind::Secret => "secret",
            EntityKind::Column => "column",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `[redacted]`.
    #[default]
    Redact,
    /// Every letter and digit but the last `keep` replaced by `*`.
    KeepLast,
    /// `tok_<16 hex>`: a keyed hash, the same for the same value and key, so masked values
    /// still join.
    Token,
}

/// Mask a result column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// Connection names (globs); empty: every connection.
    #[serde(default)]
    pub connections: Vec<String>,
    /// `table` or `schema.table`, globs (`*`, `?`).
    pub table: String,
    pub column: String,
    #[serde(default)]
    pub method: Method,
    /// For `keep_last`.
    #[serde(default)]
    pub keep: usize,
    /// Mask what the client receives too (text values; a binary value of another type is
    /// withheld as NULL).
    #[serde(default)]
    pub client: bool,
}

/// Mask what a detector finds, in any value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorRule {
    pub kind: EntityKind,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub keep: usize,
    #[serde(default)]
    pub client: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingConfig {
    #[serde(default)]
    pub columns: Vec<ColumnRule>,
    #[serde(default)]
    pub detectors: Vec<DetectorRule>,
}

/// Entity kinds masked and how many times, for the record.
pub type Counts = BTreeMap<String, u64>;

/// `*` and `?` globs, case-insensitive.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

fn iban_valid(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem = 0u32;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ssn_valid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    *area != "000"
        && *area != "666"
        && !area.starts_with('9')
        && *group != "00"
        && *serial != "0000"
}

struct Detector {
    kind: EntityKind,
    re: Regex,
    check: fn(&str) -> bool,
}

/// One pass that tells which detectors can match at all: most values match none.
fn detector_set() -> &'static regex::RegexSet {
    static S: OnceLock<regex::RegexSet> = OnceLock::new();
    S.get_or_init(|| {
        regex::RegexSet::new(detectors().iter().map(|d| d.re.as_str()))
            .expect("the detector patterns are valid")
    })
}

fn detectors() -> &'static [Detector] {
    static D: OnceLock<Vec<Detector>> = OnceLock::new();
    D.get_or_init(|| {
        let d = |kind, re: &str, check: fn(&str) -> bool| Detector {
            kind,
            re: Regex::new(re).expect("a valid detector pattern"),
            check,
        };
        let any = |_: &str| true;
        vec![
            // Order matters: earlier kinds claim their text first.
            d(
                EntityKind::Secret,
                r"(?i:\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*)|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bAKIA[0-9A-Z]{16}\b|\bxox[abpr]-[A-Za-z0-9-]{10,}\b|\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
                any,
            ),
            d(
                EntityKind::Iban,
                r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
                iban_valid,
            ),
            d(EntityKind::Card, r"\b(?:[0-9][ -]?){12,18}[0-9]\b", |s| {
                let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).collect();
                (13..=19).contains(&digits.len()) && luhn(&digits)
            }),
            d(EntityKind::UsSsn, r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", ssn_valid),
            d(
                EntityKind::Email,
                r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
                any,
            ),
            d(
                EntityKind::Phone,
                r"\+[0-9]{1,3}(?:[ .-]?[0-9]{1,4}){2,5}\b|\([0-9]{3}\) ?[0-9]{3}-[0-9]{4}\b|\b[0-9]{3}[.-][0-9]{3}[.-][0-9]{4}\b",
                |s| {
                    let n = s.bytes().filter(u8::is_ascii_digit).count();
                    (8..=15).contains(&n)
                },
            ),
        ]
    })
}

/// The masking in force for one node.
pub struct Masker {
    config: MaskingConfig,
    key: Vec<u8>,
}

impl Masker {
    pub fn new(config: MaskingConfig, key: Vec<u8>) -> Self {
        Self { config, key }
    }

    pub fn has_column_rules(&self) -> bool {
        !self.config.columns.is_empty()
    }

    pub fn is_active(&self) -> bool {
        !self.config.columns.is_empty() || !self.config.detectors.is_empty()
    }

    /// Whether any rule masks what clients receive on `connection`.
    pub fn masks_clients(&self, connection: &str) -> bool {
        self.config.detectors.iter().any(|d| d.client)
            || self
                .config
                .columns
                .iter()
                .any(|r| r.client && connects(r, connection))
    }

    /// The column rule for a result column from `schema.table`.`column`.
    pub fn column_rule(
        &self,
        connection: &str,
        schema: &str,
        table: &str,
        column: &str,
    ) -> Option<&ColumnRule> {
        let qualified = format!("{schema}.{table}");
        self.config.columns.iter().find(|r| {
            connects(r, connection)
                && (glob(&r.table, &qualified) || (!r.table.contains('.') && glob(&r.table, table)))
                && glob(&r.column, column)
        })
    }

    fn apply(&self, method: Method, keep: usize, kind: EntityKind, value: &str) -> String {
        match method {
            Method::Redact => "[redacted]".to_string(),
            Method::KeepLast => {
                let total = value.chars().filter(|c| c.is_alphanumeric()).count();
                let mut hide = total.saturating_sub(keep);
                value
                    .chars()
                    .map(|c| {
                        if c.is_alphanumeric() && hide > 0 {
                            hide -= 1;
                            '*'
                        } else {
                            c
                        }
                    })
                    .collect()
            }
            Method::Token => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
                    .expect("HMAC takes any key length");
                mac.update(kind.label().as_bytes());
                mac.update(&[0]);
                mac.update(value.as_bytes());
                let tag = mac.finalize().into_bytes();
                format!("tok_{}", hex::encode(&tag[..8]))
            }
        }
    }

    /// Masks one value. `rule` is the column rule of its column, if any; `client` selects the
    /// client copy (only rules marked `client`). Counts go to `counts` when given.
    pub fn mask<'a>(
        &self,
        value: &'a str,
        rule: Option<&ColumnRule>,
        client: bool,
        mut counts: Option<&mut Counts>,
    ) -> Cow<'a, str> {
        if let Some(r) = rule.filter(|r| !client || r.client) {
            if let Some(c) = counts {
                *c.entry(EntityKind::Column.label().into()).or_default() += 1;
            }
            return Cow::Owned(self.apply(r.method, r.keep, EntityKind::Column, value));
        }
        let mut out = Cow::Borrowed(value);
        if self.config.detectors.is_empty() {
            return out;
        }
        let candidates = detector_set().matches(value);
        if !candidates.matched_any() {
            return out;
        }
        for (i, det) in detectors().iter().enumerate() {
            if !candidates.matched(i) {
                continue;
            }
            let Some(rule) = self
                .config
                .detectors
                .iter()
                .find(|d| d.kind == det.kind && (!client || d.client))
            else {
                continue;
            };
            if !det.re.is_match(&out) {
                continue;
            }
            let mut found = 0u64;
            let replaced = det.re.replace_all(&out, |caps: &regex::Captures<'_>| {
                let m = &caps[0];
                if (det.check)(m) {
                    found += 1;
                    self.apply(rule.method, rule.keep, det.kind, m)
                } else {
                    m.to_string()
                }
            });
            if found > 0 {
                out = Cow::Owned(replaced.into_owned());
                if let Some(c) = counts.as_deref_mut() {
                    *c.entry(det.kind.label().into()).or_default() += found;
                }
            }
        }
        out
    }
}

fn connects(r: &ColumnRule, connection: &str) -> bool {
    r.connections.is_empty() || r.connections.iter().any(|c| glob(c, connection))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(client: bool) -> Masker {
        let detectors = EntityKind::DETECTED
            .into_iter()
            .map(|kind| DetectorRule {
                kind,
                method: Method::Redact,
                keep: 0,
                client,
            })
            .collect();
        Masker::new(
            MaskingConfig {
                columns: vec![ColumnRule {
                    connections: vec![],
                    table: "public.cust*".into(),
                    column: "ssn".into(),
                    method: Method::KeepLast,
                    keep: 4,
                    client: true,
                }],
                detectors,
            },
            b"key-1".to_vec(),
        )
    }

    fn masked(text: &str) -> (String, Counts) {
        let mut counts = Counts::new();
        let out = masker(false)
            .mask(text, None, false, Some(&mut counts))
            .into_owned();
        (out, counts)
    }

    #[test]
    fn detectors_find_their_entities() {
        for (text, kind) in [
            ("mail me at ada.lovelace+x@example.co.uk today", "email"),
            ("card 4111 1111 1111 1111 on file", "card"),
            ("card 4111-1111-1111-1111", "card"),
            ("ssn 123-45-6789", "us_ssn"),
            ("call +44 20 7946 0958", "phone"),
            ("call (415) 555-2671", "phone"),
            ("iban GB82 WEST 1234 5698 7654 32", "iban"),
            ("iban DE89370400440532013000", "iban"),
            (
                "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
                "secret",
            ),
            ("key sk-proj-abcdefghijklmnopqrstuvwx", "secret"),
            ("aws AKIAIOSFODNN7EXAMPLE", "secret"),
            (
                "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
                "secret",
            ),
        ] {
            let (out, counts) = masked(text);
            assert_eq!(counts.get(kind), Some(&1), "{text} -> {out} {counts:?}");
            assert!(out.contains("[redacted]"), "{text} -> {out}");
        }
    }

    #[test]
    fn look_alikes_are_left_alone() {
        for text in [
            "card 4111 1111 1111 1112", // fails Luhn
            "ssn 000-12-3456",          // invalid area
            "ssn 666-12-3456",
            "iban GB82 WEST 1234 5698 7654 33", // bad checksum
            "date 2026-11-27 and time 10:45:00",
            "order 12345 shipped",
            "not an email: foo@bar",
            "version 1.2.3.4",
        ] {
            let (out, counts) = masked(text);
            assert!(counts.is_empty(), "{text} -> {out} {counts:?}");
            assert_eq!(out, text);
        }
    }

    #[test]
    fn methods() {
        let m = masker(false);
        assert_eq!(
            m.apply(Method::KeepLast, 4, EntityKind::Card, "4111-1111-1111-1111"),
            "****-****-****-1111"
        );
        let a = m.apply(Method::Token, 0, EntityKind::Email, "a@example.com");
        assert_eq!(
            a,
            m.apply(Method::Token, 0, EntityKind::Email, "a@example.com")
        );
        assert_ne!(
            a,
            m.apply(Method::Token, 0, EntityKind::Email, "b@example.com")
        );
        let other = Masker::new(MaskingConfig::default(), b"key-2".to_vec());
        assert_ne!(
            a,
            other.apply(Method::Token, 0, EntityKind::Email, "a@example.com")
        );
        assert!(a.starts_with("tok_") && a.len() == 20);
    }

    #[test]
    fn column_rules_and_client_copies() {
        let m = masker(false);
        let rule = m.column_rule("app", "public", "customers", "ssn").unwrap();
        assert!(m.column_rule("app", "other", "customers", "ssn").is_none());
        assert!(m
            .column_rule("app", "public", "customers", "name")
            .is_none());
        assert_eq!(m.mask("123-45-6789", Some(rule), true, None), "***-**-6789");
        // Detectors here are audit-only: the client copy keeps the email.
        assert_eq!(m.mask("a@example.com", None, true, None), "a@example.com");
        assert_eq!(m.mask("a@example.com", None, false, None), "[redacted]");
        assert!(m.masks_clients("app"));
    }

    #[test]
    fn globs() {
        assert!(glob("cust*", "customers"));
        assert!(glob("*.customers", "public.customers"));
        assert!(glob("c?stomers", "Customers"));
        assert!(!glob("cust", "customers"));
    }
}
