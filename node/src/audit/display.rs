//! Text from records, clients and the coordinator, made safe to print on an operator's terminal.
//!
//! Everything `vigil` prints that it did not write itself (statement text, parameter and result
//! values, column names, application names, principal fields, error messages, approval reasons
//! and comments, details) goes through [`escape`] or [`escape_lines`]. The rule:
//!
//! - `\` is printed `\\`, so every backslash in the output either is the client's own (doubled)
//!   or starts one of the escapes below: what is printed reads back to exactly one text.
//! - Tab, carriage return and newline are printed `\t`, `\r`, `\n`; every other C0 control,
//!   DEL and every C1 control (U+0080–U+009F) is printed `\xHH` (below U+0080) or `\u{HH}`.
//!   An ANSI escape sequence therefore prints as `\x1b[…` (or `\u{9b}…` for the one-character
//!   CSI) and moves no cursor, clears nothing and changes no colour.
//! - Unicode format characters (general category Cf: the bidirectional embeddings, overrides
//!   and isolates U+202A–U+202E and U+2066–U+2069, the marks U+200E, U+200F and U+061C,
//!   zero-width spaces and joiners, the word joiner and invisible operators, the byte-order mark,
//!   soft hyphen, tag characters …), the line and paragraph separators U+2028 and U+2029, and
//!   the invisible Hangul fillers are printed `\u{…}`.
//!
//! - In terminal output (bytes, meant to be UTF-8), a byte that is no part of a UTF-8 character
//!   is printed `\xHH` by [`push_invalid`]: such a byte is 80–FF, so it never reads back as one
//!   of the control escapes above, which are all below 80.
//!
//! [`escape_lines`] is the same rule except for a newline: it is kept as a line break, and the
//! next line starts with [`CONTINUATION`], a marker no line of the CLI's own begins with. So a
//! statement of several lines stays readable, and none of its lines can pass for a line `vigil`
//! wrote (a `\r` before the break is still printed `\r`).
//!
//! What this does not guarantee: combining marks, look-alike characters (homoglyphs),
//! characters of ambiguous width and very long values print as they are, so a value can still
//! look like a different value, or be wide (`vigil approvals show` at a terminal cuts its long
//! lines into marked rows itself: [`fit_rows`]). Values are not quoted, so a value that contains the
//! separator of a list (` | ` between result cells, `, ` between groups) reads like two
//! values. None of these can make a line look like one the CLI wrote, or change what an earlier
//! or later line shows.

use std::borrow::Cow;
use std::fmt::Write as _;

/// What starts every continuation line of a multi-line value printed by [`escape_lines`].
pub const CONTINUATION: &str = "   \u{21b3} ";

/// `s` with every character that could change what a terminal shows escaped; a newline is
/// printed `\n`. Borrows when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    push_escaped(&mut out, s, "\\n");
    Cow::Owned(out)
}

/// `text` (escaped already) with every line wider than `columns` cut into rows of at most
/// `columns`, each row after the first behind [`CONTINUATION`]. A terminal that wraps a long
/// line itself starts its next row with whatever comes there, so a value padded to the edge
/// could put what reads as one of `vigil`'s own lines (`role        postgres`) at the start
/// of a row. Widths are counted as a terminal that takes ambiguous characters as wide would
/// (the larger of the two counts), so a row never reaches past the edge. With too few columns
/// for the marker and a character, `text` is returned as it is.
pub fn fit_rows(text: &str, columns: usize) -> String {
    use unicode_width::UnicodeWidthChar as _;
    let width = |c: char| c.width().unwrap_or(0).max(c.width_cjk().unwrap_or(0));
    let marker: usize = CONTINUATION.chars().map(width).sum();
    if columns < marker + 2 {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let mut used = 0;
        for c in body.chars() {
            let w = width(c);
            if used + w > columns {
                out.push('\n');
                out.push_str(CONTINUATION);
                used = marker;
            }
            out.push(c);
            used += w;
        }
        out.push_str(end);
    }
    out
}

/// [`escape`], except that a newline stays a line break and the next line starts with
/// `indent` followed by [`CONTINUATION`].
pub fn escape_lines<'a>(s: &'a str, indent: &str) -> Cow<'a, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    push_escaped(&mut out, s, &format!("\n{indent}{CONTINUATION}"));
    Cow::Owned(out)
}

/// How a bind parameter is to be read, in the words `vigil approvals show` and the console's
/// inbox both print after its value: its format and the type the client declared at Parse.
/// `binary bytes` says that the value is the parameter's bytes as the client sent them, not
/// the text they may read as: the eight bytes `00000100` of a binary `int8` are the number
/// 3472328296227745840, not 100. A declared type of PostgreSQL's common built-in ones is named
/// (their OIDs are fixed); any other is shown by its OID.
pub fn param_format(binary: bool, type_oid: u32) -> String {
    let format = if binary { "binary bytes" } else { "text" };
    match (type_oid, type_name(type_oid)) {
        (0, _) => format!("{format}, type from the statement"),
        (oid, Some(name)) => format!("{format}, declared type {name} (oid {oid})"),
        (oid, None) => format!("{format}, declared type oid {oid}"),
    }
}

/// The name of a built-in PostgreSQL type by its fixed OID (`pg_type.dat`), for the common ones.
fn type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        700 => "float4",
        701 => "float8",
        790 => "money",
        869 => "inet",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        _ => return None,
    })
}

/// Appends bytes of terminal output that are no part of a UTF-8 character, each as `\xHH`.
pub fn push_invalid(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "\\x{b:02x}");
    }
}

/// The one implementation of the rule: appends `s` to `out`, escaped, with `newline` in place
/// of every `\n`.
fn push_escaped(out: &mut String, s: &str, newline: &str) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str(newline),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if !needs_escape(c) => out.push(c),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || invisible(c)
}

/// Format characters (Cf), line and paragraph separators, and characters that render as
/// nothing (Unicode's Default_Ignorable_Code_Point: variation selectors, fillers, tags).
/// (`char::is_control` covers C0, DEL and C1.)
fn invisible(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x034F
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

#[cfg(test)]
mod tests {
    /// A line wider than the terminal is cut into rows, each after the first behind the
    /// continuation marker: padding cannot bring a forged field line to the start of a row.
    /// Wide and ambiguous characters count two columns.
    #[test]
    fn long_lines_are_cut_into_marked_rows() {
        let forged = format!(
            "statement   SELECT 1{}role        postgres\nrule        r\n",
            " ".repeat(21)
        );
        let rows = fit_rows(&forged, 40);
        for row in rows.lines() {
            assert!(row.chars().count() <= 40, "{row:?}");
            assert!(!row.starts_with("role"), "{rows}");
        }
        assert_eq!(
            rows,
            format!(
                "statement   SELECT 1{}\n{CONTINUATION} role        postgres\nrule        r\n",
                " ".repeat(20)
            )
        );
        assert_eq!(
            fit_rows("世界世界世界", 10),
            format!("世界世界世\n{CONTINUATION}界")
        );
        assert_eq!(fit_rows("short\n", 3), "short\n");
    }

    use super::*;

    /// True when `s` holds nothing a terminal would act on or hide.
    fn inert(s: &str) -> bool {
        !s.chars().any(|c| c.is_control() || invisible(c))
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in [
            "",
            "SELECT name FROM customers WHERE id = $1",
            "héllo wörld ✓ 日本",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s));
            assert!(matches!(escape_lines(s, "  "), Cow::Borrowed(b) if b == s));
        }
    }

    #[test]
    fn a_forged_state_line_stays_on_the_statement_line() {
        let forged = "SELECT 1\r\nstatus: approved by alice";
        assert_eq!(escape(forged), "SELECT 1\\r\\nstatus: approved by alice");
        let lines = escape_lines(forged, "  ");
        assert_eq!(
            lines,
            format!("SELECT 1\\r\n  {CONTINUATION}status: approved by alice")
        );
        // Every line after the first starts with the marker: none can pass for the CLI's own.
        for line in lines.lines().skip(1) {
            assert!(line.starts_with(&format!("  {CONTINUATION}")), "{line:?}");
        }
        // A bare carriage return (overwrite the line so far) is printed, not obeyed.
        assert_eq!(
            escape_lines("DELETE FROM t\rSELECT 1", ""),
            "DELETE FROM t\\rSELECT 1"
        );
    }

    #[test]
    fn ansi_sequences_are_printed_not_obeyed() {
        // Cursor up two lines, clear the line, then a green "approved".
        let s = "x\x1b[2A\x1b[2K\x1b[32mapproved\x1b[0m";
        assert_eq!(escape(s), "x\\x1b[2A\\x1b[2K\\x1b[32mapproved\\x1b[0m");
        // The one-character CSI and OSC of C1, and an OSC 8 hyperlink ended by BEL.
        assert_eq!(escape("\u{9b}1A"), "\\u{9b}1A");
        assert_eq!(escape("\u{9d}0;title\u{9c}"), "\\u{9d}0;title\\u{9c}");
        assert_eq!(
            escape("\x1b]8;;http://x\x07link"),
            "\\x1b]8;;http://x\\x07link"
        );
    }

    #[test]
    fn every_c0_control_del_and_c1_control_is_escaped() {
        for c in (0u32..0x20).chain([0x7f]).chain(0x80..0xa0) {
            let c = char::from_u32(c).unwrap();
            let s = format!("a{c}b");
            let e = escape(&s);
            assert!(inert(&e), "{:x}: {e:?}", c as u32);
            assert!(e.starts_with("a\\") && e.ends_with('b'), "{e:?}");
        }
        assert_eq!(escape("\0\x07\x08\x7f"), "\\x00\\x07\\x08\\x7f");
        assert_eq!(escape("a\tb"), "a\\tb");
        assert_eq!(escape("\u{85}"), "\\u{85}");
    }

    #[test]
    fn bidi_controls_isolates_and_marks_are_escaped() {
        // "approved" laid out right to left would read as what the override hides.
        assert_eq!(
            escape("stmt \u{202e}devorppa\u{202c}"),
            "stmt \\u{202e}devorppa\\u{202c}"
        );
        for c in (0x202a..=0x202e)
            .chain(0x2066..=0x2069)
            .chain([0x200e, 0x200f, 0x061c])
        {
            let c = char::from_u32(c).unwrap();
            assert_eq!(escape(&c.to_string()), format!("\\u{{{:x}}}", c as u32));
        }
    }

    #[test]
    fn other_invisible_characters_are_escaped() {
        for c in [
            0x00ad, 0x200b, 0x200c, 0x200d, 0x2060, 0x2063, 0xfeff, 0x2028, 0x2029, 0x180e, 0x3164,
            0xfff9, 0xe0001, 0xe0041,
            // Default-ignorable (found by an outside review: `"accounts\u{fe00}"` read as
            // `"accounts"`): variation selectors, the grapheme joiner, fillers, tags.
            0x034f, 0x17b4, 0x180b, 0x180f, 0xfe00, 0xfe0f, 0xfff0, 0xe0000, 0xe0100, 0xe01ef,
        ] {
            let c = char::from_u32(c).unwrap();
            let e = escape(&c.to_string()).into_owned();
            assert!(inert(&e) && e.starts_with("\\u{"), "{:x}: {e:?}", c as u32);
        }
        // U+2028 is a line break to some terminals and editors: not kept even in multi-line
        // text.
        assert_eq!(escape_lines("a\u{2028}b", ""), "a\\u{2028}b");
    }

    #[test]
    fn backslashes_are_doubled_so_the_output_reads_back_to_one_text() {
        // A literal backslash-n typed by the client and a real newline print differently.
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_ne!(escape("\\x1b"), escape("\x1b"));
        assert_eq!(escape("\\x0102"), "\\\\x0102");
    }

    #[test]
    fn a_parameter_says_its_format_and_type() {
        assert_eq!(
            param_format(true, 20),
            "binary bytes, declared type int8 (oid 20)"
        );
        assert_eq!(param_format(false, 23), "text, declared type int4 (oid 23)");
        assert_eq!(param_format(false, 0), "text, type from the statement");
        assert_eq!(
            param_format(true, 99_999),
            "binary bytes, declared type oid 99999"
        );
    }

    #[test]
    fn multi_line_statements_stay_readable() {
        let sql = "SELECT name\nFROM customers\nWHERE id = 1";
        let e = escape_lines(sql, "  ");
        assert_eq!(
            e,
            format!("SELECT name\n  {CONTINUATION}FROM customers\n  {CONTINUATION}WHERE id = 1")
        );
        assert!(inert(&e.replace('\n', "")));
    }
}
