//! The approvers' inbox: the pending requests the coordinator shows this person (its own
//! visibility rules, asked with the person's token), live, and their decisions.
//!
//! The coordinator watches one request at a time (`WatchApproval`) and has no watch of the
//! list, so the event stream polls `ListApprovals` every [`POLL`] and sends the list whenever it
//! changed. A decision is the coordinator's `DecideApproval` as this person: who may decide is
//! the coordinator's to enforce, never the page's.

use super::auth::{refuse, LoginSession, Visit};
use super::Console;
use crate::audit::display;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use vigil_proto::coordinator as pb;

/// How often the inbox asks the coordinator for the list.
const POLL: Duration = Duration::from_millis(500);
/// At most this many requests in the inbox (the newest).
const MAX_SHOWN: u32 = 200;
/// Longest comment sent with a decision.
const MAX_COMMENT: usize = 2000;

/// What the page shows of a request, with what its `approval_requested` record says of the
/// requester (client, model and version, declared intent: the coordinator's request carries
/// the subject and groups only), once the index holds it. Values go into the page as text,
/// never as markup, and every text the gateway did not write itself is escaped as the CLI
/// escapes it ([`display`]): a bidirectional override or isolate, a zero-width character or a
/// control shows as `\u{…}`, so what the approver reads is what runs (`uptime \u{2067}; rm …
/// #\u{2069}` cannot be made to look like `uptime # rm …`). Line breaks stay, each following
/// line marked as a continuation.
fn view(a: &pb::Approval, requester: Option<&vigil_proto::record::Principal>) -> Value {
    let t = |s: &str| display::escape_lines(s, "").into_owned();
    let scope = a.key.as_ref().and_then(|k| k.scope.as_ref());
    let shown = match a.shown.as_ref().and_then(|s| s.protocol.as_ref()) {
        Some(pb::shown_action::Protocol::Postgres(b)) => json!({
            "database": t(&b.database),
            "role": t(&b.role),
            "search_path": t(&b.search_path),
            "mode": b.mode,
            "params": b.params.iter().map(|p| if p.null { Value::Null } else { json!(t(&p.value)) }).collect::<Vec<_>>(),
        }),
        Some(pb::shown_action::Protocol::Ssh(s)) => json!({
            "login": t(&s.login),
            "request_type": s.request_type,
        }),
        Some(pb::shown_action::Protocol::Kubernetes(k)) => json!({
            "method": k.method,
            "path": t(&k.path),
            "body_sha256": k.body_sha256,
        }),
        None => Value::Null,
    };
    json!({
        "id": a.id,
        "requester": a.requester.as_ref().map(|r| json!({
            "subject": t(&r.subject),
            "groups": r.groups.iter().map(|g| t(g)).collect::<Vec<_>>(),
        })),
        "requested_by": requester.map(|p| json!({
            "client_id": p.client_id.as_deref().map(t),
            "model": p.model.as_deref().map(t),
            "model_version": p.model_version.as_deref().map(t),
            "intent": p.intent.as_deref().map(t),
        })),
        "protocol": scope.map(|s| s.protocol.as_str()),
        "target": scope.map(|s| t(&s.target)),
        "action": t(&a.action),
        "shown": shown,
        "rule": t(&a.rule),
        "reason": t(&a.reason),
        "created_at_ms": a.created_at_ms,
        "expires_at_ms": a.expires_at_ms,
        "approver_group": t(&a.approver_group),
        "approvals_required": a.approvals_required,
        "votes": a.votes.iter().map(|v| json!({
            "approver": t(&v.approver), "approve": v.approve, "comment": t(&v.comment), "at_ms": v.at_ms,
        })).collect::<Vec<_>>(),
        "state": a.state,
        "node": a.node,
    })
}

async fn pending(console: &Console, person: &LoginSession) -> Result<Value, tonic::Status> {
    let list = person
        .coordinator
        .list_approvals(pb::ListApprovalsRequest {
            state: "pending".into(),
            limit: MAX_SHOWN,
            page_token: String::new(),
        })
        .await?;
    let index = console.index.clone();
    let ids: Vec<String> = list.approvals.iter().map(|a| a.id.clone()).collect();
    let requesters = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| index.requester(id).ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Ok(Value::Array(
        list.approvals
            .iter()
            .enumerate()
            .map(|(i, a)| view(a, requesters.get(i).and_then(Option::as_ref)))
            .collect(),
    ))
}

/// `GET /api/approvals/events`: server-sent events. `approvals` carries the whole pending list
/// (a JSON array) whenever it changed; `problem` a message while the coordinator cannot
/// answer. The stream ends with the login.
pub async fn events(State(console): State<Arc<Console>>, visit: Visit) -> Response {
    let person = match console.person(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    let state = (console, person, None::<String>, true);
    let stream =
        futures_util::stream::unfold(state, |(console, person, mut last, first)| async move {
            if !first {
                tokio::time::sleep(POLL).await;
            }
            loop {
                // The login ended: so does the stream (the page then finds itself logged out).
                if person.expires <= SystemTime::now() {
                    return None;
                }
                let event = match pending(&console, &person).await {
                    Ok(list) => {
                        let text = list.to_string();
                        (last.as_deref() != Some(text.as_str())).then(|| {
                            let event = Event::default().event("approvals").data(&text);
                            last = Some(text);
                            event
                        })
                    }
                    Err(s) => {
                        last = None;
                        let why = format!("the coordinator cannot answer: {}", s.message());
                        Some(Event::default().event("problem").data(why))
                    }
                };
                if let Some(event) = event {
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (console, person, last, false),
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    approve: bool,
    #[serde(default)]
    comment: String,
}

/// `POST /api/approvals/{id}/decision` `{"approve": true, "comment": "…"}` (JSON, with the
/// CSRF token): the person's vote, as the coordinator records and counts it.
pub async fn decide(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    visit: Visit,
    body: Bytes,
) -> Response {
    let hint = "send {\"approve\": true|false, \"comment\": \"…\"}";
    let (person, decision): (_, Decision) = match console.change(&visit, &body, hint).await {
        Ok(found) => found,
        Err(res) => return res,
    };
    if decision.comment.len() > MAX_COMMENT {
        return refuse(StatusCode::BAD_REQUEST, "the comment is too long");
    }
    let decided = person
        .coordinator
        .decide_approval(pb::DecideApprovalRequest {
            id,
            approve: decision.approve,
            comment: decision.comment,
        })
        .await;
    match decided {
        Ok(a) => (
            [(header::CONTENT_TYPE, "application/json")],
            view(&a, None).to_string(),
        )
            .into_response(),
        Err(s) => super::coordinator_refusal(&s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bidirectional isolates would make the page show `uptime # rm -rf /srv/data ;`, the `rm`
    /// seemingly commented out; escaped, the page shows the characters themselves.
    #[test]
    fn what_the_approver_reads_is_what_runs() {
        let a = pb::Approval {
            action: "uptime \u{2067}; rm -rf /srv/data #\u{2069}".into(),
            reason: "needs\u{200b} a look\x1b[2J".into(),
            ..Default::default()
        };
        let v = view(&a, None);
        assert_eq!(v["action"], "uptime \\u{2067}; rm -rf /srv/data #\\u{2069}");
        assert_eq!(v["reason"], "needs\\u{200b} a look\\x1b[2J");
        // A statement of several lines keeps them.
        let a = pb::Approval {
            action: "UPDATE t\nSET v = 1".into(),
            ..Default::default()
        };
        assert_eq!(
            view(&a, None)["action"],
            format!("UPDATE t\n{}SET v = 1", display::CONTINUATION)
        );
    }
}
