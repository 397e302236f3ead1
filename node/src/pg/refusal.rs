//! How a PostgreSQL client hears a refusal: the SQLSTATE and message of its ErrorResponse.

use crate::core::Refusal;

/// The SQLSTATE and message a refusal is answered with.
pub fn sql_error(r: &Refusal) -> (&'static str, String) {
    match r {
        Refusal::Blocked { rule, reason } => (
            "42501",
            format!("blocked by Vigil policy (rule {rule}): {reason}"),
        ),
        Refusal::NoApprovalSettings { rule } => (
            "42501",
            format!(
                "statement requires approval (Vigil policy rule {rule}) but the rule has no approval settings"
            ),
        ),
        Refusal::Unbound { rule, why } => (
            "42501",
            format!(
                "statement refused: it needs approval (Vigil policy rule {rule}), but {why}; nothing was run"
            ),
        ),
        Refusal::Pending {
            rule,
            request,
            approvers,
        } => (
            "42501",
            format!(
                "statement needs approval (Vigil policy rule {rule}): request {request} is pending with {approvers}; run the statement again once it is approved"
            ),
        ),
        Refusal::Denied { request, by } => (
            "42501",
            format!(
                "statement denied: approval request {request} was denied by {by}; nothing was run"
            ),
        ),
        Refusal::Ended { request, state } => (
            "42501",
            format!("statement refused: approval request {request} is {state}; nothing was run"),
        ),
        Refusal::UsedElsewhere { request } => (
            "42501",
            format!(
                "statement refused: approval {request} was used by another run of the same statement"
            ),
        ),
        Refusal::CoordinatorUnavailable { why } => (
            "58000",
            format!(
                "statement refused: the approval service is unavailable ({why}); nothing was run"
            ),
        ),
        Refusal::NotHeld { why } => (
            "42501",
            format!("statement refused before its approval was asked for: {why}; nothing was run"),
        ),
        Refusal::AuditUnwritable {
            spool_full: true,
            why,
        } => (
            "58030",
            format!(
                "statement refused: {why}; nothing was sent to the database (retry once the audit pipeline catches up)"
            ),
        ),
        Refusal::AuditUnwritable {
            spool_full: false,
            why,
        } => (
            "58030",
            format!("statement refused: the gateway cannot write its audit record ({why}); nothing was sent to the database"),
        ),
    }
}
