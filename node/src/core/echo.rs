//! Client text quoted in a refusal: what a client sent that the gateway names when it says why
//! it refused (a grant type, a provider's error, an XML encoding), in the answer and in the
//! audit record's `detail`.
//!
//! A client chooses the size of what it sends, and a record must stay small enough for one
//! Kafka message (docs/configuration.md, "Record size"): a record over the topic's limit is
//! never delivered and holds up every record behind it. So the text is quoted with its control
//! and other unprintable characters escaped, at most [`MAX_QUOTED`] bytes of it; longer text
//! is cut there and followed by its full length and SHA-256, which still tell two attempts
//! apart and match a copy of what was sent.

use sha2::Digest as _;

/// The longest quotation, in bytes of escaped text (the quotes not counted).
pub const MAX_QUOTED: usize = 256;

/// `text` quoted and escaped (`"…"`); when it is longer than [`MAX_QUOTED`] escaped, its first
/// part, `…`, and `(N bytes, SHA-256 HEX)` of the whole.
pub fn client_text(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len().min(MAX_QUOTED) + 2);
    quoted.push('"');
    let mut escaped = 0;
    for c in text.chars() {
        let e = c.escape_debug();
        if escaped + e.len() > MAX_QUOTED {
            return format!(
                "{quoted}…\" ({} bytes, SHA-256 {})",
                text.len(),
                hex::encode(sha2::Sha256::digest(text.as_bytes()))
            );
        }
        escaped += e.len();
        quoted.extend(e);
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_whole_and_escaped() {
        assert_eq!(client_text("password"), "\"password\"");
        assert_eq!(
            client_text("a\"b\\c\nd\u{1b}[2J"),
            "\"a\\\"b\\\\c\\nd\\u{1b}[2J\""
        );
        let exact = "x".repeat(MAX_QUOTED);
        assert_eq!(client_text(&exact), format!("\"{exact}\""));
    }

    #[test]
    fn long_text_is_cut_with_its_length_and_hash() {
        let long = "a".repeat(1_900_000);
        let q = client_text(&long);
        let hash = hex::encode(sha2::Sha256::digest(long.as_bytes()));
        assert_eq!(
            q,
            format!(
                "\"{}…\" (1900000 bytes, SHA-256 {hash})",
                "a".repeat(MAX_QUOTED)
            )
        );
        // Escapes count: 300 control characters quote as at most MAX_QUOTED bytes of escapes,
        // never cut inside one.
        let controls = "\u{1}".repeat(300);
        let q = client_text(&controls);
        let inside = q.split('…').next().unwrap().trim_start_matches('"');
        assert!(inside.len() <= MAX_QUOTED, "{q}");
        assert_eq!(inside.len() % "\\u{1}".len(), 0, "{q}");
        assert!(q.ends_with(&format!(
            "(300 bytes, SHA-256 {})",
            hex::encode(sha2::Sha256::digest(controls.as_bytes()))
        )));
    }
}
