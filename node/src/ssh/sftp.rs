//! SFTP (protocol version 3, draft-ietf-secsh-filexfer-02, what OpenSSH speaks) decoded from
//! the bytes of an `sftp` subsystem channel, for policy and audit.
//!
//! The gateway relays the channel in both directions through one [`SftpTracker`]:
//! - [`SftpTracker::client_bytes`] takes what the client sent and returns every request
//!   completed by it, decoded, together with the packet's bytes. The tracker holds back an
//!   incomplete packet until the rest arrives, so the gateway can decide on each request
//!   before the host sees it: it forwards the bytes of allowed packets, and for a refused one
//!   it sends [`status_reply`] to the client and calls [`SftpTracker::refused`] so the
//!   tracker stops waiting for a reply the host will never send.
//! - [`SftpTracker::server_bytes`] takes what the host sent (forwarded as is) and returns the
//!   operations that finished, each request matched with its reply by request id.
//!
//! Operations are shaped for audit, one record per thing a person did rather than per
//! packet: a file transfer is one record from OPEN to CLOSE with the bytes read and written
//! (a 1 GiB download is 32,000 READs), a directory listing one record from OPENDIR to CLOSE
//! with the entries returned, and each change (remove, rename, mkdir, rmdir, setstat, link
//! …) one record of its own. Lookups that change nothing (stat, lstat, fstat, realpath,
//! readlink, statvfs, limits) are what clients do all the time (a file manager stats every
//! file it shows), so they are recorded only when [`SftpTracker::with_lookups`] asks for
//! them; they are always returned by `client_bytes`, so policy still decides on each.
//!
//! Paths are bytes in SFTP. They are shown as UTF-8, lossily: a request whose path was not
//! valid UTF-8 says so ([`SftpRequest::path_not_utf8`]), since a policy comparing strings
//! cannot be sure which file it names. An absolute path is normalised lexically
//! ([`normalize_path`]: `/srv//config/./a` and `/tmp/../srv/config/a` are `/srv/config/a`),
//! so that rules and records see one spelling of it; the host still gets the client's bytes.
//! A relative path is kept as written.

use super::command::normalize_path;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The longest packet accepted (the length field's value). OpenSSH refuses messages over
/// 256 KiB; the margin covers a maximal READ reply's header.
pub const MAX_PACKET: usize = 256 * 1024 + 1024;

/// The most requests awaiting a reply. OpenSSH's client keeps at most 64 in flight; a
/// client with thousands outstanding is misbehaving, and the bound caps the memory one
/// channel costs.
pub const MAX_PENDING: usize = 4096;

/// The most handles open at once, for the same reason.
pub const MAX_HANDLES: usize = 4096;

/// Handles are at most 256 bytes long (draft-ietf-secsh-filexfer-02, section 3).
const MAX_HANDLE_LEN: usize = 256;

/// Status codes of SSH_FXP_STATUS.
pub const SSH_FX_OK: u32 = 0;
pub const SSH_FX_EOF: u32 = 1;
pub const SSH_FX_NO_SUCH_FILE: u32 = 2;
pub const SSH_FX_PERMISSION_DENIED: u32 = 3;
pub const SSH_FX_FAILURE: u32 = 4;
pub const SSH_FX_OP_UNSUPPORTED: u32 = 8;

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_LSTAT: u8 = 7;
const FXP_FSTAT: u8 = 8;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_REALPATH: u8 = 16;
const FXP_STAT: u8 = 17;
const FXP_RENAME: u8 = 18;
const FXP_READLINK: u8 = 19;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

const PFLAG_READ: u32 = 0x01;
const PFLAG_WRITE: u32 = 0x02;
const PFLAG_APPEND: u32 = 0x04;
const PFLAG_CREAT: u32 = 0x08;
const PFLAG_TRUNC: u32 = 0x10;
const PFLAG_EXCL: u32 = 0x20;

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// Extensions that only read: they are lookups, not writes.
const READ_ONLY_EXTENSIONS: &[&str] = &[
    "statvfs@openssh.com",
    "fstatvfs@openssh.com",
    "limits@openssh.com",
    "home-directory",
    "users-groups-by-id@openssh.com",
];

/// What a request does. Serialised in snake_case (`open`, `set_stat`, `extended`); the
/// names of [`SftpOp::name`] are the ones a policy configuration uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftpOp {
    /// The client's SSH_FXP_INIT (and, as an operation, the session's start).
    Init,
    /// Opening a file, with the access asked for.
    Open {
        read: bool,
        write: bool,
        create: bool,
        truncate: bool,
        append: bool,
        exclusive: bool,
    },
    Close,
    Read,
    Write,
    /// STAT, LSTAT and FSTAT.
    Stat,
    /// SETSTAT, FSETSTAT and lsetstat@openssh.com: changes mode, owner, size or times.
    SetStat,
    OpenDir,
    ReadDir,
    Remove,
    Mkdir,
    Rmdir,
    /// REALPATH and expand-path@openssh.com.
    RealPath,
    /// RENAME and posix-rename@openssh.com.
    Rename,
    ReadLink,
    Symlink,
    /// hardlink@openssh.com.
    Hardlink,
    /// copy-data: the server copies between two open handles.
    CopyData,
    /// fsync@openssh.com.
    Fsync,
    /// Another SSH_FXP_EXTENDED request, by name (statvfs@openssh.com, limits@openssh.com …).
    Extended(String),
    /// A packet type SFTP version 3 does not define. It is passed on (a policy may refuse
    /// it), and counts as a write since what it does is unknown.
    Unknown(u8),
}

impl SftpOp {
    /// Every [`SftpOp::name`] a rule's `operations` may name (`init` is not decided).
    pub const NAMES: [&'static str; 20] = [
        "open",
        "close",
        "read",
        "write",
        "stat",
        "set_stat",
        "open_dir",
        "read_dir",
        "remove",
        "mkdir",
        "rmdir",
        "real_path",
        "rename",
        "read_link",
        "symlink",
        "hardlink",
        "copy_data",
        "fsync",
        "extended",
        "unknown",
    ];

    /// A stable name for policy rules and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            SftpOp::Init => "init",
            SftpOp::Open { .. } => "open",
            SftpOp::Close => "close",
            SftpOp::Read => "read",
            SftpOp::Write => "write",
            SftpOp::Stat => "stat",
            SftpOp::SetStat => "set_stat",
            SftpOp::OpenDir => "open_dir",
            SftpOp::ReadDir => "read_dir",
            SftpOp::Remove => "remove",
            SftpOp::Mkdir => "mkdir",
            SftpOp::Rmdir => "rmdir",
            SftpOp::RealPath => "real_path",
            SftpOp::Rename => "rename",
            SftpOp::ReadLink => "read_link",
            SftpOp::Symlink => "symlink",
            SftpOp::Hardlink => "hardlink",
            SftpOp::CopyData => "copy_data",
            SftpOp::Fsync => "fsync",
            SftpOp::Extended(_) => "extended",
            SftpOp::Unknown(_) => "unknown",
        }
    }

    /// Whether the request may change the file system. A read-only policy refuses these.
    /// Conservative: unknown packet types and extensions not known to be read-only count as
    /// writes.
    pub fn is_write(&self) -> bool {
        match self {
            SftpOp::Open {
                write,
                create,
                truncate,
                append,
                ..
            } => *write || *create || *truncate || *append,
            SftpOp::Write
            | SftpOp::SetStat
            | SftpOp::Remove
            | SftpOp::Rename
            | SftpOp::Mkdir
            | SftpOp::Rmdir
            | SftpOp::Symlink
            | SftpOp::Hardlink
            | SftpOp::CopyData
            | SftpOp::Unknown(_) => true,
            SftpOp::Extended(name) => !READ_ONLY_EXTENSIONS.contains(&name.as_str()),
            SftpOp::Init
            | SftpOp::Close
            | SftpOp::Read
            | SftpOp::Stat
            | SftpOp::OpenDir
            | SftpOp::ReadDir
            | SftpOp::RealPath
            | SftpOp::ReadLink
            | SftpOp::Fsync => false,
        }
    }

    /// Lookups change nothing and are frequent: recorded only on request.
    fn is_lookup(&self) -> bool {
        match self {
            SftpOp::Stat | SftpOp::RealPath | SftpOp::ReadLink => true,
            SftpOp::Extended(name) => READ_ONLY_EXTENSIONS.contains(&name.as_str()),
            _ => false,
        }
    }
}

/// File attributes sent with OPEN, MKDIR and SETSTAT: what a request would set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftpAttrs {
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The mode bits, file type included (policy: setuid is 0o4000).
    pub permissions: Option<u32>,
    pub atime: Option<u32>,
    pub mtime: Option<u32>,
}

/// A client request, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftpRequest {
    /// The request id; INIT has none.
    pub id: Option<u32>,
    pub op: SftpOp,
    /// The path the request acts on, normalised if absolute. For requests on a handle (READ, WRITE, CLOSE, FSTAT,
    /// FSETSTAT, READDIR, fsync, copy-data), the path the handle was opened with, if the
    /// tracker saw that. For RENAME and hardlink the existing path; for SYMLINK the text the
    /// link will point to.
    pub path: Option<String>,
    /// The path a RENAME, hardlink, SYMLINK or copy-data brings into existence or writes.
    pub target: Option<String>,
    /// A path was not valid UTF-8: `path`/`target` show it with replacement characters.
    pub path_not_utf8: bool,
    /// The request names a handle (for copy-data, either handle) that is not open as far as
    /// the gateway knows: one the host has not returned yet (a client that sends `OPEN` and
    /// a request on the handle it expects in one write; sshd's first handle is always
    /// `00000000`), or one whose `CLOSE` the client has sent (the host may hand the same
    /// handle to the next `OPEN`). Which file it acts on cannot be known, so it cannot be
    /// decided: the gateway refuses it.
    pub handle_unknown: bool,
    /// A path named `..`: the host resolves it from where a symlink before it points, which
    /// the text (decided normalised) does not show.
    pub climbs: bool,
    /// READ and copy-data: the length asked for; WRITE: the data's length.
    pub length: u64,
    /// READ and WRITE: the file offset.
    pub offset: u64,
    /// Attributes to set (OPEN, MKDIR, SETSTAT, FSETSTAT).
    pub attrs: Option<SftpAttrs>,
}

impl SftpRequest {
    fn new(id: Option<u32>, op: SftpOp) -> Self {
        SftpRequest {
            id,
            op,
            path: None,
            target: None,
            path_not_utf8: false,
            handle_unknown: false,
            climbs: false,
            length: 0,
            offset: 0,
            attrs: None,
        }
    }
}

/// A complete client packet: the decoded request and the packet's bytes, which the gateway
/// forwards to the host if it allows the request. The bytes are returned (rather than a
/// range of the input) because a packet may span several calls of `client_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPacket {
    pub request: SftpRequest,
    pub raw: Vec<u8>,
}

/// A finished operation for audit: a request with the outcome of its reply, or for a file
/// or directory the whole OPEN..CLOSE span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftpOperation {
    /// The request; for a file or directory, the OPEN or OPENDIR.
    pub request: SftpRequest,
    /// The status code: of the reply; for a file, the first failure during the transfer,
    /// else the CLOSE's; `None` when the reply carried data instead (ATTRS, NAME,
    /// EXTENDED_REPLY) or the channel ended before a CLOSE.
    pub status: Option<u32>,
    /// The status message; for INIT the negotiated version.
    pub message: Option<String>,
    /// Bytes the host returned for READs of this file.
    pub bytes_read: u64,
    /// Bytes of WRITEs to this file that the host acknowledged.
    pub bytes_written: u64,
    /// Names returned: READDIR entries of a directory, or 1 for REALPATH/READLINK.
    pub entries: u64,
    /// The first name of a NAME reply: what REALPATH or READLINK resolved to.
    pub result: Option<String>,
}

impl SftpOperation {
    pub(super) fn new(request: SftpRequest) -> Self {
        SftpOperation {
            request,
            status: None,
            message: None,
            bytes_read: 0,
            bytes_written: 0,
            entries: 0,
            result: None,
        }
    }
}

/// Why the stream cannot be followed. After an error the tracker refuses further input:
/// its view of the stream is lost, and the gateway should close the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SftpError {
    #[error("SFTP packet of {len} bytes is longer than the limit of {max}")]
    PacketTooLong { len: usize, max: usize },
    #[error("malformed SFTP packet of type {packet_type}: {reason}")]
    Malformed {
        packet_type: u8,
        reason: &'static str,
    },
    #[error("the first SFTP packet from the client is not INIT")]
    NotInitialised,
    #[error("the server speaks SFTP version {0}, only version 3 is understood")]
    UnsupportedVersion(u32),
    #[error("more than {0} SFTP requests await a reply")]
    TooManyPending(usize),
    #[error("more than {0} SFTP handles are open")]
    TooManyHandles(usize),
    #[error("SFTP request id {0} is reused while still awaiting a reply")]
    DuplicateId(u32),
    #[error("the SFTP stream could not be followed earlier: {0}")]
    Failed(String),
}

/// An SSH_FXP_STATUS reply, for the gateway to answer a request it refused (usually with
/// [`SSH_FX_PERMISSION_DENIED`]). The language tag is empty, as OpenSSH sends it.
pub fn status_reply(id: u32, code: u32, message: &str) -> Vec<u8> {
    let mut body = vec![FXP_STATUS];
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&code.to_be_bytes());
    put_string(&mut body, message.as_bytes());
    put_string(&mut body, b"");
    let mut packet = Vec::with_capacity(body.len() + 4);
    packet.extend_from_slice(&(body.len() as u32).to_be_bytes());
    packet.extend_from_slice(&body);
    packet
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Splits one direction's byte stream into packets. Holds at most one incomplete packet.
#[derive(Debug, Default)]
struct Framer {
    partial: Vec<u8>,
}

impl Framer {
    /// The packets (length prefix included) that `data` completes.
    fn feed(&mut self, mut data: &[u8]) -> Result<Vec<Vec<u8>>, SftpError> {
        let mut packets = Vec::new();
        if !self.partial.is_empty() {
            if self.partial.len() < 4 {
                let take = (4 - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.partial.len() < 4 {
                    return Ok(packets);
                }
            }
            let total = 4 + packet_len(&self.partial)?;
            let take = (total - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < total {
                return Ok(packets);
            }
            packets.push(std::mem::take(&mut self.partial));
        }
        while !data.is_empty() {
            if data.len() < 4 {
                self.partial.extend_from_slice(data);
                break;
            }
            let total = 4 + packet_len(data)?;
            if data.len() < total {
                self.partial.extend_from_slice(data);
                break;
            }
            packets.push(data[..total].to_vec());
            data = &data[total..];
        }
        Ok(packets)
    }
}

/// The length field of a packet, checked.
fn packet_len(header: &[u8]) -> Result<usize, SftpError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_PACKET {
        return Err(SftpError::PacketTooLong {
            len,
            max: MAX_PACKET,
        });
    }
    if len == 0 {
        return Err(SftpError::Malformed {
            packet_type: 0,
            reason: "empty packet",
        });
    }
    Ok(len)
}

/// Reads the fields of one packet's payload.
struct Reader<'a> {
    buf: &'a [u8],
    packet_type: u8,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: &'static str) -> SftpError {
        SftpError::Malformed {
            packet_type: self.packet_type,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SftpError> {
        if self.buf.len() < n {
            return Err(self.err("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, SftpError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, SftpError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn string(&mut self) -> Result<&'a [u8], SftpError> {
        let len = self.u32()? as usize;
        if len > self.buf.len() {
            return Err(self.err("string length beyond the packet"));
        }
        self.take(len)
    }

    fn handle(&mut self) -> Result<&'a [u8], SftpError> {
        let h = self.string()?;
        if h.len() > MAX_HANDLE_LEN {
            return Err(self.err("handle longer than 256 bytes"));
        }
        Ok(h)
    }

    fn attrs(&mut self) -> Result<SftpAttrs, SftpError> {
        let flags = self.u32()?;
        let mut a = SftpAttrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid = Some(self.u32()?);
            a.gid = Some(self.u32()?);
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.atime = Some(self.u32()?);
            a.mtime = Some(self.u32()?);
        }
        if flags & ATTR_EXTENDED != 0 {
            // Each pair takes at least 8 bytes, so a bogus count fails fast.
            let count = self.u32()?;
            for _ in 0..count {
                self.string()?;
                self.string()?;
            }
        }
        Ok(a)
    }
}

/// Lossy UTF-8 of a path, normalised if absolute; whether it was lossy, and whether it named
/// `..`.
fn path_string(bytes: &[u8]) -> (String, bool, bool) {
    let (text, lossy) = match std::str::from_utf8(bytes) {
        Ok(s) => (std::borrow::Cow::Borrowed(s), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    let climbs = text.split('/').any(|part| part == "..");
    (
        normalize_path(&text).unwrap_or_else(|| text.into_owned()),
        lossy,
        climbs,
    )
}

/// A request awaiting its reply.
#[derive(Debug)]
struct Pending {
    request: SftpRequest,
    /// The handle a handle request refers to.
    handle: Option<Vec<u8>>,
}

/// An open file or directory: the OPEN request and what happened since.
#[derive(Debug)]
struct OpenFile {
    operation: SftpOperation,
    /// The first failure on this handle, which becomes the record's status.
    failed: bool,
    /// The client sent its CLOSE: the file stays until the CLOSE's reply (which ends its
    /// record), but no later request may use the handle (see
    /// [`SftpRequest::handle_unknown`]).
    closing: bool,
}

/// Follows one SFTP channel. See the module documentation for how the gateway uses it.
#[derive(Debug, Default)]
pub struct SftpTracker {
    client: Framer,
    server: Framer,
    initialised: bool,
    init: Option<SftpRequest>,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, OpenFile>,
    lookups: bool,
    error: Option<SftpError>,
}

impl SftpTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also records lookups (stat, realpath, readlink, statvfs, limits) as operations.
    pub fn with_lookups(mut self, lookups: bool) -> Self {
        self.lookups = lookups;
        self
    }

    fn check(&self) -> Result<(), SftpError> {
        match &self.error {
            Some(e) => Err(SftpError::Failed(e.to_string())),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, e: SftpError) -> Result<T, SftpError> {
        self.error = Some(e.clone());
        Err(e)
    }

    /// Bytes the client sent. Returns the requests these bytes complete, in order, each
    /// with its packet's bytes; bytes of an incomplete packet are kept until it completes.
    /// Every request with an id is expected to get a reply from the host unless the gateway
    /// calls [`SftpTracker::refused`] for it.
    pub fn client_bytes(&mut self, data: &[u8]) -> Result<Vec<ClientPacket>, SftpError> {
        self.check()?;
        let packets = match self.client.feed(data) {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        let mut out = Vec::with_capacity(packets.len());
        for raw in packets {
            match self.decode_request(&raw) {
                Ok(request) => out.push(ClientPacket { request, raw }),
                Err(e) => return self.fail(e),
            }
        }
        Ok(out)
    }

    /// Bytes the host sent. Returns the operations that finished.
    pub fn server_bytes(&mut self, data: &[u8]) -> Result<Vec<SftpOperation>, SftpError> {
        self.check()?;
        let packets = match self.server.feed(data) {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        let mut out = Vec::new();
        for raw in packets {
            if let Err(e) = self.decode_reply(&raw, &mut out) {
                return self.fail(e);
            }
        }
        Ok(out)
    }

    /// Whether the host's stream is between packets: a reply the gateway writes to the
    /// client can only go there, or it would split a packet of the host's.
    pub fn server_at_boundary(&self) -> bool {
        self.server.partial.is_empty()
    }

    /// The gateway answered request `id` itself (with [`status_reply`] and `code`): the
    /// host never sees it, so no reply is expected. Returns the refused operation for audit.
    pub fn refused(&mut self, id: u32, code: u32, message: &str) -> Option<SftpOperation> {
        let pending = self.pending.remove(&id)?;
        let mut op = SftpOperation::new(pending.request);
        op.status = Some(code);
        op.message = Some(message.to_string());
        Some(op)
    }

    /// The channel closed: files and directories still open become operations of their
    /// own (with no status), so that a transfer cut short is still recorded.
    pub fn finish(&mut self) -> Vec<SftpOperation> {
        self.pending.clear();
        let mut open: Vec<OpenFile> = self.handles.drain().map(|(_, f)| f).collect();
        open.sort_by_key(|f| f.operation.request.id);
        open.into_iter().map(|f| f.operation).collect()
    }

    /// The file open under `handle`, unless its CLOSE was sent.
    fn open_file(&self, handle: &[u8]) -> Option<&OpenFile> {
        self.handles.get(handle).filter(|f| !f.closing)
    }

    fn decode_request(&mut self, raw: &[u8]) -> Result<SftpRequest, SftpError> {
        let packet_type = raw[4];
        let mut r = Reader {
            buf: &raw[5..],
            packet_type,
        };
        if packet_type == FXP_INIT {
            if self.initialised {
                return Err(r.err("INIT sent twice"));
            }
            let version = r.u32()?;
            self.initialised = true;
            let mut req = SftpRequest::new(None, SftpOp::Init);
            req.length = u64::from(version);
            self.init = Some(req.clone());
            return Ok(req);
        }
        if !self.initialised {
            return Err(SftpError::NotInitialised);
        }
        // Unknown types may not even carry an id; known ones must.
        let id = match r.u32() {
            Ok(id) => id,
            Err(_)
                if !(FXP_OPEN..=FXP_SYMLINK).contains(&packet_type)
                    && packet_type != FXP_EXTENDED =>
            {
                return Ok(SftpRequest::new(None, SftpOp::Unknown(packet_type)));
            }
            Err(e) => return Err(e),
        };
        let mut req = SftpRequest::new(Some(id), SftpOp::Close);
        let mut handle: Option<Vec<u8>> = None;
        let set_path = |req: &mut SftpRequest, bytes: &[u8]| {
            let (p, lossy, climbs) = path_string(bytes);
            req.path = Some(p);
            req.path_not_utf8 |= lossy;
            req.climbs |= climbs;
        };
        let set_target = |req: &mut SftpRequest, bytes: &[u8]| {
            let (p, lossy, climbs) = path_string(bytes);
            req.target = Some(p);
            req.path_not_utf8 |= lossy;
            req.climbs |= climbs;
        };
        match packet_type {
            FXP_OPEN => {
                set_path(&mut req, r.string()?);
                let pflags = r.u32()?;
                req.attrs = Some(r.attrs()?);
                req.op = SftpOp::Open {
                    read: pflags & PFLAG_READ != 0,
                    write: pflags & PFLAG_WRITE != 0,
                    create: pflags & PFLAG_CREAT != 0,
                    truncate: pflags & PFLAG_TRUNC != 0,
                    append: pflags & PFLAG_APPEND != 0,
                    exclusive: pflags & PFLAG_EXCL != 0,
                };
            }
            FXP_CLOSE | FXP_FSTAT | FXP_READDIR => {
                handle = Some(r.handle()?.to_vec());
                req.op = match packet_type {
                    FXP_CLOSE => SftpOp::Close,
                    FXP_FSTAT => SftpOp::Stat,
                    _ => SftpOp::ReadDir,
                };
            }
            FXP_READ => {
                handle = Some(r.handle()?.to_vec());
                req.offset = r.u64()?;
                req.length = u64::from(r.u32()?);
                req.op = SftpOp::Read;
            }
            FXP_WRITE => {
                handle = Some(r.handle()?.to_vec());
                req.offset = r.u64()?;
                req.length = r.string()?.len() as u64;
                req.op = SftpOp::Write;
            }
            FXP_LSTAT | FXP_STAT => {
                set_path(&mut req, r.string()?);
                req.op = SftpOp::Stat;
            }
            FXP_SETSTAT => {
                set_path(&mut req, r.string()?);
                req.attrs = Some(r.attrs()?);
                req.op = SftpOp::SetStat;
            }
            FXP_FSETSTAT => {
                handle = Some(r.handle()?.to_vec());
                req.attrs = Some(r.attrs()?);
                req.op = SftpOp::SetStat;
            }
            FXP_OPENDIR | FXP_REMOVE | FXP_RMDIR | FXP_REALPATH | FXP_READLINK => {
                set_path(&mut req, r.string()?);
                req.op = match packet_type {
                    FXP_OPENDIR => SftpOp::OpenDir,
                    FXP_REMOVE => SftpOp::Remove,
                    FXP_RMDIR => SftpOp::Rmdir,
                    FXP_REALPATH => SftpOp::RealPath,
                    _ => SftpOp::ReadLink,
                };
            }
            FXP_MKDIR => {
                set_path(&mut req, r.string()?);
                req.attrs = Some(r.attrs()?);
                req.op = SftpOp::Mkdir;
            }
            FXP_RENAME => {
                set_path(&mut req, r.string()?);
                set_target(&mut req, r.string()?);
                req.op = SftpOp::Rename;
            }
            FXP_SYMLINK => {
                // The draft orders the arguments (linkpath, targetpath), but OpenSSH (client
                // and server alike) sends (targetpath, linkpath), and the hosts behind the
                // gateway are OpenSSH: the first string is what the link points to, the
                // second the link that is created.
                set_path(&mut req, r.string()?);
                set_target(&mut req, r.string()?);
                req.op = SftpOp::Symlink;
            }
            FXP_EXTENDED => {
                let name = String::from_utf8_lossy(r.string()?).into_owned();
                req.op = match name.as_str() {
                    "posix-rename@openssh.com" | "hardlink@openssh.com" => {
                        set_path(&mut req, r.string()?);
                        set_target(&mut req, r.string()?);
                        if name.starts_with("posix") {
                            SftpOp::Rename
                        } else {
                            SftpOp::Hardlink
                        }
                    }
                    "lsetstat@openssh.com" => {
                        set_path(&mut req, r.string()?);
                        req.attrs = Some(r.attrs()?);
                        SftpOp::SetStat
                    }
                    "expand-path@openssh.com" => {
                        set_path(&mut req, r.string()?);
                        SftpOp::RealPath
                    }
                    "statvfs@openssh.com" => {
                        set_path(&mut req, r.string()?);
                        SftpOp::Extended(name)
                    }
                    "fstatvfs@openssh.com" => {
                        handle = Some(r.handle()?.to_vec());
                        SftpOp::Extended(name)
                    }
                    "fsync@openssh.com" => {
                        handle = Some(r.handle()?.to_vec());
                        SftpOp::Fsync
                    }
                    "copy-data" => {
                        let from = r.handle()?.to_vec();
                        let _read_offset = r.u64()?;
                        req.length = r.u64()?;
                        let to = r.handle()?;
                        req.offset = r.u64()?;
                        match self.open_file(to) {
                            Some(f) => req.target = f.operation.request.path.clone(),
                            None => req.handle_unknown = true,
                        }
                        handle = Some(from);
                        SftpOp::CopyData
                    }
                    _ => SftpOp::Extended(name),
                };
            }
            other => req.op = SftpOp::Unknown(other),
        }
        if self.pending.contains_key(&id) {
            return Err(SftpError::DuplicateId(id));
        }
        if self.pending.len() >= MAX_PENDING {
            return Err(SftpError::TooManyPending(MAX_PENDING));
        }
        if let Some(h) = &handle {
            match self.open_file(h) {
                Some(f) => req.path = f.operation.request.path.clone(),
                None => req.handle_unknown = true,
            }
            // The handle is dead from its CLOSE on, not from the host's reply: the host may
            // give it to an OPEN sent right after, and the client's requests on it then would
            // be decided on the closed file's path.
            if req.op == SftpOp::Close {
                if let Some(f) = self.handles.get_mut(h) {
                    f.closing = true;
                }
            }
        }
        self.pending.insert(
            id,
            Pending {
                request: req.clone(),
                handle,
            },
        );
        Ok(req)
    }

    fn decode_reply(&mut self, raw: &[u8], out: &mut Vec<SftpOperation>) -> Result<(), SftpError> {
        let packet_type = raw[4];
        let mut r = Reader {
            buf: &raw[5..],
            packet_type,
        };
        if packet_type == FXP_VERSION {
            let version = r.u32()?;
            if version != 3 {
                return Err(SftpError::UnsupportedVersion(version));
            }
            let request = self
                .init
                .take()
                .unwrap_or_else(|| SftpRequest::new(None, SftpOp::Init));
            let mut op = SftpOperation::new(request);
            op.message = Some(format!("version {version}"));
            out.push(op);
            return Ok(());
        }
        let id = r.u32()?;
        // A reply to nothing we know of (a request refused by the gateway, or a confused
        // host) changes nothing.
        let Some(pending) = self.pending.remove(&id) else {
            return Ok(());
        };
        let mut op = SftpOperation::new(pending.request);
        match packet_type {
            FXP_STATUS => {
                op.status = Some(r.u32()?);
                // Version 3 adds a message and a language tag; very old servers omit them.
                if !r.buf.is_empty() {
                    op.message = Some(String::from_utf8_lossy(r.string()?).into_owned());
                }
            }
            FXP_HANDLE => {
                let handle = r.handle()?.to_vec();
                if matches!(op.request.op, SftpOp::Open { .. } | SftpOp::OpenDir) {
                    if self.handles.len() >= MAX_HANDLES && !self.handles.contains_key(&handle) {
                        return Err(SftpError::TooManyHandles(MAX_HANDLES));
                    }
                    // A handle reused by the host replaces the old (closed) one.
                    self.handles.insert(
                        handle,
                        OpenFile {
                            operation: op,
                            failed: false,
                            closing: false,
                        },
                    );
                    return Ok(());
                }
            }
            FXP_DATA => {
                let len = r.string()?.len() as u64;
                op.bytes_read = len;
                if let SftpOp::CopyData = op.request.op {
                    op.bytes_written = len;
                }
            }
            FXP_NAME => {
                let count = r.u32()?;
                op.entries = u64::from(count);
                if count > 0 {
                    op.result = Some(String::from_utf8_lossy(r.string()?).into_owned());
                }
            }
            FXP_ATTRS => {
                r.attrs()?;
            }
            FXP_EXTENDED_REPLY => {}
            _ => return Err(r.err("not a reply type")),
        }
        self.finish_operation(op, pending.handle, out);
        Ok(())
    }

    /// Decides what a replied request becomes: part of its file's record, a record of its
    /// own, or (lookups) nothing.
    fn finish_operation(
        &mut self,
        op: SftpOperation,
        handle: Option<Vec<u8>>,
        out: &mut Vec<SftpOperation>,
    ) {
        let failed = op.status.is_some_and(|s| s != SSH_FX_OK && s != SSH_FX_EOF);
        let file_op = matches!(
            op.request.op,
            SftpOp::Read | SftpOp::Write | SftpOp::ReadDir | SftpOp::Close
        );
        if let (true, Some(h)) = (file_op, &handle) {
            if let Some(file) = self.handles.get_mut(h) {
                let record = &mut file.operation;
                match op.request.op {
                    SftpOp::Read => record.bytes_read += op.bytes_read,
                    SftpOp::Write if op.status == Some(SSH_FX_OK) => {
                        record.bytes_written += op.request.length;
                    }
                    SftpOp::ReadDir => record.entries += op.entries,
                    _ => {}
                }
                if failed && !file.failed {
                    file.failed = true;
                    record.status = op.status;
                    record.message = op.message.clone();
                }
                if op.request.op == SftpOp::Close {
                    if let Some(mut file) = self.handles.remove(h) {
                        if !file.failed {
                            file.operation.status = op.status;
                            file.operation.message = op.message;
                        }
                        out.push(file.operation);
                    }
                }
                return;
            }
        }
        if matches!(
            op.request.op,
            SftpOp::Read | SftpOp::Write | SftpOp::ReadDir
        ) && !failed
        {
            // On a handle the tracker does not know: nothing to attribute it to, and not
            // worth a record per packet.
            return;
        }
        if op.request.op.is_lookup() && !self.lookups {
            return;
        }
        if op.request.op == SftpOp::Fsync && !failed {
            return;
        }
        out.push(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds packets the way a client or server would.
    struct P(Vec<u8>);

    impl P {
        fn new(t: u8) -> Self {
            P(vec![t])
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &[u8]) -> Self {
            put_string(&mut self.0, v);
            self
        }
        fn done(self) -> Vec<u8> {
            let mut out = (self.0.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&self.0);
            out
        }
    }

    fn init() -> Vec<u8> {
        P::new(FXP_INIT).u32(3).done()
    }
    fn version() -> Vec<u8> {
        P::new(FXP_VERSION)
            .u32(3)
            .s(b"posix-rename@openssh.com")
            .s(b"1")
            .done()
    }
    fn open(id: u32, path: &[u8], pflags: u32) -> Vec<u8> {
        P::new(FXP_OPEN).u32(id).s(path).u32(pflags).u32(0).done()
    }
    fn handle(id: u32, h: &[u8]) -> Vec<u8> {
        P::new(FXP_HANDLE).u32(id).s(h).done()
    }
    fn status(id: u32, code: u32) -> Vec<u8> {
        P::new(FXP_STATUS).u32(id).u32(code).s(b"msg").s(b"").done()
    }
    fn write(id: u32, h: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
        P::new(FXP_WRITE).u32(id).s(h).u64(offset).s(data).done()
    }
    fn read(id: u32, h: &[u8], offset: u64, len: u32) -> Vec<u8> {
        P::new(FXP_READ).u32(id).s(h).u64(offset).u32(len).done()
    }
    fn data(id: u32, d: &[u8]) -> Vec<u8> {
        P::new(FXP_DATA).u32(id).s(d).done()
    }
    fn close(id: u32, h: &[u8]) -> Vec<u8> {
        P::new(FXP_CLOSE).u32(id).s(h).done()
    }
    fn path_req(t: u8, id: u32, path: &[u8]) -> Vec<u8> {
        P::new(t).u32(id).s(path).done()
    }

    /// A tracker past INIT/VERSION.
    fn started() -> SftpTracker {
        let mut t = SftpTracker::new();
        t.client_bytes(&init()).unwrap();
        t.server_bytes(&version()).unwrap();
        t
    }

    fn requests(t: &mut SftpTracker, bytes: &[u8]) -> Vec<SftpRequest> {
        t.client_bytes(bytes)
            .unwrap()
            .into_iter()
            .map(|p| p.request)
            .collect()
    }

    #[test]
    fn init_and_version() {
        let mut t = SftpTracker::new();
        let p = t.client_bytes(&init()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].request.op, SftpOp::Init);
        assert_eq!(p[0].request.id, None);
        assert_eq!(p[0].raw, init());
        let ops = t.server_bytes(&version()).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].request.op, SftpOp::Init);
        assert_eq!(ops[0].message.as_deref(), Some("version 3"));
    }

    #[test]
    fn requests_before_init_or_other_versions_are_refused() {
        let mut t = SftpTracker::new();
        assert_eq!(
            t.client_bytes(&open(1, b"/x", PFLAG_READ)),
            Err(SftpError::NotInitialised)
        );
        // Once failed, always failed.
        assert!(matches!(t.client_bytes(&init()), Err(SftpError::Failed(_))));
        let mut t = SftpTracker::new();
        t.client_bytes(&init()).unwrap();
        assert_eq!(
            t.server_bytes(&P::new(FXP_VERSION).u32(6).done()),
            Err(SftpError::UnsupportedVersion(6))
        );
        let mut t = started();
        assert!(t.client_bytes(&init()).is_err());
    }

    #[test]
    fn a_file_transfer_is_one_operation() {
        let mut t = started();
        let r = requests(&mut t, &open(1, b"/etc/passwd", PFLAG_READ));
        assert_eq!(
            r[0].op,
            SftpOp::Open {
                read: true,
                write: false,
                create: false,
                truncate: false,
                append: false,
                exclusive: false
            }
        );
        assert!(!r[0].op.is_write());
        assert_eq!(r[0].path.as_deref(), Some("/etc/passwd"));
        assert!(t.server_bytes(&handle(1, b"H1")).unwrap().is_empty());
        for i in 0..3u32 {
            let r = requests(&mut t, &read(10 + i, b"H1", u64::from(i) * 100, 100));
            assert_eq!(r[0].op, SftpOp::Read);
            assert_eq!(
                r[0].path.as_deref(),
                Some("/etc/passwd"),
                "path through the handle"
            );
            assert_eq!(r[0].offset, u64::from(i) * 100);
            assert_eq!(r[0].length, 100);
            assert!(t.server_bytes(&data(10 + i, &[7; 100])).unwrap().is_empty());
        }
        requests(&mut t, &read(13, b"H1", 300, 100));
        assert!(t.server_bytes(&status(13, SSH_FX_EOF)).unwrap().is_empty());
        let r = requests(&mut t, &close(14, b"H1"));
        assert_eq!(r[0].op, SftpOp::Close);
        assert_eq!(r[0].path.as_deref(), Some("/etc/passwd"));
        let ops = t.server_bytes(&status(14, SSH_FX_OK)).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].request.op.name(), "open");
        assert_eq!(ops[0].request.path.as_deref(), Some("/etc/passwd"));
        assert_eq!(ops[0].bytes_read, 300);
        assert_eq!(ops[0].bytes_written, 0);
        assert_eq!(ops[0].status, Some(SSH_FX_OK));
        assert!(t.finish().is_empty());
    }

    #[test]
    fn writes_are_aggregated_and_only_acknowledged_ones_count() {
        let mut t = started();
        let flags = PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC;
        let r = requests(&mut t, &open(1, b"/tmp/up", flags));
        assert!(r[0].op.is_write());
        t.server_bytes(&handle(1, b"\x00\x01")).unwrap();
        let mut bytes = Vec::new();
        for i in 0..4u32 {
            bytes.extend(write(2 + i, b"\x00\x01", u64::from(i) * 1000, &[1; 1000]));
        }
        let r = requests(&mut t, &bytes);
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|r| r.op == SftpOp::Write && r.length == 1000));
        assert!(r.iter().all(|r| r.path.as_deref() == Some("/tmp/up")));
        let mut replies = Vec::new();
        for i in 0..3u32 {
            replies.extend(status(2 + i, SSH_FX_OK));
        }
        replies.extend(status(5, SSH_FX_FAILURE));
        assert!(t.server_bytes(&replies).unwrap().is_empty());
        requests(&mut t, &close(6, b"\x00\x01"));
        let ops = t.server_bytes(&status(6, SSH_FX_OK)).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].bytes_written, 3000);
        // The failed write is the transfer's status.
        assert_eq!(ops[0].status, Some(SSH_FX_FAILURE));
        assert_eq!(ops[0].message.as_deref(), Some("msg"));
    }

    #[test]
    fn every_split_of_the_streams_gives_the_same_result() {
        let mut client = init();
        client.extend(open(1, b"/srv/f", PFLAG_WRITE | PFLAG_CREAT));
        client.extend(write(2, b"h", 0, b"hello"));
        client.extend(close(3, b"h"));
        client.extend(path_req(FXP_REMOVE, 4, b"/srv/g"));
        let mut server = version();
        server.extend(handle(1, b"h"));
        server.extend(status(2, SSH_FX_OK));
        server.extend(status(3, SSH_FX_OK));
        server.extend(status(4, SSH_FX_NO_SUCH_FILE));
        let whole = {
            let mut t = SftpTracker::new();
            let mut c = Vec::new();
            // Client packets in full first: a request must be seen before its reply.
            c.extend(t.client_bytes(&client).unwrap());
            (c, t.server_bytes(&server).unwrap())
        };
        assert_eq!(whole.0.len(), 5);
        assert_eq!(whole.1.len(), 3);
        for cut in 0..=client.len() {
            for scut in [
                0,
                1,
                3,
                4,
                5,
                9,
                server.len() / 2,
                server.len() - 1,
                server.len(),
            ] {
                let mut t = SftpTracker::new();
                let mut c = t.client_bytes(&client[..cut]).unwrap();
                c.extend(t.client_bytes(&client[cut..]).unwrap());
                let mut s = t.server_bytes(&server[..scut]).unwrap();
                s.extend(t.server_bytes(&server[scut..]).unwrap());
                assert_eq!(c, whole.0, "client cut at {cut}");
                assert_eq!(s, whole.1, "server cut at {scut}");
            }
        }
        // And byte by byte.
        let mut t = SftpTracker::new();
        let mut c = Vec::new();
        for b in &client {
            c.extend(t.client_bytes(std::slice::from_ref(b)).unwrap());
        }
        let mut s = Vec::new();
        for b in &server {
            s.extend(t.server_bytes(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!((c, s), whole);
        // The raw bytes of the packets are the input, in order.
        let joined: Vec<u8> = whole.0.iter().flat_map(|p| p.raw.clone()).collect();
        assert_eq!(joined, client);
    }

    #[test]
    fn changes_are_one_operation_each() {
        let mut t = started();
        let mut c = path_req(FXP_REMOVE, 1, b"/a");
        c.extend(P::new(FXP_RENAME).u32(2).s(b"/old").s(b"/new").done());
        c.extend(
            P::new(FXP_MKDIR)
                .u32(3)
                .s(b"/d")
                .u32(ATTR_PERMISSIONS)
                .u32(0o755)
                .done(),
        );
        c.extend(path_req(FXP_RMDIR, 4, b"/e"));
        c.extend(
            P::new(FXP_SETSTAT)
                .u32(5)
                .s(b"/bin/x")
                .u32(ATTR_PERMISSIONS | ATTR_UIDGID)
                .u32(0)
                .u32(0)
                .u32(0o104755)
                .done(),
        );
        c.extend(
            P::new(FXP_SYMLINK)
                .u32(6)
                .s(b"/etc/shadow")
                .s(b"/tmp/l")
                .done(),
        );
        c.extend(
            P::new(FXP_EXTENDED)
                .u32(7)
                .s(b"posix-rename@openssh.com")
                .s(b"/p")
                .s(b"/q")
                .done(),
        );
        c.extend(
            P::new(FXP_EXTENDED)
                .u32(8)
                .s(b"hardlink@openssh.com")
                .s(b"/etc/passwd")
                .s(b"/tmp/h")
                .done(),
        );
        let r = requests(&mut t, &c);
        let names: Vec<&str> = r.iter().map(|r| r.op.name()).collect();
        assert_eq!(
            names,
            ["remove", "rename", "mkdir", "rmdir", "set_stat", "symlink", "rename", "hardlink"]
        );
        assert!(r.iter().all(|r| r.op.is_write()));
        assert_eq!(r[1].path.as_deref(), Some("/old"));
        assert_eq!(r[1].target.as_deref(), Some("/new"));
        assert_eq!(r[2].attrs.as_ref().unwrap().permissions, Some(0o755));
        let a = r[4].attrs.clone().unwrap();
        assert_eq!(
            (a.uid, a.gid, a.permissions),
            (Some(0), Some(0), Some(0o104755))
        );
        // OpenSSH order: target first, then the link created.
        assert_eq!(r[5].path.as_deref(), Some("/etc/shadow"));
        assert_eq!(r[5].target.as_deref(), Some("/tmp/l"));
        assert_eq!(r[7].path.as_deref(), Some("/etc/passwd"));
        assert_eq!(r[7].target.as_deref(), Some("/tmp/h"));
        let mut s = Vec::new();
        for id in 1..=8 {
            s.extend(status(
                id,
                if id == 1 {
                    SSH_FX_NO_SUCH_FILE
                } else {
                    SSH_FX_OK
                },
            ));
        }
        let ops = t.server_bytes(&s).unwrap();
        assert_eq!(ops.len(), 8);
        assert_eq!(ops[0].status, Some(SSH_FX_NO_SUCH_FILE));
        assert_eq!(ops[0].request.path.as_deref(), Some("/a"));
        assert!(ops[1..].iter().all(|o| o.status == Some(SSH_FX_OK)));
    }

    #[test]
    fn lookups_are_recorded_only_on_request() {
        for lookups in [false, true] {
            let mut t = started().with_lookups(lookups);
            let mut c = path_req(FXP_STAT, 1, b"/a");
            c.extend(path_req(FXP_LSTAT, 2, b"/b"));
            c.extend(path_req(FXP_REALPATH, 3, b"."));
            c.extend(path_req(FXP_READLINK, 4, b"/l"));
            c.extend(
                P::new(FXP_EXTENDED)
                    .u32(5)
                    .s(b"statvfs@openssh.com")
                    .s(b"/")
                    .done(),
            );
            c.extend(P::new(FXP_EXTENDED).u32(6).s(b"limits@openssh.com").done());
            let r = requests(&mut t, &c);
            assert!(r.iter().all(|r| !r.op.is_write()), "{r:?}");
            let mut s = P::new(FXP_ATTRS).u32(1).u32(ATTR_SIZE).u64(5).done();
            s.extend(status(2, SSH_FX_NO_SUCH_FILE));
            s.extend(
                P::new(FXP_NAME)
                    .u32(3)
                    .u32(1)
                    .s(b"/home/u")
                    .s(b"")
                    .u32(0)
                    .done(),
            );
            s.extend(
                P::new(FXP_NAME)
                    .u32(4)
                    .u32(1)
                    .s(b"/target")
                    .s(b"")
                    .u32(0)
                    .done(),
            );
            s.extend(P::new(FXP_EXTENDED_REPLY).u32(5).u64(0).done());
            s.extend(P::new(FXP_EXTENDED_REPLY).u32(6).u64(0).done());
            let ops = t.server_bytes(&s).unwrap();
            if lookups {
                assert_eq!(ops.len(), 6);
                assert_eq!(ops[2].result.as_deref(), Some("/home/u"));
                assert_eq!(ops[1].status, Some(SSH_FX_NO_SUCH_FILE));
            } else {
                assert!(ops.is_empty());
            }
        }
    }

    #[test]
    fn directory_listing_is_one_operation() {
        let mut t = started();
        requests(&mut t, &path_req(FXP_OPENDIR, 1, b"/home"));
        t.server_bytes(&handle(1, b"D")).unwrap();
        let r = requests(&mut t, &P::new(FXP_READDIR).u32(2).s(b"D").done());
        assert_eq!(r[0].path.as_deref(), Some("/home"));
        let name = P::new(FXP_NAME)
            .u32(2)
            .u32(2)
            .s(b"a")
            .s(b"-rw a")
            .u32(0)
            .s(b"b")
            .s(b"-rw b")
            .u32(0)
            .done();
        assert!(t.server_bytes(&name).unwrap().is_empty());
        requests(&mut t, &P::new(FXP_READDIR).u32(3).s(b"D").done());
        t.server_bytes(&status(3, SSH_FX_EOF)).unwrap();
        requests(&mut t, &close(4, b"D"));
        let ops = t.server_bytes(&status(4, SSH_FX_OK)).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].request.op, SftpOp::OpenDir);
        assert_eq!(ops[0].entries, 2);
        assert_eq!(ops[0].status, Some(SSH_FX_OK));
    }

    #[test]
    fn requests_on_handles_that_are_not_open_are_marked_unknown() {
        let fsetstat = |id: u32, h: &[u8]| {
            P::new(FXP_FSETSTAT)
                .u32(id)
                .s(h)
                .u32(ATTR_PERMISSIONS)
                .u32(0o777)
                .done()
        };
        let mut t = started();
        // OPEN and a request on the handle sshd will return, in one write.
        let mut c = open(1, b"/srv/config/app.conf", PFLAG_READ);
        c.extend(fsetstat(2, b"00000000"));
        let r = requests(&mut t, &c);
        assert!(!r[0].handle_unknown);
        assert!(r[1].handle_unknown);
        assert_eq!(r[1].path, None);
        t.refused(2, SSH_FX_FAILURE, "unknown handle").unwrap();
        t.server_bytes(&handle(1, b"00000000")).unwrap();
        let r = requests(&mut t, &fsetstat(3, b"00000000"));
        assert!(!r[0].handle_unknown);
        assert_eq!(r[0].path.as_deref(), Some("/srv/config/app.conf"));
        t.server_bytes(&status(3, SSH_FX_OK)).unwrap();
        // A handle is dead from its CLOSE on: the host may give it to the next OPEN.
        let mut c = close(4, b"00000000");
        c.extend(open(5, b"/tmp/other", PFLAG_WRITE));
        c.extend(fsetstat(6, b"00000000"));
        let r = requests(&mut t, &c);
        assert!(!r[0].handle_unknown, "the CLOSE itself");
        assert!(r[2].handle_unknown);
        t.refused(6, SSH_FX_FAILURE, "unknown handle").unwrap();
        // The CLOSE's reply still ends the file's record.
        let ops = t.server_bytes(&status(4, SSH_FX_OK)).unwrap();
        assert_eq!(ops[0].request.path.as_deref(), Some("/srv/config/app.conf"));
        t.server_bytes(&handle(5, b"00000000")).unwrap();
        assert!(!requests(&mut t, &fsetstat(7, b"00000000"))[0].handle_unknown);
        // copy-data: either handle unknown.
        for (from, to) in [
            (&b"00000000"[..], &b"00000001"[..]),
            (b"00000001", b"00000000"),
        ] {
            let copy = P::new(FXP_EXTENDED)
                .u32(8)
                .s(b"copy-data")
                .s(from)
                .u64(0)
                .u64(0)
                .s(to)
                .u64(0)
                .done();
            assert!(requests(&mut t, &copy)[0].handle_unknown);
            t.refused(8, SSH_FX_FAILURE, "unknown handle").unwrap();
        }
    }

    #[test]
    fn refused_requests() {
        let mut t = started();
        let p = t
            .client_bytes(&path_req(FXP_REMOVE, 9, b"/etc/passwd"))
            .unwrap();
        assert_eq!(p[0].request.id, Some(9));
        let reply = status_reply(9, SSH_FX_PERMISSION_DENIED, "refused by policy");
        let op = t
            .refused(9, SSH_FX_PERMISSION_DENIED, "refused by policy")
            .unwrap();
        assert_eq!(op.status, Some(SSH_FX_PERMISSION_DENIED));
        assert_eq!(op.request.path.as_deref(), Some("/etc/passwd"));
        assert_eq!(t.refused(9, SSH_FX_PERMISSION_DENIED, "again"), None);
        // The id may be used again, and a stray reply to a refused id changes nothing.
        assert!(t.server_bytes(&status(9, SSH_FX_OK)).unwrap().is_empty());
        requests(&mut t, &path_req(FXP_REMOVE, 9, b"/tmp/x"));
        assert_eq!(t.server_bytes(&status(9, SSH_FX_OK)).unwrap().len(), 1);
        // The generated reply is a well-formed STATUS packet.
        let mut r = Reader {
            buf: &reply[4..],
            packet_type: 0,
        };
        assert_eq!(
            u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize,
            reply.len() - 4
        );
        assert_eq!(r.take(1).unwrap(), [FXP_STATUS]);
        assert_eq!(r.u32().unwrap(), 9);
        assert_eq!(r.u32().unwrap(), SSH_FX_PERMISSION_DENIED);
        assert_eq!(r.string().unwrap(), b"refused by policy");
        assert_eq!(r.string().unwrap(), b"");
        assert!(r.buf.is_empty());
        // A refused write to an open file is recorded with the file's path and does not
        // count towards the file's bytes.
        requests(&mut t, &open(20, b"/f", PFLAG_WRITE));
        t.server_bytes(&handle(20, b"h")).unwrap();
        requests(&mut t, &write(21, b"h", 0, b"xyz"));
        let op = t.refused(21, SSH_FX_PERMISSION_DENIED, "no").unwrap();
        assert_eq!(op.request.path.as_deref(), Some("/f"));
        requests(&mut t, &close(22, b"h"));
        let ops = t.server_bytes(&status(22, SSH_FX_OK)).unwrap();
        assert_eq!(ops[0].bytes_written, 0);
    }

    #[test]
    fn failed_open_is_recorded_at_once_and_open_files_at_the_end() {
        let mut t = started();
        requests(&mut t, &open(1, b"/root/x", PFLAG_READ));
        let ops = t
            .server_bytes(&status(1, SSH_FX_PERMISSION_DENIED))
            .unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].status, Some(SSH_FX_PERMISSION_DENIED));
        requests(&mut t, &open(2, b"/a", PFLAG_READ));
        requests(&mut t, &open(3, b"/b", PFLAG_READ));
        t.server_bytes(&handle(2, b"A")).unwrap();
        t.server_bytes(&handle(3, b"B")).unwrap();
        requests(&mut t, &read(4, b"A", 0, 10));
        t.server_bytes(&data(4, b"0123456789")).unwrap();
        let rest = t.finish();
        let paths: Vec<_> = rest
            .iter()
            .map(|o| o.request.path.clone().unwrap())
            .collect();
        assert_eq!(paths, ["/a", "/b"]);
        assert_eq!(rest[0].bytes_read, 10);
        assert_eq!(rest[0].status, None);
    }

    #[test]
    fn extended_requests() {
        let mut t = started();
        requests(&mut t, &open(1, b"/src", PFLAG_READ));
        t.server_bytes(&handle(1, b"S")).unwrap();
        requests(&mut t, &open(2, b"/dst", PFLAG_WRITE));
        t.server_bytes(&handle(2, b"T")).unwrap();
        let copy = P::new(FXP_EXTENDED)
            .u32(3)
            .s(b"copy-data")
            .s(b"S")
            .u64(0)
            .u64(0)
            .s(b"T")
            .u64(0)
            .done();
        let r = requests(&mut t, &copy);
        assert_eq!(r[0].op, SftpOp::CopyData);
        assert!(r[0].op.is_write());
        assert_eq!(r[0].path.as_deref(), Some("/src"));
        assert_eq!(r[0].target.as_deref(), Some("/dst"));
        assert_eq!(t.server_bytes(&status(3, SSH_FX_OK)).unwrap().len(), 1);
        let fsync = P::new(FXP_EXTENDED)
            .u32(4)
            .s(b"fsync@openssh.com")
            .s(b"T")
            .done();
        let r = requests(&mut t, &fsync);
        assert_eq!(
            (r[0].op.name(), r[0].path.as_deref()),
            ("fsync", Some("/dst"))
        );
        assert!(t.server_bytes(&status(4, SSH_FX_OK)).unwrap().is_empty());
        let expand = P::new(FXP_EXTENDED)
            .u32(5)
            .s(b"expand-path@openssh.com")
            .s(b"~/x")
            .done();
        assert_eq!(requests(&mut t, &expand)[0].op, SftpOp::RealPath);
        let other = P::new(FXP_EXTENDED)
            .u32(6)
            .s(b"frobnicate@example.com")
            .s(b"z")
            .done();
        let r = requests(&mut t, &other);
        assert_eq!(r[0].op, SftpOp::Extended("frobnicate@example.com".into()));
        assert!(r[0].op.is_write(), "unknown extensions count as writes");
        let ops = t.server_bytes(&status(6, SSH_FX_OP_UNSUPPORTED)).unwrap();
        assert_eq!(ops[0].status, Some(SSH_FX_OP_UNSUPPORTED));
    }

    #[test]
    fn unknown_packet_types_are_passed_and_recorded() {
        let mut t = started();
        let r = requests(&mut t, &P::new(77).u32(5).s(b"x").done());
        assert_eq!(r[0].op, SftpOp::Unknown(77));
        assert_eq!(r[0].id, Some(5));
        assert!(r[0].op.is_write());
        let ops = t.server_bytes(&status(5, SSH_FX_OP_UNSUPPORTED)).unwrap();
        assert_eq!(ops.len(), 1);
        let r = requests(&mut t, &P::new(99).done());
        assert_eq!((r[0].id, &r[0].op), (None, &SftpOp::Unknown(99)));
    }

    #[test]
    fn absolute_paths_are_normalised_and_relative_ones_kept() {
        let mut t = started();
        let cases = [
            ("/srv//config/a", "/srv/config/a"),
            ("/srv/./config/b", "/srv/config/b"),
            ("/tmp/../srv/config/c", "/srv/config/c"),
            ("/../../srv/config/d", "/srv/config/d"),
            ("/srv/config/", "/srv/config"),
            ("//", "/"),
            ("config/../a", "config/../a"),
            ("", ""),
        ];
        for (id, (raw, want)) in cases.into_iter().enumerate() {
            let rename = P::new(FXP_RENAME)
                .u32(id as u32)
                .s(b"/x/./y")
                .s(raw.as_bytes())
                .done();
            let r = requests(&mut t, &rename);
            assert_eq!(r[0].path.as_deref(), Some("/x/y"));
            assert_eq!(r[0].target.as_deref(), Some(want), "{raw}");
        }
    }

    #[test]
    fn paths_that_are_not_utf8() {
        let mut t = started();
        let r = requests(&mut t, &path_req(FXP_REMOVE, 1, b"/tmp/\xff\xfe"));
        assert!(r[0].path_not_utf8);
        assert_eq!(r[0].path.as_deref(), Some("/tmp/\u{fffd}\u{fffd}"));
        let r = requests(&mut t, &path_req(FXP_REMOVE, 2, "/tmp/é".as_bytes()));
        assert!(!r[0].path_not_utf8);
    }

    #[test]
    fn malformed_packets() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (P::new(FXP_OPEN).u32(1).done(), "truncated"),
            (P::new(FXP_OPEN).u32(1).u32(1000).done(), "string length"),
            (P::new(FXP_OPEN).u32(1).s(b"/x").done(), "truncated"),
            (
                P::new(FXP_READ).u32(1).s(&[0; 300]).u64(0).u32(1).done(),
                "handle",
            ),
            (P::new(FXP_REMOVE).done(), "truncated"),
            (
                P::new(FXP_SETSTAT)
                    .u32(1)
                    .s(b"/x")
                    .u32(ATTR_EXTENDED)
                    .u32(u32::MAX)
                    .done(),
                "truncated",
            ),
            (vec![0, 0, 0, 0], "empty"),
            ((MAX_PACKET as u32 + 1).to_be_bytes().to_vec(), "longer"),
            (u32::MAX.to_be_bytes().to_vec(), "longer"),
        ];
        for (bytes, what) in cases {
            let mut t = started();
            let e = t.client_bytes(&bytes).unwrap_err().to_string();
            assert!(e.contains(what), "{e} should mention {what}");
            assert!(t.client_bytes(&init()).is_err());
        }
        let mut t = started();
        requests(&mut t, &path_req(FXP_STAT, 1, b"/x"));
        assert!(t.server_bytes(&P::new(FXP_STATUS).u32(1).done()).is_err());
        let mut t = started();
        requests(&mut t, &path_req(FXP_STAT, 1, b"/x"));
        assert!(t.server_bytes(&P::new(FXP_OPEN).u32(1).done()).is_err());
        // A maximal packet is fine.
        let mut t = started();
        let big = write(1, b"h", 0, &vec![0; MAX_PACKET - 30]);
        assert!(big.len() - 4 <= MAX_PACKET);
        assert_eq!(t.client_bytes(&big).unwrap().len(), 1);
        // A short packet is only held back, not an error.
        let mut t = started();
        let p = open(1, b"/x", PFLAG_READ);
        assert!(t.client_bytes(&p[..p.len() - 1]).unwrap().is_empty());
        assert_eq!(t.client_bytes(&p[p.len() - 1..]).unwrap().len(), 1);
    }

    #[test]
    fn limits_on_state() {
        let mut t = started();
        let mut bytes = Vec::new();
        for id in 0..MAX_PENDING as u32 {
            bytes.extend(path_req(FXP_STAT, id, b"/x"));
        }
        assert_eq!(t.client_bytes(&bytes).unwrap().len(), MAX_PENDING);
        assert_eq!(
            t.client_bytes(&path_req(FXP_STAT, 99_999, b"/x")),
            Err(SftpError::TooManyPending(MAX_PENDING))
        );
        let mut t = started();
        requests(&mut t, &path_req(FXP_STAT, 1, b"/x"));
        assert_eq!(
            t.client_bytes(&path_req(FXP_STAT, 1, b"/y")),
            Err(SftpError::DuplicateId(1))
        );
        let mut t = started();
        for id in 0..MAX_HANDLES as u32 {
            requests(&mut t, &open(id, b"/x", PFLAG_READ));
            t.server_bytes(&handle(id, &id.to_be_bytes())).unwrap();
        }
        requests(&mut t, &open(1 << 20, b"/x", PFLAG_READ));
        assert_eq!(
            t.server_bytes(&handle(1 << 20, b"new")),
            Err(SftpError::TooManyHandles(MAX_HANDLES))
        );
    }

    #[test]
    fn operations_serialise_with_policy_names() {
        let op = SftpOp::Open {
            read: false,
            write: true,
            create: true,
            truncate: false,
            append: false,
            exclusive: false,
        };
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["open"]["create"], true);
        assert_eq!(serde_json::to_value(SftpOp::SetStat).unwrap(), "set_stat");
        let all = [
            SftpOp::Init,
            op,
            SftpOp::Close,
            SftpOp::Read,
            SftpOp::Write,
            SftpOp::Stat,
            SftpOp::SetStat,
            SftpOp::OpenDir,
            SftpOp::ReadDir,
            SftpOp::Remove,
            SftpOp::Mkdir,
            SftpOp::Rmdir,
            SftpOp::RealPath,
            SftpOp::Rename,
            SftpOp::ReadLink,
            SftpOp::Symlink,
            SftpOp::Hardlink,
            SftpOp::CopyData,
            SftpOp::Fsync,
            SftpOp::Extended(String::new()),
            SftpOp::Unknown(0),
        ];
        // Every operation but `init` has its name in the list rules are checked against.
        let named: Vec<_> = all[1..].iter().map(SftpOp::name).collect();
        assert_eq!(named, SftpOp::NAMES);
        // For the unit variants, name() is the serde name.
        for op in all {
            if let serde_json::Value::String(s) = serde_json::to_value(&op).unwrap() {
                assert_eq!(s, op.name());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u64 = 42;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for _ in 0..3000 {
            let mut t = SftpTracker::new();
            let _ = t.client_bytes(&init());
            let _ = t.server_bytes(&version());
            for _ in 0..8 {
                let len = (next() % 40) as usize;
                let mut pkt = vec![0, 0, 0, len as u8];
                pkt.extend((0..len).map(|_| next() as u8 % 24));
                if next() % 2 == 0 {
                    let _ = t.client_bytes(&pkt);
                } else {
                    let _ = t.server_bytes(&pkt);
                }
            }
            let _ = t.refused(next() % 24, SSH_FX_PERMISSION_DENIED, "x");
            let _ = t.finish();
        }
    }
}
