//! Masking a statement for the person who approves it, without changing how it reads.
//!
//! The detectors work on plain text: a match may run across a line break, a quote or a comment
//! marker, and its replacement (`[redacted]`, `tok_…`, or `*` for kept-last characters) may
//! join what follows into a comment (`10/` then `****1111` reads as `10/*`). An approver who
//! reads such a copy approves a different statement from the one that runs. So the statement
//! is cut into the lexer's tokens (PostgreSQL's own scanner) and masked token by token, line by
//! line: a literal or comment keeps its delimiters and only its inside is masked; any other
//! token with something to mask is shown whole as `[redacted]`; the space between tokens is
//! kept as it is. A token whose masked inside would no longer close where it closed (a quote,
//! a dollar tag or a comment marker gained or lost) cannot be shown faithfully: the caller
//! refuses to hold the statement rather than show it.

use super::{Counts, Masker};
use pg_query::protobuf::Token;
use std::fmt;

/// The statement cannot be shown masked without changing how it reads.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfaithful(pub String);

impl fmt::Display for Unfaithful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What stands for a token that holds a detected value but has no inside to mask.
const PLACEHOLDER: &str = "[redacted]";

/// The statement with detected values masked, token by token (see the module docs).
pub fn mask_statement(
    masker: &Masker,
    sql: &str,
    counts: &mut Counts,
) -> Result<String, Unfaithful> {
    if !masker.is_active() {
        return Ok(sql.to_string());
    }
    let tokens = pg_query::scan_tokens(sql)
        .map_err(|e| Unfaithful(format!("the statement cannot be read token by token: {e}")))?;
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for t in &tokens {
        let (start, end) = (t.start as usize, t.end as usize);
        let (Some(gap), Some(text)) = (sql.get(at..start), sql.get(start..end)) else {
            return Err(Unfaithful("the statement's tokens do not cover it".into()));
        };
        out.push_str(gap);
        at = end;
        let Some((open, inner, close, markers)) = delimited(t.token, text) else {
            let masked = by_line(masker, text, counts);
            out.push_str(if masked == text { text } else { PLACEHOLDER });
            continue;
        };
        let masked = by_line(masker, inner, counts);
        if markers
            .iter()
            .any(|m| masked.matches(m).count() != inner.matches(m).count())
        {
            return Err(Unfaithful(format!(
                "masking a value would change where a {} ends",
                if t.token == Token::SqlComment as i32 || t.token == Token::CComment as i32 {
                    "comment"
                } else {
                    "literal"
                }
            )));
        }
        out.push_str(open);
        out.push_str(&masked);
        out.push_str(close);
    }
    out.push_str(&sql[at..]);
    Ok(out)
}

/// A literal, quoted identifier or comment: its opening, inside, closing, and the markers whose
/// count inside must not change.
fn delimited(token: i32, text: &str) -> Option<(&str, &str, &str, &'static [&'static str])> {
    let quoted = |q: char, markers: &'static [&'static str]| {
        let open = text.find(q)? + 1;
        let close = text
            .len()
            .checked_sub(1)
            .filter(|&c| c >= open && text.ends_with(q))?;
        Some((&text[..open], &text[open..close], &text[close..], markers))
    };
    if token == Token::SqlComment as i32 {
        return Some((&text[..2], &text[2..], "", &["\n", "\r"]));
    }
    if token == Token::CComment as i32 {
        let close = text.len().checked_sub(2).filter(|&c| c >= 2)?;
        return Some((&text[..2], &text[2..close], &text[close..], &["/*", "*/"]));
    }
    let literal = [Token::Sconst, Token::Usconst, Token::Bconst, Token::Xconst]
        .iter()
        .any(|k| *k as i32 == token);
    if literal && text.starts_with('$') {
        // Dollar quoting: `$tag$ … $tag$`.
        let tag = text[1..].find('$')? + 2;
        let close = text.len().checked_sub(tag).filter(|&c| c >= tag)?;
        return Some((&text[..tag], &text[tag..close], &text[close..], &["$"]));
    }
    if literal {
        return quoted('\'', &["'", "\\"]);
    }
    if (token == Token::Ident as i32 || token == Token::Uident as i32) && text.ends_with('"') {
        return quoted('"', &["\""]);
    }
    None
}

/// Masks each line of `text` on its own: no replacement spans a line break.
fn by_line(masker: &Masker, text: &str, counts: &mut Counts) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            let body = line.trim_end_matches(['\n', '\r']);
            let masked = masker.mask(body, None, false, Some(counts));
            format!("{masked}{}", &line[body.len()..])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::masking::{DetectorRule, MaskingConfig, Method};

    fn masker(method: Method) -> Masker {
        Masker::new(
            MaskingConfig {
                columns: Vec::new(),
                detectors: DetectorRule::every_kind(method, false),
            },
            b"key".to_vec(),
        )
    }

    fn shown(method: Method, sql: &str) -> Result<String, Unfaithful> {
        mask_statement(&masker(method), sql, &mut Counts::new())
    }

    /// The statement's tokens, by kind: what masking must leave as it is.
    fn kinds(sql: &str) -> Vec<i32> {
        pg_query::scan_tokens(sql)
            .unwrap()
            .iter()
            .map(|t| t.token)
            .collect()
    }

    #[test]
    fn values_are_masked_inside_their_literals_and_comments() {
        let sql =
            "UPDATE t SET note = 'mail alice@example.com' -- by bob@example.com\nWHERE id = 1";
        let out = shown(Method::Redact, sql).unwrap();
        assert_eq!(
            out,
            "UPDATE t SET note = 'mail [redacted]' -- by [redacted]\nWHERE id = 1"
        );
        assert_eq!(kinds(&out), kinds(sql));
    }

    #[test]
    fn a_detected_value_never_swallows_a_line_break() {
        // A phone number's separators may be white space: across a line end the second line
        // would vanish into the comment.
        for sql in [
            "DELETE FROM t -- call 415 555\n2671 OR true\nWHERE id = 1",
            "SELECT 1 /* 415 555\n2671 */ , 2",
            "SELECT 'x 415 555\n2671 y'",
        ] {
            for method in [Method::Redact, Method::KeepLast, Method::Token] {
                let out = shown(method, sql).unwrap();
                assert_eq!(out.lines().count(), sql.lines().count(), "{sql} -> {out}");
                assert_eq!(kinds(&out), kinds(sql), "{sql} -> {out}");
            }
        }
    }

    #[test]
    fn a_masked_number_cannot_open_a_comment() {
        // Kept-last masking turns digits into `*`: after `/` that would read as `/*`.
        let sql = "UPDATE t SET a = 10/4111111111111111 WHERE id = 1";
        let out = shown(Method::KeepLast, sql).unwrap();
        assert_eq!(out, "UPDATE t SET a = 10/[redacted] WHERE id = 1");
        assert!(!out.contains("/*"));
    }

    #[test]
    fn masking_that_would_move_a_delimiter_is_refused() {
        // A kept-last mask inside a comment makes `*` next to `/`.
        let sql = "SELECT 1 /* 4111111111111111/ */";
        assert!(shown(Method::KeepLast, sql).is_err());
        // Dollar quotes, escaped quotes and identifiers keep their delimiters.
        for sql in [
            "SELECT $q$ alice@example.com $q$",
            "SELECT E'it''s alice@example.com\\n'",
            "SELECT 1 AS \"alice@example.com\"",
        ] {
            let out = shown(Method::Redact, sql).unwrap();
            assert!(!out.contains("alice@"), "{out}");
            assert_eq!(kinds(&out), kinds(sql), "{sql} -> {out}");
        }
    }

    #[test]
    fn nothing_to_mask_leaves_the_text_as_it_is() {
        let sql = "SELECT a, b FROM t WHERE c = $1 -- plain\n";
        assert_eq!(shown(Method::Redact, sql).unwrap(), sql);
    }
}
