//! WebSocket (RFC 6455) framing and the Kubernetes channel protocols on top of it, for a relay
//! that records exec, attach and port-forward streams between kubectl and the API server.
//!
//! The relay sits between the two ends after they agreed on the upgrade. For each direction it
//! keeps one [`WsReader`]: [`WsReader::push`] takes the bytes as they arrive and returns
//! [`WsEvent`]s, each the bytes to forward ([`WsEvent::raw`], exactly as received) and what
//! they mean ([`WsMessage`]). A data message is returned only once it is whole (fragments are
//! held until the final one), so the relay records a message before any byte of it reaches
//! the other end. Concatenated over every event, `raw` is exactly the input consumed: nothing
//! is added, dropped or reordered. Control frames (ping, pong, close) are returned as soon as
//! they are read; one that arrives between the fragments of a message has an empty `raw`,
//! and its bytes travel with the message's (they stay where they were in the stream). A close
//! frame in the middle of a message ends the message ([`WsMessage::Partial`] reports what the
//! held fragments carried, then the close follows).
//!
//! Fragments are a reading hazard towards Kubernetes: its WebSocket reader
//! (`golang.org/x/net/websocket`) takes every frame for a whole message, so the relay passes a
//! client's fragmented message on in one frame ([`one_frame`]), never in the client's frames.
//!
//! [`WsWriter`] produces frames (masked from the client, unmasked from the server) for tests
//! and for the relay's own messages: the `Status` on the error channel that says why the
//! gateway ended the streams, and a close.
//! [`accept_key`], [`select_subprotocol`], [`check_client_upgrade`] and
//! [`check_server_upgrade`] are the handshake pieces.
//!
//! # Channel protocols
//!
//! The subprotocol the API server chose says how messages carry channels
//! ([`ChannelProtocol::from_subprotocol`]; exec and attach share their protocols, port-forward
//! has its own, see [`StreamKind`]):
//!
//! | Subprotocol | Kind | Messages |
//! |---|---|---|
//! | `channel.k8s.io` (or none) | exec | binary; first byte the channel: 0 stdin, 1 stdout, 2 stderr, 3 error (plain text), 4 resize |
//! | `base64.channel.k8s.io` | exec | text; first char the channel as an ASCII digit, then the data in base64 |
//! | `v4.channel.k8s.io` | exec | as `channel.k8s.io`; the error channel carries a `v1` `Status` (JSON) with the exit code |
//! | `v4.base64.channel.k8s.io` | exec | as `base64.channel.k8s.io`, with the v4 `Status` |
//! | `v5.channel.k8s.io` | exec | as v4, plus channel 255: the close signal, `[255, CHANNEL]`, the sender closed that channel (kubectl's end of stdin) |
//! | `SPDY/3.1+portforward.k8s.io` | port-forward | binary messages whose payloads, in order, are a SPDY/3.1 byte stream (kubectl 1.30+ tunnels SPDY port-forward through WebSocket); returned as [`WsMessage::Tunnel`] for the SPDY codec |
//! | `v4.channel.k8s.io` (or none) | port-forward | binary; per port `i` of the request's `ports`, channel `2i` carries data and `2i+1` errors; the server's first message on each channel starts with the port, 16-bit little-endian |
//! | `v4.base64.channel.k8s.io` | port-forward | the same in base64 text messages |
//!
//! `v2.channel.k8s.io` and `v3.channel.k8s.io` exist only over SPDY.
//!
//! # Stricter than the API server
//!
//! A recording gateway must read a stream the way its receiver does, and refuse what it cannot
//! read with certainty. Where Kubernetes' own reader is lenient, this one refuses:
//! - binary protocols take binary messages only and base64 protocols text messages only (the
//!   server's reader takes both kinds alike; client-go refuses text messages);
//! - the channels are those the direction writes: stdin and resize from the client, stdout,
//!   stderr and error from the server (the server silently drops a message for a channel it
//!   does not read; the port-forward error channels are the server's alone);
//! - base64 must be canonical standard base64 with padding and no line breaks (Go's decoder
//!   skips `\r` and `\n`);
//! - a resize message is exactly one JSON object `{"Width":N,"Height":N}` (16-bit values, no
//!   other or repeated key; the server reads a stream of JSON values across messages, with
//!   case-insensitive keys);
//! - the error channel's `Status` (v4 and later) must be JSON with a `status`;
//! - the server's first message on a port-forward channel must carry its port, and the port
//!   must be the one requested for that channel;
//! - lengths must be minimally encoded; close codes must be ones an endpoint may send.
//!
//! No extension is understood (no `permessage-deflate`): a frame with a reserved bit set is
//! refused, so the relay must not let an extension be negotiated ([`check_server_upgrade`]
//! refuses an answer that accepts one). kubectl does not offer any.
//!
//! # What this does not guarantee
//!
//! It follows the framing; it does not judge content. An empty message (no channel byte) is
//! reported as [`WsMessage::Empty`] (the server ignores it). Port-forward data is opaque bytes
//! of whatever protocol runs through the port. Limits ([`Limits`]) bound what one reader holds:
//! one frame's payload and one message's frames.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest frame payload accepted by default.
pub const DEFAULT_MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// The most bytes (headers included) the frames of one message may take by default. Every
/// fragment is held until the last one arrives; with it, one reader holds at most this plus
/// one frame.
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

/// Control frames carry at most 125 bytes (RFC 6455, 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The most ports of one port-forward request: channels `2i` and `2i + 1` must fit below the
/// close-signal channel 255.
pub const MAX_PORTS: usize = 127;

/// The most ports over a base64 protocol: the channel is written as the character
/// `'0' + channel`, which must stay ASCII.
pub const MAX_BASE64_PORTS: usize = 40;

/// Remote command channels (k8s.io/apimachinery/pkg/util/remotecommand).
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// The v5 close signal's channel byte.
pub const CLOSE_SIGNAL: u8 = 255;

/// The GUID every `Sec-WebSocket-Accept` is computed with (RFC 6455, 1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The subprotocols Vigil reads, for exec and attach, in the order a server would prefer them.
const EXEC_SUBPROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// The subprotocol of SPDY port-forward tunnelled through WebSocket (kubectl 1.30 and later).
pub const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

/// The subprotocols Vigil reads for port-forward.
const PORT_FORWARD_SUBPROTOCOLS: &[&str] =
    &[SPDY_TUNNEL, "v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// Which end wrote the bytes a reader reads. Frames from the client are masked, frames from
/// the server are not (RFC 6455, 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    fn masked(self) -> bool {
        self == Direction::ClientToServer
    }

    fn writer(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client",
            Direction::ServerToClient => "server",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::ClientToServer => "client to server",
            Direction::ServerToClient => "server to client",
        })
    }
}

/// The subresource a stream belongs to: the same subprotocol name means different channels
/// for exec (and attach) and for port-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// `exec` and `attach`.
    Exec,
    PortForward,
}

/// How messages carry channels; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelProtocol {
    /// `channel.k8s.io` (and no subprotocol at all).
    V1,
    /// `base64.channel.k8s.io`.
    Base64,
    /// `v4.channel.k8s.io`.
    V4,
    /// `v4.base64.channel.k8s.io`.
    V4Base64,
    /// `v5.channel.k8s.io`.
    V5,
    /// Port-forward over `v4.channel.k8s.io` (or no subprotocol).
    PortForward,
    /// Port-forward over `v4.base64.channel.k8s.io`.
    PortForwardBase64,
    /// `SPDY/3.1+portforward.k8s.io`: SPDY tunnelled through binary messages.
    SpdyTunnel,
}

impl ChannelProtocol {
    /// The protocol a negotiated subprotocol names for a kind of stream; `""` is what the
    /// server picks when the client offers none (binary channels). `None`: not one Vigil reads.
    pub fn from_subprotocol(kind: StreamKind, name: &str) -> Option<Self> {
        Some(match (kind, name) {
            (StreamKind::Exec, "" | "channel.k8s.io") => Self::V1,
            (StreamKind::Exec, "base64.channel.k8s.io") => Self::Base64,
            (StreamKind::Exec, "v4.channel.k8s.io") => Self::V4,
            (StreamKind::Exec, "v4.base64.channel.k8s.io") => Self::V4Base64,
            (StreamKind::Exec, "v5.channel.k8s.io") => Self::V5,
            (StreamKind::PortForward, "" | "v4.channel.k8s.io") => Self::PortForward,
            (StreamKind::PortForward, "v4.base64.channel.k8s.io") => Self::PortForwardBase64,
            (StreamKind::PortForward, SPDY_TUNNEL) => Self::SpdyTunnel,
            _ => return None,
        })
    }

    /// The subprotocol's name, as sent in `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "channel.k8s.io",
            Self::Base64 => "base64.channel.k8s.io",
            Self::V4 | Self::PortForward => "v4.channel.k8s.io",
            Self::V4Base64 | Self::PortForwardBase64 => "v4.base64.channel.k8s.io",
            Self::V5 => "v5.channel.k8s.io",
            Self::SpdyTunnel => SPDY_TUNNEL,
        }
    }

    pub fn kind(self) -> StreamKind {
        match self {
            Self::PortForward | Self::PortForwardBase64 | Self::SpdyTunnel => {
                StreamKind::PortForward
            }
            _ => StreamKind::Exec,
        }
    }

    /// Whether messages are text: the channel as a digit, the data in base64.
    pub fn is_base64(self) -> bool {
        matches!(
            self,
            Self::Base64 | Self::V4Base64 | Self::PortForwardBase64
        )
    }

    /// Whether the error channel carries a `Status` (with the exit code) rather than text.
    pub fn has_status(self) -> bool {
        matches!(self, Self::V4 | Self::V4Base64 | Self::V5)
    }

    fn message_opcode(self) -> Opcode {
        if self.is_base64() {
            Opcode::Text
        } else {
            Opcode::Binary
        }
    }
}

impl fmt::Display for ChannelProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            StreamKind::Exec => f.write_str(self.name()),
            StreamKind::PortForward => write!(f, "{} (port-forward)", self.name()),
        }
    }
}

/// Frame opcodes (RFC 6455, 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xa => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xa,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Continuation => "continuation",
            Self::Text => "text",
            Self::Binary => "binary",
            Self::Close => "close",
            Self::Ping => "ping",
            Self::Pong => "pong",
        })
    }
}

/// Bounds on what one reader holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest payload of one frame; a longer one is refused from its header, before any
    /// of its payload is held.
    pub max_frame_payload: usize,
    /// The most bytes the frames of one message may take on the wire, headers and control
    /// frames between its fragments included.
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_payload: DEFAULT_MAX_FRAME_PAYLOAD,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// Why a stream cannot be followed. The reader is done after any of these: the relay should
/// end the connection (a close with code 1002, or 1009 for a limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket frame with reserved bits {0:#04x} set (no extension was negotiated)")]
    ReservedBits(u8),
    #[error("WebSocket frame with unknown opcode {0:#x}")]
    BadOpcode(u8),
    #[error("WebSocket {0} frame of {1} bytes: control frames carry at most 125")]
    ControlTooLong(Opcode, u64),
    #[error("fragmented WebSocket {0} frame: control frames cannot be fragmented")]
    FragmentedControl(Opcode),
    #[error("unmasked WebSocket frame from the client")]
    Unmasked,
    #[error("masked WebSocket frame from the server")]
    Masked,
    #[error("WebSocket frame length with the most significant bit set")]
    LengthTopBit,
    #[error("WebSocket frame length {0} is not minimally encoded")]
    NonMinimalLength(u64),
    #[error("WebSocket frame payload of {len} bytes is longer than the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    #[error("WebSocket message longer than the limit of {max} bytes")]
    MessageTooLarge { max: usize },
    #[error("WebSocket continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("WebSocket {0} message started before the fragmented message in progress ended")]
    Interleaved(Opcode),
    #[error("WebSocket {found} message where {protocol} carries {expected} messages")]
    WrongMessageType {
        found: Opcode,
        expected: Opcode,
        protocol: ChannelProtocol,
    },
    #[error("WebSocket text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("channel {channel} message is not valid base64: {reason}")]
    InvalidBase64 { channel: u8, reason: String },
    #[error("message for unknown channel {channel} of {protocol}")]
    UnknownChannel {
        channel: u8,
        protocol: ChannelProtocol,
    },
    #[error("channel {channel} of {protocol} is not written by the {writer}")]
    WrongDirection {
        channel: u8,
        protocol: ChannelProtocol,
        writer: &'static str,
    },
    #[error("resize message is not {{\"Width\":N,\"Height\":N}}: {0}")]
    BadResize(String),
    #[error("error channel message is not a Status: {0}")]
    BadStatus(String),
    #[error("close signal of {0} bytes: it names exactly one channel")]
    BadCloseSignal(usize),
    #[error("close signal for unknown channel {0}")]
    CloseSignalChannel(u8),
    #[error("port-forward channel {channel}: the first message does not start with the port")]
    MissingPort { channel: u8 },
    #[error("port-forward channel {channel} names port {found}, the request asked for {expected}")]
    PortMismatch {
        channel: u8,
        found: u16,
        expected: u16,
    },
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    #[error("close frame with code {0}, which an endpoint may not send")]
    BadCloseCode(u16),
    #[error("close frame whose reason is not valid UTF-8")]
    CloseReasonNotUtf8,
    #[error("WebSocket data after the close frame")]
    AfterClose,
    #[error("the WebSocket stream ended inside {0}")]
    Truncated(&'static str),
    #[error("the WebSocket stream could not be followed earlier: {0}")]
    Failed(Box<WsError>),
    #[error("{0}")]
    Config(String),
    #[error("WebSocket upgrade refused: {0}")]
    Handshake(String),
}

/// What a message, or a control frame, means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// Data of stdin (from the client), stdout or stderr (from the server), decoded from
    /// base64 where the protocol says.
    Data {
        channel: u8,
        payload: Bytes,
    },
    /// A terminal resize (channel 4, from the client).
    Resize {
        width: u16,
        height: u16,
    },
    /// The error channel (3, from the server): text for v1, a `Status` from v4 on. Empty
    /// (`status` none) when the server only opens the channel.
    Error {
        payload: Bytes,
        status: Option<ExecStatus>,
    },
    /// v5: the sender closed `channel` (kubectl's end of stdin).
    CloseSignal {
        channel: u8,
    },
    /// Port-forward data of `port` on `channel` (`2i`), its port prefix taken off.
    PortData {
        port: u16,
        channel: u8,
        payload: Bytes,
    },
    /// Port-forward error text of `port` on `channel` (`2i + 1`, from the server).
    PortError {
        port: u16,
        channel: u8,
        payload: Bytes,
    },
    /// The next piece of the SPDY stream tunnelled through `SPDY/3.1+portforward.k8s.io`.
    Tunnel {
        payload: Bytes,
    },
    /// A data message with no payload at all (not even a channel): ignored by the receiver.
    Empty,
    /// A message that a close frame cut short: the (unmasked) payload of the fragments sent,
    /// not decoded. The close follows in the next event.
    Partial {
        payload: Bytes,
        text: bool,
    },
    Ping {
        payload: Bytes,
    },
    Pong {
        payload: Bytes,
    },
    /// A close frame: its status code (none when the frame is empty) and reason.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

impl WsMessage {
    /// The channel a data message was sent on.
    pub fn channel(&self) -> Option<u8> {
        match self {
            Self::Data { channel, .. }
            | Self::PortData { channel, .. }
            | Self::PortError { channel, .. } => Some(*channel),
            Self::Resize { .. } => Some(RESIZE),
            Self::Error { .. } => Some(ERROR),
            Self::CloseSignal { .. } => Some(CLOSE_SIGNAL),
            _ => None,
        }
    }
}

/// One step of a direction: bytes to forward once `message` is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsEvent {
    /// The frames' bytes as received (masked as they were), to be forwarded unchanged. Empty
    /// for a control frame read between the fragments of a message: its bytes are in the
    /// message's event, in stream order.
    pub raw: Bytes,
    pub message: WsMessage,
}

/// The outcome of a command as the error channel's `Status` reports it (v4 and later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecStatus {
    /// `status` was `Success`.
    pub success: bool,
    /// 0 on success; the `ExitCode` cause of a `NonZeroExitCode` failure; none for a failure
    /// without one (the command could not be run).
    pub exit_code: Option<u8>,
    pub reason: String,
    pub message: String,
}

#[derive(Deserialize)]
struct StatusJson {
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    details: Option<StatusDetails>,
}

#[derive(Deserialize)]
struct StatusDetails {
    #[serde(default)]
    causes: Option<Vec<StatusCause>>,
}

#[derive(Deserialize)]
struct StatusCause {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl ExecStatus {
    /// Reads a `Status` as the v4 error channel carries it: `Success`, or `Failure` whose
    /// reason `NonZeroExitCode` comes with an `ExitCode` cause (as client-go reads it).
    pub fn parse(json: &[u8]) -> Result<Self, WsError> {
        let status: StatusJson =
            serde_json::from_slice(json).map_err(|e| WsError::BadStatus(e.to_string()))?;
        let success = match status.status.as_str() {
            "Success" => true,
            "Failure" => false,
            other => return Err(WsError::BadStatus(format!("status {other:?}"))),
        };
        let reason = status.reason.unwrap_or_default();
        let exit_code = if success {
            Some(0)
        } else if reason == "NonZeroExitCode" {
            status
                .details
                .and_then(|d| d.causes)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
                .and_then(|c| c.message?.parse::<u8>().ok())
        } else {
            None
        };
        Ok(Self {
            success,
            exit_code,
            reason,
            message: status.message.unwrap_or_default(),
        })
    }
}

/// A terminal size as kubectl sends it on the resize channel.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminalSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// A frame header, read and checked.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    len: usize,
    header_len: usize,
}

/// A data message whose final fragment has not arrived.
struct Pending {
    opcode: Opcode,
    /// The unmasked payload so far.
    payload: BytesMut,
    /// Every frame's bytes since the message began, control frames between fragments too.
    raw: BytesMut,
}

/// Reads one direction of a WebSocket stream; see the module documentation.
pub struct WsReader {
    direction: Direction,
    protocol: ChannelProtocol,
    limits: Limits,
    /// The requested ports (port-forward over channels).
    ports: Vec<u16>,
    /// Per channel, whether its port prefix has been read (server to client).
    port_seen: Vec<bool>,
    /// The header bytes of the frame being read, until the header is whole.
    head: [u8; 14],
    head_len: usize,
    header: Option<Header>,
    /// The bytes of the frame being read, header included, once the header is whole.
    frame: BytesMut,
    pending: Option<Pending>,
    closed: bool,
    failed: Option<WsError>,
}

impl WsReader {
    /// A reader for exec or attach, or for the SPDY tunnel of port-forward. A port-forward
    /// protocol over channels needs the requested ports: see [`WsReader::port_forward`]
    /// (without them every channel is unknown).
    pub fn new(direction: Direction, protocol: ChannelProtocol) -> Self {
        Self {
            direction,
            protocol,
            limits: Limits::default(),
            ports: Vec::new(),
            port_seen: Vec::new(),
            head: [0; 14],
            head_len: 0,
            header: None,
            frame: BytesMut::new(),
            pending: None,
            closed: false,
            failed: None,
        }
    }

    /// A reader for port-forward over channels (`PortForward`, `PortForwardBase64`): `ports`
    /// as the request's `ports` query names them, in order (port `i` has channels `2i` and
    /// `2i + 1`).
    pub fn port_forward(
        direction: Direction,
        protocol: ChannelProtocol,
        ports: &[u16],
    ) -> Result<Self, WsError> {
        let max = match protocol {
            ChannelProtocol::PortForward => MAX_PORTS,
            ChannelProtocol::PortForwardBase64 => MAX_BASE64_PORTS,
            other => {
                return Err(WsError::Config(format!(
                    "{other} does not carry port-forward channels"
                )))
            }
        };
        if ports.is_empty() || ports.len() > max {
            return Err(WsError::Config(format!(
                "port-forward over {protocol} takes 1 to {max} ports, not {}",
                ports.len()
            )));
        }
        let mut reader = Self::new(direction, protocol);
        reader.ports = ports.to_vec();
        reader.port_seen = vec![false; ports.len() * 2];
        Ok(reader)
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn protocol(&self) -> ChannelProtocol {
        self.protocol
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Bytes held: the frame being read and the fragments of an unfinished message (their
    /// bytes and their unmasked payload). At most 14 + `max_frame_payload` + 2 × `max_message`.
    pub fn buffered(&self) -> usize {
        self.head_len
            + self.frame.len()
            + self
                .pending
                .as_ref()
                .map_or(0, |p| p.raw.len() + p.payload.len())
    }

    /// Bytes received and not yet returned in an event's `raw`: an unfinished frame, and the
    /// frames of an unfinished message.
    pub fn held(&self) -> usize {
        self.head_len + self.frame.len() + self.pending.as_ref().map_or(0, |p| p.raw.len())
    }

    /// Whether the close frame of this direction has been read.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Takes the next bytes of the direction. Returns the events they completed, in order;
    /// bytes of an unfinished frame or message are held. After an error the reader is done:
    /// this and every later call fail, and nothing of the failing call is to be forwarded.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<WsEvent>, WsError> {
        if let Some(e) = &self.failed {
            return Err(WsError::Failed(Box::new(e.clone())));
        }
        let mut events = Vec::new();
        while !bytes.is_empty() {
            if let Err(e) = self.step(&mut bytes, &mut events) {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        Ok(events)
    }

    /// Checks that the stream ended between messages: at the end of the input, a frame or a
    /// message that was not finished is reported (its bytes were never forwarded).
    pub fn finish(&self) -> Result<(), WsError> {
        if let Some(e) = &self.failed {
            return Err(WsError::Failed(Box::new(e.clone())));
        }
        if self.head_len > 0 || self.header.is_some() {
            return Err(WsError::Truncated("a frame"));
        }
        if self.pending.is_some() {
            return Err(WsError::Truncated("a fragmented message"));
        }
        Ok(())
    }

    /// Consumes some of `bytes`: header bytes, payload bytes, or a frame's completion.
    fn step(&mut self, bytes: &mut &[u8], events: &mut Vec<WsEvent>) -> Result<(), WsError> {
        if self.closed {
            return Err(WsError::AfterClose);
        }
        match self.header {
            None => {
                let need = self.header_len_needed()?;
                let take = (need - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                self.head_len += take;
                *bytes = &bytes[take..];
                // The first bytes say enough to refuse most bad frames at once.
                let need = self.header_len_needed()?;
                if self.head_len < need {
                    return Ok(());
                }
                let header = self.parse_header(need)?;
                self.frame
                    .reserve(header.header_len + header.len.min(64 * 1024));
                self.frame
                    .extend_from_slice(&self.head[..header.header_len]);
                self.head_len = 0;
                self.header = Some(header);
            }
            Some(header) => {
                let have = self.frame.len() - header.header_len;
                let take = (header.len - have).min(bytes.len());
                self.frame.extend_from_slice(&bytes[..take]);
                *bytes = &bytes[take..];
            }
        }
        if let Some(header) = self.header {
            if self.frame.len() == header.header_len + header.len {
                self.header = None;
                let raw = self.frame.split().freeze();
                self.complete(header, raw, events)?;
            }
        }
        Ok(())
    }

    /// How many header bytes the frame being read has: 2 until the first two are known.
    /// Checks what the bytes read so far decide, so that a bad frame is refused early.
    fn header_len_needed(&self) -> Result<usize, WsError> {
        if self.head_len >= 1 {
            self.check_first_byte()?;
        }
        if self.head_len < 2 {
            return Ok(2);
        }
        self.check_second_byte()?;
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        Ok(2 + ext + mask)
    }

    /// What the first byte decides: reserved bits, the opcode, fragmented control frames,
    /// and whether the opcode fits the message in progress and the protocol.
    fn check_first_byte(&self) -> Result<(), WsError> {
        let b0 = self.head[0];
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits(b0 & 0x70));
        }
        let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(WsError::BadOpcode(b0 & 0x0f))?;
        if opcode.is_control() {
            return if b0 & 0x80 == 0 {
                Err(WsError::FragmentedControl(opcode))
            } else {
                Ok(())
            };
        }
        match (opcode, &self.pending) {
            (Opcode::Continuation, None) => Err(WsError::UnexpectedContinuation),
            (Opcode::Continuation, Some(_)) => Ok(()),
            (_, Some(_)) => Err(WsError::Interleaved(opcode)),
            (_, None) => {
                let expected = self.protocol.message_opcode();
                if opcode == expected {
                    Ok(())
                } else {
                    Err(WsError::WrongMessageType {
                        found: opcode,
                        expected,
                        protocol: self.protocol,
                    })
                }
            }
        }
    }

    /// What the second byte decides: masking by direction, the length of a control frame.
    fn check_second_byte(&self) -> Result<(), WsError> {
        let (b0, b1) = (self.head[0], self.head[1]);
        match (self.direction.masked(), b1 & 0x80 != 0) {
            (true, false) => return Err(WsError::Unmasked),
            (false, true) => return Err(WsError::Masked),
            _ => {}
        }
        let len7 = b1 & 0x7f;
        if b0 & 0x08 != 0 && usize::from(len7) > MAX_CONTROL_PAYLOAD {
            let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(WsError::BadOpcode(b0 & 0x0f))?;
            return Err(WsError::ControlTooLong(opcode, u64::from(len7)));
        }
        Ok(())
    }

    /// Reads the whole header (`header_len` bytes in `head`) and checks its length against
    /// the encoding rules and the limits.
    fn parse_header(&self, header_len: usize) -> Result<Header, WsError> {
        let h = &self.head[..header_len];
        let opcode = Opcode::from_bits(h[0] & 0x0f).ok_or(WsError::BadOpcode(h[0] & 0x0f))?;
        let (len, at) = match h[1] & 0x7f {
            126 => {
                let len = u64::from(u16::from_be_bytes([h[2], h[3]]));
                if len < 126 {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 4)
            }
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(WsError::LengthTopBit);
                }
                if len <= 0xffff {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let max = self.limits.max_frame_payload;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(WsError::FrameTooLarge { len, max })?;
        // A data frame, or a control frame between fragments, joins the message's held bytes;
        // an unfragmented data frame is a message of its own.
        let held = self.pending.as_ref().map_or(0, |p| p.raw.len());
        if held + header_len + len > self.limits.max_message {
            return Err(WsError::MessageTooLarge {
                max: self.limits.max_message,
            });
        }
        Ok(Header {
            fin: h[0] & 0x80 != 0,
            opcode,
            mask,
            len,
            header_len,
        })
    }

    /// A whole frame: `raw` is its bytes, header included.
    fn complete(
        &mut self,
        header: Header,
        raw: Bytes,
        events: &mut Vec<WsEvent>,
    ) -> Result<(), WsError> {
        let payload = match header.mask {
            // Unmasked: the payload is a slice of the frame, no copy.
            None => raw.slice(header.header_len..),
            Some(key) => {
                let mut p = BytesMut::from(&raw[header.header_len..]);
                apply_mask(&mut p, key);
                p.freeze()
            }
        };
        match header.opcode {
            Opcode::Ping | Opcode::Pong | Opcode::Close => {
                let message = match header.opcode {
                    Opcode::Ping => WsMessage::Ping { payload },
                    Opcode::Pong => WsMessage::Pong { payload },
                    _ => parse_close(&payload)?,
                };
                if header.opcode == Opcode::Close {
                    self.closed = true;
                    if let Some(p) = self.pending.take() {
                        events.push(WsEvent {
                            raw: p.raw.freeze(),
                            message: WsMessage::Partial {
                                payload: p.payload.freeze(),
                                text: p.opcode == Opcode::Text,
                            },
                        });
                    }
                }
                match &mut self.pending {
                    Some(p) => {
                        p.raw.extend_from_slice(&raw);
                        events.push(WsEvent {
                            raw: Bytes::new(),
                            message,
                        });
                    }
                    None => events.push(WsEvent { raw, message }),
                }
            }
            Opcode::Text | Opcode::Binary if header.fin => {
                let message = self.decode(header.opcode, payload)?;
                events.push(WsEvent { raw, message });
            }
            Opcode::Text | Opcode::Binary => {
                self.pending = Some(Pending {
                    opcode: header.opcode,
                    payload: BytesMut::from(&payload[..]),
                    raw: BytesMut::from(&raw[..]),
                });
            }
            Opcode::Continuation => {
                let Some(p) = self.pending.as_mut() else {
                    return Err(WsError::UnexpectedContinuation);
                };
                p.raw.extend_from_slice(&raw);
                p.payload.extend_from_slice(&payload);
                if header.fin {
                    let p = self.pending.take().expect("checked above");
                    let message = self.decode(p.opcode, p.payload.freeze())?;
                    events.push(WsEvent {
                        raw: p.raw.freeze(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    /// What a whole data message means under the protocol.
    fn decode(&mut self, opcode: Opcode, payload: Bytes) -> Result<WsMessage, WsError> {
        if opcode == Opcode::Text && std::str::from_utf8(&payload).is_err() {
            return Err(WsError::InvalidUtf8);
        }
        if payload.is_empty() {
            return Ok(WsMessage::Empty);
        }
        if self.protocol == ChannelProtocol::SpdyTunnel {
            return Ok(WsMessage::Tunnel { payload });
        }
        if self.protocol == ChannelProtocol::V5 && payload[0] == CLOSE_SIGNAL {
            if payload.len() != 2 {
                return Err(WsError::BadCloseSignal(payload.len()));
            }
            let channel = payload[1];
            if channel > RESIZE {
                return Err(WsError::CloseSignalChannel(channel));
            }
            return Ok(WsMessage::CloseSignal { channel });
        }
        let channel = if self.protocol.is_base64() {
            // The channel is the character '0' + channel; only ASCII is accepted.
            match payload[0] {
                c @ b'0'..=0x7f => c - b'0',
                c => {
                    return Err(WsError::UnknownChannel {
                        channel: c.wrapping_sub(b'0'),
                        protocol: self.protocol,
                    })
                }
            }
        } else {
            payload[0]
        };
        let data = payload.slice(1..);
        match self.protocol.kind() {
            StreamKind::Exec => self.exec_message(channel, data),
            StreamKind::PortForward => self.port_message(channel, data),
        }
    }

    fn unknown(&self, channel: u8) -> WsError {
        WsError::UnknownChannel {
            channel,
            protocol: self.protocol,
        }
    }

    fn wrong_direction(&self, channel: u8) -> WsError {
        WsError::WrongDirection {
            channel,
            protocol: self.protocol,
            writer: self.direction.writer(),
        }
    }

    fn base64(&self, channel: u8, data: Bytes) -> Result<Bytes, WsError> {
        if !self.protocol.is_base64() {
            return Ok(data);
        }
        base64::engine::general_purpose::STANDARD
            .decode(&data)
            .map(Bytes::from)
            .map_err(|e| WsError::InvalidBase64 {
                channel,
                reason: e.to_string(),
            })
    }

    fn exec_message(&self, channel: u8, data: Bytes) -> Result<WsMessage, WsError> {
        if channel > RESIZE {
            return Err(self.unknown(channel));
        }
        let from_client = self.direction == Direction::ClientToServer;
        let allowed = match channel {
            STDIN | RESIZE => from_client,
            _ => !from_client,
        };
        if !allowed {
            return Err(self.wrong_direction(channel));
        }
        let payload = self.base64(channel, data)?;
        Ok(match channel {
            RESIZE => {
                // serde would also read a struct from an array (`[80,24]`): an object only.
                let first = payload.iter().find(|b| !b" \t\r\n".contains(b));
                if first != Some(&b'{') {
                    return Err(WsError::BadResize("not a JSON object".to_owned()));
                }
                let size: TerminalSize = serde_json::from_slice(&payload)
                    .map_err(|e| WsError::BadResize(e.to_string()))?;
                WsMessage::Resize {
                    width: size.width,
                    height: size.height,
                }
            }
            ERROR => {
                let status = if self.protocol.has_status() && !payload.is_empty() {
                    Some(ExecStatus::parse(&payload)?)
                } else {
                    None
                };
                WsMessage::Error { payload, status }
            }
            _ => WsMessage::Data { channel, payload },
        })
    }

    fn port_message(&mut self, channel: u8, data: Bytes) -> Result<WsMessage, WsError> {
        let index = usize::from(channel / 2);
        let Some(&port) = self.ports.get(index) else {
            return Err(self.unknown(channel));
        };
        let is_error = channel % 2 == 1;
        let mut payload = self.base64(channel, data)?;
        if self.direction == Direction::ClientToServer {
            // The client writes data only; the server reads nothing from error channels.
            if is_error {
                return Err(self.wrong_direction(channel));
            }
        } else if !self.port_seen[usize::from(channel)] {
            if payload.len() < 2 {
                return Err(WsError::MissingPort { channel });
            }
            let found = u16::from_le_bytes([payload[0], payload[1]]);
            if found != port {
                return Err(WsError::PortMismatch {
                    channel,
                    found,
                    expected: port,
                });
            }
            self.port_seen[usize::from(channel)] = true;
            payload = payload.slice(2..);
        }
        Ok(if is_error {
            WsMessage::PortError {
                port,
                channel,
                payload,
            }
        } else {
            WsMessage::PortData {
                port,
                channel,
                payload,
            }
        })
    }
}

fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Whether a received close code is one an endpoint may send (RFC 6455, 7.4): the defined
/// codes except 1004 (reserved) and 1005, 1006 and 1015 (never on the wire), the IANA
/// registered 1012 to 1014, and 3000 to 4999 for libraries and applications.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn parse_close(payload: &[u8]) -> Result<WsMessage, WsError> {
    match payload.len() {
        0 => Ok(WsMessage::Close {
            code: None,
            reason: String::new(),
        }),
        1 => Err(WsError::CloseTooShort),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                return Err(WsError::BadCloseCode(code));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| WsError::CloseReasonNotUtf8)?
                .to_owned();
            Ok(WsMessage::Close {
                code: Some(code),
                reason,
            })
        }
    }
}

/// One frame's bytes: `payload` masked with `mask` when given (frames from the client).
pub fn encode_frame(fin: bool, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(u8::from(fin) << 7 | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.extend_from_slice(payload),
    }
    out.freeze()
}

/// The bytes of one data message as a reader returned them ([`WsEvent::raw`]: its frames,
/// each already read and checked, with any control frames read between its fragments), with
/// the message in **one** frame: the control frames first, as they were, then a final frame
/// of the message's opcode carrying its whole payload, masked with the first fragment's key
/// when that was masked. A message that came in one frame is returned as it is.
///
/// Why: the Kubernetes side of exec, attach and port-forward over WebSocket reads messages
/// with `golang.org/x/net/websocket` (`wsstream`, in the 1.20 kubelet, and in the API server's
/// stream translator of later versions), which takes *every frame*, a continuation too, for a
/// message of its own, its first byte for a channel. Vigil reads a fragmented message joined,
/// as RFC 6455 says a WebSocket endpoint does; forwarded in fragments, the kubelet would read
/// what Vigil did not record (`[0, "ls"]` then `[4, …]`: stdin `ls`, then a resize).
/// `None`: `raw` is not a sequence of whole frames.
pub fn one_frame(raw: &Bytes) -> Option<Bytes> {
    if raw.first().is_none_or(|b| b & 0x80 != 0) {
        // Empty, or the first frame is final: one frame already (control frames between
        // fragments only come with a fragmented message).
        return Some(raw.clone());
    }
    let mut controls = BytesMut::new();
    let mut payload = BytesMut::new();
    let mut first: Option<(Opcode, Option<[u8; 4]>)> = None;
    let mut rest = &raw[..];
    while !rest.is_empty() {
        let opcode = Opcode::from_bits(rest[0] & 0x0f)?;
        let b1 = *rest.get(1)?;
        let (len, mut at) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(rest.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(rest.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let key: [u8; 4] = rest.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(key)
        } else {
            None
        };
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        let frame = rest.get(..end)?;
        if opcode.is_control() {
            controls.extend_from_slice(frame);
        } else {
            let start = payload.len();
            payload.extend_from_slice(&frame[at..]);
            if let Some(key) = mask {
                apply_mask(&mut payload[start..], key);
            }
            first.get_or_insert((opcode, mask));
        }
        rest = &rest[end..];
    }
    let (opcode, mask) = first?;
    controls.extend_from_slice(&encode_frame(true, opcode, &payload, mask));
    Some(controls.freeze())
}

/// Writes messages of one direction: masked (with a random key per frame) from the client,
/// unmasked from the server. Each message is one frame.
#[derive(Debug, Clone)]
pub struct WsWriter {
    direction: Direction,
    protocol: ChannelProtocol,
    fixed_mask: Option<[u8; 4]>,
}

impl WsWriter {
    pub fn new(direction: Direction, protocol: ChannelProtocol) -> Self {
        Self {
            direction,
            protocol,
            fixed_mask: None,
        }
    }

    /// Masks every frame with `key` instead of a random one (tests and fuzzing only: a
    /// client must not use a predictable key).
    pub fn with_mask_key(mut self, key: [u8; 4]) -> Self {
        self.fixed_mask = Some(key);
        self
    }

    fn mask(&self) -> Option<[u8; 4]> {
        self.direction
            .masked()
            .then(|| self.fixed_mask.unwrap_or_else(rand::random))
    }

    /// A frame of this direction.
    pub fn frame(&self, fin: bool, opcode: Opcode, payload: &[u8]) -> Bytes {
        encode_frame(fin, opcode, payload, self.mask())
    }

    /// A message whose whole payload is `payload` (no channel added): text for base64
    /// protocols, binary otherwise. The SPDY tunnel's messages are these.
    pub fn message(&self, payload: &[u8]) -> Bytes {
        self.frame(true, self.protocol.message_opcode(), payload)
    }

    /// A message of `data` on `channel`, encoded as the protocol says.
    pub fn channel(&self, channel: u8, data: &[u8]) -> Result<Bytes, WsError> {
        if self.protocol == ChannelProtocol::SpdyTunnel {
            return Err(WsError::Config(
                "the SPDY tunnel has no channels".to_owned(),
            ));
        }
        if self.protocol.is_base64() {
            if channel > 0x7f - b'0' {
                return Err(WsError::UnknownChannel {
                    channel,
                    protocol: self.protocol,
                });
            }
            let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            return Ok(self.message(text.as_bytes()));
        }
        let mut payload = Vec::with_capacity(data.len() + 1);
        payload.push(channel);
        payload.extend_from_slice(data);
        Ok(self.message(&payload))
    }

    /// v5: the close signal for `channel`.
    pub fn close_signal(&self, channel: u8) -> Result<Bytes, WsError> {
        if self.protocol != ChannelProtocol::V5 {
            return Err(WsError::Config(format!(
                "{} has no close signal",
                self.protocol
            )));
        }
        Ok(self.message(&[CLOSE_SIGNAL, channel]))
    }

    /// A resize message as kubectl writes it (JSON and a newline).
    pub fn resize(&self, width: u16, height: u16) -> Result<Bytes, WsError> {
        let json = format!("{{\"Width\":{width},\"Height\":{height}}}\n");
        self.channel(RESIZE, json.as_bytes())
    }

    pub fn ping(&self, payload: &[u8]) -> Result<Bytes, WsError> {
        self.control(Opcode::Ping, payload)
    }

    pub fn pong(&self, payload: &[u8]) -> Result<Bytes, WsError> {
        self.control(Opcode::Pong, payload)
    }

    /// A close frame with `code` and `reason` (none: an empty close frame). A reason that
    /// does not fit in the frame is cut at a character boundary.
    pub fn close(&self, code: Option<u16>, reason: &str) -> Result<Bytes, WsError> {
        let Some(code) = code else {
            return self.control(Opcode::Close, &[]);
        };
        if !valid_close_code(code) {
            return Err(WsError::BadCloseCode(code));
        }
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.control(Opcode::Close, &payload)
    }

    fn control(&self, opcode: Opcode, payload: &[u8]) -> Result<Bytes, WsError> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlTooLong(opcode, payload.len() as u64));
        }
        Ok(self.frame(true, opcode, payload))
    }

    /// What the gateway sends the client when it ends an exec or attach itself (idle streams,
    /// a drained node): `message` on the error channel (a `Failure` `Status` with `reason` and
    /// `code` from v4 on, the text before), then a normal close.
    pub fn ending(&self, message: &str, reason: &str, code: u16) -> Result<Bytes, WsError> {
        if self.protocol.kind() != StreamKind::Exec {
            return Err(WsError::Config(format!(
                "{} has no error channel to say why it ends",
                self.protocol
            )));
        }
        let body = if self.protocol.has_status() {
            failure_status(message, reason, code)
        } else {
            message.to_owned()
        };
        let mut out = BytesMut::new();
        out.extend_from_slice(&self.channel(ERROR, body.as_bytes())?);
        out.extend_from_slice(&self.close(Some(1000), "")?);
        Ok(out.freeze())
    }
}

/// A `v1` `Status` of a failure, as the error channel (v4 and later) carries it.
pub fn failure_status(message: &str, reason: &str, code: u16) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455, 4.2.2).
pub fn accept_key(client_key: &str) -> String {
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(client_key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The subprotocols offered in `Sec-WebSocket-Protocol` header values, in order.
pub fn offered_subprotocols<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The subprotocol to answer an offer with, as the Kubernetes server picks it: the first one
/// the client offered that Vigil reads for this kind of stream. `None` when none is.
pub fn select_subprotocol<'a>(
    kind: StreamKind,
    offered: impl IntoIterator<Item = &'a str>,
) -> Option<ChannelProtocol> {
    let supported = match kind {
        StreamKind::Exec => EXEC_SUBPROTOCOLS,
        StreamKind::PortForward => PORT_FORWARD_SUBPROTOCOLS,
    };
    offered
        .into_iter()
        .find(|p| supported.contains(p))
        .and_then(|p| ChannelProtocol::from_subprotocol(kind, p))
}

/// A client's WebSocket upgrade request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientUpgrade {
    /// `Sec-WebSocket-Key`, to check the server's `Sec-WebSocket-Accept` against.
    pub key: String,
    /// The subprotocols offered, in order.
    pub protocols: Vec<String>,
    /// The client offered extensions: the relay must not pass `Sec-WebSocket-Extensions` on.
    pub offers_extensions: bool,
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Result<Option<&'a str>, WsError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(WsError::Handshake(format!("more than one {name} header")));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| WsError::Handshake(format!("{name} is not visible ASCII")))
}

fn has_token(headers: &http::HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the headers of a client's upgrade request (RFC 6455, 4.2.1): `Upgrade: websocket`,
/// `Connection: upgrade`, version 13 and a key of 16 bytes in base64.
pub fn check_client_upgrade(headers: &http::HeaderMap) -> Result<ClientUpgrade, WsError> {
    if !header_str(headers, "upgrade")?.is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
    {
        return Err(WsError::Handshake("Upgrade is not websocket".to_owned()));
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(WsError::Handshake(
            "Connection does not name upgrade".to_owned(),
        ));
    }
    if header_str(headers, "sec-websocket-version")?.map(str::trim) != Some("13") {
        return Err(WsError::Handshake(
            "Sec-WebSocket-Version is not 13".to_owned(),
        ));
    }
    let key = header_str(headers, "sec-websocket-key")?
        .map(str::trim)
        .ok_or_else(|| WsError::Handshake("no Sec-WebSocket-Key".to_owned()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| WsError::Handshake("Sec-WebSocket-Key is not base64".to_owned()))?;
    if decoded.len() != 16 {
        return Err(WsError::Handshake(
            "Sec-WebSocket-Key is not 16 bytes".to_owned(),
        ));
    }
    let protocols = offered_subprotocols(
        headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
    .into_iter()
    .map(str::to_owned)
    .collect();
    Ok(ClientUpgrade {
        key: key.to_owned(),
        protocols,
        offers_extensions: headers.contains_key("sec-websocket-extensions"),
    })
}

/// Checks the server's answer to an upgrade request made with `key` and `offered`: 101,
/// `Upgrade: websocket`, `Connection: upgrade`, the right `Sec-WebSocket-Accept`, no
/// extension, and a subprotocol that was offered and that Vigil reads for `kind` (none at
/// all reads as binary channels, as the server means it). Returns the protocol to read.
pub fn check_server_upgrade(
    kind: StreamKind,
    status: http::StatusCode,
    headers: &http::HeaderMap,
    key: &str,
    offered: &[String],
) -> Result<ChannelProtocol, WsError> {
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(WsError::Handshake(format!(
            "the server answered {status}, not 101"
        )));
    }
    if !header_str(headers, "upgrade")?.is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
    {
        return Err(WsError::Handshake(
            "the server's Upgrade is not websocket".to_owned(),
        ));
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(WsError::Handshake(
            "the server's Connection does not name upgrade".to_owned(),
        ));
    }
    if header_str(headers, "sec-websocket-accept")?.map(str::trim) != Some(&accept_key(key)) {
        return Err(WsError::Handshake(
            "the server's Sec-WebSocket-Accept does not match the key".to_owned(),
        ));
    }
    if headers.contains_key("sec-websocket-extensions") {
        return Err(WsError::Handshake(
            "the server accepted a WebSocket extension".to_owned(),
        ));
    }
    let chosen = header_str(headers, "sec-websocket-protocol")?
        .map(str::trim)
        .unwrap_or("");
    if !chosen.is_empty() && !offered.iter().any(|o| o == chosen) {
        return Err(WsError::Handshake(format!(
            "the server chose subprotocol {chosen:?}, which was not offered"
        )));
    }
    ChannelProtocol::from_subprotocol(kind, chosen).ok_or_else(|| {
        WsError::Handshake(format!(
            "the server chose subprotocol {chosen:?}, which Vigil does not read"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChannelProtocol as P;
    use Direction::{ClientToServer as C2S, ServerToClient as S2C};

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client(p: ChannelProtocol) -> WsWriter {
        WsWriter::new(C2S, p).with_mask_key(KEY)
    }

    fn server(p: ChannelProtocol) -> WsWriter {
        WsWriter::new(S2C, p)
    }

    fn concat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn messages(events: &[WsEvent]) -> Vec<WsMessage> {
        events.iter().map(|e| e.message.clone()).collect()
    }

    fn data(channel: u8, payload: &[u8]) -> WsMessage {
        WsMessage::Data {
            channel,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    /// Reads `input` in `chunks` (lengths, cycled) and checks that the forwarded bytes are
    /// exactly the input.
    fn read_chunked(mut reader: WsReader, input: &[u8], chunks: &[usize]) -> Vec<WsEvent> {
        let mut events = Vec::new();
        let mut rest = input;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().expect("cycled")).clamp(1, rest.len());
            let (chunk, tail) = rest.split_at(n);
            events.extend(reader.push(chunk).expect("valid stream"));
            rest = tail;
            let forwarded: usize = events.iter().map(|e| e.raw.len()).sum();
            assert_eq!(forwarded + reader.held(), input.len() - rest.len());
        }
        reader.finish().expect("ends between messages");
        let raws: Vec<Bytes> = events.iter().map(|e| e.raw.clone()).collect();
        assert_eq!(concat(&raws), input, "forwarded bytes are the input");
        events
    }

    /// Reads `input` whole, then split in two at every byte boundary, then one byte at a
    /// time: the same events every way. Returns them.
    fn read_every_way(make: impl Fn() -> WsReader, input: &[u8]) -> Vec<WsMessage> {
        let whole = read_chunked(make(), input, &[input.len().max(1)]);
        for at in 1..input.len() {
            let mut reader = make();
            let mut events = reader.push(&input[..at]).expect("first part");
            events.extend(reader.push(&input[at..]).expect("second part"));
            reader.finish().expect("ends between messages");
            assert_eq!(events, whole, "split at {at}");
        }
        assert_eq!(read_chunked(make(), input, &[1]), whole, "byte by byte");
        assert_eq!(read_chunked(make(), input, &[3, 1, 7, 2]), whole);
        messages(&whole)
    }

    fn read_err(reader: &mut WsReader, input: &[u8]) -> WsError {
        reader.push(input).expect_err("refused")
    }

    fn one_err(direction: Direction, protocol: ChannelProtocol, input: &[u8]) -> WsError {
        read_err(&mut WsReader::new(direction, protocol), input)
    }

    // Captured from kubectl v1.32.4 (`kubectl exec demo -i -c c -- cat` with "hello\nworld\n"
    // on stdin, then `kubectl exec -it ... -- sh` in a 100x30 terminal) against a stand-in
    // API server that accepted v5.channel.k8s.io: the client's bytes are kubectl's own; the
    // server's were written by the stand-in from the protocol (stdout echo, a v4 Status with
    // exit code 3, close 1000), and kubectl accepted them (it exited with code 3).
    const KUBECTL_EXEC_CLIENT: &str =
        "828df3374481f35f21ed9f584ef69c4528e5f982826b386cd89438888283e63885800e";
    const KUBECTL_EXEC_SERVER: &str = concat!(
        "820101820d0168656c6c6f0a776f726c640a827e00e8037b226d65746164617461223a207b7d2c2022",
        "737461747573223a20224661696c757265222c20226d657373616765223a2022636f6d6d616e642074",
        "65726d696e617465642077697468206e6f6e2d7a65726f206578697420636f64653a206572726f7220",
        "657865637574696e6720636f6d6d616e64205b73685d2c206578697420636f64652033222c20227265",
        "61736f6e223a20224e6f6e5a65726f45786974436f6465222c202264657461696c73223a207b226361",
        "75736573223a205b7b22726561736f6e223a202245786974436f6465222c20226d657373616765223a",
        "202233227d5d7d7d880203e8",
    );
    const KUBECTL_TTY_CLIENT: &str = concat!(
        "829bf66f3173f21413249f0b451bd4550043c643133b9306561b824d0b40c6123b82848c52412a8c3e",
        "322082828887ef2288838282ba2e675dba2a898001151a08",
    );
    const KUBECTL_TTY_SERVER: &str = "8201018204016c730a82020104820201048a00";

    #[test]
    fn kubectl_exec_capture() {
        let input = hex::decode(KUBECTL_EXEC_CLIENT).unwrap();
        let got = read_every_way(|| WsReader::new(C2S, P::V5), &input);
        assert_eq!(
            got,
            vec![
                data(STDIN, b"hello\nworld\n"),
                WsMessage::CloseSignal { channel: STDIN },
                WsMessage::Close {
                    code: Some(1000),
                    reason: String::new()
                },
            ]
        );

        let input = hex::decode(KUBECTL_EXEC_SERVER).unwrap();
        let got = read_every_way(|| WsReader::new(S2C, P::V5), &input);
        assert_eq!(got[0], data(STDOUT, b""));
        assert_eq!(got[1], data(STDOUT, b"hello\nworld\n"));
        let WsMessage::Error {
            status: Some(status),
            ..
        } = &got[2]
        else {
            panic!("{:?}", got[2]);
        };
        assert!(!status.success);
        assert_eq!(status.exit_code, Some(3));
        assert_eq!(status.reason, "NonZeroExitCode");
        assert_eq!(
            got[3],
            WsMessage::Close {
                code: Some(1000),
                reason: String::new()
            }
        );
    }

    #[test]
    fn kubectl_tty_capture() {
        let input = hex::decode(KUBECTL_TTY_CLIENT).unwrap();
        let got = read_every_way(|| WsReader::new(C2S, P::V5), &input);
        assert_eq!(
            got,
            vec![
                WsMessage::Resize {
                    width: 100,
                    height: 30
                },
                data(STDIN, b"ls\n"),
                data(STDIN, b"\x04"),
                data(STDIN, b"\x04"),
                WsMessage::Ping {
                    payload: Bytes::new()
                },
            ]
        );
        let input = hex::decode(KUBECTL_TTY_SERVER).unwrap();
        let got = read_every_way(|| WsReader::new(S2C, P::V5), &input);
        assert_eq!(got[1], data(STDOUT, b"ls\n"));
        assert_eq!(
            got[4],
            WsMessage::Pong {
                payload: Bytes::new()
            }
        );
    }

    #[test]
    fn kubectl_handshake_capture() {
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("host", "127.0.0.1:18183"),
            (
                "user-agent",
                "kubectl/v1.32.4 (linux/amd64) kubernetes/4cb5f07",
            ),
            ("connection", "Upgrade"),
            ("kubectl-command", "kubectl exec"),
            ("sec-websocket-key", "N3aoOcw93tKxOgtLwqoFcQ=="),
            ("sec-websocket-protocol", "v5.channel.k8s.io"),
            ("sec-websocket-version", "13"),
            ("upgrade", "websocket"),
        ] {
            headers.insert(k, v.parse().unwrap());
        }
        let offer = check_client_upgrade(&headers).unwrap();
        assert_eq!(offer.protocols, vec!["v5.channel.k8s.io"]);
        assert!(!offer.offers_extensions);
        assert_eq!(
            select_subprotocol(StreamKind::Exec, offer.protocols.iter().map(String::as_str)),
            Some(P::V5)
        );

        let mut answer = http::HeaderMap::new();
        answer.insert("upgrade", "websocket".parse().unwrap());
        answer.insert("connection", "Upgrade".parse().unwrap());
        // Computed by Python's hashlib for the capture.
        answer.insert(
            "sec-websocket-accept",
            "w0Kph90xtYSvPpehAvVlGBLJK8A=".parse().unwrap(),
        );
        answer.insert(
            "sec-websocket-protocol",
            "v5.channel.k8s.io".parse().unwrap(),
        );
        let status = http::StatusCode::SWITCHING_PROTOCOLS;
        assert_eq!(
            check_server_upgrade(
                StreamKind::Exec,
                status,
                &answer,
                &offer.key,
                &offer.protocols
            ),
            Ok(P::V5)
        );
    }

    #[test]
    fn accept_key_of_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn subprotocols() {
        for p in [P::V1, P::Base64, P::V4, P::V4Base64, P::V5] {
            assert_eq!(
                ChannelProtocol::from_subprotocol(StreamKind::Exec, p.name()),
                Some(p)
            );
            assert_eq!(p.kind(), StreamKind::Exec);
        }
        for p in [P::PortForward, P::PortForwardBase64, P::SpdyTunnel] {
            assert_eq!(
                ChannelProtocol::from_subprotocol(StreamKind::PortForward, p.name()),
                Some(p)
            );
            assert_eq!(p.kind(), StreamKind::PortForward);
        }
        assert_eq!(
            ChannelProtocol::from_subprotocol(StreamKind::Exec, ""),
            Some(P::V1)
        );
        assert_eq!(
            ChannelProtocol::from_subprotocol(StreamKind::PortForward, ""),
            Some(P::PortForward)
        );
        for bad in [
            "v2.channel.k8s.io",
            "v3.channel.k8s.io",
            "V5.channel.k8s.io",
            "portforward.k8s.io",
            "SPDY/3.1+portforward.k8s.io",
        ] {
            assert_eq!(
                ChannelProtocol::from_subprotocol(StreamKind::Exec, bad),
                None
            );
        }
        assert_eq!(
            ChannelProtocol::from_subprotocol(StreamKind::PortForward, "v5.channel.k8s.io"),
            None
        );

        let offered =
            offered_subprotocols(["v9.channel.k8s.io, v4.channel.k8s.io", "v5.channel.k8s.io"]);
        assert_eq!(
            offered,
            vec![
                "v9.channel.k8s.io",
                "v4.channel.k8s.io",
                "v5.channel.k8s.io"
            ]
        );
        // The client's order decides, as on the Kubernetes server.
        assert_eq!(
            select_subprotocol(StreamKind::Exec, offered.clone()),
            Some(P::V4)
        );
        assert_eq!(
            select_subprotocol(StreamKind::PortForward, offered),
            Some(P::PortForward)
        );
        assert_eq!(
            select_subprotocol(StreamKind::PortForward, ["SPDY/3.1+portforward.k8s.io"]),
            Some(P::SpdyTunnel)
        );
        assert_eq!(
            select_subprotocol(StreamKind::Exec, ["v2.channel.k8s.io", ""]),
            None
        );
    }

    fn upgrade_request() -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("upgrade", "WebSocket".parse().unwrap());
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("sec-websocket-version", "13".parse().unwrap());
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h
    }

    #[test]
    fn client_upgrade_checks() {
        let ok = check_client_upgrade(&upgrade_request()).unwrap();
        assert_eq!(ok.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(ok.protocols.is_empty());

        let refused = |change: &dyn Fn(&mut http::HeaderMap)| {
            let mut h = upgrade_request();
            change(&mut h);
            let e = check_client_upgrade(&h).expect_err("refused");
            assert!(matches!(e, WsError::Handshake(_)), "{e}");
        };
        refused(&|h| {
            h.remove("upgrade");
        });
        refused(&|h| {
            h.insert("upgrade", "h2c".parse().unwrap());
        });
        refused(&|h| {
            h.insert("connection", "keep-alive".parse().unwrap());
        });
        refused(&|h| {
            h.insert("sec-websocket-version", "8".parse().unwrap());
        });
        refused(&|h| {
            h.remove("sec-websocket-key");
        });
        refused(&|h| {
            h.insert("sec-websocket-key", "not base64!".parse().unwrap());
        });
        refused(&|h| {
            h.insert("sec-websocket-key", "AAAA".parse().unwrap());
        });
        refused(&|h| {
            h.append(
                "sec-websocket-key",
                "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
            );
        });
        let mut h = upgrade_request();
        h.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        assert!(check_client_upgrade(&h).unwrap().offers_extensions);
    }

    #[test]
    fn server_upgrade_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let offered = vec![
            "v5.channel.k8s.io".to_owned(),
            "v4.channel.k8s.io".to_owned(),
        ];
        let answer = |protocol: Option<&str>| {
            let mut h = http::HeaderMap::new();
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert("connection", "Upgrade".parse().unwrap());
            h.insert("sec-websocket-accept", accept_key(key).parse().unwrap());
            if let Some(p) = protocol {
                h.insert("sec-websocket-protocol", p.parse().unwrap());
            }
            h
        };
        let switching = http::StatusCode::SWITCHING_PROTOCOLS;
        let check = |kind, status, h: &http::HeaderMap| {
            check_server_upgrade(kind, status, h, key, &offered)
        };
        let exec = StreamKind::Exec;
        assert_eq!(
            check(exec, switching, &answer(Some("v4.channel.k8s.io"))),
            Ok(P::V4)
        );
        assert_eq!(check(exec, switching, &answer(None)), Ok(P::V1));
        assert_eq!(
            check(
                StreamKind::PortForward,
                switching,
                &answer(Some("v4.channel.k8s.io"))
            ),
            Ok(P::PortForward)
        );
        let refused = |r: Result<ChannelProtocol, WsError>| {
            assert!(matches!(r, Err(WsError::Handshake(_))), "{r:?}");
        };
        refused(check(
            exec,
            http::StatusCode::FORBIDDEN,
            &answer(Some("v5.channel.k8s.io")),
        ));
        refused(check(exec, switching, &answer(Some("channel.k8s.io")))); // not offered
        let mut h = answer(Some("v5.channel.k8s.io"));
        h.insert("sec-websocket-accept", accept_key("other").parse().unwrap());
        refused(check(exec, switching, &h));
        let mut h = answer(Some("v5.channel.k8s.io"));
        h.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        refused(check(exec, switching, &h));
        let mut h = answer(Some("v5.channel.k8s.io"));
        h.remove("upgrade");
        refused(check(exec, switching, &h));
        let mut h = answer(Some("v5.channel.k8s.io"));
        h.insert("connection", "close".parse().unwrap());
        refused(check(exec, switching, &h));
        // Offered, but not one Vigil reads for port-forward.
        refused(check(
            StreamKind::PortForward,
            switching,
            &answer(Some("v5.channel.k8s.io")),
        ));
    }

    #[test]
    fn v5_client_session_with_fragments_and_pings() {
        let w = client(P::V5);
        let mut input = Vec::new();
        input.extend_from_slice(&w.resize(80, 24).unwrap());
        input.extend_from_slice(&w.channel(STDIN, b"echo hi\n").unwrap());
        // A 300-byte stdin message in three fragments, a ping and a pong between them.
        let big: Vec<u8> = (0..300u16).map(|i| (i % 251) as u8).collect();
        let mut payload = vec![STDIN];
        payload.extend_from_slice(&big);
        input.extend_from_slice(&w.frame(false, Opcode::Binary, &payload[..100]));
        input.extend_from_slice(&w.ping(b"hb").unwrap());
        input.extend_from_slice(&w.frame(false, Opcode::Continuation, &payload[100..200]));
        input.extend_from_slice(&w.pong(b"").unwrap());
        input.extend_from_slice(&w.frame(true, Opcode::Continuation, &payload[200..]));
        input.extend_from_slice(&w.close_signal(STDIN).unwrap());
        input.extend_from_slice(&w.close(Some(1000), "bye").unwrap());

        let got = read_every_way(|| WsReader::new(C2S, P::V5), &input);
        assert_eq!(
            got,
            vec![
                WsMessage::Resize {
                    width: 80,
                    height: 24
                },
                data(STDIN, b"echo hi\n"),
                WsMessage::Ping {
                    payload: Bytes::from_static(b"hb")
                },
                WsMessage::Pong {
                    payload: Bytes::new()
                },
                data(STDIN, &big),
                WsMessage::CloseSignal { channel: STDIN },
                WsMessage::Close {
                    code: Some(1000),
                    reason: "bye".to_owned()
                },
            ]
        );
        // The control frames between fragments travel with the message, in stream order.
        let events = read_chunked(WsReader::new(C2S, P::V5), &input, &[input.len()]);
        assert!(events[2].raw.is_empty() && events[3].raw.is_empty());
        assert_eq!(events[4].raw.len(), 3 * 6 + 301 + 2 * 6 + 2);
    }

    /// A message the client sent in fragments goes on as one frame (the server's reader takes
    /// each frame for a message): the control frames between the fragments first, then the
    /// whole payload under the first fragment's mask key; what the server reads is exactly
    /// what was read here.
    #[test]
    fn a_fragmented_message_goes_on_as_one_frame() {
        let w = client(P::V5);
        let whole = w.channel(STDIN, b"echo hi\n").unwrap();
        assert_eq!(one_frame(&whole), Some(whole.clone()), "one frame as it is");
        assert_eq!(one_frame(&Bytes::new()), Some(Bytes::new()));
        // stdin "ls" then, in a continuation, what a frame-by-frame reader takes for a resize.
        let mut payload = vec![STDIN];
        payload.extend_from_slice(b"ls");
        let resize = br#"{"Width":1,"Height":1}"#;
        let mut tail = vec![RESIZE];
        tail.extend_from_slice(resize);
        let key = [9, 8, 7, 6];
        let mut input = Vec::new();
        input.extend_from_slice(&encode_frame(false, Opcode::Binary, &payload, Some(key)));
        input.extend_from_slice(&w.ping(b"hb").unwrap());
        input.extend_from_slice(&encode_frame(
            true,
            Opcode::Continuation,
            &tail,
            Some([1, 1, 1, 1]),
        ));
        let events = read_chunked(WsReader::new(C2S, P::V5), &input, &[input.len()]);
        assert_eq!(events.len(), 2);
        let joined = [payload.clone(), tail.clone()].concat();
        assert_eq!(events[1].message, data(STDIN, &joined[1..]));
        let out = one_frame(&events[1].raw).unwrap();
        let ping = w.ping(b"hb").unwrap();
        assert_eq!(&out[..ping.len()], &ping[..], "the ping first, as it was");
        assert_eq!(
            &out[ping.len()..],
            &encode_frame(true, Opcode::Binary, &joined, Some(key))[..],
            "then the message in one final frame, under the first key"
        );
        // Read again, as the server will: the same message, in one frame.
        let again = read_chunked(WsReader::new(C2S, P::V5), &out, &[out.len()]);
        assert_eq!(messages(&again), messages(&events));
        assert!(again[1].raw[0] & 0x80 != 0, "final");
        // Large: the joined frame takes the 16-bit length.
        let big = vec![b'x'; 200];
        let mut input = encode_frame(false, Opcode::Binary, &[STDIN], Some(key)).to_vec();
        input.extend_from_slice(&encode_frame(true, Opcode::Continuation, &big, Some(key)));
        let out = one_frame(&Bytes::from(input)).unwrap();
        let again = read_chunked(WsReader::new(C2S, P::V5), &out, &[out.len()]);
        assert_eq!(messages(&again), vec![data(STDIN, &big)]);
        assert_eq!(
            one_frame(&Bytes::from_static(&[0x02, 0x85, 0])),
            None,
            "cut short"
        );
    }

    #[test]
    fn v5_server_session() {
        let w = server(P::V5);
        let mut input = Vec::new();
        input.extend_from_slice(&w.channel(STDOUT, b"").unwrap());
        input.extend_from_slice(&w.channel(STDOUT, b"hi\n").unwrap());
        input.extend_from_slice(&w.channel(STDERR, b"oops\n").unwrap());
        let success = br#"{"metadata":{},"status":"Success"}"#;
        input.extend_from_slice(&w.channel(ERROR, success).unwrap());
        input.extend_from_slice(&w.close(Some(1000), "").unwrap());
        let got = read_every_way(|| WsReader::new(S2C, P::V5), &input);
        assert_eq!(got[0], data(STDOUT, b""));
        assert_eq!(got[1], data(STDOUT, b"hi\n"));
        assert_eq!(got[2], data(STDERR, b"oops\n"));
        assert_eq!(
            got[3],
            WsMessage::Error {
                payload: Bytes::from_static(success),
                status: Some(ExecStatus {
                    success: true,
                    exit_code: Some(0),
                    reason: String::new(),
                    message: String::new(),
                }),
            }
        );
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn large_frames_use_16_and_64_bit_lengths() {
        let w = server(P::V4);
        for len in [125usize, 126, 127, 65_535, 65_536, 200_000] {
            let payload = vec![b'x'; len];
            let frame = w.channel(STDOUT, &payload).unwrap();
            let mut r = WsReader::new(S2C, P::V4);
            let events = read_chunked(WsReader::new(S2C, P::V4), &frame, &[4096, 1, 13]);
            assert_eq!(messages(&events), vec![data(STDOUT, &payload)], "{len}");
            assert_eq!(r.push(&frame).unwrap().len(), 1);
        }
        let c = client(P::V4);
        let payload = vec![7u8; 70_000];
        let frame = c.channel(STDIN, &payload).unwrap();
        for chunks in [&[1usize][..], &[2, 3, 5, 8, 13], &[65_000], &[frame.len()]] {
            let events = read_chunked(WsReader::new(C2S, P::V4), &frame, chunks);
            assert_eq!(messages(&events), vec![data(STDIN, &payload)]);
        }
    }

    #[test]
    fn v1_error_channel_is_text() {
        let w = server(P::V1);
        let input = w.channel(ERROR, b"command not found").unwrap();
        let got = read_every_way(|| WsReader::new(S2C, P::V1), &input);
        assert_eq!(
            got,
            vec![WsMessage::Error {
                payload: Bytes::from_static(b"command not found"),
                status: None
            }]
        );
        // No close signal before v5: channel 255 is unknown.
        let input = client(P::V4).message(&[255, 0]);
        assert_eq!(
            one_err(C2S, P::V4, &input),
            WsError::UnknownChannel {
                channel: 255,
                protocol: P::V4
            }
        );
    }

    #[test]
    fn base64_protocols() {
        for p in [P::Base64, P::V4Base64] {
            let c = client(p);
            let mut input = Vec::new();
            input.extend_from_slice(&c.channel(STDIN, b"foo\n").unwrap());
            input.extend_from_slice(&c.resize(120, 40).unwrap());
            input.extend_from_slice(&c.channel(STDIN, b"").unwrap());
            // The example of the Kubernetes documentation: "0" + base64("foo\n").
            assert_eq!(
                &server(p).channel(STDIN, b"foo\n").unwrap()[2..],
                b"0Zm9vCg=="
            );
            let got = read_every_way(|| WsReader::new(C2S, p), &input);
            assert_eq!(
                got,
                vec![
                    data(STDIN, b"foo\n"),
                    WsMessage::Resize {
                        width: 120,
                        height: 40
                    },
                    data(STDIN, b""),
                ]
            );
        }
        let s = server(P::V4Base64);
        let failure = failure_status("nope", "InternalError", 500);
        let mut input = s.channel(STDOUT, b"\x00\xffbin").unwrap().to_vec();
        input.extend_from_slice(&s.channel(ERROR, failure.as_bytes()).unwrap());
        let got = read_every_way(|| WsReader::new(S2C, P::V4Base64), &input);
        assert_eq!(got[0], data(STDOUT, b"\x00\xffbin"));
        let WsMessage::Error {
            status: Some(status),
            ..
        } = &got[1]
        else {
            panic!("{:?}", got[1]);
        };
        assert_eq!(
            (status.success, status.exit_code, status.reason.as_str()),
            (false, None, "InternalError")
        );
        assert_eq!(status.message, "nope");
        // Base64 v1: the error channel is text, base64-encoded.
        let input = server(P::Base64).channel(ERROR, b"bad").unwrap();
        assert_eq!(
            read_every_way(|| WsReader::new(S2C, P::Base64), &input),
            vec![WsMessage::Error {
                payload: Bytes::from_static(b"bad"),
                status: None
            }]
        );
    }

    #[test]
    fn base64_errors() {
        let c = client(P::V4Base64);
        for bad in ["0Zm9vCg", "0Zm9v\nCg==", "0Zm9vCh==", "0!!!!"] {
            let e = one_err(C2S, P::V4Base64, &c.message(bad.as_bytes()));
            assert!(
                matches!(e, WsError::InvalidBase64 { channel: 0, .. }),
                "{bad}: {e}"
            );
        }
        let e = one_err(C2S, P::V4Base64, &c.message(b"9AAAA"));
        assert_eq!(
            e,
            WsError::UnknownChannel {
                channel: 9,
                protocol: P::V4Base64
            }
        );
        let e = one_err(C2S, P::V4Base64, &c.message(b" AAAA"));
        assert!(matches!(e, WsError::UnknownChannel { .. }), "{e}");
        let e = one_err(C2S, P::V4Base64, &c.message("\u{e9}AAAA".as_bytes()));
        assert!(matches!(e, WsError::UnknownChannel { .. }), "{e}");
        // Text frames must be UTF-8, also when cut across fragments.
        let e = one_err(C2S, P::V4Base64, &c.message(b"0\xff"));
        assert_eq!(e, WsError::InvalidUtf8);
        let mut input = c.frame(false, Opcode::Text, b"0\xc3").to_vec();
        input.extend_from_slice(&c.frame(true, Opcode::Continuation, b"\xa9"));
        let e = one_err(C2S, P::V4Base64, &input);
        assert!(
            matches!(e, WsError::InvalidBase64 { .. }),
            "valid UTF-8 once whole: {e}"
        );
        // Binary protocols take binary messages, base64 ones text messages.
        let e = one_err(
            C2S,
            P::V4Base64,
            &client(P::V4).channel(STDIN, b"x").unwrap(),
        );
        assert_eq!(
            e,
            WsError::WrongMessageType {
                found: Opcode::Binary,
                expected: Opcode::Text,
                protocol: P::V4Base64
            }
        );
        let e = one_err(C2S, P::V5, &c.message(b"0AAAA"));
        assert!(matches!(e, WsError::WrongMessageType { .. }), "{e}");
    }

    #[test]
    fn channels_by_direction() {
        let c = client(P::V5);
        for ch in [STDOUT, STDERR, ERROR] {
            assert_eq!(
                one_err(C2S, P::V5, &c.channel(ch, b"x").unwrap()),
                WsError::WrongDirection {
                    channel: ch,
                    protocol: P::V5,
                    writer: "client"
                }
            );
        }
        let s = server(P::V5);
        for ch in [STDIN, RESIZE] {
            assert!(matches!(
                one_err(S2C, P::V5, &s.channel(ch, b"x").unwrap()),
                WsError::WrongDirection {
                    writer: "server",
                    ..
                }
            ));
        }
        for ch in [5u8, 100, 254] {
            assert_eq!(
                one_err(C2S, P::V5, &c.channel(ch, b"x").unwrap()),
                WsError::UnknownChannel {
                    channel: ch,
                    protocol: P::V5
                }
            );
        }
        // An empty message has no channel: reported, and the receiver ignores it.
        let got = read_every_way(|| WsReader::new(C2S, P::V5), &c.message(b""));
        assert_eq!(got, vec![WsMessage::Empty]);
    }

    #[test]
    fn close_signal() {
        let c = client(P::V5);
        for ch in 0..=RESIZE {
            let got = read_every_way(|| WsReader::new(C2S, P::V5), &c.close_signal(ch).unwrap());
            assert_eq!(got, vec![WsMessage::CloseSignal { channel: ch }]);
        }
        assert_eq!(
            one_err(C2S, P::V5, &c.close_signal(5).unwrap()),
            WsError::CloseSignalChannel(5)
        );
        assert_eq!(
            one_err(C2S, P::V5, &c.message(&[255])),
            WsError::BadCloseSignal(1)
        );
        assert_eq!(
            one_err(C2S, P::V5, &c.message(&[255, 0, 0])),
            WsError::BadCloseSignal(3)
        );
        assert!(client(P::V4).close_signal(0).is_err());
    }

    #[test]
    fn resize_must_be_width_and_height() {
        let c = client(P::V5);
        let ok = [
            (r#"{"Width":1,"Height":2}"#, (1, 2)),
            ("{\"Height\":65535,\"Width\":0}\r\n", (0, 65535)),
            (r#" { "Width" : 7 , "Height" : 8 } "#, (7, 8)),
        ];
        for (json, (width, height)) in ok {
            let got = read_every_way(
                || WsReader::new(C2S, P::V5),
                &c.channel(RESIZE, json.as_bytes()).unwrap(),
            );
            assert_eq!(got, vec![WsMessage::Resize { width, height }], "{json}");
        }
        for bad in [
            "",
            "{}",
            r#"{"Width":1}"#,
            r#"{"width":1,"height":2}"#,
            r#"{"Width":1,"Height":2,"X":3}"#,
            r#"{"Width":1,"Height":2,"Width":3}"#,
            r#"{"Width":-1,"Height":2}"#,
            r#"{"Width":65536,"Height":2}"#,
            r#"{"Width":1.5,"Height":2}"#,
            r#"{"Width":"1","Height":2}"#,
            r#"{"Width":1,"Height":2}{"Width":1,"Height":2}"#,
            r#"[1,2]"#,
        ] {
            let e = one_err(C2S, P::V5, &c.channel(RESIZE, bad.as_bytes()).unwrap());
            assert!(matches!(e, WsError::BadResize(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn exit_status() {
        let parse = |s: &str| ExecStatus::parse(s.as_bytes());
        assert_eq!(parse(r#"{"status":"Success"}"#).unwrap().exit_code, Some(0));
        let code = |n: &str| {
            parse(&format!(
                r#"{{"status":"Failure","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"Other","message":"9"}},{{"reason":"ExitCode","message":"{n}"}}]}}}}"#
            ))
            .unwrap()
            .exit_code
        };
        assert_eq!(code("1"), Some(1));
        assert_eq!(code("255"), Some(255));
        assert_eq!(code("256"), None);
        assert_eq!(code("x"), None);
        assert_eq!(
            parse(r#"{"status":"Failure","reason":"NonZeroExitCode"}"#)
                .unwrap()
                .exit_code,
            None
        );
        for bad in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"status":"Maybe"}"#,
            r#"{"status":1}"#,
            "{",
        ] {
            assert!(matches!(parse(bad), Err(WsError::BadStatus(_))), "{bad}");
        }
        // On the stream: a v4 error channel that is not a Status is refused, an empty one
        // (the server opening the channel) is not.
        let s = server(P::V4);
        assert!(matches!(
            one_err(S2C, P::V4, &s.channel(ERROR, b"not json").unwrap()),
            WsError::BadStatus(_)
        ));
        assert_eq!(
            read_every_way(
                || WsReader::new(S2C, P::V4),
                &s.channel(ERROR, b"").unwrap()
            ),
            vec![WsMessage::Error {
                payload: Bytes::new(),
                status: None
            }]
        );
    }

    #[test]
    fn port_forward_channels() {
        let ports = [8080u16, 5432];
        let s = server(P::PortForward);
        let mut input = Vec::new();
        // The server opens each channel with its port, little-endian.
        for (i, port) in ports.iter().enumerate() {
            let ch = 2 * i as u8;
            input.extend_from_slice(&s.channel(ch, &port.to_le_bytes()).unwrap());
            input.extend_from_slice(&s.channel(ch + 1, &port.to_le_bytes()).unwrap());
        }
        input.extend_from_slice(&s.channel(0, b"HTTP/1.1 200 OK\r\n").unwrap());
        input.extend_from_slice(&s.channel(3, b"connection refused").unwrap());
        let make = || WsReader::port_forward(S2C, P::PortForward, &ports).unwrap();
        let got = read_every_way(make, &input);
        let pd = |port, channel, payload: &'static [u8]| WsMessage::PortData {
            port,
            channel,
            payload: Bytes::from_static(payload),
        };
        let pe = |port, channel, payload: &'static [u8]| WsMessage::PortError {
            port,
            channel,
            payload: Bytes::from_static(payload),
        };
        assert_eq!(
            got,
            vec![
                pd(8080, 0, b""),
                pe(8080, 1, b""),
                pd(5432, 2, b""),
                pe(5432, 3, b""),
                pd(8080, 0, b"HTTP/1.1 200 OK\r\n"),
                pe(5432, 3, b"connection refused"),
            ]
        );
        // The prefix may share its message with data.
        let mut with_data = 8080u16.to_le_bytes().to_vec();
        with_data.extend_from_slice(b"abc");
        let got = read_every_way(make, &s.channel(0, &with_data).unwrap());
        assert_eq!(got, vec![pd(8080, 0, b"abc")]);

        // The client writes data channels only, without a port prefix.
        let c = client(P::PortForward);
        let make = || WsReader::port_forward(C2S, P::PortForward, &ports).unwrap();
        let got = read_every_way(make, &c.channel(2, b"GET / HTTP/1.1\r\n").unwrap());
        assert_eq!(got, vec![pd(5432, 2, b"GET / HTTP/1.1\r\n")]);
        assert!(matches!(
            make().push(&c.channel(1, b"x").unwrap()),
            Err(WsError::WrongDirection { channel: 1, .. })
        ));
        assert!(matches!(
            make().push(&c.channel(4, b"x").unwrap()),
            Err(WsError::UnknownChannel { channel: 4, .. })
        ));

        // Base64: the same, in text.
        let s = server(P::PortForwardBase64);
        let mut input = s.channel(0, &80u16.to_le_bytes()).unwrap().to_vec();
        input.extend_from_slice(&s.channel(0, b"hello").unwrap());
        let make = || WsReader::port_forward(S2C, P::PortForwardBase64, &[80]).unwrap();
        assert_eq!(
            read_every_way(make, &input),
            vec![pd(80, 0, b""), pd(80, 0, b"hello")]
        );
    }

    #[test]
    fn port_forward_errors() {
        let s = server(P::PortForward);
        let mut r = WsReader::port_forward(S2C, P::PortForward, &[8080]).unwrap();
        assert_eq!(
            read_err(&mut r, &s.channel(0, &[0x90]).unwrap()),
            WsError::MissingPort { channel: 0 }
        );
        let mut r = WsReader::port_forward(S2C, P::PortForward, &[8080]).unwrap();
        assert_eq!(
            read_err(&mut r, &s.channel(1, &81u16.to_le_bytes()).unwrap()),
            WsError::PortMismatch {
                channel: 1,
                found: 81,
                expected: 8080
            }
        );
        assert!(WsReader::port_forward(S2C, P::PortForward, &[]).is_err());
        assert!(WsReader::port_forward(S2C, P::PortForward, &[1; MAX_PORTS]).is_ok());
        assert!(WsReader::port_forward(S2C, P::PortForward, &[1; MAX_PORTS + 1]).is_err());
        assert!(WsReader::port_forward(S2C, P::PortForwardBase64, &[1; MAX_BASE64_PORTS]).is_ok());
        assert!(
            WsReader::port_forward(S2C, P::PortForwardBase64, &[1; MAX_BASE64_PORTS + 1]).is_err()
        );
        assert!(WsReader::port_forward(S2C, P::V5, &[1]).is_err());
        // The highest channel of the most ports in base64 is still one ASCII character.
        let last = (2 * MAX_BASE64_PORTS - 1) as u8;
        let w = server(P::PortForwardBase64);
        let mut r =
            WsReader::port_forward(S2C, P::PortForwardBase64, &[7; MAX_BASE64_PORTS]).unwrap();
        let got = r
            .push(&w.channel(last, &7u16.to_le_bytes()).unwrap())
            .unwrap();
        assert_eq!(got[0].message.channel(), Some(last));
        // Without ports (a plain reader), every channel is unknown.
        assert!(matches!(
            one_err(S2C, P::PortForward, &s.channel(0, &[1, 2]).unwrap()),
            WsError::UnknownChannel { .. }
        ));
    }

    #[test]
    fn spdy_tunnel() {
        let c = client(P::SpdyTunnel);
        let mut input = c.message(b"\x80\x03\x00\x01spdy").to_vec();
        input.extend_from_slice(&c.frame(false, Opcode::Binary, b"ab"));
        input.extend_from_slice(&c.frame(true, Opcode::Continuation, b"cd"));
        input.extend_from_slice(&c.message(b""));
        let got = read_every_way(|| WsReader::new(C2S, P::SpdyTunnel), &input);
        assert_eq!(
            got,
            vec![
                WsMessage::Tunnel {
                    payload: Bytes::from_static(b"\x80\x03\x00\x01spdy")
                },
                WsMessage::Tunnel {
                    payload: Bytes::from_static(b"abcd")
                },
                WsMessage::Empty,
            ]
        );
        // client-go refuses text messages in the tunnel.
        assert!(matches!(
            one_err(C2S, P::SpdyTunnel, &c.frame(true, Opcode::Text, b"x")),
            WsError::WrongMessageType { .. }
        ));
        assert!(c.channel(0, b"x").is_err());
    }

    #[test]
    fn close_in_the_middle_of_a_message() {
        let c = client(P::V5);
        let mut input = c.frame(false, Opcode::Binary, b"\x00par").to_vec();
        input.extend_from_slice(&c.ping(b"").unwrap());
        input.extend_from_slice(&c.frame(false, Opcode::Continuation, b"tial"));
        input.extend_from_slice(&c.close(Some(1001), "going away").unwrap());
        let got = read_every_way(|| WsReader::new(C2S, P::V5), &input);
        assert_eq!(
            got,
            vec![
                WsMessage::Ping {
                    payload: Bytes::new()
                },
                WsMessage::Partial {
                    payload: Bytes::from_static(b"\x00partial"),
                    text: false
                },
                WsMessage::Close {
                    code: Some(1001),
                    reason: "going away".to_owned()
                },
            ]
        );
        // Nothing may follow the close.
        let mut r = WsReader::new(C2S, P::V5);
        r.push(&c.close(None, "").unwrap()).unwrap();
        assert!(r.is_closed());
        assert_eq!(
            read_err(&mut r, &c.channel(0, b"x").unwrap()),
            WsError::AfterClose
        );
    }

    #[test]
    fn close_frames() {
        let c = client(P::V5);
        let got = read_every_way(|| WsReader::new(C2S, P::V5), &c.close(None, "").unwrap());
        assert_eq!(
            got,
            vec![WsMessage::Close {
                code: None,
                reason: String::new()
            }]
        );
        for code in [1000u16, 1003, 1007, 1011, 1014, 3000, 4999] {
            let got = read_every_way(
                || WsReader::new(C2S, P::V5),
                &c.close(Some(code), "r").unwrap(),
            );
            assert_eq!(
                got,
                vec![WsMessage::Close {
                    code: Some(code),
                    reason: "r".to_owned()
                }]
            );
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let frame = c.frame(true, Opcode::Close, &code.to_be_bytes());
            assert_eq!(one_err(C2S, P::V5, &frame), WsError::BadCloseCode(code));
            assert!(c.close(Some(code), "").is_err());
        }
        assert_eq!(
            one_err(C2S, P::V5, &c.frame(true, Opcode::Close, &[3])),
            WsError::CloseTooShort
        );
        assert_eq!(
            one_err(C2S, P::V5, &c.frame(true, Opcode::Close, b"\x03\xe8\xff")),
            WsError::CloseReasonNotUtf8
        );
        // A long reason is cut to fit, at a character boundary.
        let reason = "é".repeat(100);
        let frame = c.close(Some(1000), &reason).unwrap();
        let got = WsReader::new(C2S, P::V5).push(&frame).unwrap();
        let WsMessage::Close { reason: cut, .. } = &got[0].message else {
            panic!()
        };
        assert_eq!(cut.len(), 122);
        assert!(reason.starts_with(cut.as_str()));
    }

    #[test]
    fn frame_errors() {
        let c = client(P::V5);
        let s = server(P::V5);
        let stdin = c.channel(STDIN, b"x").unwrap();
        // Reserved bits: refused from the first byte.
        for bits in [0x40u8, 0x20, 0x10] {
            assert_eq!(
                one_err(C2S, P::V5, &[stdin[0] | bits]),
                WsError::ReservedBits(bits)
            );
        }
        for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xf] {
            assert_eq!(
                one_err(C2S, P::V5, &[0x80 | op, 0x80]),
                WsError::BadOpcode(op)
            );
        }
        // Masking by direction, from the second byte.
        assert_eq!(
            one_err(C2S, P::V5, &s.channel(STDIN, b"x").unwrap()[..2]),
            WsError::Unmasked
        );
        assert_eq!(
            one_err(S2C, P::V5, &c.channel(STDOUT, b"x").unwrap()[..2]),
            WsError::Masked
        );
        // Control frames.
        assert_eq!(
            one_err(C2S, P::V5, &[0x89, 0x80 | 126]),
            WsError::ControlTooLong(Opcode::Ping, 126)
        );
        assert_eq!(
            one_err(C2S, P::V5, &c.frame(false, Opcode::Pong, b"")),
            WsError::FragmentedControl(Opcode::Pong)
        );
        assert!(c.ping(&[0; 126]).is_err());
        // Fragmentation.
        assert_eq!(
            one_err(C2S, P::V5, &c.frame(true, Opcode::Continuation, b"x")),
            WsError::UnexpectedContinuation
        );
        let mut input = c.frame(false, Opcode::Binary, b"\x00a").to_vec();
        input.extend_from_slice(&c.frame(true, Opcode::Binary, b"\x00b"));
        assert_eq!(
            one_err(C2S, P::V5, &input),
            WsError::Interleaved(Opcode::Binary)
        );
        // Lengths: minimal encodings only, no top bit.
        assert_eq!(
            one_err(S2C, P::V5, &[0x82, 126, 0, 125]),
            WsError::NonMinimalLength(125)
        );
        assert_eq!(
            one_err(S2C, P::V5, &[0x82, 127, 0, 0, 0, 0, 0, 0, 0xff, 0xff]),
            WsError::NonMinimalLength(0xffff)
        );
        assert_eq!(
            one_err(S2C, P::V5, &[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            WsError::LengthTopBit
        );
    }

    #[test]
    fn limits() {
        let limits = Limits {
            max_frame_payload: 1000,
            max_message: 2000,
        };
        let make = || WsReader::new(S2C, P::V5).with_limits(limits);
        let s = server(P::V5);
        // A frame at the limit passes; one byte more is refused from its header alone.
        let ok = s.channel(STDOUT, &[1; 999]).unwrap();
        assert_eq!(make().push(&ok).unwrap().len(), 1);
        let long = s.channel(STDOUT, &[1; 1000]).unwrap();
        let mut r = make();
        assert_eq!(
            read_err(&mut r, &long[..4]),
            WsError::FrameTooLarge {
                len: 1001,
                max: 1000
            }
        );
        assert_eq!(r.held(), 4);
        let huge = [0x82, 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            one_err(S2C, P::V5, &huge),
            WsError::FrameTooLarge { .. }
        ));
        // Fragments count together, headers included.
        let mut r = make();
        let mut input = s.frame(false, Opcode::Binary, &[1; 900]).to_vec();
        input.extend_from_slice(&s.frame(false, Opcode::Continuation, &[1; 900]));
        r.push(&input).unwrap();
        assert_eq!(r.held(), 1808);
        assert!(r.buffered() <= 14 + 1000 + 2 * 2000);
        assert_eq!(
            read_err(&mut r, &s.frame(true, Opcode::Continuation, &[1; 190])[..4]),
            WsError::MessageTooLarge { max: 2000 }
        );
        // Empty fragments cannot grow a message without bound either.
        let mut r = make();
        r.push(&s.frame(false, Opcode::Binary, b"\x01")).unwrap();
        let empty = s.frame(false, Opcode::Continuation, b"");
        let mut refused = None;
        for i in 0..2000 {
            if let Err(e) = r.push(&empty) {
                refused = Some((i, e));
                break;
            }
        }
        assert_eq!(
            refused,
            // 3 bytes for the first frame, 2 for each empty one: the 999th passes 2000.
            Some((998, WsError::MessageTooLarge { max: 2000 }))
        );
    }

    #[test]
    fn a_failed_reader_stays_failed_and_truncation_is_reported() {
        let c = client(P::V5);
        let mut r = WsReader::new(C2S, P::V5);
        let e = read_err(&mut r, &[0xc2]);
        assert_eq!(e, WsError::ReservedBits(0x40));
        assert_eq!(
            r.push(&c.channel(0, b"x").unwrap()),
            Err(WsError::Failed(Box::new(e.clone())))
        );
        assert_eq!(r.finish(), Err(WsError::Failed(Box::new(e))));

        let frame = c.channel(0, b"abc").unwrap();
        let mut r = WsReader::new(C2S, P::V5);
        assert!(r.push(&frame[..1]).unwrap().is_empty());
        assert_eq!(r.finish(), Err(WsError::Truncated("a frame")));
        assert!(r.push(&frame[1..frame.len() - 1]).unwrap().is_empty());
        assert_eq!(r.finish(), Err(WsError::Truncated("a frame")));
        let mut r = WsReader::new(C2S, P::V5);
        r.push(&c.frame(false, Opcode::Binary, b"\x00a")).unwrap();
        assert_eq!(r.finish(), Err(WsError::Truncated("a fragmented message")));
    }

    #[test]
    fn an_ending_is_a_status_then_a_close() {
        for p in [P::V4, P::V5, P::V4Base64, P::V1] {
            let bytes = server(p)
                .ending("vigil: blocked by rule r1", "Forbidden", 403)
                .unwrap();
            let got = read_every_way(|| WsReader::new(S2C, p), &bytes);
            let WsMessage::Error { payload, status } = &got[0] else {
                panic!("{got:?}");
            };
            if p == P::V1 {
                assert_eq!(&payload[..], b"vigil: blocked by rule r1");
                assert_eq!(*status, None);
            } else {
                let status = status.clone().expect("a Status");
                assert!(!status.success);
                assert_eq!(status.reason, "Forbidden");
                assert_eq!(status.message, "vigil: blocked by rule r1");
                let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
                assert_eq!(json["kind"], "Status");
                assert_eq!(json["code"], 403);
            }
            assert_eq!(
                got[1],
                WsMessage::Close {
                    code: Some(1000),
                    reason: String::new()
                }
            );
        }
        assert!(server(P::SpdyTunnel)
            .ending("no", "Forbidden", 403)
            .is_err());
    }

    #[test]
    fn writer_masks_from_the_client_only() {
        let frame = WsWriter::new(C2S, P::V5).channel(0, b"abc").unwrap();
        assert_eq!(frame[1] & 0x80, 0x80);
        assert_eq!(frame.len(), 2 + 4 + 4);
        let frame = WsWriter::new(S2C, P::V5).channel(1, b"abc").unwrap();
        assert_eq!(&frame[..], b"\x82\x04\x01abc");
        // Random keys still read back.
        let mut r = WsReader::new(C2S, P::V5);
        for _ in 0..16 {
            let frame = WsWriter::new(C2S, P::V5).channel(0, b"data").unwrap();
            assert_eq!(r.push(&frame).unwrap()[0].message, data(0, b"data"));
        }
    }
}
