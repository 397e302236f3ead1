//! exec and attach over SPDY/3.1: once the API server has switched protocols, every frame is
//! read whole in each direction (see [`super::spdy`]), the payload of each stdin, stdout,
//! stderr and resize DATA frame is recorded (a `recording` record, its bytes in the session's
//! recording file) before the frame is forwarded, and the exec's outcome (the `Status` on its
//! error stream) goes into the `response` record when the streams end. A frame the codec
//! refuses ends the connection: nothing Vigil could not read crosses.

use super::spdy::{FrameKind, Limits, Observed, Side, SpdyReader, StreamTable, StreamType};
use super::KubeContext;
use crate::audit::{ChunkOf, RecordingFile};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil_proto::record::{
    Body, Kind, KubeError, KubeResponse, Outcome, Response as RecordResponse,
};

/// One upgraded exec or attach: where its records go.
pub struct Exec {
    pub ctx: Arc<KubeContext>,
    /// A record of the request's session (principal, connection), to copy.
    pub base: Body,
    pub stmt: u64,
    pub file: Arc<RecordingFile>,
    pub started: Instant,
}

impl Exec {
    /// A record of this exec: its session, principal, connection and statement number.
    fn record(&self, kind: Kind) -> Body {
        let mut body = self.ctx.core.audit.body(self.base.session.as_deref(), kind);
        body.principal = self.base.principal.clone();
        body.connection = self.base.connection.clone();
        body.stmt = Some(self.stmt);
        body
    }
}

/// What both directions share.
struct Shared {
    exec: Exec,
    table: Mutex<StreamTable>,
    /// Bytes recorded so far per direction (input, output, error, resize).
    offsets: [AtomicU64; 4],
    bytes: AtomicU64,
    /// The exec's outcome, as the error stream said it.
    status: Mutex<Vec<u8>>,
}

/// Relays the two upgraded connections until both directions end, then writes the
/// `response` record.
pub async fn relay(exec: Exec, client: Upgraded, server: Upgraded) {
    let shared = Arc::new(Shared {
        exec,
        table: Mutex::new(StreamTable::default()),
        offsets: Default::default(),
        bytes: AtomicU64::new(0),
        status: Mutex::new(Vec::new()),
    });
    let (client_rd, client_wr) = tokio::io::split(TokioIo::new(client));
    let (server_rd, server_wr) = tokio::io::split(TokioIo::new(server));
    let up = tokio::spawn(pump(shared.clone(), Side::Client, client_rd, server_wr));
    let down = pump(shared.clone(), Side::Server, server_rd, client_wr);
    let (down, up) = tokio::join!(down, up);
    let error = [down, up.unwrap_or_else(|e| Err(e.to_string()))]
        .into_iter()
        .find_map(Result::err);
    finish(&shared, error);
}

async fn pump(
    shared: Arc<Shared>,
    from: Side,
    mut rd: impl tokio::io::AsyncRead + Unpin,
    mut wr: impl tokio::io::AsyncWrite + Unpin,
) -> Result<(), String> {
    let mut reader = SpdyReader::new(Limits::default());
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e.to_string()),
        };
        reader.push(&buf[..n]);
        let mut failed = None;
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("a SPDY frame Vigil cannot read: {e}"));
                    break;
                }
            };
            let observed = shared
                .table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(from, frame.kind());
            match observed {
                Ok(Observed::Data { stream_type, .. }) => {
                    if let FrameKind::Data { payload, .. } = frame.kind() {
                        if !payload.is_empty() && !record(&shared, stream_type, payload).await {
                            failed = Some("the gateway cannot record this stream".into());
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failed = Some(format!("a SPDY stream Vigil cannot follow: {e}"));
                    break;
                }
            }
            shared
                .bytes
                .fetch_add(frame.raw().len() as u64, Ordering::Relaxed);
            if let Err(e) = wr.write_all(frame.raw()).await {
                failed = Some(e.to_string());
                break;
            }
        }
        if let Some(why) = failed {
            break Err(why);
        }
    };
    let _ = wr.shutdown().await;
    result
}

/// Records a DATA payload before it is forwarded; false when it cannot be recorded.
async fn record(shared: &Shared, stream: StreamType, payload: &[u8]) -> bool {
    let (at, channel, direction) = match stream {
        StreamType::Stdin => (0, shared.exec.stmt.to_string(), "input"),
        StreamType::Stdout => (1, shared.exec.stmt.to_string(), "output"),
        StreamType::Stderr => (2, shared.exec.stmt.to_string(), "error"),
        StreamType::Resize => (3, format!("{}.resize", shared.exec.stmt), "input"),
        StreamType::Error => {
            let mut status = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            if status.len() < 64 * 1024 {
                status.extend_from_slice(payload);
            }
            return true;
        }
        // Port-forward streams do not reach this relay.
        StreamType::Data => return false,
    };
    let e = &shared.exec;
    let mut body = e.record(Kind::Recording);
    let copy = e.ctx.core.masker.chunk_copy(payload, &mut body.masked);
    let offset = shared.offsets[at].fetch_add(copy.len() as u64, Ordering::Relaxed);
    let of = ChunkOf {
        channel,
        direction,
        offset,
    };
    e.ctx
        .core
        .audit
        .chunk(body, &e.file, of, copy, true)
        .await
        .is_ok()
}

/// The `response` record: the bytes relayed and the exec's outcome.
fn finish(shared: &Shared, error: Option<String>) {
    let e = &shared.exec;
    let status: serde_json::Value = {
        let bytes = shared.status.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::from_slice(&bytes).unwrap_or_default()
    };
    let exit = exit_code(&status);
    let mut rec = e.record(Kind::Response);
    rec.duration_us = Some(e.started.elapsed().as_micros() as u64);
    rec.detail = exit.map(|c| format!("exit code {c}"));
    rec.outcome = Some(if error.is_none() && exit == Some(0) {
        Outcome::Success
    } else {
        Outcome::Error
    });
    let failure = match (&error, exit) {
        (Some(why), _) => Some(KubeError {
            reason: "StreamError".into(),
            message: e.ctx.core.scrub(why),
        }),
        (None, Some(0)) => None,
        (None, _) => Some(KubeError {
            reason: status["reason"].as_str().unwrap_or_default().to_string(),
            message: e
                .ctx
                .core
                .scrub(status["message"].as_str().unwrap_or_default()),
        }),
    };
    rec.response = Some(RecordResponse::Kubernetes(KubeResponse {
        status: 101,
        bytes: shared.bytes.load(Ordering::Relaxed),
        error: failure,
        body: None,
    }));
    e.ctx.core.audit.record(rec);
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
}
