//! exec, attach and port-forward once the API server has switched protocols: SPDY/3.1 (see
//! [`super::spdy`]) or WebSocket with a Kubernetes channel protocol (see
//! [`super::websocket`]), whichever the client and the API server agreed on; Vigil relays the
//! protocol they chose. Every frame is read whole in each direction before it is forwarded,
//! exactly as it arrived, with one exception: a WebSocket message the client sent in
//! fragments goes to the API server in one frame ([`websocket::one_frame`]), because the
//! Kubernetes end reads every frame as a message of its own.
//!
//! The one exception is port-forward's SPDY tunnel (`SPDY/3.1+portforward.k8s.io`, SPDY in
//! the payloads of WebSocket messages): the gateway ends the client's WebSocket and speaks the
//! SPDY inside it to the API server, as an API server with the tunnel does to the kubelet.
//! Each SPDY frame, read whole, crosses unchanged: unwrapped from the client's messages, and
//! each of the API server's in a binary message of its own. The gateway answers the client's
//! pings, and closes the WebSocket (1000) when the API server's side ends.
//!
//! - exec and attach: the payload of each stdin, stdout, stderr and resize message is recorded
//!   (a `recording` record, its bytes in the session's recording file) before the frame is
//!   forwarded, and the outcome (the `Status` on the error channel) goes into the `response`
//!   record when the streams end.
//! - port-forward: the bytes are counted per port, not recorded (they are whatever protocol
//!   runs through the port); the `response` record names each port with its connections, its
//!   bytes each way and any error the kubelet reported.
//!
//! A frame the codec refuses ends the connection: nothing Vigil could not read crosses.

use super::spdy::{self, FrameKind, Observed, Side, SpdyReader, StreamTable, StreamType};
use super::websocket::{self, ChannelProtocol, Direction, WsMessage, WsReader, WsWriter};
use super::KubeContext;
use crate::audit::{ChunkOf, RecordingFile};
use crate::core::idle::Activity;
use crate::core::lifecycle::SHUTTING_DOWN;
use crate::core::trace::Stmt;
use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil_proto::record::{
    Body, Kind, KubeError, KubeResponse, Outcome, Response as RecordResponse,
};

/// How the switched connection frames its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Spdy,
    /// A channel protocol (never the SPDY tunnel, which is [`Framing::Tunnel`]).
    WebSocket(ChannelProtocol),
    /// port-forward: the client tunnels SPDY through WebSocket, the API server speaks SPDY.
    Tunnel,
}

/// What the streams are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// exec or attach: recorded byte for byte.
    Exec,
    /// port-forward: counted per port. Over WebSocket channels the ports are those of the
    /// request's `ports` query, in order; over SPDY each stream names its port.
    PortForward { ports: Vec<u16> },
}

/// One switched exec, attach or port-forward: where its records go.
pub struct Streams {
    pub ctx: Arc<KubeContext>,
    /// The session stays open until the streams' records are written.
    pub _open: super::Open,
    /// A record of the request's session (principal, connection), to copy.
    pub base: Body,
    pub stmt: Stmt,
    pub file: Arc<RecordingFile>,
    pub started: Instant,
    pub framing: Framing,
    pub purpose: Purpose,
}

impl Streams {
    /// A record of these streams: their session, principal, connection and statement number.
    fn record(&self, kind: Kind) -> Body {
        let mut body = self.ctx.core.audit.body(self.base.session.as_deref(), kind);
        body.principal = self.base.principal.clone();
        body.connection = self.base.connection.clone();
        body.parties = self.base.parties.clone();
        body.stmt = Some(self.stmt.n);
        body
    }
}

/// Bytes and connections of one forwarded port.
#[derive(Debug, Default)]
struct PortStats {
    connections: u64,
    /// From the client to the pod.
    bytes_in: u64,
    bytes_out: u64,
    /// What the kubelet reported on the port's error stream (the first KiB).
    errors: String,
}

/// What both directions share.
struct Shared {
    streams: Streams,
    /// The SPDY streams of the connection (SPDY, and SPDY tunnelled through WebSocket).
    table: Mutex<StreamTable>,
    /// Bytes recorded so far per direction (input, output, error, resize).
    offsets: [AtomicU64; 4],
    bytes: AtomicU64,
    /// The exec's outcome, as the error channel said it.
    status: Mutex<Vec<u8>>,
    ports: Mutex<BTreeMap<u16, PortStats>>,
    /// When a byte last crossed either way (`kubernetes.idle_timeout_secs`).
    activity: Activity,
}

/// An exec stream whose bytes are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

/// What a piece of a stream means for the records.
#[derive(Debug)]
enum Meaning {
    /// exec bytes, recorded before they are forwarded.
    Chunk(Recorded, Bytes),
    /// The exec's error channel (its `Status`).
    Status(Bytes),
    /// A port-forward connection opened to `port`.
    PortOpened(u16),
    PortBytes(u16, u64),
    PortError(u16, Bytes),
}

/// Bytes to forward once what they mean is on record.
struct Step {
    raw: Bytes,
    meanings: Vec<Meaning>,
    /// What the gateway answers the sender itself (a pong in a tunnel); empty: nothing.
    back: Bytes,
}

impl Step {
    fn forward(raw: Bytes, meanings: Vec<Meaning>) -> Self {
        Self {
            raw,
            meanings,
            back: Bytes::new(),
        }
    }
}

/// Reads one direction of the connection.
enum Decoder {
    Spdy(SpdyReader),
    WebSocket(WsReader),
    /// The client's SPDY tunnelled in WebSocket messages (`SPDY/3.1+portforward.k8s.io`):
    /// its frames go on bare, and its pings are answered with the writer.
    Tunnel(WsReader, Box<SpdyReader>, WsWriter),
    /// The API server's SPDY for a client that tunnels it: each frame goes on in a binary
    /// message of the writer's.
    Wrapped(SpdyReader, WsWriter),
}

impl Decoder {
    fn new(framing: Framing, purpose: &Purpose, from: Side) -> Result<Self, String> {
        let direction = match from {
            Side::Client => Direction::ClientToServer,
            Side::Server => Direction::ServerToClient,
        };
        let spdy = || SpdyReader::new(spdy::Limits::default());
        let to_client = || WsWriter::new(Direction::ServerToClient, ChannelProtocol::SpdyTunnel);
        Ok(match (framing, purpose) {
            (Framing::Spdy, _) => Self::Spdy(spdy()),
            (Framing::Tunnel, _) if from == Side::Client => Self::Tunnel(
                WsReader::new(direction, ChannelProtocol::SpdyTunnel),
                Box::new(spdy()),
                to_client(),
            ),
            (Framing::Tunnel, _) => Self::Wrapped(spdy(), to_client()),
            (Framing::WebSocket(ChannelProtocol::SpdyTunnel), _) => {
                return Err("the SPDY tunnel is ended at the gateway, never relayed".into())
            }
            (Framing::WebSocket(p), Purpose::Exec) => Self::WebSocket(WsReader::new(direction, p)),
            (Framing::WebSocket(p), Purpose::PortForward { ports }) => Self::WebSocket(
                WsReader::port_forward(direction, p, ports).map_err(|e| e.to_string())?,
            ),
        })
    }

    /// What `bytes` (the next read of this direction) complete: the steps to take, in order,
    /// and whether the sender closed its side (a tunnel's client closing its WebSocket).
    /// `observe` says what each SPDY frame means ([`Shared::observe`]).
    fn decode(&mut self, observe: Observe<'_>, bytes: &[u8]) -> Result<(Vec<Step>, bool), String> {
        let ws_events = |reader: &mut WsReader| {
            reader
                .push(bytes)
                .map_err(|e| format!("a WebSocket frame Vigil cannot read: {e}"))
        };
        let mut steps = Vec::new();
        match self {
            Self::Spdy(reader) => {
                reader.push(bytes);
                spdy_steps(reader, observe, |raw| raw.clone(), &mut steps)?;
            }
            Self::Wrapped(reader, to_client) => {
                reader.push(bytes);
                spdy_steps(reader, observe, |raw| to_client.message(raw), &mut steps)?;
            }
            Self::WebSocket(reader) => {
                let to_server = reader.direction() == Direction::ClientToServer;
                for ev in ws_events(reader)? {
                    let mut raw = forwarded(ev.raw, &ev.message);
                    // The server's reader takes each frame for a message: the client's
                    // fragmented message goes on as the one message Vigil read and recorded.
                    if to_server {
                        raw = websocket::one_frame(&raw)
                            .ok_or("a WebSocket message Vigil cannot pass on whole")?;
                    }
                    steps.push(Step::forward(
                        raw,
                        ws_meaning(&ev.message).into_iter().collect(),
                    ));
                }
            }
            Self::Tunnel(ws, inner, to_client) => {
                for ev in ws_events(ws)? {
                    match ev.message {
                        WsMessage::Tunnel { payload } => {
                            inner.push(&payload);
                            spdy_steps(inner, observe, |raw| raw.clone(), &mut steps)?;
                        }
                        WsMessage::Ping { payload } => steps.push(Step {
                            back: to_client.pong(&payload).map_err(|e| e.to_string())?,
                            ..Step::forward(Bytes::new(), Vec::new())
                        }),
                        WsMessage::Close { .. } => return Ok((steps, true)),
                        _ => {}
                    }
                }
            }
        }
        Ok((steps, false))
    }

    /// What ends this direction for its receiver: a tunnel's client gets a normal close.
    fn closing(&self) -> Option<Bytes> {
        match self {
            Self::Wrapped(_, to_client) => to_client.close(Some(1000), "").ok(),
            _ => None,
        }
    }
}

/// What a SPDY frame of one direction means for the records.
type Observe<'a> = &'a mut dyn FnMut(&FrameKind) -> Result<Vec<Meaning>, String>;

/// The steps of the whole SPDY frames `reader` holds: each frame's bytes as `out` makes them.
fn spdy_steps(
    reader: &mut SpdyReader,
    observe: Observe<'_>,
    out: impl Fn(&Bytes) -> Bytes,
    steps: &mut Vec<Step>,
) -> Result<(), String> {
    while let Some(frame) = next_frame(reader)? {
        let meanings = observe(frame.kind())?;
        steps.push(Step::forward(out(frame.raw()), meanings));
    }
    Ok(())
}

fn next_frame(reader: &mut SpdyReader) -> Result<Option<spdy::Frame>, String> {
    reader
        .next_frame()
        .map_err(|e| format!("a SPDY frame Vigil cannot read: {e}"))
}

/// The bytes of a WebSocket event to forward: a message a close cut short is not (its
/// receiver drops it too, and it was never decoded, so never recorded).
fn forwarded(raw: Bytes, message: &WsMessage) -> Bytes {
    match message {
        WsMessage::Partial { .. } => Bytes::new(),
        _ => raw,
    }
}

/// What a WebSocket message means for the records.
fn ws_meaning(message: &WsMessage) -> Option<Meaning> {
    Some(match message {
        WsMessage::Data { channel, payload } => {
            let stream = match *channel {
                websocket::STDIN => Recorded::Stdin,
                websocket::STDOUT => Recorded::Stdout,
                _ => Recorded::Stderr,
            };
            Meaning::Chunk(stream, payload.clone())
        }
        WsMessage::Resize { width, height } => Meaning::Chunk(
            Recorded::Resize,
            Bytes::from(format!("{{\"Width\":{width},\"Height\":{height}}}")),
        ),
        WsMessage::Error { payload, .. } => Meaning::Status(payload.clone()),
        WsMessage::PortData { port, payload, .. } => {
            Meaning::PortBytes(*port, payload.len() as u64)
        }
        WsMessage::PortError { port, payload, .. } => Meaning::PortError(*port, payload.clone()),
        _ => return None,
    })
}

/// Who sends on a stream, as a refusal names it.
fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "API server",
    }
}

impl Shared {
    /// Takes note of a SPDY frame `from` sent: what it means for these streams, or why it
    /// does not fit them.
    fn observe(&self, from: Side, frame: &FrameKind) -> Result<Vec<Meaning>, String> {
        let observed = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(from, frame)
            .map_err(|e| format!("a SPDY stream Vigil cannot follow: {e}"))?;
        let port_forward = matches!(self.streams.purpose, Purpose::PortForward { .. });
        let wrong = |t: StreamType| {
            Err(format!(
                "a SPDY {t} stream does not belong to {}",
                if port_forward {
                    "a port-forward"
                } else {
                    "an exec"
                }
            ))
        };
        let meaning = match observed {
            Observed::Opened(info) => match (port_forward, info.stream_type, info.port) {
                (true, StreamType::Data, Some(port)) => Meaning::PortOpened(port),
                (true, StreamType::Data, None) => {
                    return Err("a SPDY port-forward stream names no port".into())
                }
                (true, StreamType::Error, _) => return Ok(Vec::new()),
                (false, StreamType::Data, _) => return wrong(StreamType::Data),
                (false, _, _) => return Ok(Vec::new()),
                (true, t, _) => return wrong(t),
            },
            Observed::Data {
                stream_type, port, ..
            } => {
                let FrameKind::Data { payload, .. } = frame else {
                    return Ok(Vec::new());
                };
                // Whichever side opened a stream may send on it in SPDY: what is recorded as
                // the pod's output or the exit status comes only from the API server, what
                // is recorded as input only from the client (as the WebSocket channels are).
                let sender = match (port_forward, stream_type) {
                    (_, StreamType::Data) => None,
                    (false, StreamType::Stdin | StreamType::Resize) => Some(Side::Client),
                    (_, _) => Some(Side::Server),
                };
                if sender.is_some_and(|s| s != from) && !payload.is_empty() {
                    return Err(format!(
                        "the {} sent data on the SPDY {stream_type} stream, which carries \
                         data only from the {}",
                        side_name(from),
                        side_name(from.other())
                    ));
                }
                match (port_forward, stream_type, port) {
                    (false, StreamType::Stdin, _) => {
                        Meaning::Chunk(Recorded::Stdin, payload.clone())
                    }
                    (false, StreamType::Stdout, _) => {
                        Meaning::Chunk(Recorded::Stdout, payload.clone())
                    }
                    (false, StreamType::Stderr, _) => {
                        Meaning::Chunk(Recorded::Stderr, payload.clone())
                    }
                    (false, StreamType::Resize, _) => {
                        Meaning::Chunk(Recorded::Resize, payload.clone())
                    }
                    (false, StreamType::Error, _) => Meaning::Status(payload.clone()),
                    (true, StreamType::Data, Some(port)) => {
                        Meaning::PortBytes(port, payload.len() as u64)
                    }
                    (true, StreamType::Error, Some(port)) => {
                        Meaning::PortError(port, payload.clone())
                    }
                    (_, t, _) => return wrong(t),
                }
            }
            _ => return Ok(Vec::new()),
        };
        Ok(vec![meaning])
    }

    /// Puts what a step means on record; false when it cannot be recorded.
    async fn take(&self, from: Side, meaning: Meaning) -> bool {
        match meaning {
            Meaning::Chunk(stream, payload) => {
                return payload.is_empty() || self.record(stream, &payload).await
            }
            Meaning::Status(payload) => {
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                if status.len() < 64 * 1024 {
                    status.extend_from_slice(&payload);
                }
            }
            Meaning::PortOpened(p) => self.port(p, |s| s.connections += 1),
            Meaning::PortBytes(p, n) => self.port(p, |s| match from {
                Side::Client => s.bytes_in += n,
                Side::Server => s.bytes_out += n,
            }),
            Meaning::PortError(p, text) => self.port(p, |s| {
                if s.errors.len() < 1024 {
                    s.errors.push_str(&String::from_utf8_lossy(&text));
                }
            }),
        }
        true
    }

    fn port(&self, port: u16, change: impl FnOnce(&mut PortStats)) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        change(ports.entry(port).or_default());
    }

    /// Records an exec payload before it is forwarded; false when it cannot be recorded.
    async fn record(&self, stream: Recorded, payload: &[u8]) -> bool {
        let stmt = self.streams.stmt.n;
        let (at, channel, direction) = match stream {
            Recorded::Stdin => (0, stmt.to_string(), "input"),
            Recorded::Stdout => (1, stmt.to_string(), "output"),
            Recorded::Stderr => (2, stmt.to_string(), "error"),
            Recorded::Resize => (3, format!("{stmt}.resize"), "input"),
        };
        let s = &self.streams;
        let mut body = s.record(Kind::Recording);
        let copy = s.ctx.core.masker.chunk_copy(payload, &mut body.masked);
        let offset = self.offsets[at].fetch_add(copy.len() as u64, Ordering::Relaxed);
        let of = ChunkOf {
            channel,
            direction,
            offset,
        };
        s.ctx
            .core
            .audit
            .chunk(body, &s.file, of, copy, true)
            .await
            .is_ok()
    }
}

/// Why the gateway itself ended the streams: the record's error, and what the client is told
/// (an exec's error stream carries it as a `Failure` `Status` with `reason` and `code`).
struct Ending {
    why: &'static str,
    said: &'static str,
    reason: &'static str,
    code: u16,
}

/// Nothing crossed for `kubernetes.idle_timeout_secs`.
const IDLE: Ending = Ending {
    why: "the streams were idle for kubernetes.idle_timeout_secs",
    said: "vigil: the streams were idle for kubernetes.idle_timeout_secs",
    reason: "Timeout",
    code: 408,
};

/// The token the streams were opened with expired (`identity.session_expiry = "token"`).
const EXPIRED: Ending = Ending {
    why: super::TOKEN_ENDED,
    said: "vigil: the token expired; run the command again with a fresh token",
    reason: "Unauthorized",
    code: 401,
};

/// The node's drain deadline passed.
const DRAINED: Ending = Ending {
    why: SHUTTING_DOWN,
    said: SHUTTING_DOWN,
    reason: "ServiceUnavailable",
    code: 503,
};

/// Relays the two switched connections until both directions end (or the node drains, or the
/// streams are idle for `kubernetes.idle_timeout_secs`), then writes the `response` record.
pub async fn relay(streams: Streams, client: Upgraded, server: Upgraded) {
    let decoders = Decoder::new(streams.framing, &streams.purpose, Side::Client).and_then(|c| {
        Ok((
            c,
            Decoder::new(streams.framing, &streams.purpose, Side::Server)?,
        ))
    });
    let mut ports = BTreeMap::new();
    if let (Framing::WebSocket(_), Purpose::PortForward { ports: p }) =
        (streams.framing, &streams.purpose)
    {
        // Over channels, each port is one connection for the life of the WebSocket.
        for port in p {
            ports.insert(
                *port,
                PortStats {
                    connections: 1,
                    ..PortStats::default()
                },
            );
        }
    }
    let shared = Arc::new(Shared {
        streams,
        table: Mutex::new(StreamTable::default()),
        offsets: Default::default(),
        bytes: AtomicU64::new(0),
        status: Mutex::new(Vec::new()),
        ports: Mutex::new(ports),
        activity: Activity::default(),
    });
    let (up_decoder, down_decoder) = match decoders {
        Ok(d) => d,
        Err(why) => return finish(&shared, Some(why)),
    };
    let (client_rd, client_wr) = tokio::io::split(TokioIo::new(client));
    let to_client = Half::shared(client_wr);
    let (server_rd, server_wr) = tokio::io::split(TokioIo::new(server));
    // The client's side is written by both directions: what the server sends, and what the
    // gateway answers the client itself (a tunnel's pongs).
    let up = tokio::spawn(pump(
        shared.clone(),
        Side::Client,
        up_decoder,
        client_rd,
        Half::shared(server_wr),
        Some(to_client.clone()),
    ));
    let down = pump(
        shared.clone(),
        Side::Server,
        down_decoder,
        server_rd,
        to_client.clone(),
        None,
    );
    let abort = up.abort_handle();
    let idle = Duration::from_secs(shared.streams.ctx.config.idle_timeout_secs);
    // Streams last as long as their token does, like a PostgreSQL or SSH session: a request
    // is verified when it is made, an exec or attach can run for hours.
    let core = &shared.streams.ctx.core;
    let expires = shared
        .streams
        .base
        .principal
        .as_ref()
        .and_then(|p| core.verifier.session_deadline(p));
    let ending = tokio::select! {
        (down, up) = async { tokio::join!(down, up) } => {
            let error = [down, up.unwrap_or_else(|e| Err(e.to_string()))]
                .into_iter()
                .find_map(Result::err);
            return finish(&shared, error);
        }
        () = shared.streams.ctx.core.lifecycle.ended() => DRAINED,
        () = shared.activity.idle_for(idle) => IDLE,
        () = crate::core::lifecycle::until(expires) => EXPIRED,
    };
    abort.abort();
    // A client that stopped reading (the reason the streams went idle, perhaps) cannot keep
    // them: its connection is dropped if it does not take the last words in time.
    let _ = tokio::time::timeout(LAST_WORDS, tell_client(&shared, &to_client, &ending)).await;
    finish(&shared, Some(ending.why.to_string()));
}

/// How long the gateway waits for a client to take why its streams end, and the close.
const LAST_WORDS: Duration = Duration::from_secs(5);

/// The gateway ends the streams: the client is told why where the streams have a place for it
/// (an exec's error stream), then its connection is closed.
async fn tell_client(shared: &Shared, to_client: &Writer, ending: &Ending) {
    let mut w = to_client.lock().await;
    if let (false, Some(words)) = (w.torn, last_words(shared, ending)) {
        let _ = w.write(&words).await;
    }
    let _ = w.io.shutdown().await;
}

/// `ending` on an exec's error stream, in the streams' framing (a normal close follows over
/// WebSocket); nothing for a port-forward, whose error streams are the pod's ports'.
fn last_words(shared: &Shared, ending: &Ending) -> Option<Vec<u8>> {
    let s = &shared.streams;
    if s.purpose != Purpose::Exec {
        return None;
    }
    match s.framing {
        Framing::WebSocket(protocol) => WsWriter::new(Direction::ServerToClient, protocol)
            .ending(ending.said, ending.reason, ending.code)
            .ok()
            .map(|b| b.to_vec()),
        Framing::Spdy => {
            let table = shared.table.lock().unwrap_or_else(|e| e.into_inner());
            let error = table
                .open_streams()
                .find(|st| st.stream_type == StreamType::Error && st.replied && !st.server_fin)?;
            let status = websocket::failure_status(ending.said, ending.reason, ending.code);
            spdy::data(error.id, true, status.as_bytes()).ok()
        }
        Framing::Tunnel => None,
    }
}

/// One side's writing half, shared by the directions that write to it.
type Writer = Arc<tokio::sync::Mutex<Half>>;

/// A writing half that knows whether a write to it was cut off (its future dropped when the
/// gateway ended the streams): after part of a frame, the gateway's own message would be
/// garbage.
struct Half {
    io: tokio::io::WriteHalf<TokioIo<Upgraded>>,
    torn: bool,
}

impl Half {
    fn shared(io: tokio::io::WriteHalf<TokioIo<Upgraded>>) -> Writer {
        Arc::new(tokio::sync::Mutex::new(Self { io, torn: false }))
    }

    /// Writes all of `bytes`, flushed (TLS may hold the last of them otherwise).
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.torn = true;
        let written = crate::core::tls::send_all(&mut self.io, bytes).await;
        self.torn = false;
        written
    }
}

/// Relays what `from` sends: read, decoded, put on record, then written to `wr` (and the
/// gateway's own answers to `back`, the sender's side).
async fn pump(
    shared: Arc<Shared>,
    from: Side,
    mut decoder: Decoder,
    mut rd: impl tokio::io::AsyncRead + Unpin,
    wr: Writer,
    back: Option<Writer>,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let result = 'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            // How a client usually goes: kubectl exits without closing TLS, or resets. What
            // it sent whole was forwarded; a frame it left unfinished never is.
            Err(e) if gone(&e) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        shared.activity.touch();
        let (steps, closed) = match decoder.decode(&mut |f| shared.observe(from, f), &buf[..n]) {
            Ok(s) => s,
            Err(why) => break Err(why),
        };
        for step in steps {
            for meaning in step.meanings {
                if !shared.take(from, meaning).await {
                    break 'read Err("the gateway cannot record this stream".into());
                }
            }
            if let (Some(back), false) = (&back, step.back.is_empty()) {
                // A sender that cannot take the answer is gone: its reads end too.
                let _ = back.lock().await.write(&step.back).await;
            }
            if step.raw.is_empty() {
                continue;
            }
            shared
                .bytes
                .fetch_add(step.raw.len() as u64, Ordering::Relaxed);
            match wr.lock().await.write(&step.raw).await {
                Ok(()) => {}
                // The other end went first (kubectl ends a port-forward by leaving).
                Err(e) if gone(&e) => break 'read Ok(()),
                Err(e) => break 'read Err(e.to_string()),
            }
        }
        if closed {
            break Ok(());
        }
    };
    let mut wr = wr.lock().await;
    if let Some(close) = decoder.closing() {
        let _ = wr.write(&close).await;
    }
    let _ = wr.io.shutdown().await;
    result
}

/// Whether an I/O error is a peer going away rather than a failure of the stream.
fn gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// The `response` record: the bytes relayed and the outcome (an exec's exit status, a
/// port-forward's ports).
fn finish(shared: &Shared, error: Option<String>) {
    let s = &shared.streams;
    let mut rec = s.record(Kind::Response);
    rec.duration_us = Some(s.started.elapsed().as_micros() as u64);
    let failure = match s.purpose {
        Purpose::Exec => exec_outcome(shared, &mut rec, &error),
        Purpose::PortForward { .. } => {
            let ports = shared.ports.lock().unwrap_or_else(|e| e.into_inner());
            rec.detail = Some(s.ctx.core.scrub(&port_summary(&ports)));
            rec.outcome = Some(match error {
                None => Outcome::Success,
                Some(_) => Outcome::Error,
            });
            error.as_ref().map(|why| stream_error(s, why))
        }
    };
    rec.response = Some(RecordResponse::Kubernetes(KubeResponse {
        status: 101,
        bytes: shared.bytes.load(Ordering::Relaxed),
        error: failure,
        ..KubeResponse::default()
    }));
    crate::core::trace::from_record(&s.stmt.span, &rec);
    s.ctx.core.audit.record(rec);
}

fn stream_error(s: &Streams, why: &str) -> KubeError {
    KubeError {
        reason: "StreamError".into(),
        message: s.ctx.core.scrub(why),
    }
}

/// An exec's outcome from its error channel: the record's detail (`exit code N`) and
/// outcome, and the failure to name.
fn exec_outcome(shared: &Shared, rec: &mut Body, error: &Option<String>) -> Option<KubeError> {
    let s = &shared.streams;
    let bytes = shared
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let exit = exit_code(&status);
    rec.detail = exit.map(|c| format!("exit code {c}"));
    rec.outcome = Some(if error.is_none() && exit == Some(0) {
        Outcome::Success
    } else {
        Outcome::Error
    });
    match (error, exit) {
        (Some(why), _) => Some(stream_error(s, why)),
        (None, Some(0)) => None,
        // The channel protocol of v1 carries the error as text, not a `Status`.
        (None, _) if status.is_null() && !bytes.is_empty() => Some(KubeError {
            reason: String::new(),
            message: s.ctx.core.scrub(&String::from_utf8_lossy(&bytes)),
        }),
        // Nothing came on the error channel: the streams ended (the client opened none, or
        // left) before the command reported how it ended (outside review, 2026-12-07: this
        // was recorded as an error with an empty reason and message).
        (None, _) if bytes.is_empty() => Some(stream_error(
            s,
            "the streams ended before the command reported how it ended (no status on the error channel)",
        )),
        (None, _) => Some(KubeError {
            reason: status["reason"].as_str().unwrap_or_default().to_string(),
            message: s
                .ctx
                .core
                .scrub(status["message"].as_str().unwrap_or_default()),
        }),
    }
}

/// `port 8080: 2 connections, 120 bytes in, 3400 bytes out` for each port, in order.
fn port_summary(ports: &BTreeMap<u16, PortStats>) -> String {
    if ports.is_empty() {
        return "no port was forwarded".into();
    }
    ports
        .iter()
        .map(|(port, s)| {
            let mut line = format!(
                "port {port}: {} connection{}, {} bytes in, {} bytes out",
                s.connections,
                if s.connections == 1 { "" } else { "s" },
                s.bytes_in,
                s.bytes_out
            );
            if !s.errors.is_empty() {
                line.push_str(&format!(" (error: {})", s.errors.trim()));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The exit code a `Status` on the error stream reports: 0 for `Success`, the `ExitCode`
/// cause of a `NonZeroExitCode`; `None` when the stream said nothing readable.
fn exit_code(status: &serde_json::Value) -> Option<i64> {
    match status["status"].as_str()? {
        "Success" => Some(0),
        _ => status["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str()?.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_is_read_from_the_error_streams_status() {
        let ok = serde_json::json!({"status": "Success"});
        assert_eq!(exit_code(&ok), Some(0));
        let three = serde_json::json!({"status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}});
        assert_eq!(exit_code(&three), Some(3));
        assert_eq!(exit_code(&serde_json::Value::Null), None);
    }

    fn no_meaning(_: &FrameKind) -> Result<Vec<Meaning>, String> {
        Ok(Vec::new())
    }

    fn forward() -> Purpose {
        Purpose::PortForward { ports: Vec::new() }
    }

    fn to_client() -> WsWriter {
        WsWriter::new(Direction::ServerToClient, ChannelProtocol::SpdyTunnel)
    }

    #[test]
    fn a_tunnels_spdy_goes_on_bare_a_whole_frame_at_a_time_and_its_pings_are_answered() {
        let mut up = Decoder::new(Framing::Tunnel, &forward(), Side::Client).unwrap();
        let client = WsWriter::new(Direction::ClientToServer, ChannelProtocol::SpdyTunnel)
            .with_mask_key([1, 2, 3, 4]);
        let ping = spdy::ping(7);
        let data = spdy::data(1, false, b"hello").unwrap();
        // A SPDY frame split across two messages, a WebSocket ping between them.
        let bytes = [
            client.message(&ping[..5]),
            client.ping(b"are you there").unwrap(),
            client.message(&[&ping[5..], &data[..]].concat()),
        ]
        .concat();
        let (steps, closed) = up.decode(&mut no_meaning, &bytes).unwrap();
        assert!(!closed);
        let raw: Vec<&[u8]> = steps
            .iter()
            .filter(|s| !s.raw.is_empty())
            .map(|s| &s.raw[..])
            .collect();
        assert_eq!(raw, [&ping[..], &data[..]]);
        let back: Vec<&Bytes> = steps
            .iter()
            .filter(|s| !s.back.is_empty())
            .map(|s| &s.back)
            .collect();
        assert_eq!(back, [&to_client().pong(b"are you there").unwrap()]);
        // A close ends the direction; what came before it in the same read still goes on.
        let bytes = [client.message(&ping), client.close(Some(1000), "").unwrap()].concat();
        let (steps, closed) = up.decode(&mut no_meaning, &bytes).unwrap();
        assert!(closed);
        assert_eq!(steps.len(), 1);
        assert_eq!(&steps[0].raw[..], &ping[..]);
        assert_eq!(up.closing(), None);
        // Text is no part of the tunnel.
        let text = client.frame(true, websocket::Opcode::Text, b"x");
        assert!(up.decode(&mut no_meaning, &text).is_err());
    }

    /// An exec's stdin message the client sent in two fragments reaches the API server (and the
    /// kubelet, whose reader takes every frame for a message) as the one message recorded; the
    /// server's fragments reach the client as they came (its reader joins them).
    #[test]
    fn a_clients_fragmented_message_reaches_the_server_in_one_frame() {
        let exec = Framing::WebSocket(ChannelProtocol::V4);
        let mut up = Decoder::new(exec, &Purpose::Exec, Side::Client).unwrap();
        let key = [5, 6, 7, 8];
        let first = websocket::encode_frame(
            false,
            websocket::Opcode::Binary,
            &[websocket::STDIN, b'l', b's'],
            Some(key),
        );
        let rest = websocket::encode_frame(
            true,
            websocket::Opcode::Continuation,
            b"\x04 -la\n",
            Some(key),
        );
        let (steps, _) = up.decode(&mut no_meaning, &[first, rest].concat()).unwrap();
        assert_eq!(steps.len(), 1);
        let one = websocket::encode_frame(
            true,
            websocket::Opcode::Binary,
            b"\x00ls\x04 -la\n",
            Some(key),
        );
        assert_eq!(steps[0].raw, one);
        assert!(
            matches!(&steps[0].meanings[..], [Meaning::Chunk(Recorded::Stdin, b)] if &b[..] == b"ls\x04 -la\n"),
            "recorded as read"
        );
        let mut down = Decoder::new(exec, &Purpose::Exec, Side::Server).unwrap();
        let out = [
            websocket::encode_frame(false, websocket::Opcode::Binary, b"\x01o", None),
            websocket::encode_frame(true, websocket::Opcode::Continuation, b"ut", None),
        ]
        .concat();
        let (steps, _) = down.decode(&mut no_meaning, &out).unwrap();
        assert_eq!(steps[0].raw, out, "to the client as it came");
    }

    #[test]
    fn the_api_servers_spdy_reaches_a_tunnels_client_a_whole_frame_per_message() {
        let mut down = Decoder::new(Framing::Tunnel, &forward(), Side::Server).unwrap();
        let ping = spdy::ping(2);
        let data = spdy::data(2, true, b"world").unwrap();
        let all = [&ping[..], &data[..]].concat();
        let (steps, _) = down.decode(&mut no_meaning, &all[..3]).unwrap();
        assert!(steps.is_empty(), "nothing before a whole frame");
        let (steps, closed) = down.decode(&mut no_meaning, &all[3..]).unwrap();
        assert!(!closed);
        let sent: Vec<Bytes> = steps.iter().map(|s| s.raw.clone()).collect();
        assert_eq!(
            sent,
            [to_client().message(&ping), to_client().message(&data)]
        );
        assert_eq!(
            down.closing(),
            Some(to_client().close(Some(1000), "").unwrap())
        );
        // What the client reads out of those messages is the API server's bytes.
        let mut client = WsReader::new(Direction::ServerToClient, ChannelProtocol::SpdyTunnel);
        let mut got = Vec::new();
        for ev in client.push(&sent.concat()).unwrap() {
            let WsMessage::Tunnel { payload } = ev.message else {
                panic!("{:?}", ev.message)
            };
            got.extend_from_slice(&payload);
        }
        assert_eq!(got, all);
    }

    #[test]
    fn the_tunnel_is_never_relayed_as_it_is() {
        let relayed = Framing::WebSocket(ChannelProtocol::SpdyTunnel);
        assert!(Decoder::new(relayed, &forward(), Side::Client).is_err());
    }
}
