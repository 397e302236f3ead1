//! SPDY/3.1 framing for the recording relay of `kubectl exec`, `attach` and `port-forward`.
//!
//! Once kubectl and the API server have agreed on `Upgrade: SPDY/3.1`, the connection carries
//! SPDY frames both ways. The relay sits in the middle and must see every stream's bytes
//! before it forwards them, without changing any of them. Per direction it pushes what it
//! read into a [`SpdyReader`], takes whole [`Frame`]s out of it, tells a shared
//! [`StreamTable`] about each one (which learns each stream's `streamtype` from its
//! SYN_STREAM headers), records a DATA frame's payload under its stream's type, and then
//! writes the frame's [`raw`](Frame::raw) bytes, unchanged, to the other side.
//!
//! ```text
//! loop {
//!     let n = from.read(&mut buf).await?;           // n == 0: reader.finish()
//!     reader.push(&buf[..n]);
//!     while let Some(frame) = reader.next_frame()? {
//!         match table.observe(side, frame.kind())? { /* record what it says */ }
//!         to.write_all(frame.raw()).await?;
//!     }
//! }
//! ```
//!
//! The wire format (SPDY Protocol, Draft 3.1):
//!
//! ```text
//! control: |1| version (15) = 3 | type (16) | flags (8) | length (24) | data ...
//! data:    |0| stream id (31)                | flags (8) | length (24) | payload ...
//! ```
//!
//! SYN_STREAM, SYN_REPLY and HEADERS carry a name/value header block compressed with zlib
//! and the SPDY/3 dictionary, all blocks of one direction in ONE zlib stream: every block
//! of a direction must be inflated, in order, even when nobody needs its headers. That is
//! why one reader serves one direction for the whole connection, and why an error poisons it
//! (its zlib state is lost; so is the connection).
//!
//! # What the reader guarantees, and what it does not
//!
//! - The bytes of the frames it returns, in order, are exactly the bytes pushed into it, up
//!   to the frame boundary it has reached ([`SpdyReader::consumed`]); a frame is returned only
//!   when all of it has arrived.
//! - A frame longer than the configured cap ([`Limits`]) is refused as soon as its 8-byte
//!   header arrives, before its body is buffered; a header block is inflated into at most
//!   [`Limits::max_header_block`] bytes, so a zlib bomb is an error, not an allocation.
//! - It is stricter than the Go implementation on the other end (moby/spdystream) wherever
//!   the two could read the same bytes differently: a reserved bit set in a stream id,
//!   duplicate, upper-case or empty header names, values with stray NUL separators or not in
//!   UTF-8, decompressed bytes left over after a header block (Go would read them as the start
//!   of the next block), control frames of a wrong length. Such input is an error, and the
//!   relay ends the session. Control frames of unknown types are passed through as
//!   [`FrameKind::Unknown`] (the draft says to ignore them; the Go peer refuses them).
//! - It does not look inside payloads: what a stdin stream carries (keystrokes, a file) is
//!   the recorder's business; nothing here decides or redacts.
//!
//! # Writing frames
//!
//! [`SpdyWriter`] builds frames with header blocks on its own zlib stream; the free functions
//! ([`data`], [`rst_stream`], …) build the others. A peer inflates all header blocks of a
//! direction in one zlib stream, so a writer can only speak for a direction whose header
//! blocks all come from it: a relay that forwards a peer's SYN_REPLY frames must not insert
//! its own SYN_REPLY or HEADERS into that direction (DATA, RST_STREAM, GOAWAY and the other
//! frames without header blocks are safe to insert between forwarded frames).
//!
//! For the same reason a forwarded frame with a header block cannot be dropped or changed:
//! the receiver's zlib stream would lose its place and every later block would fail. A relay
//! that must refuse one stream (a port-forward to a port no rule allows: the port is only in
//! the stream's `port` header, not in the URL) either ends the session, or re-encodes that
//! direction's header blocks with a [`SpdyWriter`] of its own from the first one on (it has
//! them all, inflated, from the reader) and then may leave one out.

use bytes::{Buf as _, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

/// The protocol version this codec speaks.
pub const VERSION: u16 = 3;
/// The largest length a frame header can carry (24 bits).
pub const MAX_FRAME_LEN: usize = 0xff_ffff;
/// Length of every frame header, control or data.
pub const HEADER_LEN: usize = 8;

/// DATA, SYN_STREAM, SYN_REPLY, HEADERS: the sender's half of the stream ends here.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the receiver must not send on this stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS: forget persisted settings.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// Control frame types (draft 3.1 §2.6).
pub mod frame_type {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const SETTINGS: u16 = 4;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes (draft 3.1 §2.4.2).
pub mod rst_status {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// Caps on what one direction of a connection may make the reader hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest DATA payload accepted. kubectl and the kubelet copy streams in 32 KiB
    /// pieces; the protocol allows 16 MiB.
    pub max_data_len: usize,
    /// Longest control frame body accepted (its header block still compressed).
    pub max_control_len: usize,
    /// Most bytes a header block may inflate to.
    pub max_header_block: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data_len: 1 << 20,
            max_control_len: 64 << 10,
            max_header_block: 64 << 10,
        }
    }
}

impl Limits {
    /// The most bytes a reader holds between two pushes: one frame, header included.
    pub fn max_buffered(&self) -> usize {
        HEADER_LEN
            + self
                .max_data_len
                .max(self.max_control_len)
                .min(MAX_FRAME_LEN)
    }
}

/// Why a header block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the frame has no header block")]
    Missing,
    #[error("it is compressed against an unknown zlib dictionary (Adler-32 {0:#010x})")]
    UnknownDictionary(u32),
    #[error("it does not inflate: {0}")]
    Inflate(String),
    #[error("the sender ended its header compression stream")]
    StreamEnded,
    #[error("it inflates to more than {max} bytes")]
    TooLarge { max: usize },
    #[error("it ends inside a {0}")]
    Truncated(&'static str),
    #[error("{0} bytes follow its last header")]
    TrailingBytes(usize),
    #[error("a header name is empty")]
    EmptyName,
    #[error("header name {0:?} is not lower-case ASCII")]
    BadName(String),
    #[error("header {0:?} appears twice")]
    DuplicateName(String),
    #[error("the value of header {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("the value of header {0:?} has an empty NUL-separated part")]
    EmptyValuePart(String),
}

/// Why a direction's byte stream was refused. After any of these the reader is poisoned:
/// the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY: control frame of version {0} (only 3 is spoken)")]
    UnsupportedVersion(u16),
    #[error("SPDY: {kind} frame of {len} bytes is longer than the {max} allowed")]
    FrameTooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("SPDY: {frame} frame of {len} bytes (must be {expected})")]
    BadLength {
        frame: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error("SPDY: {frame} frame with flags {flags:#04x}")]
    BadFlags { frame: &'static str, flags: u8 },
    #[error("SPDY: {frame} frame for stream 0")]
    ZeroStreamId { frame: &'static str },
    #[error("SPDY: {frame} frame with a reserved bit set in {field}")]
    ReservedBit {
        frame: &'static str,
        field: &'static str,
    },
    #[error("SPDY: RST_STREAM for stream {0} with status 0")]
    ZeroStatus(u32),
    #[error("SPDY: bad header block in {frame} for stream {stream_id}: {source}")]
    HeaderBlock {
        frame: &'static str,
        stream_id: u32,
        #[source]
        source: HeaderError,
    },
    #[error("SPDY: an earlier frame of this direction was refused; its header compression state is lost")]
    Poisoned,
    #[error("SPDY: the stream ended inside a frame ({buffered} bytes of it arrived)")]
    Truncated { buffered: usize },
    #[error("SPDY: cannot write a frame for stream {0} (ids are 1 to 2^31-1)")]
    InvalidStreamId(u32),
    #[error("SPDY: cannot write a {kind} frame of {len} bytes (at most {MAX_FRAME_LEN})")]
    TooLongToWrite { kind: &'static str, len: usize },
    #[error("SPDY: cannot write header {0:?}: {1}")]
    BadHeaderToWrite(String, HeaderError),
    #[error("SPDY: cannot write a WINDOW_UPDATE of {0} (1 to 2^31-1)")]
    BadDelta(u32),
    #[error("SPDY: header compression failed: {0}")]
    Deflate(String),
}

/// The name/value pairs of a header block, in the order they came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// The value of `name` (lower-case), NUL separators and all.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One entry of a SETTINGS frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    /// 24 bits.
    pub id: u32,
    pub value: u32,
}

/// What a frame is, parsed from its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    /// `stream_id` 0 is the whole session's window (3.1).
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        /// The payload: a slice of the frame's raw bytes, not a copy.
        payload: Bytes,
    },
    /// A control frame of a type SPDY/3.1 does not define (NOOP of SPDY/2, CREDENTIAL of
    /// SPDY/3, …): passed through, not interpreted.
    Unknown {
        frame_type: u16,
        flags: u8,
    },
}

/// A whole frame: its bytes exactly as they came, and what they say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
    kind: FrameKind,
}

impl Frame {
    /// The frame's bytes as they came, header included: what the relay forwards.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn kind(&self) -> &FrameKind {
        &self.kind
    }

    pub fn into_parts(self) -> (Bytes, FrameKind) {
        (self.raw, self.kind)
    }
}

/// The SPDY/3 header compression dictionary (draft 3 §2.6.10.1): the names and values HTTP
/// requests of 2012 used most, each of the first ones behind its 4-byte length, then a run of
/// status texts, dates and media types. Built from its parts rather than kept as a byte
/// table; a test pins its length and Adler-32 and the captured kubectl sessions prove it.
pub fn dictionary() -> &'static [u8] {
    #[rustfmt::skip]
    const WORDS: &[&str] = &[
        "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
        "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
        "authorization", "cache-control", "connection", "content-base", "content-encoding",
        "content-language", "content-length", "content-location", "content-md5",
        "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
        "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
        "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
        "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
        "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
        "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
        "public", "set-cookie", "keep-alive", "origin",
    ];
    const TAIL: &[&str] = &[
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505",
        "203 Non-Authoritative Information",
        "204 No Content",
        "301 Moved Permanently",
        "400 Bad Request",
        "401 Unauthorized",
        "403 Forbidden",
        "404 Not Found",
        "500 Internal Server Error",
        "501 Not Implemented",
        "503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
        "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    ];
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for word in WORDS {
            d.extend_from_slice(&(word.len() as u32).to_be_bytes());
            d.extend_from_slice(word.as_bytes());
        }
        for part in TAIL {
            d.extend_from_slice(part.as_bytes());
        }
        d
    })
}

/// The Adler-32 of [`dictionary`], as a zlib header names it (FDICT).
pub const DICTIONARY_ADLER32: u32 = 0xe3c6_a7c2;

/// Reads one direction of a SPDY/3.1 connection into whole frames.
pub struct SpdyReader {
    buf: BytesMut,
    limits: Limits,
    inflater: Inflater,
    consumed: u64,
    poisoned: bool,
}

impl fmt::Debug for SpdyReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpdyReader")
            .field("buffered", &self.buf.len())
            .field("consumed", &self.consumed)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Default for SpdyReader {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl SpdyReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            inflater: Inflater::new(),
            consumed: 0,
            poisoned: false,
        }
    }

    /// Appends bytes read from the connection. Take the frames out with
    /// [`next_frame`](Self::next_frame) before pushing more: the reader then never holds
    /// more than [`Limits::max_buffered`] bytes plus one push.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. An error is final: every
    /// later call returns [`SpdyError::Poisoned`].
    ///
    /// Frames come out one at a time (rather than all frames of a push at once) so that the
    /// frames before a bad one are still forwarded and recorded.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if self.poisoned {
            return Err(SpdyError::Poisoned);
        }
        let frame = self.read_frame();
        if frame.is_err() {
            self.poisoned = true;
        }
        frame
    }

    /// Bytes pushed and not yet handed out in a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes handed out in whole frames so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// At the end of the direction's byte stream: whether it ended between frames. (Go
    /// peers often end a connection in the middle of their GOAWAY: the other side closed
    /// first.)
    pub fn finish(&self) -> Result<(), SpdyError> {
        if self.poisoned {
            Err(SpdyError::Poisoned)
        } else if !self.buf.is_empty() {
            Err(SpdyError::Truncated {
                buffered: self.buf.len(),
            })
        } else {
            Ok(())
        }
    }

    fn read_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let head = Head::parse(&self.buf[..HEADER_LEN]);
        // The length is checked before the body is waited for, so a lying header cannot
        // make the reader buffer more than the limit.
        let (kind, max) = match head {
            Head::Control { version, .. } if version != VERSION => {
                return Err(SpdyError::UnsupportedVersion(version))
            }
            Head::Control { .. } => ("control", self.limits.max_control_len),
            Head::Data { .. } => ("DATA", self.limits.max_data_len),
        };
        let len = head.len();
        if len > max {
            return Err(SpdyError::FrameTooLarge { kind, len, max });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let raw = self.buf.split_to(HEADER_LEN + len).freeze();
        let kind = match head {
            Head::Data {
                stream_id, flags, ..
            } => {
                if stream_id == 0 {
                    return Err(SpdyError::ZeroStreamId { frame: "DATA" });
                }
                FrameKind::Data {
                    stream_id,
                    // Flags other than FIN mean nothing in SPDY/3; the Go peer ignores them.
                    fin: flags & FLAG_FIN != 0,
                    payload: raw.slice(HEADER_LEN..),
                }
            }
            Head::Control {
                frame_type, flags, ..
            } => self.control_frame(frame_type, flags, &raw[HEADER_LEN..])?,
        };
        self.consumed += raw.len() as u64;
        Ok(Some(Frame { raw, kind }))
    }

    fn control_frame(
        &mut self,
        frame_type: u16,
        flags: u8,
        body: &[u8],
    ) -> Result<FrameKind, SpdyError> {
        use frame_type::*;
        let len = body.len();
        let mut b = body;
        Ok(match frame_type {
            SYN_STREAM => {
                let frame = "SYN_STREAM";
                check_len(frame, len, len > 10, "more than 10")?;
                check_flags(frame, flags, FLAG_FIN | FLAG_UNIDIRECTIONAL)?;
                let stream_id = stream_id(frame, "the stream id", b.get_u32())?;
                let associated_to = id31(frame, "the associated stream id", b.get_u32())?;
                let priority = b.get_u8() >> 5;
                let slot = b.get_u8();
                let headers = self.headers(frame, stream_id, b)?;
                FrameKind::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    slot,
                    fin: flags & FLAG_FIN != 0,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let frame = if frame_type == SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                check_len(frame, len, len > 4, "more than 4")?;
                check_flags(frame, flags, FLAG_FIN)?;
                let stream_id = stream_id(frame, "the stream id", b.get_u32())?;
                let headers = self.headers(frame, stream_id, b)?;
                let fin = flags & FLAG_FIN != 0;
                if frame_type == SYN_REPLY {
                    FrameKind::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    FrameKind::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            RST_STREAM => {
                let frame = "RST_STREAM";
                check_len(frame, len, len == 8, "8")?;
                check_flags(frame, flags, 0)?;
                let stream_id = stream_id(frame, "the stream id", b.get_u32())?;
                let status = b.get_u32();
                if status == 0 {
                    return Err(SpdyError::ZeroStatus(stream_id));
                }
                FrameKind::RstStream { stream_id, status }
            }
            SETTINGS => {
                let frame = "SETTINGS";
                check_flags(frame, flags, FLAG_SETTINGS_CLEAR)?;
                check_len(frame, len, len >= 4, "4 + 8 × entries")?;
                let count = b.get_u32() as u64;
                check_len(
                    frame,
                    len,
                    count.checked_mul(8).and_then(|n| n.checked_add(4)) == Some(len as u64),
                    "4 + 8 × entries",
                )?;
                let mut entries = Vec::with_capacity(b.len() / 8);
                while b.has_remaining() {
                    let word = b.get_u32();
                    entries.push(Setting {
                        flags: (word >> 24) as u8,
                        id: word & 0xff_ffff,
                        value: b.get_u32(),
                    });
                }
                FrameKind::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                }
            }
            PING => {
                check_len("PING", len, len == 4, "4")?;
                check_flags("PING", flags, 0)?;
                FrameKind::Ping { id: b.get_u32() }
            }
            GOAWAY => {
                let frame = "GOAWAY";
                check_len(frame, len, len == 8, "8")?;
                check_flags(frame, flags, 0)?;
                let last_good_stream_id = id31(frame, "the last good stream id", b.get_u32())?;
                FrameKind::GoAway {
                    last_good_stream_id,
                    status: b.get_u32(),
                }
            }
            WINDOW_UPDATE => {
                let frame = "WINDOW_UPDATE";
                check_len(frame, len, len == 8, "8")?;
                check_flags(frame, flags, 0)?;
                let stream_id = id31(frame, "the stream id", b.get_u32())?;
                let delta = id31(frame, "the delta", b.get_u32())?;
                FrameKind::WindowUpdate { stream_id, delta }
            }
            frame_type => FrameKind::Unknown { frame_type, flags },
        })
    }

    fn headers(
        &mut self,
        frame: &'static str,
        stream_id: u32,
        compressed: &[u8],
    ) -> Result<Headers, SpdyError> {
        let block = self
            .inflater
            .inflate(compressed, self.limits.max_header_block)
            .and_then(parse_header_block);
        block.map_err(|source| SpdyError::HeaderBlock {
            frame,
            stream_id,
            source,
        })
    }
}

/// A frame header, before its length was checked.
#[derive(Debug, Clone, Copy)]
enum Head {
    Control {
        version: u16,
        frame_type: u16,
        flags: u8,
        len: usize,
    },
    Data {
        stream_id: u32,
        flags: u8,
        len: usize,
    },
}

impl Head {
    fn parse(mut bytes: &[u8]) -> Self {
        let first = bytes.get_u32();
        let second = bytes.get_u32();
        let flags = (second >> 24) as u8;
        let len = (second & 0xff_ffff) as usize;
        if first & 0x8000_0000 != 0 {
            Head::Control {
                version: ((first >> 16) & 0x7fff) as u16,
                frame_type: (first & 0xffff) as u16,
                flags,
                len,
            }
        } else {
            Head::Data {
                stream_id: first,
                flags,
                len,
            }
        }
    }

    fn len(&self) -> usize {
        match *self {
            Head::Control { len, .. } | Head::Data { len, .. } => len,
        }
    }
}

fn check_len(
    frame: &'static str,
    len: usize,
    ok: bool,
    expected: &'static str,
) -> Result<(), SpdyError> {
    if ok {
        Ok(())
    } else {
        Err(SpdyError::BadLength {
            frame,
            len,
            expected,
        })
    }
}

fn check_flags(frame: &'static str, flags: u8, allowed: u8) -> Result<(), SpdyError> {
    if flags & !allowed == 0 {
        Ok(())
    } else {
        Err(SpdyError::BadFlags { frame, flags })
    }
}

/// A 31-bit field behind a reserved bit. The Go peer reads the whole 32 bits, so a set
/// reserved bit would name a different stream there than here: refused.
fn id31(frame: &'static str, field: &'static str, word: u32) -> Result<u32, SpdyError> {
    if word & 0x8000_0000 != 0 {
        Err(SpdyError::ReservedBit { frame, field })
    } else {
        Ok(word)
    }
}

fn stream_id(frame: &'static str, field: &'static str, word: u32) -> Result<u32, SpdyError> {
    match id31(frame, field, word)? {
        0 => Err(SpdyError::ZeroStreamId { frame }),
        id => Ok(id),
    }
}

/// One direction's header decompression: a single zlib stream for the whole connection.
struct Inflater {
    z: Decompress,
    out: Vec<u8>,
}

impl Inflater {
    fn new() -> Self {
        Self {
            z: Decompress::new(true),
            out: Vec::new(),
        }
    }

    /// Inflates one frame's compressed header block, all of it, into at most `limit` bytes.
    fn inflate(&mut self, input: &[u8], limit: usize) -> Result<&[u8], HeaderError> {
        if input.is_empty() {
            return Err(HeaderError::Missing);
        }
        // One byte more than the limit tells "exactly the limit" from "more".
        let cap = limit.saturating_add(1);
        let (mut read, mut written) = (0usize, 0usize);
        let mut dictionary_given = false;
        loop {
            if written == self.out.len() {
                if written >= cap {
                    return Err(HeaderError::TooLarge { max: limit });
                }
                // Grown as needed, not to the limit at once: most blocks are tiny.
                let grown = (self.out.len().max(512) * 2).min(cap);
                self.out.resize(grown, 0);
            }
            let (in_before, out_before) = (self.z.total_in(), self.z.total_out());
            let status = self.z.decompress(
                &input[read..],
                &mut self.out[written..],
                FlushDecompress::Sync,
            );
            let took = (self.z.total_in() - in_before) as usize;
            let gave = (self.z.total_out() - out_before) as usize;
            read += took;
            written += gave;
            match status {
                Ok(Status::StreamEnd) => return Err(HeaderError::StreamEnded),
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => match e.needs_dictionary() {
                    // zlib asks once, at the start of the stream; asked again, it is broken.
                    Some(DICTIONARY_ADLER32) if !dictionary_given => {
                        dictionary_given = true;
                        self.z
                            .set_dictionary(dictionary())
                            .map_err(|e| HeaderError::Inflate(e.to_string()))?;
                        continue;
                    }
                    Some(other) => return Err(HeaderError::UnknownDictionary(other)),
                    None => return Err(HeaderError::Inflate(e.to_string())),
                },
            }
            if read == input.len() && written < self.out.len() {
                // All input taken and room left over: nothing more is coming out of it.
                break;
            }
            if took == 0 && gave == 0 && written < self.out.len() {
                return Err(HeaderError::Inflate("no progress".into()));
            }
        }
        Ok(&self.out[..written])
    }
}

/// Reads an inflated header block: a 32-bit count, then per pair a 32-bit length and the
/// name, a 32-bit length and the value. It must be used up exactly.
fn parse_header_block(block: &[u8]) -> Result<Headers, HeaderError> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], HeaderError> {
        if b.len() < n {
            return Err(HeaderError::Truncated(what));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8], what: &'static str) -> Result<usize, HeaderError> {
        let bytes = take(b, 4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
    }
    let mut b = block;
    let count = len(&mut b, "header count")?;
    // Not preallocated from `count`: it is the sender's word. Each pair takes at least
    // 9 bytes, so the block's size bounds the loop.
    let mut pairs = Vec::new();
    for _ in 0..count {
        let n = len(&mut b, "header name length")?;
        let name = take(&mut b, n, "header name")?;
        let n = len(&mut b, "header value length")?;
        let value = take(&mut b, n, "header value")?;
        let name = check_name(name)?;
        let value = check_value(&name, value)?;
        pairs.push((name, value));
    }
    if !b.is_empty() {
        return Err(HeaderError::TrailingBytes(b.len()));
    }
    let mut names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(HeaderError::DuplicateName(w[0].to_string()));
    }
    Ok(Headers(pairs))
}

/// Header names are lower-case US-ASCII (draft 3.1 §2.6.10), visible characters only.
fn check_name(name: &[u8]) -> Result<String, HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyName);
    }
    if name
        .iter()
        .all(|&c| (0x21..=0x7e).contains(&c) && !c.is_ascii_uppercase())
    {
        Ok(String::from_utf8_lossy(name).into_owned())
    } else {
        Err(HeaderError::BadName(
            String::from_utf8_lossy(name).into_owned(),
        ))
    }
}

/// A value is empty or NUL-separated non-empty parts (draft 3.1 §2.6.10), here in UTF-8.
fn check_value(name: &str, value: &[u8]) -> Result<String, HeaderError> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Err(HeaderError::NotUtf8(name.to_string()));
    };
    if !text.is_empty() && text.split('\0').any(str::is_empty) {
        return Err(HeaderError::EmptyValuePart(name.to_string()));
    }
    Ok(text.to_string())
}

/// Writes frames with header blocks for one direction, on its own zlib stream (see the
/// module doc for when a writer may speak in a direction).
pub struct SpdyWriter {
    z: Compress,
    block: Vec<u8>,
}

impl fmt::Debug for SpdyWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpdyWriter").finish_non_exhaustive()
    }
}

impl Default for SpdyWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl SpdyWriter {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // A zlib stream that has not started takes a dictionary; this cannot fail.
        let _ = z.set_dictionary(dictionary());
        Self {
            z,
            block: Vec::new(),
        }
    }

    /// A SYN_STREAM opening `stream_id` (`flags`: [`FLAG_FIN`], [`FLAG_UNIDIRECTIONAL`]).
    pub fn syn_stream(
        &mut self,
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, SpdyError> {
        check_stream_id(stream_id)?;
        if associated_to > 0x7fff_ffff {
            return Err(SpdyError::InvalidStreamId(associated_to));
        }
        let mut prefix = [0u8; 10];
        prefix[..4].copy_from_slice(&stream_id.to_be_bytes());
        prefix[4..8].copy_from_slice(&associated_to.to_be_bytes());
        prefix[8] = (priority & 0x07) << 5;
        self.with_headers(frame_type::SYN_STREAM, flags, &prefix, headers)
    }

    /// A SYN_REPLY accepting `stream_id`.
    pub fn syn_reply(
        &mut self,
        stream_id: u32,
        fin: bool,
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, SpdyError> {
        check_stream_id(stream_id)?;
        let flags = if fin { FLAG_FIN } else { 0 };
        self.with_headers(
            frame_type::SYN_REPLY,
            flags,
            &stream_id.to_be_bytes(),
            headers,
        )
    }

    /// A HEADERS frame for `stream_id`.
    pub fn headers(
        &mut self,
        stream_id: u32,
        fin: bool,
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, SpdyError> {
        check_stream_id(stream_id)?;
        let flags = if fin { FLAG_FIN } else { 0 };
        self.with_headers(
            frame_type::HEADERS,
            flags,
            &stream_id.to_be_bytes(),
            headers,
        )
    }

    fn with_headers(
        &mut self,
        frame_type: u16,
        flags: u8,
        prefix: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, SpdyError> {
        // Only blocks this codec would read back are written.
        self.block.clear();
        self.block
            .extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            let bad = |e| SpdyError::BadHeaderToWrite(name.to_string(), e);
            check_name(name.as_bytes()).map_err(bad)?;
            check_value(name, value.as_bytes()).map_err(bad)?;
            for part in [name.as_bytes(), value.as_bytes()] {
                let n = u32::try_from(part.len()).map_err(|_| SpdyError::TooLongToWrite {
                    kind: "header",
                    len: part.len(),
                })?;
                self.block.extend_from_slice(&n.to_be_bytes());
                self.block.extend_from_slice(part);
            }
        }
        let mut names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(SpdyError::BadHeaderToWrite(
                w[0].to_string(),
                HeaderError::DuplicateName(w[0].to_string()),
            ));
        }
        let mut body = prefix.to_vec();
        self.deflate_into(&mut body)?;
        control(frame_type, flags, &body)
    }

    /// Compresses `self.block` onto the end of `out`, ending with a sync flush so the peer
    /// can inflate all of it now.
    fn deflate_into(&mut self, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let input = std::mem::take(&mut self.block);
        let mut read = 0usize;
        let result = loop {
            out.reserve(input.len() / 2 + 64);
            let before = self.z.total_in();
            if let Err(e) = self
                .z
                .compress_vec(&input[read..], out, FlushCompress::Sync)
            {
                break Err(SpdyError::Deflate(e.to_string()));
            }
            read += (self.z.total_in() - before) as usize;
            // Done when all input is in and the flush left spare room in `out`.
            if read == input.len() && out.len() < out.capacity() {
                break Ok(());
            }
        };
        self.block = input;
        result
    }
}

fn check_stream_id(stream_id: u32) -> Result<(), SpdyError> {
    if stream_id == 0 || stream_id > 0x7fff_ffff {
        Err(SpdyError::InvalidStreamId(stream_id))
    } else {
        Ok(())
    }
}

/// A control frame with `body`.
fn control(frame_type: u16, flags: u8, body: &[u8]) -> Result<Vec<u8>, SpdyError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(SpdyError::TooLongToWrite {
            kind: "control",
            len: body.len(),
        });
    }
    Ok(control_unchecked(frame_type, flags, body))
}

/// A control frame with a `body` known to fit.
fn control_unchecked(frame_type: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&frame_type.to_be_bytes());
    frame.extend_from_slice(&((u32::from(flags) << 24) | body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

fn control8(frame_type: u16, a: u32, b: u32) -> Vec<u8> {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&a.to_be_bytes());
    body[4..].copy_from_slice(&b.to_be_bytes());
    control_unchecked(frame_type, 0, &body)
}

/// A DATA frame.
pub fn data(stream_id: u32, fin: bool, payload: &[u8]) -> Result<Vec<u8>, SpdyError> {
    check_stream_id(stream_id)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(SpdyError::TooLongToWrite {
            kind: "DATA",
            len: payload.len(),
        });
    }
    let flags = if fin { FLAG_FIN } else { 0 };
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(&((u32::from(flags) << 24) | payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// A RST_STREAM frame (`status`: see [`rst_status`]).
pub fn rst_stream(stream_id: u32, status: u32) -> Result<Vec<u8>, SpdyError> {
    check_stream_id(stream_id)?;
    Ok(control8(frame_type::RST_STREAM, stream_id, status))
}

/// A SETTINGS frame.
pub fn settings(clear: bool, entries: &[Setting]) -> Result<Vec<u8>, SpdyError> {
    let mut body = Vec::with_capacity(4 + 8 * entries.len());
    body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        body.extend_from_slice(&((u32::from(e.flags) << 24) | (e.id & 0xff_ffff)).to_be_bytes());
        body.extend_from_slice(&e.value.to_be_bytes());
    }
    let flags = if clear { FLAG_SETTINGS_CLEAR } else { 0 };
    control(frame_type::SETTINGS, flags, &body)
}

/// A PING frame.
pub fn ping(id: u32) -> Vec<u8> {
    control_unchecked(frame_type::PING, 0, &id.to_be_bytes())
}

/// A GOAWAY frame (`status` 0 OK, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR).
pub fn goaway(last_good_stream_id: u32, status: u32) -> Result<Vec<u8>, SpdyError> {
    if last_good_stream_id > 0x7fff_ffff {
        return Err(SpdyError::InvalidStreamId(last_good_stream_id));
    }
    Ok(control8(frame_type::GOAWAY, last_good_stream_id, status))
}

/// A WINDOW_UPDATE frame (`stream_id` 0: the session's window).
pub fn window_update(stream_id: u32, delta: u32) -> Result<Vec<u8>, SpdyError> {
    if stream_id > 0x7fff_ffff {
        return Err(SpdyError::InvalidStreamId(stream_id));
    }
    if delta == 0 || delta > 0x7fff_ffff {
        return Err(SpdyError::BadDelta(delta));
    }
    Ok(control8(frame_type::WINDOW_UPDATE, stream_id, delta))
}

/// Which end of the connection sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// kubectl (or whatever opened the upgraded connection).
    Client,
    /// The API server, speaking for the kubelet.
    Server,
}

impl Side {
    pub fn other(self) -> Self {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// What a stream carries, from its `streamtype` header (Kubernetes' remotecommand and
/// portforward protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    Stdin,
    Stdout,
    Stderr,
    /// The exec's outcome (a `Status` in JSON) or a port-forward's error text.
    Error,
    /// Terminal size changes, JSON `{"Width":W,"Height":H}` per line.
    Resize,
    /// A port-forward connection's bytes.
    Data,
}

impl StreamType {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "stdin" => Self::Stdin,
            "stdout" => Self::Stdout,
            "stderr" => Self::Stderr,
            "error" => Self::Error,
            "resize" => Self::Resize,
            "data" => Self::Data,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Error => "error",
            Self::Resize => "resize",
            Self::Data => "data",
        }
    }
}

impl fmt::Display for StreamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An open stream, as its SYN_STREAM described it, with what went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub id: u32,
    pub stream_type: StreamType,
    /// port-forward: the pod's port (`port` header).
    pub port: Option<u16>,
    /// port-forward: pairs a `data` stream with its `error` stream (`requestid` header).
    pub request_id: Option<String>,
    pub initiator: Side,
    pub replied: bool,
    pub client_fin: bool,
    pub server_fin: bool,
    /// DATA payload bytes each side sent on it.
    pub client_bytes: u64,
    pub server_bytes: u64,
}

impl StreamInfo {
    fn fin_mut(&mut self, side: Side) -> &mut bool {
        match side {
            Side::Client => &mut self.client_fin,
            Side::Server => &mut self.server_fin,
        }
    }

    fn bytes_mut(&mut self, side: Side) -> &mut u64 {
        match side {
            Side::Client => &mut self.client_bytes,
            Side::Server => &mut self.server_bytes,
        }
    }
}

/// What a frame meant for the streams of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A SYN_STREAM opened this stream.
    Opened(StreamInfo),
    /// A DATA frame of an open stream: record its payload under this type.
    Data {
        stream_id: u32,
        stream_type: StreamType,
        port: Option<u16>,
        /// Set when this frame's FIN finished the stream both ways: its final counts.
        closed: Option<StreamInfo>,
    },
    /// A DATA frame for a stream already reset or finished both ways: the receiver drops it
    /// (the Go peer ignores frames of streams it removed).
    Discarded { stream_id: u32 },
    /// The stream is over (RST_STREAM, or FIN from both sides): its final counts.
    Closed { info: StreamInfo, reset: bool },
    /// Nothing about streams (SETTINGS, PING, WINDOW_UPDATE, …) or nothing new.
    Nothing,
}

/// Why a frame does not fit the streams of the connection; the relay ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("SPDY stream {id} opened by the {side:?} has the wrong parity (client streams are odd, server streams even)")]
    WrongParity { id: u32, side: Side },
    #[error("SPDY stream {id} opened after stream {last} (ids must increase)")]
    NotIncreasing { id: u32, last: u32 },
    #[error("SPDY stream {0} has no streamtype header")]
    NoStreamType(u32),
    #[error("SPDY stream {id} has an unknown streamtype {value:?}")]
    UnknownStreamType { id: u32, value: String },
    #[error("SPDY stream {id} has a bad port header {value:?}")]
    BadPort { id: u32, value: String },
    #[error("SPDY stream {id}: header {name:?} has several values")]
    SeveralValues { id: u32, name: &'static str },
    #[error("more than {0} SPDY streams open at once")]
    TooManyStreams(usize),
    #[error("SPDY {frame} for stream {id}, which was never opened")]
    UnknownStream { frame: &'static str, id: u32 },
    #[error("SPDY {frame} for stream {id} from its own initiator")]
    WrongSide { frame: &'static str, id: u32 },
    #[error("SPDY DATA for stream {id} from the {side:?} before the stream was accepted")]
    DataBeforeReply { id: u32, side: Side },
    #[error("SPDY {frame} for stream {id} from the {side:?} after its FIN")]
    AfterFin {
        frame: &'static str,
        id: u32,
        side: Side,
    },
}

/// The streams of one connection, fed the frames of both directions.
///
/// Each frame must be observed before it is forwarded: the table then sees a SYN_STREAM
/// before the SYN_REPLY that answers it and a stream's frames in their order. Frames of the
/// two directions may still cross (a reset one way while DATA is on its way the other):
/// DATA for a stream that closed is [`Observed::Discarded`], not an error.
///
/// Streams are forgotten when they close, so the table holds at most `max_open` entries; a
/// frame for a closed stream is told apart from one for a stream never opened because each
/// side's stream ids increase.
#[derive(Debug, Clone)]
pub struct StreamTable {
    open: HashMap<u32, StreamInfo>,
    max_open: usize,
    last_client: u32,
    last_server: u32,
}

impl Default for StreamTable {
    fn default() -> Self {
        Self::new(1024)
    }
}

impl StreamTable {
    pub fn new(max_open: usize) -> Self {
        Self {
            open: HashMap::new(),
            max_open,
            last_client: 0,
            last_server: 0,
        }
    }

    /// What is stream `id`, if it is open.
    pub fn get(&self, id: u32) -> Option<&StreamInfo> {
        self.open.get(&id)
    }

    pub fn open_streams(&self) -> impl Iterator<Item = &StreamInfo> {
        self.open.values()
    }

    /// Takes note of a frame `from` sent.
    pub fn observe(&mut self, from: Side, frame: &FrameKind) -> Result<Observed, StreamError> {
        match frame {
            FrameKind::SynStream {
                stream_id,
                fin,
                unidirectional,
                headers,
                ..
            } => self.open(from, *stream_id, *fin, *unidirectional, headers),
            FrameKind::SynReply { stream_id, fin, .. } => {
                self.reply_or_headers(from, "SYN_REPLY", *stream_id, *fin, true)
            }
            FrameKind::Headers { stream_id, fin, .. } => {
                self.reply_or_headers(from, "HEADERS", *stream_id, *fin, false)
            }
            FrameKind::RstStream { stream_id, .. } => Ok(match self.open.remove(stream_id) {
                Some(info) => Observed::Closed { info, reset: true },
                None => Observed::Nothing,
            }),
            FrameKind::Data {
                stream_id,
                fin,
                payload,
            } => self.data(from, *stream_id, *fin, payload.len()),
            FrameKind::Settings { .. }
            | FrameKind::Ping { .. }
            | FrameKind::GoAway { .. }
            | FrameKind::WindowUpdate { .. }
            | FrameKind::Unknown { .. } => Ok(Observed::Nothing),
        }
    }

    fn last_mut(&mut self, side: Side) -> &mut u32 {
        match side {
            Side::Client => &mut self.last_client,
            Side::Server => &mut self.last_server,
        }
    }

    /// Whether `id` was opened at some point (by the side its parity names).
    fn ever_opened(&self, id: u32) -> bool {
        let last = if id % 2 == 1 {
            self.last_client
        } else {
            self.last_server
        };
        id <= last
    }

    fn open(
        &mut self,
        from: Side,
        id: u32,
        fin: bool,
        unidirectional: bool,
        headers: &Headers,
    ) -> Result<Observed, StreamError> {
        let odd = id % 2 == 1;
        if odd != (from == Side::Client) {
            return Err(StreamError::WrongParity { id, side: from });
        }
        let last = *self.last_mut(from);
        if id <= last {
            return Err(StreamError::NotIncreasing { id, last });
        }
        let single = |name: &'static str| -> Result<Option<&str>, StreamError> {
            match headers.get(name) {
                Some(v) if v.contains('\0') => Err(StreamError::SeveralValues { id, name }),
                v => Ok(v),
            }
        };
        let value = single("streamtype")?.ok_or(StreamError::NoStreamType(id))?;
        let stream_type =
            StreamType::parse(value).ok_or_else(|| StreamError::UnknownStreamType {
                id,
                value: value.to_string(),
            })?;
        // The kubelet reads the port with Go's ParseUint(…, 10, 16): digits only (Rust's
        // parser would also take a leading '+').
        let port = match single("port")? {
            None => None,
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p != 0 && v.bytes().all(|c| c.is_ascii_digit()) => Some(p),
                _ => {
                    return Err(StreamError::BadPort {
                        id,
                        value: v.to_string(),
                    })
                }
            },
        };
        let request_id = single("requestid")?.map(str::to_string);
        if self.open.len() >= self.max_open {
            return Err(StreamError::TooManyStreams(self.max_open));
        }
        *self.last_mut(from) = id;
        let mut info = StreamInfo {
            id,
            stream_type,
            port,
            request_id,
            initiator: from,
            replied: false,
            client_fin: false,
            server_fin: false,
            client_bytes: 0,
            server_bytes: 0,
        };
        *info.fin_mut(from) = fin;
        *info.fin_mut(from.other()) = unidirectional;
        let opened = Observed::Opened(info.clone());
        if info.client_fin && info.server_fin {
            // Opened and done in one frame: nothing will follow.
            return Ok(Observed::Closed { info, reset: false });
        }
        self.open.insert(id, info);
        Ok(opened)
    }

    fn reply_or_headers(
        &mut self,
        from: Side,
        frame: &'static str,
        id: u32,
        fin: bool,
        reply: bool,
    ) -> Result<Observed, StreamError> {
        let Some(info) = self.open.get_mut(&id) else {
            return if self.ever_opened(id) {
                Ok(Observed::Nothing)
            } else {
                Err(StreamError::UnknownStream { frame, id })
            };
        };
        if reply {
            if info.initiator == from {
                return Err(StreamError::WrongSide { frame, id });
            }
            info.replied = true;
        }
        if *info.fin_mut(from) {
            return Err(StreamError::AfterFin {
                frame,
                id,
                side: from,
            });
        }
        if fin {
            *info.fin_mut(from) = true;
        }
        Ok(self.close_if_done(id))
    }

    fn data(
        &mut self,
        from: Side,
        id: u32,
        fin: bool,
        len: usize,
    ) -> Result<Observed, StreamError> {
        let Some(info) = self.open.get_mut(&id) else {
            return if self.ever_opened(id) {
                Ok(Observed::Discarded { stream_id: id })
            } else {
                Err(StreamError::UnknownStream { frame: "DATA", id })
            };
        };
        if from != info.initiator && !info.replied {
            return Err(StreamError::DataBeforeReply { id, side: from });
        }
        if *info.fin_mut(from) {
            return Err(StreamError::AfterFin {
                frame: "DATA",
                id,
                side: from,
            });
        }
        *info.bytes_mut(from) += len as u64;
        let (stream_type, port) = (info.stream_type, info.port);
        if fin {
            *info.fin_mut(from) = true;
        }
        // The last DATA of a stream still carries a payload to record: the close is
        // reported with it.
        let closed = match self.close_if_done(id) {
            Observed::Closed { info, .. } => Some(info),
            _ => None,
        };
        Ok(Observed::Data {
            stream_id: id,
            stream_type,
            port,
            closed,
        })
    }

    fn close_if_done(&mut self, id: u32) -> Observed {
        match self.open.get(&id) {
            Some(info) if info.client_fin && info.server_fin => match self.open.remove(&id) {
                Some(info) => Observed::Closed { info, reset: false },
                None => Observed::Nothing,
            },
            _ => Observed::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `reader` makes of `bytes` pushed at once; panics on an error.
    fn decode(bytes: &[u8]) -> Vec<Frame> {
        let mut reader = SpdyReader::default();
        reader.push(bytes);
        let frames = drain(&mut reader).expect("valid frames");
        assert_eq!(reader.buffered(), 0, "a frame was left incomplete");
        frames
    }

    fn drain(reader: &mut SpdyReader) -> Result<Vec<Frame>, SpdyError> {
        let mut frames = Vec::new();
        while let Some(frame) = reader.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    /// The first error `bytes` make, pushed at once.
    fn first_error(bytes: &[u8]) -> SpdyError {
        let mut reader = SpdyReader::default();
        reader.push(bytes);
        let err = drain(&mut reader).expect_err("refused");
        assert_eq!(reader.next_frame(), Err(SpdyError::Poisoned));
        assert_eq!(reader.finish(), Err(SpdyError::Poisoned));
        err
    }

    fn header_error(bytes: &[u8]) -> HeaderError {
        match first_error(bytes) {
            SpdyError::HeaderBlock { source, .. } => source,
            other => panic!("not a header block error: {other}"),
        }
    }

    /// A header block as the draft lays it out, `count` being what it claims.
    fn block(count: u32, pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut b = count.to_be_bytes().to_vec();
        for (name, value) in pairs {
            b.extend_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name);
            b.extend_from_slice(&(value.len() as u32).to_be_bytes());
            b.extend_from_slice(value);
        }
        b
    }

    /// A zlib stream set up as a SPDY/3 sender does, independently of `SpdyWriter`.
    fn zlib(dict: Option<&[u8]>) -> Compress {
        let mut z = Compress::new(Compression::best(), true);
        if let Some(dict) = dict {
            z.set_dictionary(dict)
                .expect("a fresh stream takes a dictionary");
        }
        z
    }

    fn compress(z: &mut Compress, block: &[u8], flush: FlushCompress) -> Vec<u8> {
        let mut out = Vec::with_capacity(block.len() + 1024);
        let before = z.total_in();
        z.compress_vec(block, &mut out, flush).expect("compresses");
        assert_eq!((z.total_in() - before) as usize, block.len());
        out
    }

    fn syn_stream_frame(stream_id: u32, compressed: &[u8]) -> Vec<u8> {
        let mut body = stream_id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(compressed);
        control(frame_type::SYN_STREAM, 0, &body).expect("fits")
    }

    /// A SYN_STREAM for stream 1 with `block` compressed against the dictionary.
    fn syn_stream_with_block(block: &[u8]) -> Vec<u8> {
        let compressed = compress(&mut zlib(Some(dictionary())), block, FlushCompress::Sync);
        syn_stream_frame(1, &compressed)
    }

    /// One of everything, written by this module's writer.
    fn sample_stream() -> Vec<u8> {
        let mut w = SpdyWriter::new();
        let mut bytes = Vec::new();
        bytes.extend(
            settings(
                false,
                &[Setting {
                    flags: 0,
                    id: 7,
                    value: 65536,
                }],
            )
            .unwrap(),
        );
        bytes.extend(
            w.syn_stream(1, 0, 2, 0, &[("streamtype", "error")])
                .unwrap(),
        );
        bytes.extend(
            w.syn_stream(3, 0, 0, 0, &[("streamtype", "stdin"), ("x-two", "a\0b")])
                .unwrap(),
        );
        bytes.extend(data(3, false, b"ls -l\n").unwrap());
        bytes.extend(data(3, true, b"").unwrap());
        bytes.extend(w.syn_reply(3, false, &[]).unwrap());
        bytes.extend(w.headers(3, true, &[("x-trailer", "done")]).unwrap());
        bytes.extend(ping(1));
        bytes.extend(window_update(0, 1 << 20).unwrap());
        bytes.extend(rst_stream(1, rst_status::CANCEL).unwrap());
        bytes.extend(goaway(3, 0).unwrap());
        bytes
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // Adler-32 computed here from its definition, not by the zlib under test.
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in d {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, DICTIONARY_ADLER32);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
    }

    #[test]
    fn every_frame_round_trips() {
        let bytes = sample_stream();
        let frames = decode(&bytes);
        let kinds: Vec<&FrameKind> = frames.iter().map(Frame::kind).collect();
        let headers = |pairs: &[(&str, &str)]| {
            Headers(
                pairs
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            kinds,
            [
                &FrameKind::Settings {
                    clear: false,
                    entries: vec![Setting {
                        flags: 0,
                        id: 7,
                        value: 65536
                    }],
                },
                &FrameKind::SynStream {
                    stream_id: 1,
                    associated_to: 0,
                    priority: 2,
                    slot: 0,
                    fin: false,
                    unidirectional: false,
                    headers: headers(&[("streamtype", "error")]),
                },
                &FrameKind::SynStream {
                    stream_id: 3,
                    associated_to: 0,
                    priority: 0,
                    slot: 0,
                    fin: false,
                    unidirectional: false,
                    headers: headers(&[("streamtype", "stdin"), ("x-two", "a\0b")]),
                },
                &FrameKind::Data {
                    stream_id: 3,
                    fin: false,
                    payload: Bytes::from_static(b"ls -l\n"),
                },
                &FrameKind::Data {
                    stream_id: 3,
                    fin: true,
                    payload: Bytes::new(),
                },
                &FrameKind::SynReply {
                    stream_id: 3,
                    fin: false,
                    headers: Headers::default(),
                },
                &FrameKind::Headers {
                    stream_id: 3,
                    fin: true,
                    headers: headers(&[("x-trailer", "done")]),
                },
                &FrameKind::Ping { id: 1 },
                &FrameKind::WindowUpdate {
                    stream_id: 0,
                    delta: 1 << 20,
                },
                &FrameKind::RstStream {
                    stream_id: 1,
                    status: rst_status::CANCEL,
                },
                &FrameKind::GoAway {
                    last_good_stream_id: 3,
                    status: 0,
                },
            ]
        );
        let raw: Vec<u8> = frames.iter().flat_map(|f| f.raw().to_vec()).collect();
        assert_eq!(raw, bytes, "the frames' raw bytes are the input");
    }

    #[test]
    fn frames_come_out_the_same_whatever_the_chunks() {
        let bytes = sample_stream();
        let whole = decode(&bytes);
        for split in 0..=bytes.len() {
            let mut reader = SpdyReader::default();
            reader.push(&bytes[..split]);
            let mut frames = drain(&mut reader).unwrap();
            assert_eq!(reader.consumed() as usize + reader.buffered(), split);
            reader.push(&bytes[split..]);
            frames.extend(drain(&mut reader).unwrap());
            assert_eq!(frames, whole, "split at {split}");
            assert_eq!(reader.finish(), Ok(()));
        }
        let mut reader = SpdyReader::default();
        let mut frames = Vec::new();
        for byte in &bytes {
            reader.push(std::slice::from_ref(byte));
            frames.extend(drain(&mut reader).unwrap());
        }
        assert_eq!(frames, whole, "byte by byte");
    }

    #[test]
    fn a_header_block_compressed_by_plain_zlib_with_the_dictionary() {
        let mut z = zlib(Some(dictionary()));
        let first = block(2, &[(b"streamtype", b"data"), (b"port", b"8080")]);
        let second = block(2, &[(b"port", b"8080"), (b"streamtype", b"data")]);
        let mut bytes = syn_stream_frame(1, &compress(&mut z, &first, FlushCompress::Sync));
        let second_frame = syn_stream_frame(3, &compress(&mut z, &second, FlushCompress::Sync));
        bytes.extend_from_slice(&second_frame);
        let frames = decode(&bytes);
        let FrameKind::SynStream { headers, .. } = frames[1].kind() else {
            panic!("{:?}", frames[1]);
        };
        assert_eq!(headers.get("streamtype"), Some("data"));
        assert_eq!(headers.get("port"), Some("8080"));
        // The second block is a continuation of the direction's zlib stream: alone, it
        // means nothing.
        assert!(matches!(
            header_error(&second_frame),
            HeaderError::Inflate(_)
        ));
    }

    #[test]
    fn a_zlib_stream_without_the_dictionary_is_read_as_the_go_peer_reads_it() {
        let mut z = zlib(None);
        let bytes = syn_stream_frame(
            1,
            &compress(
                &mut z,
                &block(1, &[(b"streamtype", b"stdin")]),
                FlushCompress::Sync,
            ),
        );
        let frames = decode(&bytes);
        assert!(
            matches!(frames[0].kind(), FrameKind::SynStream { headers, .. } if headers.get("streamtype") == Some("stdin"))
        );
    }

    /// Reads one captured session: chunks as the relay read them, `C` from kubectl, `S` from
    /// the API server, each `TAG LEN(4) BYTES` (see testdata/README.md).
    fn capture(bytes: &[u8]) -> Vec<(Side, &[u8])> {
        let mut chunks = Vec::new();
        let mut b = bytes;
        while !b.is_empty() {
            let side = match b[0] {
                b'C' => Side::Client,
                b'S' => Side::Server,
                other => panic!("bad tag {other}"),
            };
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            chunks.push((side, &b[5..5 + len]));
            b = &b[5 + len..];
        }
        chunks
    }

    /// What a relay makes of a captured session: the payload of each stream type per side,
    /// the streams closed, and the bytes each reader held at the end.
    #[derive(Debug, Default)]
    struct Replay {
        payloads: HashMap<(Side, StreamType, u32), Vec<u8>>,
        opened: Vec<StreamInfo>,
        closed: Vec<(StreamInfo, bool)>,
        trailing: HashMap<Side, usize>,
    }

    fn replay(bytes: &[u8]) -> Replay {
        let (mut client, mut server) = (SpdyReader::default(), SpdyReader::default());
        let mut table = StreamTable::default();
        let mut forwarded: HashMap<Side, Vec<u8>> = HashMap::new();
        let mut pushed: HashMap<Side, Vec<u8>> = HashMap::new();
        let mut out = Replay::default();
        for (side, chunk) in capture(bytes) {
            let reader = match side {
                Side::Client => &mut client,
                Side::Server => &mut server,
            };
            pushed.entry(side).or_default().extend_from_slice(chunk);
            reader.push(chunk);
            while let Some(frame) = reader.next_frame().expect("kubectl's frames are valid") {
                match table
                    .observe(side, frame.kind())
                    .expect("and fit the streams")
                {
                    Observed::Opened(info) => out.opened.push(info),
                    Observed::Data {
                        stream_id,
                        stream_type,
                        closed,
                        ..
                    } => {
                        let FrameKind::Data { payload, .. } = frame.kind() else {
                            unreachable!("Data from a DATA frame");
                        };
                        out.payloads
                            .entry((side, stream_type, stream_id))
                            .or_default()
                            .extend_from_slice(payload);
                        if let Some(info) = closed {
                            out.closed.push((info, false));
                        }
                    }
                    Observed::Closed { info, reset } => out.closed.push((info, reset)),
                    Observed::Discarded { stream_id } => panic!("discarded on {stream_id}"),
                    Observed::Nothing => {}
                }
                forwarded
                    .entry(side)
                    .or_default()
                    .extend_from_slice(frame.raw());
            }
        }
        for (side, reader) in [(Side::Client, &client), (Side::Server, &server)] {
            let pushed = &pushed[&side];
            let forwarded = &forwarded[&side];
            assert_eq!(
                forwarded[..],
                pushed[..forwarded.len()],
                "{side:?}: forwarded as read"
            );
            assert_eq!(forwarded.len() + reader.buffered(), pushed.len());
            out.trailing.insert(side, reader.buffered());
        }
        out
    }

    fn payload(r: &Replay, side: Side, ty: StreamType, id: u32) -> &str {
        std::str::from_utf8(&r.payloads[&(side, ty, id)]).unwrap()
    }

    #[test]
    fn a_captured_kubectl_exec() {
        // kubectl 1.32 against kube-apiserver 1.20 (SPDY forced), `exec -i shell -- sh -c
        // 'cat; echo to-stderr >&2; exit 3'` with two lines on stdin.
        let r = replay(include_bytes!("testdata/spdy-exec.chunks"));
        let types: Vec<(u32, StreamType)> =
            r.opened.iter().map(|i| (i.id, i.stream_type)).collect();
        use StreamType::*;
        assert_eq!(types, [(1, Error), (3, Stdin), (5, Stdout), (7, Stderr)]);
        assert_eq!(
            payload(&r, Side::Client, Stdin, 3),
            "hello-stdin\nline two\n"
        );
        assert_eq!(
            payload(&r, Side::Server, Stdout, 5),
            "hello-stdin\nline two\n"
        );
        assert_eq!(payload(&r, Side::Server, Stderr, 7), "to-stderr\n");
        let status: serde_json::Value =
            serde_json::from_str(payload(&r, Side::Server, Error, 1)).unwrap();
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert_eq!(r.payloads.len(), 4);
        // The API server reset every stream, then kubectl's GOAWAY was cut short by the
        // connection's end.
        assert_eq!(r.closed.len(), 4);
        assert!(r.closed.iter().all(|(_, reset)| *reset));
        let stdin = &r.closed.iter().find(|(i, _)| i.id == 3).unwrap().0;
        assert!(stdin.client_fin && stdin.client_bytes == 21);
        assert_eq!(r.trailing[&Side::Client], 4);
        assert_eq!(r.trailing[&Side::Server], 0);
    }

    #[test]
    fn a_captured_kubectl_exec_with_a_terminal() {
        // `exec -it shell -- sh` in a 100×30 terminal, typing `echo hi-tty; exit 0`.
        let r = replay(include_bytes!("testdata/spdy-exec-tty.chunks"));
        use StreamType::*;
        let types: Vec<StreamType> = r.opened.iter().map(|i| i.stream_type).collect();
        assert_eq!(types, [Error, Stdin, Stdout, Resize]);
        assert_eq!(
            payload(&r, Side::Client, Resize, 7),
            "{\"Width\":100,\"Height\":30}\n"
        );
        assert_eq!(payload(&r, Side::Client, Stdin, 3), "echo hi-tty; exit 0\n");
        assert_eq!(
            payload(&r, Side::Server, Stdout, 5),
            "# echo hi-tty; exit 0\r\nhi-tty\r\n"
        );
        assert_eq!(
            payload(&r, Side::Server, Error, 1),
            "{\"metadata\":{},\"status\":\"Success\"}"
        );
    }

    #[test]
    fn a_captured_kubectl_port_forward() {
        // `port-forward pod/shell 25997:25998`, two HTTP requests through it.
        let r = replay(include_bytes!("testdata/spdy-portforward.chunks"));
        use StreamType::*;
        let opened: Vec<(u32, StreamType, Option<u16>, Option<&str>)> = r
            .opened
            .iter()
            .map(|i| (i.id, i.stream_type, i.port, i.request_id.as_deref()))
            .collect();
        assert_eq!(
            opened,
            [
                (1, Error, Some(25998), Some("0")),
                (3, Data, Some(25998), Some("0")),
                (5, Error, Some(25998), Some("1")),
                (7, Data, Some(25998), Some("1")),
            ]
        );
        assert!(payload(&r, Side::Client, Data, 3).starts_with("GET /index.txt HTTP/1.1\r\n"));
        assert!(payload(&r, Side::Server, Data, 3).ends_with("port-forwarded body\n"));
        assert!(payload(&r, Side::Server, Data, 7).starts_with("HTTP/1.0 404"));
        // The error streams finished both ways; the data streams were reset by kubectl.
        let mut closed: Vec<(u32, bool)> =
            r.closed.iter().map(|(i, reset)| (i.id, *reset)).collect();
        closed.sort_unstable();
        assert_eq!(closed, [(1, false), (3, true), (5, false), (7, true)]);
        let data3 = &r.closed.iter().find(|(i, _)| i.id == 3).unwrap().0;
        assert_eq!(data3.client_bytes, 88);
        assert_eq!(data3.server_bytes, 206);
        assert_eq!(r.trailing[&Side::Client] + r.trailing[&Side::Server], 0);
    }

    #[test]
    fn the_captured_sessions_decode_the_same_in_any_chunks() {
        for bytes in [
            &include_bytes!("testdata/spdy-exec.chunks")[..],
            include_bytes!("testdata/spdy-exec-tty.chunks"),
            include_bytes!("testdata/spdy-portforward.chunks"),
        ] {
            for side in [Side::Client, Side::Server] {
                let stream: Vec<u8> = capture(bytes)
                    .into_iter()
                    .filter(|(s, _)| *s == side)
                    .flat_map(|(_, c)| c.to_vec())
                    .collect();
                let mut reader = SpdyReader::default();
                reader.push(&stream);
                let whole = drain(&mut reader).unwrap();
                let tail = reader.buffered();
                for step in [1, 3, 7, 64] {
                    let mut reader = SpdyReader::default();
                    let mut frames = Vec::new();
                    for chunk in stream.chunks(step) {
                        reader.push(chunk);
                        frames.extend(drain(&mut reader).unwrap());
                    }
                    assert_eq!(frames, whole);
                    assert_eq!(reader.buffered(), tail);
                }
            }
        }
    }

    #[test]
    fn frame_errors() {
        let frame = |ty: u16, flags: u8, body: &[u8]| control(ty, flags, body).unwrap();
        let mut v2 = frame(frame_type::PING, 0, &[0, 0, 0, 1]);
        v2[1] = 2;
        assert_eq!(first_error(&v2), SpdyError::UnsupportedVersion(2));
        assert!(first_error(&v2).to_string().contains("version 2"));

        use frame_type::*;
        let bad_len = |f: &[u8]| matches!(first_error(f), SpdyError::BadLength { .. });
        assert!(bad_len(&frame(RST_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0])));
        assert!(bad_len(&frame(PING, 0, &[0; 8])));
        assert!(bad_len(&frame(GOAWAY, 0, &[0; 4])));
        assert!(bad_len(&frame(WINDOW_UPDATE, 0, &[0; 12])));
        assert!(bad_len(&frame(
            SETTINGS,
            0,
            &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1]
        )));
        assert!(bad_len(&frame(SETTINGS, 0, &[0, 0])));
        assert!(bad_len(&frame(
            SYN_STREAM,
            0,
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        )));
        assert!(bad_len(&frame(SYN_REPLY, 0, &[0, 0, 0, 1])));
        assert!(bad_len(&frame(HEADERS, 0, &[])));

        assert_eq!(
            first_error(&frame(RST_STREAM, 1, &[0, 0, 0, 1, 0, 0, 0, 5])),
            SpdyError::BadFlags {
                frame: "RST_STREAM",
                flags: 1
            }
        );
        assert_eq!(
            first_error(&frame(RST_STREAM, 0, &[0, 0, 0, 0, 0, 0, 0, 5])),
            SpdyError::ZeroStreamId {
                frame: "RST_STREAM"
            }
        );
        assert_eq!(
            first_error(&frame(RST_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0])),
            SpdyError::ZeroStatus(1)
        );
        assert_eq!(
            first_error(&frame(WINDOW_UPDATE, 0, &[0x80, 0, 0, 1, 0, 0, 0, 1])),
            SpdyError::ReservedBit {
                frame: "WINDOW_UPDATE",
                field: "the stream id"
            }
        );
        let mut reserved = syn_stream_with_block(&block(1, &[(b"streamtype", b"stdin")]));
        reserved[8] |= 0x80;
        assert!(matches!(
            first_error(&reserved),
            SpdyError::ReservedBit {
                frame: "SYN_STREAM",
                ..
            }
        ));
        assert_eq!(
            first_error(&[0, 0, 0, 0, 0, 0, 0, 1, b'x']),
            SpdyError::ZeroStreamId { frame: "DATA" }
        );
        assert!(matches!(
            first_error(&frame(SYN_STREAM, 0x04, &[0; 12])),
            SpdyError::BadFlags { .. }
        ));
    }

    #[test]
    fn unknown_control_frames_pass_through() {
        // CREDENTIAL (10) of SPDY/3, dropped from 3.1.
        let credential = control(10, 0, b"whatever it held").unwrap();
        let mut bytes = credential.clone();
        bytes.extend(ping(7));
        let frames = decode(&bytes);
        assert_eq!(
            frames[0].kind(),
            &FrameKind::Unknown {
                frame_type: 10,
                flags: 0
            }
        );
        assert_eq!(frames[0].raw()[..], credential[..]);
        assert_eq!(frames[1].kind(), &FrameKind::Ping { id: 7 });
    }

    #[test]
    fn header_block_errors() {
        let err = |b: Vec<u8>| header_error(&syn_stream_with_block(&b));
        assert_eq!(
            err(block(1, &[(b"Streamtype", b"stdin")])),
            HeaderError::BadName("Streamtype".into())
        );
        assert_eq!(
            err(block(1, &[(b"stream type", b"stdin")])),
            HeaderError::BadName("stream type".into())
        );
        assert_eq!(err(block(1, &[(b"", b"stdin")])), HeaderError::EmptyName);
        assert_eq!(
            err(block(
                2,
                &[(b"streamtype", b"stdin"), (b"streamtype", b"stdout")]
            )),
            HeaderError::DuplicateName("streamtype".into())
        );
        for value in [&b"\0stdin"[..], b"stdin\0", b"std\0\0in"] {
            assert_eq!(
                err(block(1, &[(b"streamtype", value)])),
                HeaderError::EmptyValuePart("streamtype".into())
            );
        }
        assert_eq!(
            err(block(1, &[(b"streamtype", b"std\xffin")])),
            HeaderError::NotUtf8("streamtype".into())
        );
        assert_eq!(
            err(block(2, &[(b"streamtype", b"stdin")])),
            HeaderError::Truncated("header name length")
        );
        assert_eq!(
            err(block(1, &[(b"streamtype", b"stdin"), (b"port", b"1")])),
            HeaderError::TrailingBytes(13)
        );
        let mut short = block(1, &[(b"streamtype", b"stdin")]);
        short.truncate(short.len() - 2);
        assert_eq!(err(short), HeaderError::Truncated("header value"));
        assert_eq!(err(vec![0, 0]), HeaderError::Truncated("header count"));
        // An empty value is a value.
        let frames = decode(&syn_stream_with_block(&block(1, &[(b"x", b"")])));
        assert!(
            matches!(frames[0].kind(), FrameKind::SynStream { headers, .. } if headers.get("x") == Some(""))
        );
    }

    #[test]
    fn compression_errors() {
        let b = block(1, &[(b"streamtype", b"stdin")]);
        // Compressed against another dictionary.
        let other = compress(
            &mut zlib(Some(b"not the spdy dictionary")),
            &b,
            FlushCompress::Sync,
        );
        assert!(matches!(
            header_error(&syn_stream_frame(1, &other)),
            HeaderError::UnknownDictionary(id) if id != DICTIONARY_ADLER32
        ));
        // Not zlib at all.
        assert!(matches!(
            header_error(&syn_stream_frame(1, b"plain text, no zlib")),
            HeaderError::Inflate(_)
        ));
        // A sender that finishes its zlib stream can send no more header blocks.
        let finished = compress(&mut zlib(Some(dictionary())), &b, FlushCompress::Finish);
        assert_eq!(
            header_error(&syn_stream_frame(1, &finished)),
            HeaderError::StreamEnded
        );
        // Cut before its sync flush: the block is incomplete.
        let whole = compress(&mut zlib(Some(dictionary())), &b, FlushCompress::Sync);
        assert!(matches!(
            header_error(&syn_stream_frame(1, &whole[..whole.len() - 8])),
            HeaderError::Truncated(_)
        ));
    }

    #[test]
    fn a_zlib_bomb_is_an_error_not_an_allocation() {
        let huge = "a".repeat(10 << 20);
        let frame = SpdyWriter::new()
            .syn_stream(1, 0, 0, 0, &[("streamtype", &huge)])
            .unwrap();
        assert!(
            frame.len() < 64 << 10,
            "10 MiB compress to {} bytes",
            frame.len()
        );
        let mut reader = SpdyReader::default();
        reader.push(&frame);
        assert!(matches!(
            reader.next_frame(),
            Err(SpdyError::HeaderBlock {
                source: HeaderError::TooLarge { max: 65536 },
                ..
            })
        ));
        assert!(reader.inflater.out.len() <= (64 << 10) + 1);
        // Exactly at the limit is fine.
        let limits = Limits {
            max_header_block: 4 + 4 + 1 + 4 + 1000,
            ..Limits::default()
        };
        let value = "v".repeat(1000);
        let mut reader = SpdyReader::new(limits);
        reader.push(
            &SpdyWriter::new()
                .syn_stream(1, 0, 0, 0, &[("x", &value)])
                .unwrap(),
        );
        assert!(reader.next_frame().unwrap().is_some());
        let mut reader = SpdyReader::new(limits);
        let value = "v".repeat(1001);
        reader.push(
            &SpdyWriter::new()
                .syn_stream(1, 0, 0, 0, &[("x", &value)])
                .unwrap(),
        );
        assert!(reader.next_frame().is_err());
    }

    #[test]
    fn frame_lengths_are_capped_before_the_body_arrives() {
        let limits = Limits::default();
        // A DATA header announcing 2 MiB: refused on its 8 bytes.
        let mut reader = SpdyReader::new(limits);
        reader.push(&[0, 0, 0, 1, 0, 0x20, 0, 0]);
        assert_eq!(
            reader.next_frame(),
            Err(SpdyError::FrameTooLarge {
                kind: "DATA",
                len: 2 << 20,
                max: 1 << 20
            })
        );
        // A control frame of 16 MiB - 1.
        let mut reader = SpdyReader::new(limits);
        reader.push(&[0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(
            reader.next_frame(),
            Err(SpdyError::FrameTooLarge {
                kind: "control",
                ..
            })
        ));
        // At the cap: waits for the body, then takes it.
        let payload = vec![7u8; limits.max_data_len];
        let frame = data(1, false, &payload).unwrap();
        let mut reader = SpdyReader::new(limits);
        reader.push(&frame[..frame.len() - 1]);
        assert_eq!(reader.next_frame(), Ok(None));
        assert!(reader.buffered() <= limits.max_buffered());
        assert_eq!(
            reader.finish(),
            Err(SpdyError::Truncated {
                buffered: frame.len() - 1
            })
        );
        reader.push(&frame[frame.len() - 1..]);
        let got = reader.next_frame().unwrap().unwrap();
        assert!(
            matches!(got.kind(), FrameKind::Data { payload: p, .. } if p.len() == payload.len())
        );
        // A smaller cap.
        let mut reader = SpdyReader::new(Limits {
            max_data_len: 16,
            ..limits
        });
        reader.push(&data(1, false, &[0; 17]).unwrap()[..8]);
        assert!(reader.next_frame().is_err());
    }

    #[test]
    fn writer_errors() {
        let mut w = SpdyWriter::new();
        assert_eq!(data(0, false, b""), Err(SpdyError::InvalidStreamId(0)));
        assert_eq!(
            data(1 << 31, false, b""),
            Err(SpdyError::InvalidStreamId(1 << 31))
        );
        assert!(matches!(
            data(1, false, &vec![0; MAX_FRAME_LEN + 1]),
            Err(SpdyError::TooLongToWrite { kind: "DATA", .. })
        ));
        assert_eq!(rst_stream(0, 1), Err(SpdyError::InvalidStreamId(0)));
        assert_eq!(window_update(1, 0), Err(SpdyError::BadDelta(0)));
        assert!(w.syn_stream(0, 0, 0, 0, &[]).is_err());
        assert!(w.syn_stream(1, 0, 0, 0, &[("Upper", "x")]).is_err());
        assert!(w.syn_stream(1, 0, 0, 0, &[("a", "1"), ("a", "2")]).is_err());
        assert!(w.syn_reply(1, false, &[("a", "\0")]).is_err());
        // A refused frame leaves the writer's zlib stream untouched.
        let mut r = SpdyReader::default();
        r.push(
            &w.syn_stream(1, 0, 0, 0, &[("streamtype", "stdin")])
                .unwrap(),
        );
        assert!(r.next_frame().unwrap().is_some());
    }

    fn opened(
        table: &mut StreamTable,
        side: Side,
        id: u32,
        headers: &[(&str, &str)],
    ) -> Result<Observed, StreamError> {
        let headers = Headers(
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        );
        table.observe(
            side,
            &FrameKind::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers,
            },
        )
    }

    fn data_kind(id: u32, fin: bool, payload: &'static [u8]) -> FrameKind {
        FrameKind::Data {
            stream_id: id,
            fin,
            payload: Bytes::from_static(payload),
        }
    }

    fn reply(id: u32, fin: bool) -> FrameKind {
        FrameKind::SynReply {
            stream_id: id,
            fin,
            headers: Headers::default(),
        }
    }

    #[test]
    fn the_stream_table_follows_streams() {
        use Side::*;
        let mut t = StreamTable::default();
        assert!(matches!(
            opened(&mut t, Client, 1, &[("streamtype", "stdout")]),
            Ok(Observed::Opened(StreamInfo {
                id: 1,
                stream_type: StreamType::Stdout,
                ..
            }))
        ));
        assert_eq!(t.get(1).unwrap().stream_type, StreamType::Stdout);
        // The server may not send before it accepted the stream.
        assert_eq!(
            t.observe(Server, &data_kind(1, false, b"x")),
            Err(StreamError::DataBeforeReply {
                id: 1,
                side: Server
            })
        );
        assert_eq!(
            t.observe(Client, &reply(1, false)),
            Err(StreamError::WrongSide {
                frame: "SYN_REPLY",
                id: 1
            })
        );
        assert_eq!(t.observe(Server, &reply(1, false)), Ok(Observed::Nothing));
        assert_eq!(
            t.observe(Server, &data_kind(1, false, b"out")),
            Ok(Observed::Data {
                stream_id: 1,
                stream_type: StreamType::Stdout,
                port: None,
                closed: None
            })
        );
        assert!(matches!(
            t.observe(Client, &data_kind(1, true, b"")),
            Ok(Observed::Data { closed: None, .. })
        ));
        assert_eq!(
            t.observe(Client, &data_kind(1, false, b"late")),
            Err(StreamError::AfterFin {
                frame: "DATA",
                id: 1,
                side: Client
            })
        );
        let Ok(Observed::Data {
            closed: Some(info), ..
        }) = t.observe(Server, &data_kind(1, true, b"!"))
        else {
            panic!("the second FIN closes the stream");
        };
        assert_eq!((info.client_bytes, info.server_bytes), (0, 4));
        assert!(t.get(1).is_none());
        // Gone: a straggler is discarded, not an error.
        assert_eq!(
            t.observe(Server, &data_kind(1, false, b"x")),
            Ok(Observed::Discarded { stream_id: 1 })
        );
        // Never opened.
        assert_eq!(
            t.observe(Client, &data_kind(9, false, b"x")),
            Err(StreamError::UnknownStream {
                frame: "DATA",
                id: 9
            })
        );
        // Reset.
        opened(
            &mut t,
            Client,
            3,
            &[("streamtype", "data"), ("port", "5432"), ("requestid", "7")],
        )
        .unwrap();
        let info = t.get(3).unwrap();
        assert_eq!(
            (info.port, info.request_id.as_deref()),
            (Some(5432), Some("7"))
        );
        assert!(matches!(
            t.observe(
                Server,
                &FrameKind::RstStream {
                    stream_id: 3,
                    status: 5
                }
            ),
            Ok(Observed::Closed { reset: true, .. })
        ));
        assert_eq!(
            t.observe(Client, &data_kind(3, false, b"x")),
            Ok(Observed::Discarded { stream_id: 3 })
        );
        assert_eq!(
            t.observe(Client, &FrameKind::Ping { id: 1 }),
            Ok(Observed::Nothing)
        );
    }

    #[test]
    fn the_stream_table_refuses_what_it_cannot_attribute() {
        use Side::*;
        let mut t = StreamTable::new(2);
        assert_eq!(
            opened(&mut t, Client, 1, &[]),
            Err(StreamError::NoStreamType(1))
        );
        assert!(matches!(
            opened(&mut t, Client, 1, &[("streamtype", "stdio")]),
            Err(StreamError::UnknownStreamType { id: 1, .. })
        ));
        assert!(matches!(
            opened(&mut t, Client, 1, &[("streamtype", "stdin\0stdout")]),
            Err(StreamError::SeveralValues {
                id: 1,
                name: "streamtype"
            })
        ));
        for port in ["+80", "0", "65536", "80a", ""] {
            assert!(
                matches!(
                    opened(&mut t, Client, 1, &[("streamtype", "data"), ("port", port)]),
                    Err(StreamError::BadPort { .. })
                ),
                "{port:?}"
            );
        }
        assert_eq!(
            opened(&mut t, Client, 2, &[("streamtype", "stdin")]),
            Err(StreamError::WrongParity {
                id: 2,
                side: Client
            })
        );
        assert_eq!(
            opened(&mut t, Server, 1, &[("streamtype", "stdin")]),
            Err(StreamError::WrongParity {
                id: 1,
                side: Server
            })
        );
        opened(&mut t, Client, 3, &[("streamtype", "stdin")]).unwrap();
        assert_eq!(
            opened(&mut t, Client, 3, &[("streamtype", "stdin")]),
            Err(StreamError::NotIncreasing { id: 3, last: 3 })
        );
        assert_eq!(
            opened(&mut t, Client, 1, &[("streamtype", "stdin")]),
            Err(StreamError::NotIncreasing { id: 1, last: 3 })
        );
        opened(&mut t, Server, 2, &[("streamtype", "stdout")]).unwrap();
        assert_eq!(
            opened(&mut t, Client, 5, &[("streamtype", "stderr")]),
            Err(StreamError::TooManyStreams(2))
        );
        assert_eq!(
            t.observe(Server, &reply(11, false)),
            Err(StreamError::UnknownStream {
                frame: "SYN_REPLY",
                id: 11
            })
        );
    }
}
