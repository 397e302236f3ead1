//! The PROXY protocol, version 2 (the binary form HAProxy sends with `send-proxy-v2`): a load
//! balancer in TCP mode opens its own connection to the node, so the node sees the balancer's
//! address; the balancer puts a header in front of the client's bytes that says where the
//! client connected from. The node believes that header only from the addresses configured in
//! `node.proxy_protocol_from` ([`Balancers`]), and from those it requires one: a connection
//! from a balancer without a valid header is refused, so a misconfigured balancer cannot make
//! every client look like the balancer. A connection that starts with a PROXY header (v1 text
//! or v2 binary) after that point, from any other address or from a client behind the
//! balancer, is refused and recorded: a client never chooses its own recorded address.
//!
//! What it does not guarantee: the header is the balancer's word. Anyone who can send from a
//! configured address (the balancer's host, or a network that lets addresses be spoofed) can
//! claim any client address, so list the balancers' own addresses, not their networks' ranges.
//! Version 1 (text) headers are never accepted, not even from a balancer.

use super::Core;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use vigil_proto::record::{Connection, Kind, Outcome};

/// The twelve bytes a version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a version 1 (text) header starts with.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The fixed part of a version 2 header: signature, version and command, address family and
/// transport, and the length of what follows.
const FIXED_LEN: usize = 16;
/// The longest part after the fixed one accepted: the addresses (36 bytes for TCP over IPv6)
/// and the TLVs a balancer adds (HAProxy's are a few dozen bytes; with its SSL TLVs a few
/// hundred). The protocol allows 65,535; nothing the node reads needs that much.
pub const MAX_PAYLOAD: usize = 1024;
/// How long a balancer has to send its header, and a client its first bytes, before the node
/// decides whether a connection starts with a PROXY header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a version 2 header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The balancer relays a client that connected from `source` to `destination`.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (a health check): no client behind it, and the
    /// addresses, if any, mean nothing.
    Local,
}

/// Why bytes are not a version 2 header the node accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the bytes are not a PROXY protocol v2 signature")]
    Signature,
    #[error("PROXY protocol version {0} is not supported (only version 2)")]
    Version(u8),
    #[error("unknown PROXY protocol command {0:#x} (only LOCAL and PROXY)")]
    Command(u8),
    #[error("PROXY protocol address family and transport {0:#04x} is not TCP over IPv4 or IPv6")]
    Family(u8),
    #[error("the PROXY protocol header declares {0} bytes after its fixed part, more than the {MAX_PAYLOAD} accepted")]
    TooLong(usize),
    #[error("the PROXY protocol header declares {declared} bytes after its fixed part, fewer than its addresses take ({needed})")]
    TooShort { declared: usize, needed: usize },
    #[error("a TLV of the PROXY protocol header at byte {0} runs past the header's end")]
    Tlv(usize),
}

/// Reads a version 2 header at the start of `buf`: the header and how many bytes it takes,
/// `Ok(None)` while `buf` is a valid beginning that needs more bytes. Bytes that cannot begin a
/// header (a wrong signature byte, an oversized length) are refused as soon as they are seen.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let sig = buf.len().min(SIGNATURE.len());
    if buf[..sig] != SIGNATURE[..sig] {
        return Err(HeaderError::Signature);
    }
    if buf.len() < FIXED_LEN {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(HeaderError::Version(version));
    }
    let family = buf[13];
    let declared = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if declared > MAX_PAYLOAD {
        return Err(HeaderError::TooLong(declared));
    }
    let total = FIXED_LEN + declared;
    let Some(payload) = buf.get(FIXED_LEN..total) else {
        return Ok(None);
    };
    let header = match command {
        0x0 => Header::Local,
        0x1 => proxied(family, payload)?,
        other => return Err(HeaderError::Command(other)),
    };
    Ok(Some((header, total)))
}

/// The addresses of a PROXY command, checking that the TLVs after them fit the header.
fn proxied(family: u8, payload: &[u8]) -> Result<Header, HeaderError> {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let needed = match family {
        0x11 => 12,
        0x21 => 36,
        other => return Err(HeaderError::Family(other)),
    };
    if payload.len() < needed {
        return Err(HeaderError::TooShort {
            declared: payload.len(),
            needed,
        });
    }
    let (source, destination) = if family == 0x11 {
        let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        (
            SocketAddr::new(ip(&payload[0..4]), be16(&payload[8..10])),
            SocketAddr::new(ip(&payload[4..8]), be16(&payload[10..12])),
        )
    } else {
        let ip = |b: &[u8]| {
            let octets: [u8; 16] = b.try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        (
            SocketAddr::new(ip(&payload[0..16]), be16(&payload[32..34])),
            SocketAddr::new(ip(&payload[16..32]), be16(&payload[34..36])),
        )
    };
    // TLVs (type, 16-bit length, value): none is read, each must end inside the header.
    let mut at = needed;
    while at < payload.len() {
        let value_len = payload
            .get(at + 1..at + 3)
            .map(be16)
            .ok_or(HeaderError::Tlv(FIXED_LEN + at))?;
        let end = at + 3 + usize::from(value_len);
        if end > payload.len() {
            return Err(HeaderError::Tlv(FIXED_LEN + at));
        }
        at = end;
    }
    Ok(Header::Proxy {
        source,
        destination,
    })
}

/// How many bytes a header that begins with `buf` (a valid beginning) takes in all, as far as
/// `buf` says: the fixed part until it is complete, then the declared length.
fn wanted(buf: &[u8]) -> usize {
    if buf.len() < FIXED_LEN {
        FIXED_LEN
    } else {
        FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
    }
}

/// Why no header could be read from a balancer's connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the connection closed before any byte")]
    Closed,
    #[error("the connection closed inside the PROXY protocol header")]
    Truncated,
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("reading the PROXY protocol header")]
    Io(#[from] std::io::Error),
}

/// Reads one version 2 header from `stream`, and not a byte more: what follows is the client's.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, ReadError> {
    let mut buf = [0u8; FIXED_LEN + MAX_PAYLOAD];
    let mut have = 0;
    loop {
        if let Some((header, _)) = parse(&buf[..have])? {
            return Ok(header);
        }
        let end = wanted(&buf[..have]);
        let n = stream.read(&mut buf[have..end]).await?;
        if n == 0 {
            return Err(if have == 0 {
                ReadError::Closed
            } else {
                ReadError::Truncated
            });
        }
        have += n;
    }
}

/// Which PROXY protocol header the first bytes of a connection are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What the first bytes of a connection say about a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Header(Version),
    /// A signature's beginning: more bytes decide.
    Undecided,
    /// Not a PROXY header: the protocol's own bytes.
    Other,
}

/// Classifies the first bytes of a connection. No protocol the node serves starts like
/// either signature (a PostgreSQL startup packet starts with a zero byte, TLS with 0x16, SSH
/// with `SSH-`), so real clients are decided by their first byte.
fn start(bytes: &[u8]) -> Start {
    if bytes.starts_with(&SIGNATURE) {
        Start::Header(Version::V2)
    } else if bytes.starts_with(V1_SIGNATURE) {
        Start::Header(Version::V1)
    } else if !bytes.is_empty() && (SIGNATURE.starts_with(bytes) || V1_SIGNATURE.starts_with(bytes))
    {
        Start::Undecided
    } else {
        Start::Other
    }
}

/// A CIDR block of `node.proxy_protocol_from`: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    addr: IpAddr,
    prefix: u8,
}

impl Block {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = (usize::from(prefix / 8), prefix % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    bits == 0 || (a[bytes] ^ b[bytes]) >> (8 - bits) == 0
}

impl std::str::FromStr for Block {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let wrong = || {
            format!(
                "{s:?} is not an IP address or a CIDR block (10.0.0.5, 10.0.0.0/8, 2001:db8::/32)"
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| wrong())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(wrong)?,
            Some(_) => return Err(wrong()),
        };
        // Host bits set (10.0.0.5/8) most likely mean a typo: say so rather than guess.
        if !bits_clear(addr, prefix) {
            return Err(format!(
                "{s:?} has bits set beyond its /{prefix} prefix: write the network's first address"
            ));
        }
        Ok(Block { addr, prefix })
    }
}

/// Whether every bit of `addr` after the first `prefix` is zero.
fn bits_clear(addr: IpAddr, prefix: u8) -> bool {
    let octets = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    octets.iter().enumerate().all(|(i, byte)| {
        let start = i * 8;
        let keep = usize::from(prefix).saturating_sub(start).min(8) as u32;
        let mask = if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        byte & !mask == 0
    })
}

/// The load balancers whose PROXY headers the node believes (`node.proxy_protocol_from`);
/// empty: none, and the PROXY protocol is off (a header is refused from everyone).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct Balancers(Vec<Block>);

impl TryFrom<Vec<String>> for Balancers {
    type Error = String;

    fn try_from(list: Vec<String>) -> Result<Self, String> {
        list.iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| format!("node.proxy_protocol_from: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Balancers)
    }
}

impl Balancers {
    /// Whether `ip` is a configured balancer's (an IPv4 peer of a dual-stack listener, seen as
    /// `::ffff:a.b.c.d`, counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|b| b.contains(ip))
    }
}

/// Who is behind an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The client: the peer, or the source a balancer's header named.
    pub client: SocketAddr,
    /// The balancer the connection came through (its PROXY header named `client`).
    pub balancer: Option<SocketAddr>,
}

impl Origin {
    /// A client connected to the node itself.
    pub fn direct(peer: SocketAddr) -> Self {
        Self {
            client: peer,
            balancer: None,
        }
    }

    /// The audit record's connection of a session of `protocol` from here.
    pub fn connection(&self, protocol: &str) -> Connection {
        Connection {
            protocol: protocol.into(),
            client_addr: self.client.to_string(),
            balancer_addr: self.balancer.map(|b| b.to_string()),
            ..Connection::default()
        }
    }
}

/// Who speaks first in a protocol: the node may wait for a client's first bytes only if the
/// client sends them unasked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstWord {
    /// PostgreSQL (the startup packet), TLS (the ClientHello).
    Client,
    /// SSH: the server sends its identification first and a client may wait for it; the first
    /// bytes are checked as they are read instead ([`Guarded`]).
    Server,
}

/// Why a connection was refused before its protocol began.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Recorded; the message is for the client where its protocol can carry one.
    #[error("{0}")]
    Said(String),
    /// The balancer's connection closed before any byte (a TCP health check): nothing to say
    /// or record.
    #[error("the connection closed before any byte")]
    Quiet,
}

/// The first step of every connection of a listener of `protocol`: from a balancer, its
/// header (required); then, for a protocol whose client speaks first, a refusal of a
/// connection that starts with a PROXY header. A refusal is on record when this returns.
pub async fn admit(
    core: &Core,
    protocol: &'static str,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    first: FirstWord,
) -> Result<Origin, Refused> {
    let origin = if core.balancers.contains(peer.ip()) {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(tcp)).await {
            Ok(Ok(header)) => header,
            Ok(Err(ReadError::Closed)) => return Err(Refused::Quiet),
            Ok(Err(e)) => {
                let why = crate::error_chain(&e);
                return Err(refuse(core, protocol, Origin::direct(peer), format!(
                    "the load balancer at {peer} (node.proxy_protocol_from) sent no valid PROXY protocol v2 header: {why}"
                )));
            }
            Err(_) => {
                return Err(refuse(core, protocol, Origin::direct(peer), format!(
                    "the load balancer at {peer} (node.proxy_protocol_from) sent no PROXY protocol v2 header within {} s",
                    HEADER_TIMEOUT.as_secs()
                )))
            }
        };
        Origin {
            client: match header {
                Header::Proxy { source, .. } => source,
                Header::Local => peer,
            },
            balancer: Some(peer),
        }
    } else {
        Origin::direct(peer)
    };
    if first == FirstWord::Client {
        // A client that begins a signature and does not finish it in time is refused as one
        // that sends it whole (an outside review: a header sent slowly escaped its refusal
        // and its record).
        let mut seen = Start::Other;
        let peeked = tokio::time::timeout(HEADER_TIMEOUT, peek_start(tcp, &mut seen)).await;
        match peeked {
            Ok(Ok(Start::Header(version))) => {
                return Err(refuse(core, protocol, origin, refusal(version, &origin)));
            }
            Err(_) if seen == Start::Undecided => {
                let why = format!(
                    "refused: {} began a PROXY protocol header and did not finish it within {} s",
                    origin.client,
                    HEADER_TIMEOUT.as_secs()
                );
                return Err(refuse(core, protocol, origin, why));
            }
            _ => {}
        }
    }
    Ok(origin)
}

/// What the first bytes waiting on `tcp` are, without taking them; `seen` says what they were
/// at the last look, for a caller that stops waiting first.
async fn peek_start(tcp: &TcpStream, seen: &mut Start) -> std::io::Result<Start> {
    let mut buf = [0u8; SIGNATURE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        *seen = start(&buf[..n]);
        match *seen {
            // Peeking again returns at once while nothing new arrived.
            Start::Undecided => tokio::time::sleep(Duration::from_millis(20)).await,
            decided => return Ok(decided),
        }
    }
}

/// The words of the refusal of a connection from `origin` that starts with a `version` header.
pub fn refusal(version: Version, origin: &Origin) -> String {
    let v = match version {
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    match origin.balancer {
        Some(b) => format!(
            "refused: a PROXY protocol {v} header from the client {} behind the load balancer at {b}; only the balancer's own header is read",
            origin.client
        ),
        None => format!(
            "refused: a PROXY protocol {v} header from {}, which is not a configured load balancer (node.proxy_protocol_from)",
            origin.client
        ),
    }
}

/// Records the refusal of a connection from `origin` (a `protocol_error`), and returns it.
pub fn refuse(core: &Core, protocol: &str, origin: Origin, message: String) -> Refused {
    tracing::info!(client = %origin.client, balancer = ?origin.balancer, %message, "connection refused");
    core.metrics.protocol_errors.inc();
    let mut body = core
        .audit
        .body(Some(&super::new_session_id()), Kind::ProtocolError);
    body.outcome = Some(Outcome::Error);
    body.connection = Some(Arc::new(origin.connection(protocol)));
    body.detail = Some(message.clone());
    core.audit.record(body);
    Refused::Said(message)
}

/// A stream whose first bytes are checked as they are read: one that starts with a PROXY
/// header fails the read (the protocol's own error path closes the connection), and
/// [`Guarded::found`] says so, for the refusal's record. For protocols in which the server
/// speaks first ([`FirstWord::Server`]).
pub struct Guarded<S> {
    inner: S,
    head: [u8; SIGNATURE.len()],
    /// Bytes in `head`; `given` of them handed to the reader once decided.
    have: usize,
    given: usize,
    decided: bool,
    found: Arc<OnceLock<Version>>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            head: [0; SIGNATURE.len()],
            have: 0,
            given: 0,
            decided: false,
            found: Arc::default(),
        }
    }

    /// Set once the stream was found to start with a PROXY header.
    pub fn found(&self) -> Arc<OnceLock<Version>> {
        self.found.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while !this.decided {
            let mut head = ReadBuf::new(&mut this.head[this.have..]);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut head))?;
            let n = head.filled().len();
            this.have += n;
            match start(&this.head[..this.have]) {
                Start::Header(version) => {
                    let _ = this.found.set(version);
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the connection starts with a PROXY protocol header",
                    )));
                }
                // At the end of the stream, what came is the protocol's to judge.
                Start::Undecided if n > 0 => {}
                _ => this.decided = true,
            }
        }
        if this.given < this.have {
            let n = buf.remaining().min(this.have - this.given);
            buf.put_slice(&this.head[this.given..this.given + n]);
            this.given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header: `ver_cmd`, `family`, then `payload` (its length declared as is).
    fn header(ver_cmd: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend([ver_cmd, family]);
        h.extend((payload.len() as u16).to_be_bytes());
        h.extend(payload);
        h
    }

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = src.to_vec();
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p
    }

    #[test]
    fn tcp4_proxy_with_tlvs() {
        let mut payload = tcp4([192, 0, 2, 7], [10, 0, 0, 1], 40001, 5432);
        // PP2_TYPE_ALPN "h2", then a NOOP of length 0.
        payload.extend([0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        let mut bytes = header(0x21, 0x11, &payload);
        bytes.extend(b"after");
        let (h, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!(
            n,
            bytes.len() - 5,
            "the header ends where the client's bytes begin"
        );
        assert_eq!(
            h,
            Header::Proxy {
                source: "192.0.2.7:40001".parse().unwrap(),
                destination: "10.0.0.1:5432".parse().unwrap(),
            }
        );
    }

    #[test]
    fn tcp6_proxy() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut payload = src.octets().to_vec();
        payload.extend(dst.octets());
        payload.extend(50000u16.to_be_bytes());
        payload.extend(22u16.to_be_bytes());
        let bytes = header(0x21, 0x21, &payload);
        assert_eq!(
            parse(&bytes).unwrap(),
            Some((
                Header::Proxy {
                    source: "[2001:db8::7]:50000".parse().unwrap(),
                    destination: "[2001:db8::1]:22".parse().unwrap(),
                },
                bytes.len()
            ))
        );
    }

    #[test]
    fn local_ignores_its_addresses() {
        let bytes = header(0x20, 0x00, &[]);
        assert_eq!(parse(&bytes).unwrap(), Some((Header::Local, 16)));
        // LOCAL with addresses of a family the node does not read: still LOCAL.
        let bytes = header(0x20, 0x31, &[0; 216]);
        assert_eq!(parse(&bytes).unwrap(), Some((Header::Local, 232)));
    }

    #[test]
    fn truncated_needs_more_bytes_at_every_length() {
        let bytes = header(0x21, 0x11, &tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2));
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(&bytes).unwrap().is_some());
    }

    #[test]
    fn refused_headers() {
        let addrs = tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        let mut bad_sig = header(0x21, 0x11, &addrs);
        bad_sig[5] = b'x';
        assert_eq!(parse(&bad_sig), Err(HeaderError::Signature));
        // Refused at the first wrong byte, before the rest arrived.
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIZ"), Err(HeaderError::Signature));
        assert_eq!(parse(b"PROXY TCP4 "), Err(HeaderError::Signature));
        assert_eq!(parse(&[0, 0, 0, 8]), Err(HeaderError::Signature));
        assert_eq!(
            parse(&header(0x11, 0x11, &addrs)),
            Err(HeaderError::Version(1))
        );
        assert_eq!(
            parse(&header(0x22, 0x11, &addrs)),
            Err(HeaderError::Command(2))
        );
        // UNSPEC, UDP over IPv4, AF_UNIX stream: no TCP client address.
        for family in [0x00, 0x12, 0x31] {
            assert_eq!(
                parse(&header(0x21, family, &[0; 216])),
                Err(HeaderError::Family(family))
            );
        }
        assert_eq!(
            parse(&header(0x21, 0x21, &addrs)),
            Err(HeaderError::TooShort {
                declared: 12,
                needed: 36
            })
        );
        let mut tlv_overrun = addrs.clone();
        tlv_overrun.extend([0x04, 0x00, 0x05, 0, 0]);
        assert_eq!(
            parse(&header(0x21, 0x11, &tlv_overrun)),
            Err(HeaderError::Tlv(28))
        );
        let mut tlv_cut = addrs;
        tlv_cut.extend([0x04, 0x00]);
        assert_eq!(
            parse(&header(0x21, 0x11, &tlv_cut)),
            Err(HeaderError::Tlv(28))
        );
    }

    #[test]
    fn oversized_length_is_refused_before_its_bytes() {
        let mut fixed = SIGNATURE.to_vec();
        fixed.extend([0x21, 0x11]);
        fixed.extend(((MAX_PAYLOAD + 1) as u16).to_be_bytes());
        assert_eq!(parse(&fixed), Err(HeaderError::TooLong(MAX_PAYLOAD + 1)));
        fixed[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&fixed), Err(HeaderError::TooLong(65535)));
    }

    #[tokio::test]
    async fn read_header_takes_the_header_and_not_a_byte_more() {
        let mut bytes = header(0x21, 0x11, &tcp4([192, 0, 2, 7], [10, 0, 0, 1], 1, 2));
        bytes.extend([0, 0, 0, 8, 4, 210, 22, 47]);
        // One byte at a time, as a slow balancer might send it.
        let mut reader = tokio_test_reader(&bytes);
        let h = read_header(&mut reader).await.unwrap();
        assert!(matches!(h, Header::Proxy { .. }));
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0, 0, 0, 8, 4, 210, 22, 47]);
        let cut = &bytes[..20];
        assert!(matches!(
            read_header(&mut tokio_test_reader(cut)).await,
            Err(ReadError::Truncated)
        ));
        assert!(matches!(
            read_header(&mut tokio_test_reader(&[])).await,
            Err(ReadError::Closed)
        ));
        assert!(matches!(
            read_header(&mut tokio_test_reader(b"\x00\x00\x00\x08")).await,
            Err(ReadError::Header(HeaderError::Signature))
        ));
    }

    /// A reader that hands out one byte per read.
    fn tokio_test_reader(bytes: &[u8]) -> impl AsyncRead + Unpin {
        let (mut tx, rx) = tokio::io::duplex(1);
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                if tx.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    #[test]
    fn first_bytes() {
        assert_eq!(start(&SIGNATURE), Start::Header(Version::V2));
        assert_eq!(start(b"PROXY TCP4 1.2.3.4"), Start::Header(Version::V1));
        assert_eq!(start(b"\r\n\r\n"), Start::Undecided);
        assert_eq!(start(b"PRO"), Start::Undecided);
        assert_eq!(start(b""), Start::Other);
        assert_eq!(start(&[0, 0, 0, 8, 4, 210, 22, 47]), Start::Other);
        assert_eq!(start(&[0x16, 3, 1]), Start::Other);
        assert_eq!(start(b"SSH-2.0-OpenSSH_9.2"), Start::Other);
        assert_eq!(start(b"PROXIMA"), Start::Other);
    }

    /// A signature begun and not finished leaves the look undecided when the caller stops
    /// waiting; bytes that decide, decide.
    #[tokio::test]
    async fn a_begun_signature_is_seen_undecided() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        client.write_all(b"\r\n").await.unwrap();
        let mut seen = Start::Other;
        let waited = Duration::from_millis(200);
        let peeked = tokio::time::timeout(waited, peek_start(&server, &mut seen)).await;
        assert!(peeked.is_err());
        assert_eq!(seen, Start::Undecided);
        client.write_all(&SIGNATURE[2..]).await.unwrap();
        let peeked = tokio::time::timeout(waited, peek_start(&server, &mut seen)).await;
        assert_eq!(peeked.unwrap().unwrap(), Start::Header(Version::V2));
    }

    #[tokio::test]
    async fn guarded_fails_on_a_header_and_passes_anything_else_whole() {
        let mut guarded = Guarded::new(tokio_test_reader(b"PROXY TCP4 192.0.2.9 10.0.0.1 1 2\r\n"));
        let found = guarded.found();
        let mut out = Vec::new();
        let e = guarded.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(found.get(), Some(&Version::V1));
        assert!(out.is_empty(), "nothing of the header reaches the protocol");
        let mut v2 = SIGNATURE.to_vec();
        v2.extend([0x21, 0x11, 0, 12]);
        let mut guarded = Guarded::new(tokio_test_reader(&v2));
        let found = guarded.found();
        assert!(guarded.read_to_end(&mut Vec::new()).await.is_err());
        assert_eq!(found.get(), Some(&Version::V2));

        for bytes in [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b"PRO", b"\r\n\r\nX", b""] {
            let mut guarded = Guarded::new(tokio_test_reader(bytes));
            let found = guarded.found();
            let mut out = Vec::new();
            guarded.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, bytes);
            assert!(found.get().is_none());
        }
    }

    #[test]
    fn balancers() {
        let list =
            |v: &[&str]| Balancers::try_from(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let b = list(&[
            "10.0.0.0/8",
            "127.0.0.2",
            "2001:db8::/32",
            "192.168.1.128/25",
        ])
        .unwrap();
        for yes in [
            "10.1.2.3",
            "127.0.0.2",
            "::ffff:127.0.0.2",
            "2001:db8:1::5",
            "192.168.1.200",
        ] {
            assert!(b.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "11.0.0.1",
            "127.0.0.1",
            "127.0.0.3",
            "2001:db9::1",
            "192.168.1.127",
            "::1",
        ] {
            assert!(!b.contains(no.parse().unwrap()), "{no}");
        }
        assert!(!Balancers::default().contains("127.0.0.1".parse().unwrap()));
        assert!(list(&["0.0.0.0/0"])
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0/8",
            "host.example",
            "10.0.0.5/8",
            "::1/129",
            "10.0.0.0/+8",
        ] {
            let e = list(&[bad]).unwrap_err();
            assert!(e.starts_with("node.proxy_protocol_from: "), "{bad}: {e}");
        }
    }
}
