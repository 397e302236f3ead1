//! The auditors' half: the session list and its search (from the [`index`]), a session's
//! records, its verification badge, its download. Only people of `console.auditor_group`
//! reach any of it, and every look at a session's content is put on record (a `request` of
//! protocol `console` in the person's own console session) before the content is sent: if it
//! cannot be recorded, it is not shown.

use super::auth::{refuse, LoginSession};
use super::index::{Index, Query, Summary};
use super::Console;
use axum::extract::{Path, Query as Params, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vigil_proto::checkpoint::Checkpoint;
use vigil_proto::coordinator as pb;
use vigil_proto::verify::Trust;

/// How often the index looks for new lines in the log.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Keeps the index up with the log until the node stops.
pub async fn follow(index: Arc<Index>, core: Arc<crate::core::Core>) {
    let ended = core.lifecycle.ended();
    tokio::pin!(ended);
    loop {
        let index = index.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || index.catch_up()).await {
            Ok(Ok(taken)) if taken.records > 0 => tracing::debug!(
                records = taken.records,
                took_ms = started.elapsed().as_millis() as u64,
                "console index caught up"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the console's session index cannot follow the log")
            }
            Err(e) => tracing::error!(error = %e, "the console's index task failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            () = &mut ended => return,
        }
    }
}

impl Console {
    /// The person, if they are an auditor.
    async fn auditor(&self, headers: &HeaderMap) -> Result<Arc<LoginSession>, Response> {
        let Some(person) = self.person(headers).await else {
            return Err(refuse(StatusCode::UNAUTHORIZED, "log in first"));
        };
        let group = self.config.auditor_group.as_ref();
        if !group.is_some_and(|g| person.principal.groups.contains(g)) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "recorded sessions are for the auditor group",
            ));
        }
        Ok(person)
    }

    /// Runs `f` on the index on a blocking thread.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, super::index::IndexError> + Send + 'static,
    ) -> Result<T, Response> {
        let index = self.index.clone();
        match tokio::task::spawn_blocking(move || f(&index)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "console index");
                Err(refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
            }
            Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())),
        }
    }

    /// The session `id` (summary and records), once this look at it is on record.
    async fn looked_at(
        &self,
        headers: &HeaderMap,
        id: String,
        action: &str,
    ) -> Result<(Summary, Vec<Vec<u8>>), Response> {
        let person = self.auditor(headers).await?;
        let found = self.with_index(move |i| i.session(&id)).await?;
        let Some((summary, records)) = found else {
            return Err(refuse(StatusCode::NOT_FOUND, "no such session"));
        };
        self.record_look(&person, action, &summary.session).await?;
        Ok((summary, records))
    }
}

fn json_response(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `GET /api/sessions?…`: the sessions that match, newest first ([`Query`]'s fields).
pub async fn list(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    params: Result<Params<Query>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = console.auditor(&headers).await {
        return r;
    }
    let q = match params {
        Ok(Params(q)) => q,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let started = Instant::now();
    match console.with_index(move |i| i.search(&q)).await {
        Ok(found) => json_response(json!({
            "sessions": found,
            "took_ms": started.elapsed().as_secs_f64() * 1000.0,
        })),
        Err(r) => r,
    }
}

/// `GET /api/sessions/{id}`: the session's summary and records (on record first).
pub async fn show(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match console.looked_at(&headers, id, "view_session").await {
        Ok((summary, records)) => {
            let records: Vec<Value> = records
                .iter()
                .filter_map(|r| serde_json::from_slice(r).ok())
                .collect();
            json_response(json!({ "session": summary, "records": records }))
        }
        Err(r) => r,
    }
}

/// `GET /api/sessions/{id}/records.jsonl`: the records as written, one per line (on record
/// first).
pub async fn download(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match console.looked_at(&headers, id, "download_records").await {
        Ok((summary, records)) => {
            let mut body = Vec::new();
            for r in records {
                body.extend_from_slice(&r);
                body.push(b'\n');
            }
            let disposition = format!(
                "attachment; filename=\"vigil-session-{}.jsonl\"",
                summary
                    .session
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect::<String>()
            );
            (
                [
                    (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
                    (header::CONTENT_DISPOSITION, disposition),
                ],
                body,
            )
                .into_response()
        }
        Err(r) => r,
    }
}

/// `GET /api/sessions/{id}/verification`: the badge. The session's stream is verified from
/// the log itself (never from the index's copy), from its first record through the session's
/// last, and anchored by the witness's checkpoint of that stream when one covers it.
pub async fn verification(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let person = match console.auditor(&headers).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let found = console
        .with_index(move |i| i.session(&id).map(|s| s.map(|(s, _)| s)))
        .await;
    let summary = match found {
        Ok(Some(s)) => s,
        Ok(None) => return refuse(StatusCode::NOT_FOUND, "no such session"),
        Err(r) => return r,
    };
    // The witness first: what it vouches for was written before the log is read.
    let witness = match person
        .coordinator
        .list_checkpoints(pb::ListCheckpointsRequest {})
        .await
    {
        Ok(list) => Some(
            list.checkpoints
                .into_iter()
                .map(Checkpoint::from)
                .filter(|c| c.stream == summary.stream)
                .collect::<Vec<_>>(),
        ),
        Err(e) => {
            tracing::warn!(error = %e.message(), "console: the witness cannot be asked");
            None
        }
    };
    let log_dir = console.index.log_dir().to_path_buf();
    let badge = tokio::task::spawn_blocking(move || badge(&log_dir, &summary, witness)).await;
    match badge {
        Ok(b) => json_response(b),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The badge of `s`: `verified` (every record of its stream up to its last one is present,
/// in order and unaltered; `anchored_seq` says which witnessed checkpoint covers it, if one
/// does yet), `broken` (the first failure at or before its last record, located), or
/// `missing` (its stream's file is not in the log).
fn badge(log_dir: &std::path::Path, s: &Summary, witness: Option<Vec<Checkpoint>>) -> Value {
    let file = crate::audit::log_files(log_dir)
        .unwrap_or_default()
        .into_iter()
        .find(|f| crate::audit::stream_of(f).as_deref() == Some(s.stream.as_str()));
    let Some(file) = file else {
        return json!({
            "state": "missing",
            "stream": s.stream,
            "detail": "the stream's file is not in this node's log (removed by retention, or moved)",
        });
    };
    let mut verifier = match crate::audit::read::verify_path(&file) {
        Ok((v, _)) => v,
        Err(e) => return json!({ "state": "missing", "stream": s.stream, "detail": e.to_string() }),
    };
    verifier.check_checkpoints(&Trust {
        witness: witness.as_deref(),
        pinned: None,
        allow_missing_streams: true,
    });
    let report = verifier.report();
    let failure = report
        .failures
        .iter()
        .find(|f| f.stream == s.stream && f.seq.is_none_or(|seq| seq <= s.last_seq));
    let stream = report.streams.get(&s.stream).cloned().unwrap_or_default();
    let checkpoint = witness
        .as_ref()
        .and_then(|w| w.iter().find(|c| Some(c.seq) == stream.anchored_seq))
        .map(|c| json!({ "seq": c.seq, "time_ms": c.time_ms, "hash": c.hash }));
    match failure {
        Some(f) => json!({
            "state": "broken",
            "stream": s.stream,
            "failure": {
                "location": f.location.rsplit('/').next().unwrap_or(&f.location),
                "seq": f.seq,
                "problem": f.problem.to_string(),
            },
        }),
        None => json!({
            "state": "verified",
            "stream": s.stream,
            "through_seq": s.last_seq,
            "anchored": stream.anchored_seq.is_some_and(|a| a >= s.last_seq),
            "anchored_seq": stream.anchored_seq,
            "checkpoint": checkpoint,
            "witness": witness.is_some(),
        }),
    }
}
