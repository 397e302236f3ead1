//! Why the gateway refused an action, in no protocol's terms. Each protocol says it in its own
//! (PostgreSQL: a SQLSTATE and a message; SSH: a channel failure or exit status; Kubernetes: an
//! HTTP 403 `Status`), and records the refusal with [`Refusal::outcome`].

use vigil_proto::record::Outcome;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A policy rule forbids the action.
    Blocked { rule: String, reason: String },
    /// The rule asks for approval but has no approval settings.
    NoApprovalSettings { rule: String },
    /// The action needs approval but cannot be held: what it is bound to could not be
    /// established, or it cannot be shown to the approver faithfully.
    Unbound { rule: String, why: String },
    /// Held: approval request `request` is pending with `approvers`.
    Pending {
        rule: String,
        request: String,
        approvers: String,
    },
    /// The approvers denied it; `by` names each with their comment.
    Denied { request: String, by: String },
    /// The request ended without a usable approval (`state`: expired, consumed …).
    Ended { request: String, state: String },
    /// The approval was used by another run of the same action first.
    UsedElsewhere { request: String },
    /// The coordinator could not be reached, or did not answer in time.
    CoordinatorUnavailable { why: String },
    /// Not held: its client went, or its session ended, before the coordinator was asked.
    NotHeld { why: &'static str },
    /// The action's audit record could not be written; `spool_full`: the broker is behind.
    AuditUnwritable { spool_full: bool, why: String },
}

impl Refusal {
    /// How the refused action ended, for its record and metrics.
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::Blocked { .. }
            | Refusal::NoApprovalSettings { .. }
            | Refusal::Unbound { .. } => Outcome::Blocked,
            Refusal::Pending { .. } => Outcome::Pending,
            Refusal::Denied { .. } | Refusal::Ended { .. } | Refusal::UsedElsewhere { .. } => {
                Outcome::Denied
            }
            Refusal::CoordinatorUnavailable { .. }
            | Refusal::AuditUnwritable { .. }
            | Refusal::NotHeld { .. } => Outcome::Error,
        }
    }
}

/// The refusal in words the client can act on, for protocols whose answer is free text (an
/// SSH stderr line, a Kubernetes `Status` message). PostgreSQL words its own (SQLSTATE texts).
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
        Refusal::Blocked { rule, reason } => format!("blocked by rule {rule}: {reason}"),
        Refusal::NoApprovalSettings { rule } => {
            format!("rule {rule} requires approval but has no approval settings")
        }
        Refusal::Unbound { rule, why } => format!("rule {rule} requires approval: {why}"),
        Refusal::Pending {
            rule,
            request,
            approvers,
        } => format!(
            "held for approval by rule {rule}: request {request} is pending with {approvers}; run it again once it is approved"
        ),
        Refusal::Denied { request, by } => format!("approval request {request} was denied: {by}"),
        Refusal::Ended { request, state } => format!("approval request {request} is {state}"),
        Refusal::UsedElsewhere { request } => {
            format!("approval request {request} was used by another run of this action")
        }
        Refusal::CoordinatorUnavailable { why } => {
            format!("the approval service is unavailable: {why}")
        }
        Refusal::NotHeld { why } => format!("refused before its approval was asked for: {why}"),
        Refusal::AuditUnwritable { why, .. } => {
            format!("the gateway cannot record this request: {why}")
        }
            };
        f.write_str(&text)
    }
}
