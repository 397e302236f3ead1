//! The grants page: time-windowed grants ("this principal may use this access class on this
//! target"), listed, created and revoked as the person. Who may do what is the coordinator's
//! to enforce (`coordinator.admin_group` creates and revokes; anyone sees their own grants);
//! the console shows the page to `console.admin_group` and adds nothing of its own.

use super::auth::{refuse, Visit};
use super::Console;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use vigil_proto::coordinator as pb;

/// Longest reason sent with a grant.
const MAX_REASON: usize = 2000;
/// Longest window a grant may be made for: a week, as the coordinator allows.
const MAX_MINUTES: u64 = vigil_coordinator::service::MAX_GRANT_MINUTES;

/// What the page shows of a grant (escaped on the way out, [`super::page_json`]).
fn view(g: &pb::Grant) -> Value {
    let scope = g.scope.as_ref();
    json!({
        "id": g.id,
        "subject": g.subject,
        "issuer": g.issuer,
        "protocol": scope.map(|s| s.protocol.as_str()),
        "target": scope.map(|s| s.target.as_str()),
        "access_class": g.access_class,
        "not_before_ms": g.not_before_ms,
        "not_after_ms": g.not_after_ms,
        "granted_by": g.granted_by,
        "revoked_at_ms": g.revoked_at_ms,
        "reason": g.reason,
    })
}

/// `GET /api/grants`: the grants the coordinator shows this person.
pub async fn list(State(console): State<Arc<Console>>, visit: Visit) -> Response {
    let person = match console.person(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    match person
        .coordinator
        .list_grants(pb::ListGrantsRequest {})
        .await
    {
        Ok(list) => super::page_json(Value::Array(list.grants.iter().map(view).collect())),
        Err(s) => super::coordinator_refusal(&s),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    subject: String,
    issuer: String,
    protocol: String,
    target: String,
    access_class: String,
    minutes: u64,
    #[serde(default)]
    reason: String,
}

/// `POST /api/grants` (JSON, with the CSRF token): a grant from now for `minutes`.
pub async fn create(State(console): State<Arc<Console>>, visit: Visit, body: Bytes) -> Response {
    let hint = "send {\"subject\", \"issuer\", \"protocol\", \"target\", \"access_class\", \"minutes\", \"reason\"}";
    let (person, new): (_, NewGrant) = match console.change(&visit, &body, hint).await {
        Ok(found) => found,
        Err(res) => return res,
    };
    if new.reason.len() > MAX_REASON {
        return refuse(StatusCode::BAD_REQUEST, "the reason is too long");
    }
    if !(1..=MAX_MINUTES).contains(&new.minutes) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a grant lasts from 1 minute to a week",
        );
    }
    let created = person
        .coordinator
        .create_grant(pb::CreateGrantRequest {
            subject: new.subject,
            issuer: new.issuer,
            scope: Some(pb::Scope {
                protocol: new.protocol,
                target: new.target,
            }),
            access_class: new.access_class,
            duration_ms: new.minutes * 60_000,
            reason: new.reason,
            ..Default::default()
        })
        .await;
    match created {
        Ok(g) => super::page_json(view(&g)),
        Err(s) => super::coordinator_refusal(&s),
    }
}

/// `POST /api/grants/{id}/revoke` (with the CSRF token).
pub async fn revoke(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    visit: Visit,
) -> Response {
    let person = match console.person_for_change(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    match person.coordinator.revoke_grant(pb::GrantId { id }).await {
        Ok(g) => super::page_json(view(&g)),
        Err(s) => super::coordinator_refusal(&s),
    }
}
