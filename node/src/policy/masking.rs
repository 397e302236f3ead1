//! Masking of values: column rules (connection, table and column globs) and value detectors
//! (email, card numbers with Luhn, US SSN, phone numbers, IBAN with its checksum, bearer
//! tokens and API keys). Pure: values in, masked values and counts out.
//!
//! The audit copy of results (and of bind parameters and statement text) is always masked by
//! every rule and detector; the client copy only by the rules marked `client = true`.
//!
//! Every candidate of a detector is tried: one that fails its check (Luhn, mod 97, the SSN
//! rules) does not hide a shorter or later one in the same text. A find is replaced and nothing
//! around it, so masked text keeps its lines, quotes and brackets.
//!
//! What it does not guarantee: detectors are patterns, not understanding. A value split over
//! several columns, encoded (base64, hex), written with unusual separators, a card number glued
//! to other digits or an IBAN of a country outside the registry is not found. The recall measured
//! on the generated corpus (`corpus.rs`) holds for the corpus's shapes only.
//! Column rules follow the table and column a result column comes from (as PostgreSQL reports
//! them); an expression over a column (`lower(email)`) has no table and only the detectors
//! apply to it.

use hmac::{Hmac, Mac};
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
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

/// What [`Method::Redact`] puts in place of a value.
pub const REDACTED: &str = "[redacted]";
const TOKEN_PREFIX: &str = "tok_";

/// A mask in `text` that a client copy may carry: the redaction text or a token. (A
/// `keep_last` mask cannot be told apart from data.)
pub fn produced_mask(text: &str) -> Option<&str> {
    let (at, len) = mask_in(text.as_bytes(), true)?;
    Some(&text[at..at + len])
}

/// Where the first mask of [`produced_mask`] is in `b`, as (offset, length). With `ended`
/// false more bytes follow `b`, so a token at its very end is not one yet (a hex digit next
/// would make it longer than a token).
fn mask_in(b: &[u8], ended: bool) -> Option<(usize, usize)> {
    if let Some(at) = memchr::memmem::find(b, REDACTED.as_bytes()) {
        return Some((at, REDACTED.len()));
    }
    let hex = |c: &u8| matches!(c, b'0'..=b'9' | b'a'..=b'f');
    memchr::memmem::find_iter(b, TOKEN_PREFIX).find_map(|at| {
        let digits = at + TOKEN_PREFIX.len();
        let end = digits + TOKEN_DIGITS;
        let token = b.get(digits..end).is_some_and(|d| d.iter().all(hex))
            && b.get(end).map_or(ended, |c| !hex(c));
        token.then_some((at, end - at))
    })
}

const TOKEN_DIGITS: usize = 16;

/// [`produced_mask`] over a stream that arrives in chunks (COPY data): a mask split between
/// two chunks is found, and a token at the end of a chunk waits for the byte after it.
#[derive(Debug, Default)]
pub struct MaskScan {
    /// The stream's last bytes, where a mask may have begun that the next chunk completes.
    held: Vec<u8>,
}

impl MaskScan {
    /// A mask that begins before a chunk's last bytes is decided once that byte follows.
    const HELD: usize = TOKEN_PREFIX.len() + TOKEN_DIGITS;

    /// The first mask the stream holds once `chunk` is added, if its end is known.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<String> {
        // A mask that begins in the held bytes ends within the chunk's first bytes.
        let mut seam = std::mem::take(&mut self.held);
        seam.extend_from_slice(&chunk[..chunk.len().min(Self::HELD + 1)]);
        let found = mask_in(&seam, false)
            .map(|(at, len)| &seam[at..at + len])
            .or_else(|| mask_in(chunk, false).map(|(at, len)| &chunk[at..at + len]))
            .map(|m| String::from_utf8_lossy(m).into_owned());
        let keep = |b: &[u8]| b[b.len().saturating_sub(Self::HELD)..].to_vec();
        self.held = if chunk.len() >= Self::HELD {
            keep(chunk)
        } else {
            keep(&seam)
        };
        found
    }

    /// At the stream's end: a token its last bytes held.
    pub fn finish(&mut self) -> Option<String> {
        let held = std::mem::take(&mut self.held);
        mask_in(&held, true)
            .map(|(at, len)| String::from_utf8_lossy(&held[at..at + len]).into_owned())
    }
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

impl DetectorRule {
    /// One rule per detected kind, all with `method` (tests and benchmarks).
    pub fn every_kind(method: Method, client: bool) -> Vec<DetectorRule> {
        EntityKind::DETECTED
            .into_iter()
            .map(|kind| DetectorRule {
                kind,
                method,
                keep: 0,
                client,
            })
            .collect()
    }
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

/// Luhn over the digits of `s` (other characters are skipped).
fn luhn(s: &str) -> bool {
    let mut sum = 0u32;
    for (i, d) in s.bytes().rev().filter(u8::is_ascii_digit).enumerate() {
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

/// ISO 7064 mod 97 of an IBAN (spaces skipped), its first four characters moved to the end:
/// 1 for a valid IBAN. `iban` holds only capital letters, digits and spaces.
fn iban_mod97(iban: &[u8]) -> u32 {
    let chars = || iban.iter().copied().filter(|&c| c != b' ');
    chars().skip(4).chain(chars().take(4)).fold(0, |rem, c| {
        if c.is_ascii_digit() {
            (rem * 10 + u32::from(c - b'0')) % 97
        } else {
            (rem * 100 + u32::from(c - b'A') + 10) % 97
        }
    })
}

/// The length of an IBAN of `country`, for the countries of the SWIFT IBAN registry.
fn iban_length(country: &[u8]) -> Option<usize> {
    Some(match country {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FK" | b"FO" | b"GL" | b"NL" | b"SD" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"MN" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"OM" | b"SO" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"LY" | b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"BI" | b"DJ" | b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"NI" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" | b"YE" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        b"RU" => 33,
        _ => return None,
    })
}

/// The byte ranges of the groups of `region`, split at every byte of `separators`.
fn groups(region: &str, separators: &[u8]) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (i, b) in region.bytes().enumerate() {
        if separators.contains(&b) {
            groups.push(start..i);
            start = i + 1;
        }
    }
    groups.push(start..region.len());
    groups
}

/// Adds `found` to finds sorted by start, merging it into the last one when they overlap.
fn push_merged(finds: &mut Vec<Range<usize>>, found: Range<usize>) {
    match finds.last_mut() {
        Some(last) if found.start < last.end => last.end = last.end.max(found.end),
        _ => finds.push(found),
    }
}

/// The whole region is the entity.
fn whole(region: &str, finds: &mut Vec<Range<usize>>) {
    finds.push(0..region.len());
}

/// `Bearer <token>` is masked from the token on, so the whitespace before it (which may be a
/// line break) stays; other secrets are masked whole.
fn secret(region: &str, finds: &mut Vec<Range<usize>>) {
    let start = match region.get(..6) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer") => {
            region.len() - region[6..].trim_start().len()
        }
        _ => 0,
    };
    finds.push(start..region.len());
}

/// Every run of whole digit groups (the region's digits, separated by single spaces or dashes)
/// holding 13 to 19 digits and passing Luhn: a run that fails does not hide a shorter or later
/// one (`4111 1111 1111 1111 12/28`, `ref 42 4111111111111111`). Overlapping runs are masked as
/// one.
fn cards(region: &str, finds: &mut Vec<Range<usize>>) {
    let groups = groups(region, b" -");
    for (i, first) in groups.iter().enumerate() {
        let mut digits = 0;
        for last in &groups[i..] {
            digits += last.len();
            if digits > 19 {
                break;
            }
            if digits >= 13 && luhn(&region[first.start..last.end]) {
                push_merged(finds, first.start..last.end);
            }
        }
    }
}

/// Three consecutive whole groups of a dash-separated run of digits shaped `ddd-dd-dddd` (so
/// not part of a longer number), with area not `000`, `666` or `9xx`, group not `00` and serial
/// not `0000`.
fn ssns(region: &str, finds: &mut Vec<Range<usize>>) {
    for w in groups(region, b"-").windows(3) {
        let [area, group, serial] = [0, 1, 2].map(|k| &region[w[k].clone()]);
        if area.len() == 3
            && group.len() == 2
            && serial.len() == 4
            && area != "000"
            && area != "666"
            && !area.starts_with('9')
            && group != "00"
            && serial != "0000"
        {
            finds.push(w[0].start..w[2].end);
        }
    }
}

/// From every position of the region where a country code and two digits start, the IBAN
/// length of that country (single spaces not counted), if it passes mod 97: what follows
/// (`EUR`, more digits) is not part of it.
fn ibans(region: &str, finds: &mut Vec<Range<usize>>) {
    let b = region.as_bytes();
    let mut start = 0;
    while start < b.len() {
        match iban_at(b, start) {
            Some(end) => {
                finds.push(start..end);
                start = end;
            }
            None => start += 1,
        }
    }
}

/// The end of the IBAN that starts at `start` of `b`, if one does.
fn iban_at(b: &[u8], start: usize) -> Option<usize> {
    let head = b.get(start..start + 4)?;
    if !(head[..2].iter().all(u8::is_ascii_uppercase) && head[2..].iter().all(u8::is_ascii_digit)) {
        return None;
    }
    let len = iban_length(&head[..2])?;
    let mut chars = 0;
    let last = b[start..].iter().position(|&c| {
        chars += usize::from(c != b' ');
        chars == len
    })?;
    let end = start + last + 1;
    (iban_mod97(&b[start..end]) == 1).then_some(end)
}

/// 8 to 15 digits in all.
fn phone(region: &str, finds: &mut Vec<Range<usize>>) {
    let digits = region.bytes().filter(u8::is_ascii_digit).count();
    if (8..=15).contains(&digits) {
        finds.push(0..region.len());
    }
}

struct Detector {
    kind: EntityKind,
    /// Candidate regions: every entity of the kind lies inside one match, so a value without a
    /// match holds none (and `hinted` tells most such values without running it). Regions are
    /// ASCII except for `email` and `secret`.
    re: Regex,
    /// The entities inside one region, as byte ranges of the region, in order and disjoint.
    find: fn(&str, &mut Vec<Range<usize>>),
}

/// A set of entity kinds.
#[derive(Clone, Copy, Default)]
struct Kinds(u8);

impl Kinds {
    fn insert(&mut self, kind: EntityKind) {
        self.0 |= 1 << kind as u8;
    }

    fn contains(self, kind: EntityKind) -> bool {
        self.0 & 1 << kind as u8 != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The kinds whose detector pattern may match `text`, in one pass over its bytes: a pattern
/// cannot match a text without its hint, so the regex of a kind left out is not run (and most
/// values hold no hint at all). Every hint is ASCII and no byte of a non-ASCII character is,
/// so bytes are compared. The hints, each implied by its pattern:
/// - secret: `bearer` in any case (no other character folds to its letters), `k-` (`sk-`,
///   `pk-`, `rk-`), `gh`, one of `pousr` and `_`, `xox`, one of `abpr` and `-`, `AKIA`, `eyJ`;
/// - iban: two capitals and two digits;
/// - card: 13 digits;
/// - us_ssn: a digit, `-` and a digit;
/// - email: `@`;
/// - phone: `+` and a digit, or a digit, `.` or `-` and a digit (`(415) 555-2671` has one).
///
/// Each is looked for at one of its bytes in `HINT_BYTES`: no lower-case letter but the rare
/// `b`, since those make most of a text.
fn hinted(text: &str) -> Kinds {
    const HINT_BYTES: [bool; 256] = {
        let mut table = [false; 256];
        let bytes = b"0123456789@+-_AJbB";
        let mut k = 0;
        while k < bytes.len() {
            table[bytes[k] as usize] = true;
            k += 1;
        }
        table
    };
    let b = text.as_bytes();
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let after = |i: usize, literal: &[u8]| b[..i].ends_with(literal);
    let mut kinds = Kinds::default();
    let mut digits = 0;
    for (i, &c) in b.iter().enumerate() {
        if !HINT_BYTES[usize::from(c)] {
            continue;
        }
        match c {
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 13 {
                    kinds.insert(EntityKind::Card);
                }
                let next = at(i + 1);
                if matches!(next, b'-' | b'.') && at(i + 2).is_ascii_digit() {
                    kinds.insert(EntityKind::Phone);
                    if next == b'-' {
                        kinds.insert(EntityKind::UsSsn);
                    }
                }
                if next.is_ascii_digit() && i >= 2 && b[i - 2..i].iter().all(u8::is_ascii_uppercase)
                {
                    kinds.insert(EntityKind::Iban);
                }
            }
            b'@' => kinds.insert(EntityKind::Email),
            b'+' if at(i + 1).is_ascii_digit() => kinds.insert(EntityKind::Phone),
            b'-' if after(i, b"k")
                || (i >= 4 && after(i - 1, b"xox") && b"abpr".contains(&b[i - 1])) =>
            {
                kinds.insert(EntityKind::Secret)
            }
            b'_' if i >= 3 && after(i - 1, b"gh") && b"pousr".contains(&b[i - 1]) => {
                kinds.insert(EntityKind::Secret)
            }
            b'A' if b[i..].starts_with(b"AKIA") => kinds.insert(EntityKind::Secret),
            b'J' if after(i, b"ey") => kinds.insert(EntityKind::Secret),
            b'b' | b'B'
                if b.get(i..i + 6)
                    .is_some_and(|w| w.eq_ignore_ascii_case(b"bearer")) =>
            {
                kinds.insert(EntityKind::Secret)
            }
            _ => {}
        }
    }
    kinds
}

fn detectors() -> &'static [Detector] {
    static D: OnceLock<Vec<Detector>> = OnceLock::new();
    D.get_or_init(|| {
        let d = |kind, re: &str, find| Detector {
            kind,
            re: Regex::new(re).expect("a valid detector pattern"),
            find,
        };
        vec![
            // Order matters: earlier kinds claim their text first.
            d(
                EntityKind::Secret,
                r"(?i:\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*)|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bAKIA[0-9A-Z]{16}\b|\bxox[abpr]-[A-Za-z0-9-]{10,}\b|\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
                secret,
            ),
            d(
                EntityKind::Iban,
                r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,}",
                ibans,
            ),
            d(EntityKind::Card, r"[0-9](?:[ -]?[0-9]){12,}", cards),
            d(EntityKind::UsSsn, r"[0-9]+(?:-[0-9]+){2,}", ssns),
            d(
                EntityKind::Email,
                r"[\p{L}\p{M}\p{N}._%+-]+@[\p{L}\p{M}\p{N}-]+(?:\.[\p{L}\p{M}\p{N}-]+)*\.(?:\p{L}[\p{L}\p{M}]+|xn--[a-z0-9-]+)",
                whole,
            ),
            d(
                EntityKind::Phone,
                r"\+[0-9]{1,3}(?:[ .-]?[0-9]{1,4}){2,5}\b|\([0-9]{3}\) ?[0-9]{3}-[0-9]{4}\b|\b[0-9]{3}[.-][0-9]{3}[.-][0-9]{4}\b",
                phone,
            ),
        ]
    })
}

/// The masking in force for one node.
pub struct Masker {
    config: MaskingConfig,
    /// The HMAC of `Method::Token`, keyed once: each token starts from a copy.
    token_mac: Hmac<Sha256>,
}

impl Masker {
    pub fn new(config: MaskingConfig, key: Vec<u8>) -> Self {
        let token_mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
        Self { config, token_mac }
    }

    pub fn has_column_rules(&self) -> bool {
        !self.config.columns.is_empty()
    }

    pub fn is_active(&self) -> bool {
        !self.config.columns.is_empty() || !self.config.detectors.is_empty()
    }

    /// What a recorded chunk's record keeps: the bytes, with the value detectors applied when
    /// the chunk is UTF-8 text (the client and the target get the original). A value split
    /// between two chunks, or a chunk that splits a character, is not seen by the detectors
    /// (docs/ssh.md).
    pub fn chunk_copy(&self, bytes: &[u8], counts: &mut Counts) -> Vec<u8> {
        let text = match std::str::from_utf8(bytes) {
            Ok(text) if self.is_active() => text,
            _ => return bytes.to_vec(),
        };
        self.mask(text, None, false, Some(counts))
            .into_owned()
            .into_bytes()
    }

    /// Whether any rule masks what clients receive on `connection`.
    pub fn masks_clients(&self, connection: &str) -> bool {
        self.config.detectors.iter().any(|d| d.client) || self.client_columns(connection)
    }

    /// Whether a result column PostgreSQL reports no table for (a set operation's, a scalar
    /// subquery's, a cast's) may carry a value a column rule covers, in a statement that names
    /// `tables` (as written: `table` or `schema.table`) and references `columns` (`*` for a
    /// star): some rule of the connection names one of those tables and one of those columns.
    /// `Some(client)` then, `client` when such a rule also masks the client's copy.
    pub fn derives<'a>(
        &self,
        connection: &str,
        tables: impl IntoIterator<Item = &'a str> + Clone,
        columns: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Option<bool> {
        // A name as written may be unqualified: it may be the rule's table in any schema.
        fn last(name: &str) -> &str {
            name.rsplit('.').next().unwrap_or(name)
        }
        let names = |rule: &str, written: &str| {
            glob(rule, written)
                || (!rule.contains('.') && glob(rule, last(written)))
                || (!written.contains('.') && glob(last(rule), written))
        };
        let mut found = None;
        for r in self
            .config
            .columns
            .iter()
            .filter(|r| connects(r, connection))
        {
            let table = tables.clone().into_iter().any(|t| names(&r.table, t));
            let column = || {
                columns
                    .clone()
                    .into_iter()
                    .any(|c| c == "*" || glob(&r.column, c))
            };
            if table && column() {
                found = Some(found.unwrap_or(false) || r.client);
            }
        }
        found
    }

    /// Whether a column rule of the connection masks the client's copy.
    pub fn client_columns(&self, connection: &str) -> bool {
        self.config
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
            Method::Redact => REDACTED.to_string(),
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
                let mut mac = self.token_mac.clone();
                mac.update(kind.label().as_bytes());
                mac.update(&[0]);
                mac.update(value.as_bytes());
                let tag = mac.finalize().into_bytes();
                let mut hex = [0; 16];
                hex::encode_to_slice(&tag[..8], &mut hex).expect("8 bytes are 16 hex digits");
                [
                    TOKEN_PREFIX,
                    std::str::from_utf8(&hex).expect("hex digits are ASCII"),
                ]
                .concat()
            }
        }
    }

    /// Masks one value. `rule` is the column rule of its column, if any; `client` selects the
    /// client copy (only rules marked `client`). Counts go to `counts` when given.
    /// Looks through a value that cannot be masked as text (binary, or not UTF-8) with the
    /// detectors, reading its runs of text as text. `true` when they find something: the value
    /// is then hidden whole, since a mask inside its bytes would hide nothing.
    pub fn detects_in_bytes(
        &self,
        value: &[u8],
        client: bool,
        counts: Option<&mut Counts>,
    ) -> bool {
        let text = String::from_utf8_lossy(value);
        matches!(self.mask(&text, None, client, counts), Cow::Owned(_))
    }

    /// [`Masker::mask`] of a value the caller owns: the value itself back when nothing in it
    /// is masked (no copy).
    pub fn mask_owned(&self, value: String, counts: Option<&mut Counts>) -> String {
        match self.mask(&value, None, false, counts) {
            Cow::Owned(masked) => masked,
            Cow::Borrowed(_) => value,
        }
    }

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
        if self.config.detectors.is_empty() {
            return Cow::Borrowed(value);
        }
        let kinds = hinted(value);
        if kinds.is_empty() {
            return Cow::Borrowed(value);
        }
        // Every detector looks at the original value; what an earlier one found is claimed, and
        // a later find overlapping it is dropped. Kept sorted by start and disjoint.
        let mut claimed: Vec<(Range<usize>, EntityKind, &DetectorRule)> = Vec::new();
        let mut finds = Vec::new();
        for det in detectors() {
            if !kinds.contains(det.kind) {
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
            let before = claimed.len();
            for region in det.re.find_iter(value) {
                (det.find)(region.as_str(), &mut finds);
                for f in finds.drain(..) {
                    let f = region.start() + f.start..region.start() + f.end;
                    let prior = &claimed[..before];
                    let next = prior.partition_point(|(p, ..)| p.end <= f.start);
                    if prior.get(next).is_none_or(|(p, ..)| p.start >= f.end) {
                        claimed.push((f, det.kind, rule));
                    }
                }
            }
            if before > 0 && claimed.len() > before {
                claimed.sort_unstable_by_key(|(f, ..)| f.start);
            }
        }
        if claimed.is_empty() {
            return Cow::Borrowed(value);
        }
        let mut out = String::with_capacity(value.len());
        let mut last = 0;
        for (f, kind, rule) in claimed {
            out.push_str(&value[last..f.start]);
            out.push_str(&self.apply(rule.method, rule.keep, kind, &value[f.clone()]));
            last = f.end;
            if let Some(c) = counts.as_deref_mut() {
                *c.entry(kind.label().into()).or_default() += 1;
            }
        }
        out.push_str(&value[last..]);
        Cow::Owned(out)
    }
}

fn connects(r: &ColumnRule, connection: &str) -> bool {
    r.connections.is_empty() || r.connections.iter().any(|c| glob(c, connection))
}

#[cfg(test)]
mod corpus;
mod statement;
pub use statement::{
    mask_recorded, mask_statement, scrub_values, without_credentials, Taken, Unfaithful,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(client: bool) -> Masker {
        let detectors = DetectorRule::every_kind(Method::Redact, client);
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
    fn every_candidate_is_tried() {
        for (text, want) in [
            // A longer run fails Luhn; the card inside it does not.
            ("card 4111 1111 1111 1111 12/28", "card [redacted] 12/28"),
            ("4111111111111111 0528", "[redacted] 0528"),
            ("ref 7 4111111111111111", "ref 7 [redacted]"),
            ("card4111111111111111exp", "card[redacted]exp"),
            ("x=4111-1111-1111-1111-", "x=[redacted]-"),
            // The country's length ends the IBAN, whatever follows.
            ("DE89370400440532013000 EUR", "[redacted] EUR"),
            (
                "IBAN DE89 3704 0044 0532 0130 00 EUR",
                "IBAN [redacted] EUR",
            ),
            ("IBANDE89370400440532013000EUR", "IBAN[redacted]EUR"),
            ("XX12 DE89 3704 0044 0532 0130 00", "XX12 [redacted]"),
            ("SSN123-45-6789", "SSN[redacted]"),
            (
                "000-12-3456-78-9012 and 078-05-1120",
                "000-12-3456-78-9012 and [redacted]",
            ),
            ("josé.müller@bücher.de", "[redacted]"),
            ("contact: 用户@例子.中国, ok", "contact: [redacted], ok"),
            ("<дмитрий@пример.рф>", "<[redacted]>"),
            ("राम@डाक.भारत", "[redacted]"),
        ] {
            assert_eq!(masked(text).0, want, "{text}");
        }
        for text in [
            "order 0123-45-6789",
            "14111111111111111",
            "IBAN XX89370400440532013000",
        ] {
            assert_eq!(masked(text).0, text);
        }
    }

    #[test]
    fn masking_keeps_the_structure_around_a_value() {
        for (text, want) in [
            (
                "-- Authorization: Bearer\nabcdefghijklmnopqrstuvwxyz\nDELETE FROM t",
                "-- Authorization: Bearer\n[redacted]\nDELETE FROM t",
            ),
            (
                "SELECT 1; -- 4111 1111 1111 1111\nDELETE FROM t",
                "SELECT 1; -- [redacted]\nDELETE FROM t",
            ),
            (
                "'a@example.com'\n'123-45-6789'",
                "'[redacted]'\n'[redacted]'",
            ),
        ] {
            assert_eq!(masked(text).0, want, "{text}");
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
        assert_eq!(produced_mask(&format!("SET x = '{a}',")), Some(a.as_str()));
        assert_eq!(produced_mask("[redacted] x"), Some("[redacted]"));
        for text in [
            "tok_0123",
            "tok_0123456789abcdef0",
            "tok_0123456789ABCDEF",
            "****1234",
        ] {
            assert_eq!(produced_mask(text), None, "{text}");
        }
    }

    /// COPY data arrives in chunks: a mask is found wherever the chunks split it, once its
    /// end is known, and never where the whole stream holds none.
    #[test]
    fn masks_in_a_stream_of_chunks() {
        let chunked = |stream: &str, cuts: &[usize]| {
            let mut scan = MaskScan::default();
            let mut from = 0;
            for &cut in cuts.iter().chain([stream.len()].iter()) {
                if let Some(m) = scan.feed(&stream.as_bytes()[from..cut]) {
                    return Some(m);
                }
                from = cut;
            }
            scan.finish()
        };
        let token = "tok_0123456789abcdef";
        for stream in [
            format!("1\t{token}\n2\tb\n"),
            "1,\"[redacted]\"\n".to_string(),
            format!("1\t{token}"),
            format!("x{token}\ty"),
        ] {
            let whole = produced_mask(&stream).map(str::to_string);
            assert!(whole.is_some(), "{stream}");
            // Every way of cutting the stream in two and in three.
            for a in 0..=stream.len() {
                assert_eq!(chunked(&stream, &[a]), whole, "{stream} cut at {a}");
                for b in a..=stream.len() {
                    assert_eq!(chunked(&stream, &[a, b]), whole, "{stream} cut at {a}, {b}");
                }
            }
            // One byte at a time.
            let cuts: Vec<usize> = (1..stream.len()).collect();
            assert_eq!(chunked(&stream, &cuts), whole, "{stream} byte by byte");
        }
        for stream in [
            format!("1\t{token}0\n"),
            "1\ttok_0123\n[redacte]\n".to_string(),
            format!("{token}f"),
        ] {
            for a in 0..=stream.len() {
                assert_eq!(chunked(&stream, &[a]), None, "{stream} cut at {a}");
            }
            let cuts: Vec<usize> = (1..stream.len()).collect();
            assert_eq!(chunked(&stream, &cuts), None, "{stream} byte by byte");
        }
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
    fn only_ascii_letters_fold_to_the_letters_of_bearer() {
        // `hinted` looks for `bearer` in ASCII cases only.
        let letter = Regex::new("(?i)^[bear]$").expect("a valid pattern");
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            assert!(
                c.is_ascii() || !letter.is_match(c.encode_utf8(&mut [0; 4])),
                "{c:?}"
            );
        }
    }

    #[test]
    fn globs() {
        assert!(glob("cust*", "customers"));
        assert!(glob("*.customers", "public.customers"));
        assert!(glob("c?stomers", "Customers"));
        assert!(!glob("cust", "customers"));
    }
}
