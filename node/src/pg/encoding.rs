//! How the target reads statement text is fixed: client encoding UTF-8, standard-conforming
//! string literals.
//!
//! Guardrails and audit records read statement text as UTF-8. A target that read the same
//! bytes in another client encoding could disagree with the gateway on where a string literal
//! ends: in SJIS, BIG5, GBK, GB18030, UHC and JOHAB the second byte of a two-byte character can
//! be `0x5c` (`\`) or other ASCII bytes, so `'…\x95\x5c' OR …` is one thing to a UTF-8 reader and
//! another to PostgreSQL. Instead of parsing after PostgreSQL's own conversion, the gateway logs
//! in to every target with `client_encoding=UTF8` and accepts from a client only a requested
//! encoding under which the client's bytes mean the same thing:
//!
//! - any spelling of UTF-8 (`UTF8`, `utf-8`, `Unicode` … compared the way PostgreSQL compares
//!   encoding names: case-insensitively, ignoring everything but letters and digits);
//! - `SQL_ASCII`, which asks for no conversion at all: the target then reads the client's bytes
//!   in the database encoding, which for a UTF-8 session is what the gateway sends anyway. It is
//!   what libpq sends for `client_encoding=auto` under the C locale. The client is told
//!   `client_encoding=UTF8` in ParameterStatus, and libpq and psql adopt what the server reports.
//!
//! Everything else is refused at startup, `auto` included (libpq resolves `auto` from the locale
//! before it connects; PostgreSQL itself rejects the literal value).
//!
//! `standard_conforming_strings` is the other setting that decides what a statement is: when
//! it is off, a backslash in a plain `'…'` literal escapes the next character, so
//! `SELECT 'a\''; DELETE …; --'` is one string to the gateway's parser (which reads literals as
//! standard) and a `SELECT` and a `DELETE` to PostgreSQL. The gateway logs in with it `on` (a
//! startup parameter outranks a role's or a database's setting, and `RESET` returns to it) and
//! refuses any other value a client asks for.
//!
//! A statement can still change either setting after startup: `SET` and `set_config` with
//! constants are refused by the gateway before they run (`policy::classify`); code the server
//! runs on its own account (a function, a trigger, a `DO` block) is not visible. The target's
//! ParameterStatus report ([`check_parameter_status`]) ends the session when either setting
//! changes; it comes before the ReadyForQuery that ends the statement that changed it. Only a
//! backslash can make the two readings end a string, a comment or a statement in different
//! places: in valid UTF-8, the only text relayed, a trail byte of those encodings is never a
//! quote, `$`, `-`, `/`, `*`, `;`, a parenthesis, a space or a line break, and standard strings
//! differ from the others only in backslashes (a letter or operator character a trail byte
//! swallows changes a name that starts with the non-ASCII character before it). So a statement
//! that holds one ([`read_by_settings`]) goes to the target only once everything before it has
//! been answered, the settings it will be read with reported.

use super::messages::Malformed;

/// What the gateway sends the target as `client_encoding`, and the only value it accepts back.
pub const TARGET_ENCODING: &str = "UTF8";

/// The settings that decide how the target reads statement text, as every target session is
/// opened with them and must keep them.
pub const TARGET_SETTINGS: [(&str, &str); 2] = [
    ("client_encoding", TARGET_ENCODING),
    ("standard_conforming_strings", "on"),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodingError {
    /// A client asked for an encoding the gateway does not relay.
    #[error(
        "client_encoding {0:?} is not supported by this gateway: it relays UTF8 only \
         (connect with client_encoding UTF8)"
    )]
    Refused(String),
    /// A client asked for string literals that are not standard.
    #[error(
        "standard_conforming_strings {0:?} is not supported by this gateway: it reads string \
         literals as standard (on) only"
    )]
    StringsRefused(String),
    /// The target says the session's encoding is no longer UTF-8.
    #[error("the target reports client_encoding {0:?}; this gateway relays UTF8 sessions only")]
    TargetNotUtf8(String),
    /// The target says string literals are no longer standard.
    #[error(
        "the target reports standard_conforming_strings {0:?}; this gateway reads string \
         literals as standard (on) only"
    )]
    TargetNotStandard(String),
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

/// An encoding name as PostgreSQL looks it up (`clean_encoding_name`): ASCII letters and digits
/// only, lower-cased. `None` for names PostgreSQL never matches (empty, 64 bytes or longer) and
/// for names with non-ASCII characters, which no encoding is named with.
fn canonical(name: &str) -> Option<String> {
    if name.is_empty() || name.len() >= 64 || !name.is_ascii() {
        return None;
    }
    Some(
        name.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect(),
    )
}

/// Whether PostgreSQL reads `name` as UTF-8 (`UTF8`, `utf-8`, `unicode` …).
pub fn is_utf8_name(name: &str) -> bool {
    canonical(name).is_some_and(|n| n == "utf8" || n == "unicode")
}

/// Whether a boolean setting's value means `on` to PostgreSQL (`parse_bool`: `on`, `true`,
/// `yes`, `1` and the unambiguous prefixes of `true` and `yes`, in any case).
pub fn is_on(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v == "on" || v == "1" || (!v.is_empty() && ("true".starts_with(&v) || "yes".starts_with(&v)))
}

/// Whether `name` is one of [`TARGET_SETTINGS`] (PostgreSQL reads setting names in any case).
pub fn is_target_setting(name: &str) -> bool {
    TARGET_SETTINGS
        .iter()
        .any(|(setting, _)| name.eq_ignore_ascii_case(setting))
}

/// Checks the `client_encoding` a client asked for at startup (a startup parameter or a setting
/// in `options`): UTF-8 or SQL_ASCII. The value is never forwarded: the target always gets
/// [`TARGET_ENCODING`].
pub fn check_client_request(name: &str) -> Result<(), EncodingError> {
    if is_utf8_name(name) || canonical(name).as_deref() == Some("sqlascii") {
        Ok(())
    } else {
        Err(EncodingError::Refused(name.to_string()))
    }
}

/// Checks a setting a client asked for at startup: `client_encoding` as
/// [`check_client_request`] does, `standard_conforming_strings` must be on; others pass. Neither
/// is forwarded: the target always gets [`TARGET_SETTINGS`].
pub fn check_client_setting(name: &str, value: &str) -> Result<(), EncodingError> {
    if name.eq_ignore_ascii_case("client_encoding") {
        check_client_request(value)
    } else if name.eq_ignore_ascii_case("standard_conforming_strings") && !is_on(value) {
        Err(EncodingError::StringsRefused(value.to_string()))
    } else {
        Ok(())
    }
}

/// Checks the body of a ParameterStatus message from a target: an error when it reports
/// `client_encoding` as anything but UTF-8 or `standard_conforming_strings` as anything but
/// `on` (the session can then no longer be decided correctly and must end), or when the
/// message is malformed. Other parameters pass.
pub fn check_parameter_status(body: &[u8]) -> Result<(), EncodingError> {
    let (name, value) = super::messages::parse_parameter_status(body)?;
    if name.eq_ignore_ascii_case("client_encoding") && !is_utf8_name(value) {
        return Err(EncodingError::TargetNotUtf8(value.to_string()));
    }
    if name.eq_ignore_ascii_case("standard_conforming_strings") && value != "on" {
        return Err(EncodingError::TargetNotStandard(value.to_string()));
    }
    Ok(())
}

/// Whether a statement text could be read differently under another client encoding or with
/// strings that are not standard: whether it holds a backslash.
pub fn read_by_settings(text: &str) -> bool {
    memchr::memchr(b'\\', text.as_bytes()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_recognised_in_every_spelling_postgresql_accepts() {
        for name in [
            "UTF8", "utf8", "UTF-8", "utf_8", "Unicode", "UNICODE", "u.t.f-8", " utf8 ",
        ] {
            assert!(is_utf8_name(name), "{name}");
        }
        for name in [
            "",
            "utf",
            "utf16",
            "utf-16",
            "SQL_ASCII",
            "SJIS",
            "latin1",
            "auto",
            "ütf8",
            // PostgreSQL refuses names of NAMEDATALEN (64) bytes or more before cleaning.
            &format!("utf8{}", "-".repeat(60)),
        ] {
            assert!(!is_utf8_name(name), "{name}");
        }
        assert!(is_utf8_name(&format!("utf8{}", "-".repeat(59))));
    }

    #[test]
    fn clients_may_ask_for_utf8_or_sql_ascii_only() {
        for ok in [
            "UTF8",
            "utf-8",
            "unicode",
            "SQL_ASCII",
            "sql-ascii",
            "SQLASCII",
        ] {
            assert_eq!(check_client_request(ok), Ok(()), "{ok}");
        }
        // The client-only encodings whose trail bytes can be `\` or a quote, the other
        // multi-byte ones, single-byte ones, and what PostgreSQL does not know at all.
        for refused in [
            "SJIS",
            "Shift_JIS",
            "MSKANJI",
            "win932",
            "SHIFT_JIS_2004",
            "BIG5",
            "win950",
            "GBK",
            "win936",
            "GB18030",
            "UHC",
            "JOHAB",
            "EUC_JP",
            "EUC_CN",
            "MULE_INTERNAL",
            "LATIN1",
            "ISO-8859-1",
            "WIN1252",
            "KOI8R",
            "auto",
            "",
            "UTF16",
        ] {
            assert_eq!(
                check_client_request(refused),
                Err(EncodingError::Refused(refused.into())),
                "{refused}"
            );
        }
    }

    fn status(name: &str, value: &str) -> Vec<u8> {
        format!("{name}\0{value}\0").into_bytes()
    }

    #[test]
    fn string_literals_must_stay_standard() {
        for on in ["on", "ON", "true", "t", "TRU", "yes", "y", "1"] {
            assert!(is_on(on), "{on}");
            assert_eq!(
                check_client_setting("standard_conforming_strings", on),
                Ok(())
            );
        }
        for off in [
            "off", "of", "o", "false", "f", "no", "0", "", "onn", "2", "yess",
        ] {
            assert!(!is_on(off), "{off}");
            assert_eq!(
                check_client_setting("Standard_Conforming_Strings", off),
                Err(EncodingError::StringsRefused(off.into())),
                "{off}"
            );
        }
        assert_eq!(check_client_setting("client_encoding", "UTF8"), Ok(()));
        assert_eq!(
            check_client_setting("CLIENT_ENCODING", "GBK"),
            Err(EncodingError::Refused("GBK".into()))
        );
        assert_eq!(check_client_setting("search_path", "off"), Ok(()));
        assert!(is_target_setting("STANDARD_CONFORMING_STRINGS"));
        assert!(!is_target_setting("escape_string_warning"));
        assert_eq!(
            check_parameter_status(&status("standard_conforming_strings", "on")),
            Ok(())
        );
        for value in ["off", "On", ""] {
            assert_eq!(
                check_parameter_status(&status("standard_conforming_strings", value)),
                Err(EncodingError::TargetNotStandard(value.into())),
                "{value}"
            );
        }
    }

    #[test]
    fn only_backslashes_depend_on_the_settings() {
        assert!(read_by_settings(r"SELECT 'a\''; DELETE FROM t; --'"));
        assert!(read_by_settings(r"SELECT E'丁\''"));
        assert!(!read_by_settings("SELECT '丁''', $$ x $$ -- é"));
    }

    #[test]
    fn parameter_status_must_keep_the_session_utf8() {
        assert_eq!(
            check_parameter_status(&status("client_encoding", "UTF8")),
            Ok(())
        );
        assert_eq!(check_parameter_status(&status("TimeZone", "SJIS")), Ok(()));
        assert_eq!(
            check_parameter_status(&status("server_encoding", "SQL_ASCII")),
            Ok(())
        );
        for value in ["SJIS", "BIG5", "SQL_ASCII", "LATIN1", ""] {
            assert_eq!(
                check_parameter_status(&status("client_encoding", value)),
                Err(EncodingError::TargetNotUtf8(value.into())),
                "{value}"
            );
        }
        assert_eq!(
            check_parameter_status(&status("Client_Encoding", "GBK")),
            Err(EncodingError::TargetNotUtf8("GBK".into()))
        );
        // Malformed reports fail closed too.
        for body in [
            &b"client_encoding\0UTF8"[..],
            b"client_encoding\0UTF8\0extra",
            b"client_encoding\0\xff\0",
            b"",
        ] {
            assert!(matches!(
                check_parameter_status(body),
                Err(EncodingError::Malformed(_))
            ));
        }
    }
}
