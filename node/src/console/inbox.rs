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
use axum::http::StatusCode;
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
/// the subject and groups only), once the index holds it: the facts `vigil approvals show`
/// prints, for PostgreSQL every prepared statement the text runs by name and every parameter
/// with its format and declared type in the CLI's words ([`display::param_format`]). Raw
/// here: every answer escapes its texts once, on the way out ([`super::escaped`]).
fn view(a: &pb::Approval, requester: Option<&vigil_proto::record::Principal>) -> Value {
    let scope = a.key.as_ref().and_then(|k| k.scope.as_ref());
    let shown = match a.shown.as_ref().and_then(|s| s.protocol.as_ref()) {
        Some(pb::shown_action::Protocol::Postgres(b)) => json!({
            "mode": b.mode,
            "runs": b.runs.iter().map(|r| json!({ "name": r.name, "text": r.text })).collect::<Vec<_>>(),
            "params": b.params.iter().map(|p| json!({
                "value": (!p.null).then_some(&p.value),
                "format": display::param_format(p.binary, p.type_oid),
            })).collect::<Vec<_>>(),
            "database": b.database,
            "role": b.role,
            "search_path": b.search_path,
            "settings": b.settings,
        }),
        Some(pb::shown_action::Protocol::Ssh(s)) => json!({
            "login": s.login,
            "request_type": s.request_type,
        }),
        Some(pb::shown_action::Protocol::Kubernetes(k)) => json!({
            "method": k.method,
            "path": k.path,
            "body": k.body,
            "body_sha256": k.body_sha256,
        }),
        None => Value::Null,
    };
    json!({
        "id": a.id,
        "requester": a.requester.as_ref().map(|r| json!({
            "subject": r.subject,
            "groups": r.groups,
        })),
        "requested_by": requester.map(|p| json!({
            "client_id": p.client_id,
            "model": p.model,
            "model_version": p.model_version,
            "intent": p.intent,
        })),
        "protocol": scope.map(|s| s.protocol.as_str()),
        "target": scope.map(|s| s.target.as_str()),
        "action": a.action,
        "shown": shown,
        "summarized": a.summarized,
        "rule": a.rule,
        "reason": a.reason,
        "created_at_ms": a.created_at_ms,
        "expires_at_ms": a.expires_at_ms,
        "approver_group": a.approver_group,
        "approvals_required": a.approvals_required,
        "votes": a.votes.iter().map(|v| json!({
            "approver": v.approver, "approve": v.approve, "comment": v.comment, "at_ms": v.at_ms,
        })).collect::<Vec<_>>(),
        "state": a.state,
        "node": a.node,
    })
}

/// The requester of each of `approvals` as the index knows it.
async fn requesters(
    console: &Console,
    approvals: &[pb::Approval],
) -> Vec<Option<vigil_proto::record::Principal>> {
    let index = console.index.clone();
    let ids: Vec<String> = approvals.iter().map(|a| a.id.clone()).collect();
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| index.requester(id).ok().flatten())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default()
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
    let requesters = requesters(console, &list.approvals).await;
    let requests: Vec<Value> = list
        .approvals
        .iter()
        .enumerate()
        .map(|(i, a)| view(a, requesters.get(i).and_then(Option::as_ref)))
        .collect();
    Ok(super::escaped(json!({
        "requests": requests,
        "more": !list.next_page_token.is_empty(),
    })))
}

/// `GET /api/approvals/{id}`: one request whole, as the coordinator shows it to this person
/// (the list carries a large one summarised: the page asks for it whole before a decision).
pub async fn show(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    visit: Visit,
) -> Response {
    let person = match console.person(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    match person.coordinator.get_approval(pb::ApprovalId { id }).await {
        Ok(a) => {
            let requester = requesters(&console, std::slice::from_ref(&a)).await;
            super::page_json(view(&a, requester.first().and_then(Option::as_ref)))
        }
        Err(s) => super::coordinator_refusal(&s),
    }
}

/// `GET /api/approvals/events`: server-sent events. `approvals` carries the pending list
/// (`{"requests": [...], "more": bool}`, `more` when requests older than the page also wait)
/// whenever it changed; `problem` a message while the coordinator cannot answer. The stream
/// ends with the login: at its expiry, or within a poll of a logout on any node.
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
                // The login ended, with its token or by a logout on any node: so does the
                // stream (the page then finds itself logged out). A coordinator that cannot
                // say is the `problem` below: it cannot list anything either.
                if person.expires <= SystemTime::now() {
                    return None;
                }
                let state = person
                    .coordinator
                    .get_login_state(pb::LoginStateRequest {})
                    .await;
                let listed = match state {
                    Ok(state) if state.ended => return None,
                    Ok(_) => pending(&console, &person).await,
                    // Whether the login still holds is unknown: nothing is listed.
                    Err(s) => Err(s),
                };
                let event = match listed {
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
        Ok(a) => super::page_json(view(&a, None)),
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
        let v = super::super::escaped(view(&a, None));
        assert_eq!(v["action"], "uptime \\u{2067}; rm -rf /srv/data #\\u{2069}");
        assert_eq!(v["reason"], "needs\\u{200b} a look\\x1b[2J");
        // A statement of several lines keeps them.
        let a = pb::Approval {
            action: "UPDATE t\nSET v = 1".into(),
            ..Default::default()
        };
        assert_eq!(
            super::super::escaped(view(&a, None))["action"],
            format!("UPDATE t\n{}SET v = 1", display::CONTINUATION)
        );
    }

    /// An `EXECUTE s1` is shown with what `s1` holds, and each parameter with its format and
    /// declared type: a binary `int8` whose bytes read `00000100` is not the text 00000100.
    #[test]
    fn the_inbox_shows_what_runs_by_name_and_how_each_parameter_reads() {
        let a = pb::Approval {
            action: "EXECUTE s1".into(),
            shown: Some(pb::ShownAction {
                protocol: Some(pb::shown_action::Protocol::Postgres(pb::StatementBinding {
                    mode: "simple".into(),
                    text: "EXECUTE s1".into(),
                    runs: vec![pb::PreparedStatement {
                        name: "s1".into(),
                        text: "DELETE FROM accounts\u{202e}".into(),
                    }],
                    params: vec![
                        pb::Parameter {
                            value: "00000100".into(),
                            binary: true,
                            type_oid: 20,
                            ..Default::default()
                        },
                        pb::Parameter {
                            null: true,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        let v = super::super::escaped(view(&a, None));
        let shown = &v["shown"];
        assert_eq!(shown["runs"][0]["name"], "s1");
        assert_eq!(shown["runs"][0]["text"], "DELETE FROM accounts\\u{202e}");
        assert_eq!(shown["params"][0]["value"], "00000100");
        assert_eq!(
            shown["params"][0]["format"],
            "binary bytes, declared type int8 (oid 20)"
        );
        assert_eq!(shown["params"][1]["value"], Value::Null);
        assert_eq!(v["summarized"], false);
    }
}
