//! Policy inside an SFTP channel: every client request is decided before the host sees it (on
//! its operation and its paths); a refused request never reaches the host, the client gets
//! `SSH_FX_PERMISSION_DENIED` from the gateway, and the refusal is on record. Each finished
//! operation becomes one record (a file transfer from open to close, a removal, a rename …).
//!
//! A request the gateway cannot decide is refused whatever the policy says: one on a handle
//! that is not open as far as the gateway knows ([`SftpRequest::handle_unknown`], rule
//! `unknown-handle`, answered `SSH_FX_FAILURE` as sshd answers a bad handle); and, when a rule
//! that may decide it names paths, one with a relative path (rule `relative-path`): the host
//! resolves it against a directory the gateway does not know (the login's home, or what
//! `sftp-server -d` made it), and the rules' globs are absolute. `REALPATH` (with
//! `expand-path@openssh.com`) is the exception: it changes and reads nothing, and clients
//! start by asking it for `.`, to make every later path absolute. Paths are compared
//! normalised (see [`super::sftp`]).

use super::sftp::{
    status_reply, SftpError, SftpOp, SftpOperation, SftpRequest, SftpTracker, SSH_FX_FAILURE,
    SSH_FX_PERMISSION_DENIED,
};
use crate::policy::ssh::{SshAction, SshRequestKind};
use crate::policy::{gateway_block, Action, Decision, Policy};
use std::sync::{Arc, Mutex, MutexGuard};
use vigil_proto::record::Principal;

pub struct SftpGuard {
    tracker: Mutex<SftpTracker>,
    policy: Arc<Policy>,
    principal: Arc<Principal>,
    target: String,
    login: String,
    /// A rule that may decide this channel's requests names paths.
    names_paths: bool,
}

/// A request the gateway refused: the reply the client gets instead of the host's, and the
/// operation with the decision, for the record.
pub struct Refused {
    pub reply: Vec<u8>,
    pub operation: SftpOperation,
    pub decision: Decision,
}

impl SftpGuard {
    pub fn new(
        policy: Arc<Policy>,
        principal: Arc<Principal>,
        target: String,
        login: String,
    ) -> Self {
        Self {
            names_paths: policy.names_paths(SshRequestKind::Sftp, &principal, &target),
            tracker: Mutex::new(SftpTracker::new()),
            policy,
            principal,
            target,
            login,
        }
    }

    fn tracker(&self) -> MutexGuard<'_, SftpTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Client bytes: the bytes of the allowed requests (to forward), and the refused ones.
    pub fn client(&self, data: &[u8]) -> Result<(Vec<u8>, Vec<Refused>), SftpError> {
        let packets = self.tracker().client_bytes(data)?;
        let mut forward = Vec::with_capacity(data.len());
        let mut refused = Vec::new();
        for p in packets {
            let (decision, code) = self
                .undecidable(&p.request)
                .unwrap_or_else(|| (self.decide(&p.request), SSH_FX_PERMISSION_DENIED));
            match (decision.action, p.request.id) {
                (Action::Allow, _) | (_, None) => forward.extend_from_slice(&p.raw),
                (action, Some(id)) => {
                    let why = match (action, &decision.reason) {
                        (Action::RequireApproval, _) => format!(
                            "rule {} requires approval, which an SFTP request cannot wait for; run the change as an exec",
                            decision.rule
                        ),
                        (_, Some(reason)) => format!("blocked by rule {}: {reason}", decision.rule),
                        (_, None) => format!("blocked by rule {}", decision.rule),
                    };
                    let operation = self
                        .tracker()
                        .refused(id, code, &why)
                        .unwrap_or_else(|| SftpOperation::new(p.request.clone()));
                    refused.push(Refused {
                        reply: status_reply(id, code, &format!("vigil: {why}")),
                        operation,
                        decision,
                    });
                }
            }
        }
        Ok((forward, refused))
    }

    /// The gateway's own refusal of a request it cannot decide, whatever the rules, with the
    /// status code of its reply.
    fn undecidable(&self, request: &SftpRequest) -> Option<(Decision, u32)> {
        if request.handle_unknown {
            let why = "the request names a handle the host has not returned, or one already closed: which file it acts on cannot be known";
            return Some((gateway_block("unknown-handle", why), SSH_FX_FAILURE));
        }
        let relative = |p: &Option<String>| p.as_deref().is_some_and(|p| !p.starts_with('/'));
        let decided_on_paths = self.names_paths && request.op != SftpOp::RealPath;
        if !decided_on_paths {
            return None;
        }
        if relative(&request.path) || relative(&request.target) {
            let why =
                "a relative path cannot be decided against the rules on paths; send it absolute";
            return Some((
                gateway_block("relative-path", why),
                SSH_FX_PERMISSION_DENIED,
            ));
        }
        request.climbs.then(|| {
            let why = "a path with .. cannot be decided against the rules on paths: the host resolves it from where a symlink before it points; send the path without ..";
            (gateway_block("parent-path", why), SSH_FX_PERMISSION_DENIED)
        })
    }

    /// A request's decision: its path and, for a rename or link, the path it creates, each
    /// decided (a block of either refuses it).
    fn decide(&self, request: &SftpRequest) -> Decision {
        let paths = std::iter::once(request.path.as_deref()).chain(
            request
                .target
                .is_some()
                .then_some(request.target.as_deref()),
        );
        let actions: Vec<SshAction<'_>> = paths
            .map(|path| SshAction {
                kind: SshRequestKind::Sftp,
                login: &self.login,
                command: None,
                line: None,
                path,
                operation: Some(&request.op),
            })
            .collect();
        self.policy
            .decide_actions(Ok(&actions), &self.principal, &self.target)
    }

    /// Host bytes: the operations they finish.
    pub fn server(&self, data: &[u8]) -> Result<Vec<SftpOperation>, SftpError> {
        self.tracker().server_bytes(data)
    }

    /// Whether a reply of the gateway's may go to the client now (between the host's packets).
    pub fn at_boundary(&self) -> bool {
        self.tracker().server_at_boundary()
    }

    /// The policy reference of a decision, for its record.
    pub fn reference(&self, d: &Decision) -> vigil_proto::record::PolicyRef {
        self.policy.reference(d)
    }

    /// The channel closed: transfers still open.
    pub fn finish(&self) -> Vec<SftpOperation> {
        self.tracker().finish()
    }
}
