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
            Refusal::CoordinatorUnavailable { .. } | Refusal::AuditUnwritable { .. } => {
                Outcome::Error
            }
        }
    }
}
