//! Typed views of the PostgreSQL messages the gateway inspects, parsed on demand from raw
//! frame bodies, and builders for the messages it sends itself.

use crate::policy::masking::{ColumnRule, Counts, Masker};
use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;

/// Protocol codes of the untyped startup-phase packets.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {0} message")]
pub struct Malformed(pub &'static str);

/// The longest statement or portal name PostgreSQL tells apart.
pub const MAX_NAME: usize = 63;

/// A cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn err(&self) -> Malformed {
        Malformed(self.what)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self.buf.split_first().ok_or(self.err())?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, Malformed> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, Malformed> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, which must be UTF-8.
    pub fn cstr(&mut self) -> Result<&'a str, Malformed> {
        let err = self.err();
        std::str::from_utf8(self.cstr_bytes()?).map_err(|_| err)
    }

    /// A NUL-terminated string's bytes, whatever their encoding.
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(self.err())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = &rest[1..];
        Ok(s)
    }

    /// A statement or portal name. PostgreSQL keys them by their first 63 bytes
    /// (`NAMEDATALEN - 1`), so two longer names the gateway would tell apart may be one name
    /// to the target: refused.
    pub fn name(&mut self) -> Result<&'a str, Malformed> {
        let name = self.cstr()?;
        if name.len() > MAX_NAME {
            return Err(Malformed(
                "statement or portal name longer than 63 bytes in a protocol",
            ));
        }
        Ok(name)
    }

    /// A non-negative count from an i16 field.
    pub fn count16(&mut self) -> Result<usize, Malformed> {
        usize::try_from(self.i16()?).map_err(|_| self.err())
    }

    /// A length-prefixed value; -1 is NULL.
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, Malformed> {
        match self.i32()? {
            -1 => Ok(None),
            n if n >= 0 => self.take(n as usize).map(Some),
            _ => Err(self.err()),
        }
    }

    pub fn finish(self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed(self.what))
        }
    }
}

/// The StartupMessage parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Startup {
    pub params: Vec<(String, String)>,
}

impl Startup {
    /// Parses the packet body after the protocol code.
    pub fn parse(body: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "StartupMessage");
        let mut params = Vec::new();
        loop {
            let key = r.cstr()?;
            if key.is_empty() {
                break;
            }
            let value = r.cstr()?;
            // PostgreSQL takes the last of a repeated parameter; the gateway reads, records
            // and decides by one value, so a parameter given twice is refused (outside
            // review, 2026-12-07: two `application_name`s, the first on record, the last in
            // effect).
            if params.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(Malformed("StartupMessage (a parameter given twice)"));
            }
            params.push((key.to_string(), value.to_string()));
        }
        r.finish()?;
        Ok(Self { params })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse: statement name, query text (parameter type OIDs are not needed).
/// Parse: statement name, text, and the parameter types the client declared (OIDs; 0 leaves
/// a parameter's type to the server).
pub fn parse_parse(body: &[u8]) -> Result<(&str, &str, Vec<u32>), Malformed> {
    let mut r = Reader::new(body, "Parse");
    let name = r.name()?;
    let query = r.cstr()?;
    let n = r.count16()?;
    let mut types = Vec::with_capacity(n);
    for _ in 0..n {
        types.push(r.i32()? as u32);
    }
    r.finish()?;
    Ok((name, query, types))
}

/// Bind, reduced to what the audit needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub params: Vec<Option<&'a [u8]>>,
    /// Each parameter's format (0 text, 1 binary), one per parameter.
    pub param_formats: Vec<i16>,
    /// Result column formats: none (all text), one (for all columns) or one per column.
    pub result_formats: Vec<i16>,
}

pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, Malformed> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.name()?;
    let statement = r.name()?;
    let nfmt = r.count16()?;
    let mut formats = Vec::with_capacity(nfmt);
    for _ in 0..nfmt {
        formats.push(r.i16()?);
    }
    let nparams = r.count16()?;
    if nfmt > 1 && nfmt != nparams {
        return Err(Malformed("Bind"));
    }
    // None: all text; one: for every parameter.
    let param_formats = (0..nparams)
        .map(|i| formats.get(i).or(formats.first()).copied().unwrap_or(0))
        .collect();
    let mut params = Vec::with_capacity(nparams);
    for _ in 0..nparams {
        params.push(r.value()?);
    }
    let nres = r.count16()?;
    let mut result_formats = Vec::with_capacity(nres);
    for _ in 0..nres {
        result_formats.push(r.i16()?);
    }
    r.finish()?;
    Ok(Bind {
        result_formats,
        portal,
        statement,
        params,
        param_formats,
    })
}

/// Execute: portal name and row limit.
pub fn parse_execute(body: &[u8]) -> Result<(&str, i32), Malformed> {
    let mut r = Reader::new(body, "Execute");
    let portal = r.name()?;
    let max_rows = r.i32()?;
    r.finish()?;
    Ok((portal, max_rows))
}

/// Describe or Close: kind (`S` statement, `P` portal) and name.
pub fn parse_target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), Malformed> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(Malformed(what));
    }
    let name = r.name()?;
    r.finish()?;
    Ok((kind, name))
}

/// A Query message's text.
pub fn parse_query(body: &[u8]) -> Result<&str, Malformed> {
    let mut r = Reader::new(body, "Query");
    let q = r.cstr()?;
    r.finish()?;
    Ok(q)
}

/// A ParameterStatus message's name and value.
pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), Malformed> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.cstr()?;
    let value = r.cstr()?;
    r.finish()?;
    Ok((name, value))
}

/// The fields of an ErrorResponse or NoticeResponse.
pub fn parse_error_fields(body: &[u8]) -> (String, String) {
    let mut r = Reader::new(body, "ErrorResponse");
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        // A database in SQL_ASCII quotes values in bytes that need not be UTF-8.
        let Ok(value) = r.cstr_bytes() else { break };
        match field {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// The fields of an ErrorResponse or NoticeResponse (`tag`) with each value passed through
/// `mask`; `None` when no value changed. A value that is not UTF-8 (a database in SQL_ASCII
/// quoting a value) is read as text for `mask`, and hidden whole when `mask` changes it.
pub fn mask_fields(
    tag: u8,
    body: &[u8],
    mut mask: impl FnMut(&str) -> Option<String>,
) -> Result<Option<Bytes>, Malformed> {
    let what = if tag == b'E' {
        "ErrorResponse"
    } else {
        "NoticeResponse"
    };
    let mut r = Reader::new(body, what);
    let mut fields = Vec::new();
    let mut changed = false;
    loop {
        let field = r.u8()?;
        if field == 0 {
            break;
        }
        let value = r.cstr_bytes()?;
        let masked = match std::str::from_utf8(value) {
            Ok(text) => mask(text).map(String::into_bytes),
            Err(_) => mask(&String::from_utf8_lossy(value)).map(|_| b"[redacted]".to_vec()),
        };
        changed |= masked.is_some();
        fields.push((field, masked.unwrap_or_else(|| value.to_vec())));
    }
    r.finish()?;
    Ok(changed.then(|| {
        typed(tag, |b| {
            for (field, value) in &fields {
                b.put_u8(*field);
                b.put_slice(value);
                b.put_u8(0);
            }
            b.put_u8(0);
        })
    }))
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    typed(b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    })
}

/// A NotificationResponse: the notifying backend's process id, the channel, the payload.
pub fn parse_notification(body: &[u8]) -> Result<(i32, &str, &str), Malformed> {
    let mut r = Reader::new(body, "NotificationResponse");
    let pid = r.i32()?;
    let channel = r.cstr()?;
    let payload = r.cstr()?;
    r.finish()?;
    Ok((pid, channel, payload))
}

pub fn notification(pid: i32, channel: &str, payload: &str) -> Bytes {
    typed(b'A', |b| {
        b.put_i32(pid);
        put_cstr(b, channel);
        put_cstr(b, payload);
    })
}

/// One column of a RowDescription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The table the column comes from (0 for expressions).
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary (0 as well when unknown: Describe of a statement).
    pub format: i16,
}

/// Types whose binary form is their UTF-8 text (text, varchar, bpchar, name, json, unknown).
pub fn is_text_type(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19 | 114 | 705)
}

/// The columns of a RowDescription.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, Malformed> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.count16()?;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.cstr()?.to_string();
        let table_oid = r.i32()? as u32;
        let column = r.i16()?;
        let type_oid = r.i32()? as u32;
        r.take(6)?;
        let format = r.i16()?;
        fields.push(Field {
            name,
            table_oid,
            column,
            type_oid,
            format,
        });
    }
    r.finish()?;
    Ok(fields)
}

/// A DataRow with these values.
pub fn data_row(values: &[Option<&[u8]>]) -> Bytes {
    typed(b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
    })
}

/// Values of a DataRow.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, Malformed> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.count16()?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        values.push(r.value()?);
    }
    r.finish()?;
    Ok(values)
}

/// A value as [`display_value`] shows it, masked for a copy that is not the client's: by its
/// column's rule, else by the detectors. A value shown as hex is looked through as text (see
/// [`Masker::detects_in_bytes`]) and shown `[redacted]` when they find something in it.
pub fn mask_shown<'a>(
    masker: &Masker,
    shown: &'a str,
    rule: Option<&ColumnRule>,
    counts: Option<&mut Counts>,
) -> Cow<'a, str> {
    let hex = shown.strip_prefix("\\x").and_then(|h| hex::decode(h).ok());
    match hex {
        Some(bytes) if rule.is_none() => {
            if masker.detects_in_bytes(&bytes, false, counts) {
                Cow::Owned("[redacted]".into())
            } else {
                Cow::Borrowed(shown)
            }
        }
        _ => masker.mask(shown, rule, false, counts),
    }
}

/// A value for the audit record: printable UTF-8 as is (text format, or a binary-format text
/// value), anything else as `\x` hex.
pub fn display_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s)
            if !s
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) =>
        {
            s.to_string()
        }
        _ => format!("\\x{}", hex::encode(v)),
    }
}

fn typed(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(tag);
    b.put_i32(0);
    body(&mut b);
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; the gateway's own texts never hold one.
    b.put_slice(s.replace('\0', " ").as_bytes());
    b.put_u8(0);
}

/// ErrorResponse with severity ERROR (session continues) or FATAL (session ends).
pub fn error_response(fatal: bool, sqlstate: &str, message: &str) -> Bytes {
    typed(b'E', |b| {
        let sev = if fatal { "FATAL" } else { "ERROR" };
        b.put_u8(b'S');
        put_cstr(b, sev);
        b.put_u8(b'V');
        put_cstr(b, sev);
        b.put_u8(b'C');
        put_cstr(b, sqlstate);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    })
}

/// CopyFail: the frontend abandons COPY FROM STDIN; the target fails the COPY with `message`.
pub fn copy_fail(message: &str) -> Bytes {
    typed(b'f', |b| put_cstr(b, message))
}

pub fn ready_for_query(status: u8) -> Bytes {
    typed(b'Z', |b| b.put_u8(status))
}

pub fn auth_request(code: i32, extra: &[u8]) -> Bytes {
    typed(b'R', |b| {
        b.put_i32(code);
        b.put_slice(extra);
    })
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    typed(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

pub fn password_message(password: &[u8]) -> Bytes {
    typed(b'p', |b| {
        b.put_slice(password);
        b.put_u8(0);
    })
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    typed(b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    })
}

pub fn sasl_response(data: &[u8]) -> Bytes {
    typed(b'p', |b| b.put_slice(data))
}

pub fn query(sql: &str) -> Bytes {
    typed(b'Q', |b| put_cstr(b, sql))
}

/// Parse of an unnamed statement with no parameter types.
pub fn parse(sql: &str) -> Bytes {
    typed(b'P', |b| {
        put_cstr(b, "");
        put_cstr(b, sql);
        b.put_i16(0);
    })
}

/// A Describe of portal `name`.
pub fn describe_portal(name: &str) -> Bytes {
    typed(b'D', |b| {
        b.put_u8(b'P');
        put_cstr(b, name);
    })
}

/// A Close of portal `name`.
pub fn close_portal(name: &str) -> Bytes {
    typed(b'C', |b| {
        b.put_u8(b'P');
        put_cstr(b, name);
    })
}

/// Bind message `raw` with its portal renamed `portal`.
pub fn rename_bind(raw: &[u8], portal: &str) -> Result<Bytes, Malformed> {
    let body = raw.get(5..).ok_or(Malformed("Bind"))?;
    let mut r = Reader::new(body, "Bind");
    r.cstr()?;
    let rest = &body[body.len() - r.remaining()..];
    Ok(typed(b'B', |b| {
        put_cstr(b, portal);
        b.put_slice(rest);
    }))
}

/// The gateway's own read of the session, as one batch: Parse and Bind of `sql` under `name`
/// (statement and portal), Execute, Close of both, Sync.
pub fn settings_probe(name: &str, sql: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(&typed(b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(0);
    }));
    b.extend_from_slice(&typed(b'B', |b| {
        put_cstr(b, name);
        put_cstr(b, name);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    }));
    b.extend_from_slice(&typed(b'E', |b| {
        put_cstr(b, name);
        b.put_i32(0);
    }));
    for kind in [b'P', b'S'] {
        b.extend_from_slice(&typed(b'C', |b| {
            b.put_u8(kind);
            put_cstr(b, name);
        }));
    }
    b.extend_from_slice(&typed(b'S', |_| {}));
    b.freeze()
}

pub fn terminate() -> Bytes {
    typed(b'X', |_| {})
}

/// An untyped startup-phase packet: length, then `body`.
pub fn startup_packet(body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(128);
    b.put_i32(0);
    body(&mut b);
    let len = b.len() as i32;
    b[0..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

pub fn startup_message(params: &[(&str, &str)]) -> Bytes {
    startup_packet(|b| {
        b.put_i32(PROTOCOL_3_0);
        for (k, v) in params {
            put_cstr(b, k);
            put_cstr(b, v);
        }
        b.put_u8(0);
    })
}

pub fn cancel_request(pid: i32, secret: i32) -> Bytes {
    startup_packet(|b| {
        b.put_i32(CANCEL_REQUEST);
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

pub fn ssl_request() -> Bytes {
    startup_packet(|b| b.put_i32(SSL_REQUEST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::codec::split_frame;

    fn body_of(frame: Bytes) -> Bytes {
        let mut buf = BytesMut::from(&frame[..]);
        split_frame(&mut buf, 1 << 20).unwrap().unwrap().body()
    }

    #[test]
    fn error_responses_round_trip() {
        let e = error_response(false, "28P01", "bad token");
        let (code, msg) = parse_error_fields(&body_of(e));
        assert_eq!((code.as_str(), msg.as_str()), ("28P01", "bad token"));
    }

    #[test]
    fn error_fields_that_are_not_utf8_are_read_and_hidden_whole() {
        // SQL_ASCII quotes a value as it is stored: here Latin-1 bytes around an e-mail.
        let body = b"SERROR\0C22P02\0Minvalid input: \"jos\xe9 bob@example.com\"\0\0";
        let (code, message) = parse_error_fields(body);
        assert_eq!(code, "22P02");
        assert_eq!(message, "invalid input: \"jos\u{fffd} bob@example.com\"");
        let masked = mask_fields(b'E', body, |v| {
            v.contains("@example.com")
                .then(|| v.replace("bob@example.com", "***"))
        });
        let masked = body_of(masked.unwrap().unwrap());
        assert_eq!(&masked[..], b"SERROR\0C22P02\0M[redacted]\0\0");
        // UTF-8 values keep the mask's own text; unchanged ones their bytes.
        let body = b"SERROR\0Mbob@example.com\0Djos\xe9\0\0";
        let masked = mask_fields(b'E', body, |v| {
            (v == "bob@example.com").then(|| "***".into())
        });
        let masked = body_of(masked.unwrap().unwrap());
        assert_eq!(&masked[..], b"SERROR\0M***\0Djos\xe9\0\0");
        assert_eq!(
            mask_fields(b'E', b"SERROR\0Mx\0", |_| None),
            Err(Malformed("ErrorResponse"))
        );
    }

    #[test]
    fn startup_messages_round_trip() {
        let p = startup_message(&[("user", "u"), ("database", "d")]);
        let s = Startup::parse(&p[8..]).unwrap();
        assert_eq!(s.get("database"), Some("d"));
        assert_eq!(Startup::parse(b"user\0u"), Err(Malformed("StartupMessage")));
        let twice = startup_message(&[
            ("user", "u"),
            ("application_name", "claimed"),
            ("application_name", "real"),
        ]);
        assert_eq!(
            Startup::parse(&twice[8..]),
            Err(Malformed("StartupMessage (a parameter given twice)"))
        );
    }

    #[test]
    fn bind_parses_and_rejects_lies() {
        // portal "", statement "s1", 1 format (binary), 2 params, 0 result formats
        let mut b = BytesMut::new();
        b.put_slice(b"\0s1\0");
        b.put_i16(1);
        b.put_i16(1);
        b.put_i16(2);
        b.put_i32(2);
        b.put_slice(b"\x00\x01");
        b.put_i32(-1);
        b.put_i16(0);
        let bind = parse_bind(&b).unwrap();
        assert_eq!(bind.statement, "s1");
        assert_eq!(bind.params, vec![Some(&b"\x00\x01"[..]), None]);
        assert_eq!(
            bind.param_formats,
            vec![1, 1],
            "one format counts for every parameter"
        );
        let mut lie = b.clone();
        lie[10] = 0x7f; // parameter length far beyond the body
        assert!(parse_bind(&lie).is_err());
        assert!(parse_bind(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn data_rows_and_descriptions_parse() {
        let mut row = BytesMut::new();
        row.put_i16(2);
        row.put_i32(1);
        row.put_u8(b'7');
        row.put_i32(-1);
        assert_eq!(parse_data_row(&row).unwrap(), vec![Some(&b"7"[..]), None]);
        let mut desc = BytesMut::new();
        desc.put_i16(1);
        desc.put_slice(b"id\0");
        desc.put_slice(&[0; 18]);
        let fields = parse_row_description(&desc).unwrap();
        assert_eq!(fields[0].name, "id");
        let row = data_row(&[Some(b"7"), None]);
        assert_eq!(
            parse_data_row(&body_of(row)).unwrap(),
            vec![Some(&b"7"[..]), None]
        );
        assert!(parse_row_description(&desc[..10]).is_err());
    }

    #[test]
    fn a_bind_is_renamed_with_all_else_kept() {
        let raw = typed(b'B', |b| {
            put_cstr(b, "client");
            put_cstr(b, "s1");
            b.put_slice(&[0, 1, 0, 1, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
        });
        let renamed = rename_bind(&raw, "vigil_probe_00").unwrap();
        let body = body_of(renamed);
        let bind = parse_bind(&body).unwrap();
        assert_eq!((bind.portal, bind.statement), ("vigil_probe_00", "s1"));
        assert_eq!(bind.params, [Some(&b"7"[..])]);
        assert_eq!(bind.param_formats, [1]);
        assert!(rename_bind(&raw[..8], "x").is_err());
    }

    #[test]
    fn names_postgres_would_cut_short_are_refused() {
        let body = |name: &str| [name.as_bytes(), b"\0"].concat();
        let at_limit = "p".repeat(MAX_NAME);
        assert_eq!(
            parse_execute(&[body(&at_limit), vec![0; 4]].concat())
                .unwrap()
                .0,
            at_limit
        );
        let over = format!("{at_limit}x");
        assert!(parse_execute(&[body(&over), vec![0; 4]].concat()).is_err());
        assert!(parse_target(&[vec![b'P'], body(&over)].concat(), "Close").is_err());
        assert!(parse_parse(&[body(&over), body("SELECT 1"), vec![0; 2]].concat()).is_err());
    }

    #[test]
    fn values_display_as_text_or_hex() {
        assert_eq!(display_value(b"abc"), "abc");
        assert_eq!(display_value(&[0xff, 0x00]), "\\xff00");
        assert_eq!(display_value(&[0, 0, 0, 7]), "\\x00000007");
        assert_eq!(display_value(b"a\tb"), "a\tb");
    }
}
