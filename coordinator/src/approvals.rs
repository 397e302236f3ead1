//! The approvals domain: approval requests and their decisions, one-time consumption,
//! time-windowed grants, and the latest signed checkpoint of every audit stream.
//!
//! A deterministic state machine: every change is a [`Command`] applied in log order, time
//! arrives inside the command (never read from a clock here), maps are ordered. Two replicas
//! that apply the same commands hold the same state, byte for byte once serialised, which is
//! what a Raft state machine needs. No Raft types appear here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Milliseconds since the Unix epoch, as stamped by the proposer.
pub type Millis = u64;

/// Who asks or decides, as established from a verified token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The token's issuer: a subject names someone only together with its issuer (empty in
    /// what nodes of earlier releases sent).
    #[serde(default)]
    pub issuer: String,
    /// The person behind the token across identity providers, when the token carries the
    /// configured person key (`identity.claims.person`, `identity.saml.person_attribute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
}

impl Actor {
    /// The same identity: one subject of one issuer. What an approval and a request are
    /// bound to.
    pub fn is(&self, other: &Actor) -> bool {
        self.issuer == other.issuer && self.subject == other.subject
    }

    /// Whether `self` and `other` may be one person, for the rules that keep a person from
    /// approving their own request or approving twice: the same subject (whatever the issuer:
    /// two providers that name someone alike are taken to mean the same person, which only
    /// ever refuses more), or the same person key (compared ignoring ASCII case, as emails and
    /// user principal names are).
    pub fn maybe_same_person(&self, other: &Actor) -> bool {
        self.subject == other.subject
            || matches!(
                (&self.person, &other.person),
                (Some(a), Some(b)) if a.eq_ignore_ascii_case(b)
            )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    /// Approved and used: a one-time approval is consumed exactly once.
    Consumed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub approver: String,
    pub approve: bool,
    pub comment: Option<String>,
    pub at: Millis,
    /// The approver's person key, when their token carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
}

impl Vote {
    /// The approver as far as a vote remembers them (subject and person key).
    fn voter(&self) -> Actor {
        Actor {
            subject: self.approver.clone(),
            person: self.person.clone(),
            ..Actor::default()
        }
    }
}

/// The protocols whose actions are approved and granted.
pub const PROTOCOLS: [&str; 3] = ["postgres", "ssh", "kubernetes"];

/// Where an approval or a grant applies: one target of one protocol. A PostgreSQL connection
/// and an SSH target of the same name are different scopes.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// One of [`PROTOCOLS`].
    pub protocol: String,
    /// The configured name of the target (a PostgreSQL connection, an SSH target, a cluster).
    pub target: String,
}

impl Scope {
    pub fn new(protocol: &str, target: &str) -> Self {
        Self {
            protocol: protocol.into(),
            target: target.into(),
        }
    }

    /// Why this scope cannot be stored, if it cannot.
    pub fn invalid(&self) -> Option<String> {
        if !PROTOCOLS.contains(&self.protocol.as_str()) {
            return Some(format!(
                "unknown protocol {:?} (one of {})",
                self.protocol,
                PROTOCOLS.join(", ")
            ));
        }
        self.target
            .is_empty()
            .then(|| "a scope needs a target".to_string())
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.protocol, self.target)
    }
}

/// One exact action on one scope: what an approval is for. `hash` covers what would run (SQL
/// text and bind parameters, an SSH command line, an HTTP method, path and body), as the
/// protocol defines it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionKey {
    #[serde(flatten)]
    pub scope: Scope,
    /// Hex SHA-256.
    pub hash: String,
}

impl From<&Scope> for vigil_proto::coordinator::Scope {
    fn from(s: &Scope) -> Self {
        Self {
            protocol: s.protocol.clone(),
            target: s.target.clone(),
        }
    }
}

impl From<&ActionKey> for vigil_proto::coordinator::ActionKey {
    fn from(k: &ActionKey) -> Self {
        Self {
            scope: Some((&k.scope).into()),
            hash: k.hash.clone(),
        }
    }
}

/// What a gateway node asks for when it holds an action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRequest {
    /// Chosen by the node; unique.
    pub id: String,
    pub requester: Actor,
    pub key: ActionKey,
    /// The action as audited (masked), for the approver to read.
    pub action: String,
    pub reason: Option<String>,
    /// Lifetime in milliseconds from creation.
    pub ttl: Millis,
    /// Members of this group may decide.
    pub approver_group: String,
    pub approvals_required: u32,
    /// The gateway node that holds the statement.
    pub node: String,
    /// The policy rule that asked for approval.
    pub rule: String,
    /// Everything the hash binds, as the approver reads it (values masked).
    #[serde(default)]
    pub shown: Option<Box<Shown>>,
}

/// Everything an action's hash binds, in its protocol's terms, as the approver reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum Shown {
    Postgres(ShownBinding),
    Ssh(ShownCommand),
    Kubernetes(ShownRequest),
}

/// What a Kubernetes approval binds, as the approver reads it (see `KubeRequest` in the API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownRequest {
    pub method: String,
    pub path: String,
    pub body: String,
    pub body_sha256: String,
}

/// What an SSH approval binds, as the approver reads it (see `SshCommand` in the API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownCommand {
    pub login: String,
    pub request_type: String,
    pub command: String,
}

/// What a PostgreSQL approval binds, as the approver reads it (see `StatementBinding` in the
/// API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownBinding {
    /// `simple` or `extended`.
    pub mode: String,
    pub text: String,
    /// Prepared statements the text runs by name: (name, text).
    pub runs: Vec<(String, String)>,
    pub params: Vec<ShownParam>,
    pub database: String,
    pub role: String,
    pub search_path: String,
    /// The session's other settings that differ from the server's.
    #[serde(default)]
    pub settings: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownParam {
    /// `None`: NULL.
    pub value: Option<String>,
    pub binary: bool,
    pub type_oid: u32,
}

/// A statement held for approval, bound to who asked, where, and the exact statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    #[serde(flatten)]
    pub asked: NewRequest,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub votes: Vec<Vote>,
    pub state: RequestState,
    pub consumed_at: Option<Millis>,
    /// The attempt that consumed it (see [`Command::Consume`]).
    pub consumed_by: Option<String>,
}

impl ApprovalRequest {
    pub fn id(&self) -> &str {
        &self.asked.id
    }

    fn expired(&self, now: Millis) -> bool {
        now >= self.expires_at
    }

    /// The state as an operator sees it at `now`: a pending request past its lifetime is
    /// `expired` (it can no longer be decided).
    pub fn state_at(&self, now: Millis) -> &'static str {
        match self.state {
            RequestState::Pending if self.expired(now) => "expired",
            RequestState::Pending => "pending",
            RequestState::Approved if self.expired(now) => "expired",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Consumed => "consumed",
        }
    }

    /// Decided for good: nothing can change it any more at `now`.
    pub fn settled(&self, now: Millis) -> bool {
        !matches!(self.state_at(now), "pending" | "approved")
    }

    /// When it settled, if it has by `now`: used, denied, or past its lifetime undecided or
    /// unused. Every time here came from a command, so replicas agree.
    pub fn settled_at(&self, now: Millis) -> Option<Millis> {
        match self.state {
            RequestState::Consumed => self.consumed_at,
            RequestState::Denied => self.votes.last().map(|v| v.at),
            RequestState::Pending | RequestState::Approved => {
                self.expired(now).then_some(self.expires_at)
            }
        }
    }
}

/// "This principal may use this access class on this target in this window."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub subject: String,
    /// The identity provider of `subject` (empty in grants of earlier releases: those cover
    /// no one).
    #[serde(default)]
    pub issuer: String,
    pub scope: Scope,
    /// What the grant covers, e.g. `write`.
    pub access_class: String,
    pub not_before: Millis,
    pub not_after: Millis,
    pub granted_by: String,
    pub revoked_at: Option<Millis>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Grant {
    fn active(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && self.not_before <= now && now < self.not_after
    }

    /// When it stopped covering anything: revoked, or its window over.
    pub fn ended_at(&self) -> Millis {
        self.revoked_at
            .unwrap_or(self.not_after)
            .min(self.not_after)
    }
}

/// A node's signed statement of how far an audit stream reached (its signature is checked
/// before the command is proposed).
pub use vigil_proto::checkpoint::Checkpoint;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Hold a statement for approval. Creating the same request again (same id, same content)
    /// answers with the one held, so a node may retry after a lost reply.
    CreateRequest {
        request: NewRequest,
        now: Millis,
    },
    Decide {
        id: String,
        approver: Actor,
        approve: bool,
        comment: Option<String>,
        now: Millis,
    },
    /// Use an approved request for this principal (`subject` of `issuer`: the request's
    /// requester) and exact action: succeeds once. `attempt` names the try (unique per run of
    /// the action); repeating a consume with the same attempt answers with the request it
    /// consumed, so a node may retry after a lost reply. With `request`, only that request
    /// may be used (the one the node held the action for); without, the oldest that matches.
    Consume {
        subject: String,
        #[serde(default)]
        issuer: String,
        key: ActionKey,
        attempt: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        now: Millis,
    },
    CreateGrant {
        grant: Grant,
    },
    RevokeGrant {
        id: String,
        now: Millis,
    },
    /// Hold a stream's latest checkpoint; the first checkpoint of a node registers its key.
    PutCheckpoint {
        checkpoint: Checkpoint,
        /// When the command was proposed (the leader's clock): the registration time of a
        /// node's key.
        #[serde(default)]
        now: Millis,
    },
    /// Put a mark on something that may happen once (`key`: its kind and name, such as
    /// `logout:<SHA-256 of a token>` or `saml:<IdP>|<assertion id>`), kept until `until`
    /// (when what it names expires anyway). Marking it again keeps the first time and says so.
    Mark {
        key: String,
        until: Millis,
        now: Millis,
    },
    /// Several commands proposed together (one Raft entry), applied in order, each with its
    /// own result. Batches do not nest.
    Batch(Vec<Command>),
    /// Forget the requests that settled at or before `cutoff` and the grants that ended at or
    /// before it (retention: the leader proposes its clock minus the retention period). The
    /// audit records of what they decided stay in the audit stream.
    Purge {
        cutoff: Millis,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DomainError {
    #[error("no approval request {0}")]
    NotFound(String),
    #[error("an object with id {0} exists already")]
    Duplicate(String),
    #[error("the request was decided already")]
    AlreadyDecided,
    #[error(
        "the requester cannot approve their own request (the same subject, or the same person \
         key under another identity)"
    )]
    SelfApproval,
    #[error("{0} is not in the approver group")]
    NotApprover(String),
    #[error(
        "{0} has voted on this request already (as this or another identity of the same person)"
    )]
    AlreadyVoted(String),
    #[error("the request has expired")]
    Expired,
    #[error("no approved request matches")]
    NothingToConsume,
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("checkpoint for stream {stream} goes back from seq {have} to {got}")]
    CheckpointRegression { stream: String, have: u64, got: u64 },
    #[error("checkpoint for stream {stream} seq {seq} conflicts with the one held")]
    CheckpointConflict { stream: String, seq: u64 },
    #[error("checkpoint for stream {0} is signed by another key than the stream's")]
    CheckpointKey(String),
    #[error(
        "checkpoint for stream {stream} is signed by another key than node {node}'s registered key"
    )]
    NodeKey { stream: String, node: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Boxed: a request (with its requester and votes) is several times the other variants.
    Request(Box<ApprovalRequest>),
    Grant(Grant),
    Checkpoint(Checkpoint),
    /// When the mark was first made, and whether it was this command that made it.
    Marked {
        at: Millis,
        first: bool,
    },
    /// What a [`Command::Purge`] removed.
    Purged {
        requests: u64,
        grants: u64,
    },
    /// The results of a [`Command::Batch`], in order.
    Batch(Vec<Result<Applied, DomainError>>),
}

/// The key a node signs its checkpoints with, as the witness first saw it: trust on first use,
/// bound to the node id. Every later checkpoint of any stream of that node must be signed by
/// it; it never changes (a node with a new key needs a new node id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKey {
    /// Hex Ed25519 public key.
    pub public_key: String,
    /// The stream whose checkpoint registered it.
    pub first_stream: String,
    pub registered_at: Millis,
}

/// The longest key of a [`Command::Mark`].
pub const MAX_MARK_KEY: usize = 1024;

/// The whole replicated state.
///
/// Keys and values are shared (`Arc`), so that a clone copies the maps' structure, not what
/// they hold (a snapshot takes one while applies wait): a change replaces or copies the one
/// value it touches ([`Arc::make_mut`]). Serialised as plain maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub requests: BTreeMap<Arc<str>, Arc<ApprovalRequest>>,
    pub grants: BTreeMap<Arc<str>, Arc<Grant>>,
    pub checkpoints: BTreeMap<Arc<str>, Arc<Checkpoint>>,
    /// Node id → its checkpoint key.
    #[serde(default)]
    pub node_keys: BTreeMap<Arc<str>, Arc<NodeKey>>,
    /// Things that may happen once (see [`Command::Mark`]) → when they happened and until
    /// when that is kept.
    #[serde(default)]
    pub marks: BTreeMap<Arc<str>, Mark>,
}

/// Something that happened once (a logout, a SAML assertion used).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub at: Millis,
    pub until: Millis,
}

/// One object of the [`State`], by its map and key: what [`State::apply_noting`] reports as
/// changed (inserted, changed or removed), so that the store writes just that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    Request(Arc<str>),
    Grant(Arc<str>),
    Checkpoint(Arc<str>),
    NodeKey(Arc<str>),
    Mark(Arc<str>),
}

impl State {
    /// Applies one command. A refused command changes nothing.
    #[cfg(test)]
    pub fn apply(&mut self, cmd: Command) -> Result<Applied, DomainError> {
        self.apply_noting(cmd, &mut Vec::new())
    }

    /// Applies one command, and adds what it changed to `changed` (in the order it changed
    /// them; an object may appear more than once). A refused command changes nothing.
    pub fn apply_noting(
        &mut self,
        cmd: Command,
        changed: &mut Vec<Changed>,
    ) -> Result<Applied, DomainError> {
        match cmd {
            Command::Batch(cmds) => {
                if cmds.iter().any(|c| matches!(c, Command::Batch(_))) {
                    return Err(DomainError::Invalid("batches do not nest".into()));
                }
                Ok(Applied::Batch(
                    cmds.into_iter()
                        .map(|c| self.apply_noting(c, changed))
                        .collect(),
                ))
            }
            Command::CreateRequest { request, now } => {
                if let Some(held) = self.requests.get(request.id.as_str()) {
                    return if held.asked == request {
                        Ok(Applied::Request(Box::new(ApprovalRequest::clone(held))))
                    } else {
                        Err(DomainError::Duplicate(request.id))
                    };
                }
                if let Some(why) = request.key.scope.invalid() {
                    return Err(DomainError::Invalid(why));
                }
                if request.id.is_empty()
                    || request.key.hash.is_empty()
                    || request.approvals_required == 0
                    || request.ttl == 0
                    || request.approver_group.is_empty()
                {
                    return Err(DomainError::Invalid(
                        "a request needs an id, an action hash, an approver group, at least one approval and a lifetime"
                            .into(),
                    ));
                }
                let held = ApprovalRequest {
                    created_at: now,
                    expires_at: now.saturating_add(request.ttl),
                    asked: request,
                    votes: Vec::new(),
                    state: RequestState::Pending,
                    consumed_at: None,
                    consumed_by: None,
                };
                let id: Arc<str> = held.asked.id.as_str().into();
                self.requests.insert(id.clone(), Arc::new(held.clone()));
                changed.push(Changed::Request(id));
                Ok(Applied::Request(Box::new(held)))
            }
            Command::Decide {
                id,
                approver,
                approve,
                comment,
                now,
            } => {
                let r = self
                    .requests
                    .get_mut(id.as_str())
                    .ok_or_else(|| DomainError::NotFound(id.clone()))?;
                if r.state != RequestState::Pending {
                    return Err(DomainError::AlreadyDecided);
                }
                if r.expired(now) {
                    return Err(DomainError::Expired);
                }
                if approver.maybe_same_person(&r.asked.requester) {
                    return Err(DomainError::SelfApproval);
                }
                if !approver.groups.contains(&r.asked.approver_group) {
                    return Err(DomainError::NotApprover(approver.subject));
                }
                if r.votes
                    .iter()
                    .any(|v| approver.maybe_same_person(&v.voter()))
                {
                    return Err(DomainError::AlreadyVoted(approver.subject));
                }
                let r = Arc::make_mut(r);
                r.votes.push(Vote {
                    approver: approver.subject,
                    approve,
                    comment,
                    at: now,
                    person: approver.person,
                });
                // One denial decides; approvals decide when enough distinct approvers agree.
                if !approve {
                    r.state = RequestState::Denied;
                } else if r.votes.iter().filter(|v| v.approve).count() as u32
                    >= r.asked.approvals_required
                {
                    r.state = RequestState::Approved;
                }
                changed.push(Changed::Request(id.as_str().into()));
                Ok(Applied::Request(Box::new(r.clone())))
            }
            Command::Consume {
                subject,
                issuer,
                key,
                attempt,
                request,
                now,
            } => {
                let consumer = Actor {
                    subject,
                    issuer,
                    ..Actor::default()
                };
                if let Some(done) = self
                    .requests
                    .values()
                    .find(|r| r.consumed_by.as_deref() == Some(attempt.as_str()))
                {
                    return Ok(Applied::Request(Box::new(ApprovalRequest::clone(done))));
                }
                // The named request, or else the oldest matching approval, is used; the
                // compare (approved, not expired) and the set (consumed) happen in one apply,
                // so exactly one caller wins.
                let r = self
                    .requests
                    .values_mut()
                    .filter(|r| {
                        r.state == RequestState::Approved
                            && r.asked.requester.is(&consumer)
                            && r.asked.key == key
                            && !r.expired(now)
                            && request.as_deref().is_none_or(|id| r.asked.id == id)
                    })
                    .min_by_key(|r| (r.created_at, r.asked.id.clone()))
                    .ok_or(DomainError::NothingToConsume)?;
                let r = Arc::make_mut(r);
                r.state = RequestState::Consumed;
                r.consumed_at = Some(now);
                r.consumed_by = Some(attempt);
                changed.push(Changed::Request(r.asked.id.as_str().into()));
                Ok(Applied::Request(Box::new(r.clone())))
            }
            Command::CreateGrant { grant } => {
                if self.grants.contains_key(grant.id.as_str()) {
                    return Err(DomainError::Duplicate(grant.id));
                }
                if let Some(why) = grant.scope.invalid() {
                    return Err(DomainError::Invalid(why));
                }
                if grant.not_after <= grant.not_before {
                    return Err(DomainError::Invalid("a grant's window is empty".into()));
                }
                let id: Arc<str> = grant.id.as_str().into();
                self.grants.insert(id.clone(), Arc::new(grant.clone()));
                changed.push(Changed::Grant(id));
                Ok(Applied::Grant(grant))
            }
            Command::RevokeGrant { id, now } => {
                let g = self
                    .grants
                    .get_mut(id.as_str())
                    .ok_or_else(|| DomainError::NotFound(id.clone()))?;
                if g.revoked_at.is_none() {
                    Arc::make_mut(g).revoked_at = Some(now);
                    changed.push(Changed::Grant(id.as_str().into()));
                }
                Ok(Applied::Grant(Grant::clone(g)))
            }
            Command::Purge { cutoff } => {
                let (requests, grants) = (self.requests.len(), self.grants.len());
                self.requests.retain(|k, r| {
                    let keep = r.settled_at(cutoff).is_none_or(|at| at > cutoff);
                    if !keep {
                        changed.push(Changed::Request(k.clone()));
                    }
                    keep
                });
                self.grants.retain(|k, g| {
                    let keep = g.ended_at() > cutoff;
                    if !keep {
                        changed.push(Changed::Grant(k.clone()));
                    }
                    keep
                });
                self.marks.retain(|k, m| {
                    let keep = m.until > cutoff;
                    if !keep {
                        changed.push(Changed::Mark(k.clone()));
                    }
                    keep
                });
                Ok(Applied::Purged {
                    requests: (requests - self.requests.len()) as u64,
                    grants: (grants - self.grants.len()) as u64,
                })
            }
            Command::Mark { key, until, now } => {
                let named = key
                    .split_once(':')
                    .is_some_and(|(kind, name)| !kind.is_empty() && !name.is_empty());
                if !named || key.len() > MAX_MARK_KEY {
                    return Err(DomainError::Invalid(format!(
                        "a mark is `kind:name`, at most {MAX_MARK_KEY} bytes"
                    )));
                }
                let first = !self.marks.contains_key(key.as_str());
                let key: Arc<str> = key.into();
                let mark = self
                    .marks
                    .entry(key.clone())
                    .or_insert(Mark { at: now, until });
                mark.until = mark.until.max(until);
                let marked = Applied::Marked { at: mark.at, first };
                changed.push(Changed::Mark(key));
                Ok(marked)
            }
            Command::PutCheckpoint { checkpoint, now } => {
                let node = vigil_proto::chain::node_of(&checkpoint.stream)
                    .ok_or_else(|| {
                        DomainError::Invalid("a stream id is `<node id>:<epoch>`".into())
                    })?
                    .to_string();
                if let Some(have) = self.checkpoints.get(checkpoint.stream.as_str()) {
                    if checkpoint.public_key != have.public_key {
                        return Err(DomainError::CheckpointKey(checkpoint.stream));
                    }
                    if checkpoint.seq < have.seq {
                        return Err(DomainError::CheckpointRegression {
                            stream: checkpoint.stream,
                            have: have.seq,
                            got: checkpoint.seq,
                        });
                    }
                    if checkpoint.seq == have.seq && checkpoint.hash != have.hash {
                        return Err(DomainError::CheckpointConflict {
                            stream: checkpoint.stream,
                            seq: checkpoint.seq,
                        });
                    }
                }
                match self.node_keys.get(node.as_str()) {
                    Some(k) if k.public_key != checkpoint.public_key => {
                        return Err(DomainError::NodeKey {
                            stream: checkpoint.stream,
                            node,
                        });
                    }
                    Some(_) => {}
                    None => {
                        let node: Arc<str> = node.into();
                        changed.push(Changed::NodeKey(node.clone()));
                        self.node_keys.insert(
                            node,
                            Arc::new(NodeKey {
                                public_key: checkpoint.public_key.clone(),
                                first_stream: checkpoint.stream.clone(),
                                registered_at: now,
                            }),
                        );
                    }
                }
                let stream: Arc<str> = checkpoint.stream.as_str().into();
                self.checkpoints
                    .insert(stream.clone(), Arc::new(checkpoint.clone()));
                changed.push(Changed::Checkpoint(stream));
                Ok(Applied::Checkpoint(checkpoint))
            }
        }
    }

    /// The objects that differ between this state and `other` (for checks that
    /// [`State::apply_noting`] reports every change: the store writes only what it reports).
    pub fn differences(&self, other: &State) -> Vec<Changed> {
        fn diff<V: PartialEq>(
            a: &BTreeMap<Arc<str>, V>,
            b: &BTreeMap<Arc<str>, V>,
            kind: fn(Arc<str>) -> Changed,
            out: &mut Vec<Changed>,
        ) {
            for k in a.keys().chain(b.keys()) {
                if a.get(k) != b.get(k) {
                    out.push(kind(k.clone()));
                }
            }
        }
        let mut out = Vec::new();
        diff(&self.requests, &other.requests, Changed::Request, &mut out);
        diff(&self.grants, &other.grants, Changed::Grant, &mut out);
        diff(
            &self.checkpoints,
            &other.checkpoints,
            Changed::Checkpoint,
            &mut out,
        );
        diff(
            &self.node_keys,
            &other.node_keys,
            Changed::NodeKey,
            &mut out,
        );
        diff(&self.marks, &other.marks, Changed::Mark, &mut out);
        out
    }

    /// An active grant for this principal (subject of issuer), scope and access class at
    /// `now`.
    pub fn active_grant(
        &self,
        subject: &str,
        issuer: &str,
        scope: &Scope,
        access_class: &str,
        now: Millis,
    ) -> Option<&Grant> {
        self.grants.values().map(Arc::as_ref).find(|g| {
            g.subject == subject
                && !g.issuer.is_empty()
                && g.issuer == issuer
                && g.scope == *scope
                && g.access_class == access_class
                && g.active(now)
        })
    }

    /// Whether a [`Command::Purge`] with this cutoff would remove anything (the leader
    /// proposes one only then).
    pub fn purgeable(&self, cutoff: Millis) -> bool {
        self.requests
            .values()
            .any(|r| r.settled_at(cutoff).is_some_and(|at| at <= cutoff))
            || self.grants.values().any(|g| g.ended_at() <= cutoff)
            || self.marks.values().any(|m| m.until <= cutoff)
    }

    /// Requests still waiting for a decision at `now`.
    pub fn pending(&self, now: Millis) -> impl Iterator<Item = &ApprovalRequest> {
        self.requests
            .values()
            .map(Arc::as_ref)
            .filter(move |r| r.state == RequestState::Pending && !r.expired(now))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `subject` of the test's issuer, without a person key.
    fn actor(subject: &str, groups: &[&str]) -> Actor {
        Actor {
            subject: subject.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            issuer: ISSUER.into(),
            person: None,
        }
    }

    const ISSUER: &str = "https://idp";

    pub(crate) fn create(id: &str, required: u32, now: Millis) -> Command {
        Command::CreateRequest {
            request: NewRequest {
                id: id.into(),
                requester: actor("agent", &["approvers"]),
                key: key("postgres", "app"),
                action: "DELETE FROM t".into(),
                reason: Some("monthly cleanup".into()),
                ttl: 60_000,
                approver_group: "approvers".into(),
                approvals_required: required,
                node: "n1".into(),
                rule: "deletes".into(),
                shown: None,
            },
            now,
        }
    }

    fn key(protocol: &str, target: &str) -> ActionKey {
        ActionKey {
            scope: Scope::new(protocol, target),
            hash: "h1".into(),
        }
    }

    pub(crate) fn decide(id: &str, who: &str, approve: bool, now: Millis) -> Command {
        Command::Decide {
            id: id.into(),
            approver: actor(who, &["approvers"]),
            approve,
            comment: None,
            now,
        }
    }

    /// Creates grant `id`: the agent may write to PostgreSQL target `prod` from 0 to 100.
    fn prod_grant(id: &str) -> Command {
        Command::CreateGrant {
            grant: Grant {
                id: id.into(),
                subject: "agent".into(),
                issuer: ISSUER.into(),
                scope: Scope::new("postgres", "prod"),
                access_class: "write".into(),
                not_before: 0,
                not_after: 100,
                granted_by: "admin".into(),
                revoked_at: None,
                reason: None,
            },
        }
    }

    fn consume(now: Millis) -> Command {
        consume_key(key("postgres", "app"), now)
    }

    fn consume_key(key: ActionKey, now: Millis) -> Command {
        Command::Consume {
            subject: "agent".into(),
            issuer: ISSUER.into(),
            key,
            attempt: format!("try-{now}"),
            request: None,
            now,
        }
    }

    /// An approval for a PostgreSQL connection does not let another protocol's action run on a
    /// target of the same name, nor the same action on another target; a grant neither.
    #[test]
    fn approvals_and_grants_are_bound_to_protocol_and_target() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        s.apply(decide("r1", "alice", true, 1)).unwrap();
        for other in [
            key("ssh", "app"),
            key("kubernetes", "app"),
            key("postgres", "app2"),
        ] {
            assert_eq!(
                s.apply(consume_key(other, 2)),
                Err(DomainError::NothingToConsume)
            );
        }
        assert!(s.apply(consume_key(key("postgres", "app"), 3)).is_ok());
        s.apply(prod_grant("g1")).unwrap();
        let prod = |protocol| Scope::new(protocol, "prod");
        assert!(s
            .active_grant("agent", ISSUER, &prod("postgres"), "write", 5)
            .is_some());
        assert!(s
            .active_grant("agent", ISSUER, &prod("ssh"), "write", 5)
            .is_none());
        assert!(s
            .active_grant("agent", ISSUER, &prod("kubernetes"), "write", 5)
            .is_none());
        // A scope must name a known protocol and a target.
        let mut bad = create("r2", 1, 5);
        if let Command::CreateRequest { request, .. } = &mut bad {
            request.key.scope.protocol = "telnet".into();
        }
        assert!(matches!(s.apply(bad), Err(DomainError::Invalid(_))));
    }

    #[test]
    fn an_approval_is_consumed_exactly_once() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        assert_eq!(s.apply(consume(1)), Err(DomainError::NothingToConsume));
        s.apply(decide("r1", "alice", true, 2)).unwrap();
        assert!(
            matches!(s.apply(consume(3)), Ok(Applied::Request(r)) if r.state == RequestState::Consumed)
        );
        assert_eq!(s.apply(consume(4)), Err(DomainError::NothingToConsume));
        // The attempt that won may ask again (a retry after a lost reply) and hears the same.
        assert!(
            matches!(s.apply(consume(3)), Ok(Applied::Request(r)) if r.consumed_by.as_deref() == Some("try-3"))
        );
    }

    #[test]
    fn a_batch_applies_in_order_with_one_result_each() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        s.apply(decide("r1", "alice", true, 1)).unwrap();
        let got = s
            .apply(Command::Batch(vec![
                consume(2),
                consume(3),
                create("r2", 1, 3),
            ]))
            .unwrap();
        let Applied::Batch(results) = got else {
            panic!("a batch answers with a batch")
        };
        assert!(
            matches!(&results[0], Ok(Applied::Request(r)) if r.state == RequestState::Consumed)
        );
        assert_eq!(results[1], Err(DomainError::NothingToConsume));
        assert!(results[2].is_ok());
        assert!(matches!(
            s.apply(Command::Batch(vec![Command::Batch(vec![])])),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn creating_the_same_request_again_answers_with_the_one_held() {
        let mut s = State::default();
        let first = s.apply(create("r1", 1, 0)).unwrap();
        assert_eq!(s.apply(create("r1", 1, 5)).unwrap(), first);
        assert_eq!(
            s.apply(create("r1", 2, 5)),
            Err(DomainError::Duplicate("r1".into()))
        );
    }

    #[test]
    fn requesters_cannot_approve_themselves_and_approvers_need_the_group() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        assert_eq!(
            s.apply(decide("r1", "agent", true, 1)),
            Err(DomainError::SelfApproval)
        );
        let outsider = Command::Decide {
            id: "r1".into(),
            approver: actor("mallory", &["analysts"]),
            approve: true,
            comment: None,
            now: 1,
        };
        assert_eq!(
            s.apply(outsider),
            Err(DomainError::NotApprover("mallory".into()))
        );
        assert_eq!(s.requests["r1"].state, RequestState::Pending);
    }

    /// One person with two identities (two issuers, two subjects) is one person when the
    /// configured person key says so: they can neither approve their own request nor vote
    /// twice. Two providers that give someone the same subject are taken to mean one person.
    #[test]
    fn a_person_is_the_same_under_every_identity_that_names_them() {
        let person = |subject: &str, issuer: &str, key: Option<&str>| Actor {
            subject: subject.into(),
            groups: vec!["approvers".into()],
            issuer: issuer.into(),
            person: key.map(str::to_string),
        };
        let oidc_alice = person("3f1c-uuid", "https://oidc", Some("alice@example.com"));
        let saml_alice = person("alice", "https://vigil/tokens", Some("Alice@Example.com"));
        let mut s = State::default();
        let mut held = create("r1", 2, 0);
        if let Command::CreateRequest { request, .. } = &mut held {
            request.requester = oidc_alice.clone();
        }
        s.apply(held).unwrap();
        let by = |approver: &Actor, now| Command::Decide {
            id: "r1".into(),
            approver: approver.clone(),
            approve: true,
            comment: None,
            now,
        };
        assert_eq!(s.apply(by(&saml_alice, 1)), Err(DomainError::SelfApproval));
        // The same subject under another issuer: refused too.
        let namesake = person("3f1c-uuid", "https://vigil/tokens", None);
        assert_eq!(s.apply(by(&namesake, 2)), Err(DomainError::SelfApproval));
        // Bob approves once, not again as his other identity.
        let bob = person("bob", "https://oidc", Some("bob@example.com"));
        let saml_bob = person("bob-saml", "https://vigil/tokens", Some("BOB@example.com"));
        s.apply(by(&bob, 3)).unwrap();
        assert_eq!(
            s.apply(by(&saml_bob, 4)),
            Err(DomainError::AlreadyVoted("bob-saml".into()))
        );
        assert_eq!(s.requests["r1"].state, RequestState::Pending);
        // Without person keys, two subjects are two people.
        let carol = person("carol", "https://oidc", None);
        s.apply(by(&carol, 5)).unwrap();
        assert_eq!(s.requests["r1"].state, RequestState::Approved);
    }

    /// An approval is used only by its requester: the same subject of the same issuer. The
    /// same subject string from another issuer is someone else.
    #[test]
    fn an_approval_is_consumed_only_by_the_requesters_own_identity() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        s.apply(decide("r1", "alice", true, 1)).unwrap();
        let elsewhere = Command::Consume {
            subject: "agent".into(),
            issuer: "https://vigil/tokens".into(),
            key: key("postgres", "app"),
            attempt: "try-other".into(),
            request: None,
            now: 2,
        };
        assert_eq!(s.apply(elsewhere), Err(DomainError::NothingToConsume));
        assert_eq!(s.requests["r1"].state, RequestState::Approved);
        assert!(s.apply(consume(3)).is_ok());
    }

    /// A node that held an action for a request and saw it approved uses that request, not an
    /// older approval of the same action (its record names the request, and who approved it,
    /// that let the action run); once that one is used elsewhere, nothing else stands in.
    #[test]
    fn a_consume_that_names_its_request_uses_only_that_one() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        s.apply(create("r2", 1, 2)).unwrap();
        s.apply(decide("r1", "alice", true, 3)).unwrap();
        s.apply(decide("r2", "carol", true, 4)).unwrap();
        let named = |attempt: &str, now| Command::Consume {
            subject: "agent".into(),
            issuer: ISSUER.into(),
            key: key("postgres", "app"),
            attempt: attempt.into(),
            request: Some("r2".into()),
            now,
        };
        let Ok(Applied::Request(used)) = s.apply(named("try-a", 5)) else {
            panic!("r2 is consumed");
        };
        assert_eq!(used.asked.id, "r2");
        assert_eq!(s.requests["r1"].state, RequestState::Approved);
        assert_eq!(
            s.apply(named("try-b", 6)),
            Err(DomainError::NothingToConsume),
            "r2 is used, and r1 does not stand in for it"
        );
        // Without a name, the oldest.
        let Ok(Applied::Request(used)) = s.apply(consume(7)) else {
            panic!("r1 is consumed");
        };
        assert_eq!(used.asked.id, "r1");
    }

    #[test]
    fn several_approvals_and_a_denial() {
        let mut s = State::default();
        s.apply(create("r1", 2, 0)).unwrap();
        s.apply(decide("r1", "alice", true, 1)).unwrap();
        assert_eq!(
            s.apply(decide("r1", "alice", true, 2)),
            Err(DomainError::AlreadyVoted("alice".into()))
        );
        assert_eq!(s.requests["r1"].state, RequestState::Pending);
        s.apply(decide("r1", "bob", true, 3)).unwrap();
        assert_eq!(s.requests["r1"].state, RequestState::Approved);
        assert_eq!(
            s.apply(decide("r1", "carol", false, 4)),
            Err(DomainError::AlreadyDecided)
        );
        s.apply(create("r2", 2, 0)).unwrap();
        s.apply(decide("r2", "alice", false, 1)).unwrap();
        assert_eq!(s.requests["r2"].state, RequestState::Denied);
    }

    #[test]
    fn expiry_is_judged_by_the_time_in_the_command() {
        let mut s = State::default();
        s.apply(create("r1", 1, 0)).unwrap();
        assert_eq!(
            s.apply(decide("r1", "alice", true, 60_000)),
            Err(DomainError::Expired)
        );
        s.apply(create("r2", 1, 0)).unwrap();
        s.apply(decide("r2", "alice", true, 10)).unwrap();
        assert_eq!(s.apply(consume(60_001)), Err(DomainError::NothingToConsume));
        assert_eq!(s.pending(59_999).count(), 1);
        assert_eq!(s.pending(60_000).count(), 0);
    }

    /// A mark is made once: marking it again keeps the first time and says it was not the
    /// first; it is kept until what it names expires, then a purge forgets it.
    #[test]
    fn a_mark_is_made_once_and_kept_until_it_expires() {
        let mut s = State::default();
        let key = "logout:abc".to_string();
        let mark = |until, now| Command::Mark {
            key: key.clone(),
            until,
            now,
        };
        let first = Applied::Marked {
            at: 100,
            first: true,
        };
        assert_eq!(s.apply(mark(5_000, 100)), Ok(first));
        let again = Applied::Marked {
            at: 100,
            first: false,
        };
        assert_eq!(s.apply(mark(9_000, 200)), Ok(again));
        assert_eq!(s.marks[key.as_str()].until, 9_000);
        let long = format!("x:{}", "y".repeat(MAX_MARK_KEY));
        for bad in ["", "no kind", ":name", "kind:", long.as_str()] {
            let cmd = Command::Mark {
                key: bad.into(),
                until: 1,
                now: 1,
            };
            assert!(
                matches!(s.apply(cmd), Err(DomainError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(!s.purgeable(8_999));
        s.apply(Command::Purge { cutoff: 8_999 }).unwrap();
        assert!(s.marks.contains_key(key.as_str()));
        assert!(s.purgeable(9_000));
        s.apply(Command::Purge { cutoff: 9_000 }).unwrap();
        assert!(s.marks.is_empty());
    }

    #[test]
    fn a_purge_forgets_only_what_settled_before_its_cutoff() {
        let mut s = State::default();
        s.apply(create("used", 1, 0)).unwrap();
        s.apply(decide("used", "alice", true, 10)).unwrap();
        s.apply(consume(20)).unwrap();
        s.apply(create("denied", 1, 0)).unwrap();
        s.apply(decide("denied", "alice", false, 30)).unwrap();
        s.apply(create("expired", 1, 0)).unwrap(); // expires at 60_000
        s.apply(create("approved", 1, 100)).unwrap(); // expires at 60_100
        s.apply(decide("approved", "bob", true, 110)).unwrap();
        s.apply(create("pending", 1, 1_000)).unwrap();
        s.apply(create("late", 1, 50_000)).unwrap();
        s.apply(decide("late", "alice", false, 70_000)).unwrap();
        let grant = |id: &str, not_after, revoked_at| Command::CreateGrant {
            grant: Grant {
                id: id.into(),
                subject: "agent".into(),
                issuer: ISSUER.into(),
                scope: Scope::new("postgres", "app"),
                access_class: "write".into(),
                not_before: 0,
                not_after,
                granted_by: "alice".into(),
                revoked_at,
                reason: None,
            },
        };
        s.apply(grant("g-over", 50_000, None)).unwrap();
        s.apply(grant("g-revoked", 900_000, Some(40))).unwrap();
        s.apply(grant("g-live", 900_000, None)).unwrap();

        let mut replica = s.clone();
        assert!(!s.purgeable(10));
        assert_eq!(
            s.apply(Command::Purge { cutoff: 10 }).unwrap(),
            Applied::Purged {
                requests: 0,
                grants: 0
            }
        );
        assert!(s.purgeable(60_000));
        let purge = Command::Purge { cutoff: 60_000 };
        let purged = s.apply(purge.clone()).unwrap();
        assert_eq!(replica.apply(purge), Ok(purged.clone()));
        assert_eq!(s, replica);
        assert_eq!(
            purged,
            Applied::Purged {
                requests: 3,
                grants: 2
            }
        );
        let left: Vec<&str> = s.requests.keys().map(AsRef::as_ref).collect();
        // "pending" expires at 61_000, "approved" at 60_100: both still live at the cutoff.
        assert_eq!(left, ["approved", "late", "pending"]);
        assert_eq!(s.grants.keys().collect::<Vec<_>>(), [&"g-live".into()]);
        assert!(!s.purgeable(60_000));
        s.apply(Command::Purge { cutoff: 69_999 }).unwrap();
        assert_eq!(s.requests.keys().collect::<Vec<_>>(), [&"late".into()]);
        s.apply(Command::Purge { cutoff: 70_000 }).unwrap();
        assert!(s.requests.is_empty());
    }

    #[test]
    fn grants_cover_their_window_until_revoked() {
        let mut s = State::default();
        let app = Scope::new("postgres", "app");
        let grant = Grant {
            id: "g1".into(),
            subject: "agent".into(),
            issuer: ISSUER.into(),
            scope: Scope::new("postgres", "app"),
            access_class: "write".into(),
            not_before: 100,
            not_after: 200,
            granted_by: "alice".into(),
            revoked_at: None,
            reason: None,
        };
        s.apply(Command::CreateGrant {
            grant: grant.clone(),
        })
        .unwrap();
        assert!(s.active_grant("agent", ISSUER, &app, "write", 99).is_none());
        assert!(s
            .active_grant("agent", ISSUER, &app, "write", 150)
            .is_some());
        // The same subject from another identity provider is someone else.
        assert!(s
            .active_grant("agent", "https://other.example", &app, "write", 150)
            .is_none());
        assert!(s.active_grant("agent", ISSUER, &app, "read", 150).is_none());
        assert!(s
            .active_grant("agent", ISSUER, &app, "write", 200)
            .is_none());
        s.apply(Command::RevokeGrant {
            id: "g1".into(),
            now: 160,
        })
        .unwrap();
        assert!(s
            .active_grant("agent", ISSUER, &app, "write", 170)
            .is_none());
        let empty = Grant {
            id: "g2".into(),
            not_after: 100,
            ..grant
        };
        assert!(matches!(
            s.apply(Command::CreateGrant { grant: empty }),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn checkpoints_only_move_forward() {
        let mut s = State::default();
        let cp = |seq, hash: &str| Command::PutCheckpoint {
            checkpoint: Checkpoint {
                stream: "n1:1".into(),
                seq,
                hash: hash.into(),
                time_ms: seq,
                signature: "sig".into(),
                public_key: "key".into(),
            },
            now: 7,
        };
        s.apply(cp(10, "a")).unwrap();
        s.apply(cp(10, "a")).unwrap();
        assert!(matches!(
            s.apply(cp(10, "b")),
            Err(DomainError::CheckpointConflict { .. })
        ));
        assert!(matches!(
            s.apply(cp(9, "c")),
            Err(DomainError::CheckpointRegression { .. })
        ));
        s.apply(cp(20, "d")).unwrap();
        assert_eq!(s.checkpoints["n1:1"].seq, 20);
        let mut foreign = cp(30, "e");
        if let Command::PutCheckpoint { checkpoint, .. } = &mut foreign {
            checkpoint.public_key = "another key".into();
        }
        assert!(matches!(
            s.apply(foreign),
            Err(DomainError::CheckpointKey(_))
        ));
    }

    #[test]
    fn a_nodes_first_key_is_its_key_for_good() {
        let mut s = State::default();
        let cp = |stream: &str, key: &str| Command::PutCheckpoint {
            checkpoint: Checkpoint {
                stream: stream.into(),
                seq: 0,
                hash: "h".into(),
                time_ms: 1,
                signature: "sig".into(),
                public_key: key.into(),
            },
            now: 42,
        };
        s.apply(cp("gw-1:100", "k1")).unwrap();
        assert_eq!(
            *s.node_keys["gw-1"],
            NodeKey {
                public_key: "k1".into(),
                first_stream: "gw-1:100".into(),
                registered_at: 42,
            }
        );
        // A new stream of the same node with another key: refused, nothing changes.
        let before = s.clone();
        assert!(matches!(
            s.apply(cp("gw-1:200", "k2")),
            Err(DomainError::NodeKey { .. })
        ));
        assert_eq!(s, before);
        // With its key: taken. Another node registers its own.
        s.apply(cp("gw-1:200", "k1")).unwrap();
        s.apply(cp("gw-2:100", "k2")).unwrap();
        assert_eq!(s.node_keys["gw-2"].public_key, "k2");
        assert_eq!(s.node_keys["gw-1"].first_stream, "gw-1:100");
        // A stream id that names no node.
        assert!(matches!(
            s.apply(cp("no-epoch", "k1")),
            Err(DomainError::Invalid(_))
        ));
    }

    /// Random command sequences applied to two replicas: same state, and the invariants hold.
    #[test]
    fn replicas_agree_and_invariants_hold_under_random_commands() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut a, mut b) = (State::default(), State::default());
        let mut consumed_ok = BTreeMap::<String, u32>::new();
        for step in 0..5_000u64 {
            let id = format!("r{}", next(40));
            let now = step * 10;
            let cmd = match next(4) {
                0 => create(&id, 1 + next(2) as u32, now),
                1 => decide(
                    &id,
                    ["alice", "bob", "agent"][next(3) as usize],
                    next(4) != 0,
                    now,
                ),
                2 => consume(now),
                _ => decide(&id, "carol", true, now),
            };
            let is_consume = matches!(cmd, Command::Consume { .. });
            let ra = a.apply(cmd.clone());
            let rb = b.apply(cmd);
            assert_eq!(ra, rb);
            if let (true, Ok(Applied::Request(r))) = (is_consume, &ra) {
                if r.state == RequestState::Consumed {
                    *consumed_ok.entry(r.asked.id.clone()).or_default() += 1;
                }
            }
        }
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert!(
            consumed_ok.values().all(|&n| n == 1),
            "consumed at most once"
        );
        for r in a.requests.values() {
            let approvals = r.votes.iter().filter(|v| v.approve).count() as u32;
            let denials = r.votes.iter().filter(|v| !v.approve).count();
            match r.state {
                RequestState::Denied => assert_eq!(denials, 1),
                RequestState::Approved | RequestState::Consumed => {
                    assert_eq!(denials, 0);
                    assert!(approvals >= r.asked.approvals_required);
                }
                RequestState::Pending => assert_eq!(denials, 0),
            }
            assert!(r
                .votes
                .iter()
                .all(|v| v.approver != r.asked.requester.subject));
        }
    }

    /// Every command kind, accepted and refused: what it changes is exactly what it reports
    /// (the store writes only that), and a refused command reports nothing.
    #[test]
    fn every_change_is_reported() {
        let grant = prod_grant;
        let checkpoint = |stream: &str, seq| Command::PutCheckpoint {
            checkpoint: Checkpoint {
                stream: stream.into(),
                seq,
                hash: format!("h{seq}"),
                time_ms: seq,
                signature: "sig".into(),
                public_key: "key".into(),
            },
            now: 7,
        };
        let mark = |key: &str, until| Command::Mark {
            key: key.into(),
            until,
            now: 1,
        };
        let script = [
            create("r1", 1, 0),
            create("r1", 1, 0),
            create("r2", 2, 0),
            decide("r1", "alice", true, 1),
            decide("r1", "bob", true, 2),
            decide("r2", "alice", true, 2),
            decide("r2", "bob", false, 3),
            consume(4),
            consume(5),
            grant("g1"),
            grant("g1"),
            Command::RevokeGrant {
                id: "g1".into(),
                now: 50,
            },
            Command::RevokeGrant {
                id: "g1".into(),
                now: 60,
            },
            checkpoint("n1:1", 10),
            checkpoint("n1:1", 9),
            checkpoint("n1:2", 1),
            mark("logout:a", 10),
            mark("logout:a", 20),
            mark("nokind", 20),
            Command::Batch(vec![create("r3", 1, 30), decide("r3", "alice", false, 31)]),
            Command::Batch(vec![Command::Batch(vec![])]),
            Command::Purge { cutoff: 1_000_000 },
        ];
        let mut s = State::default();
        for cmd in script {
            let before = s.clone();
            let mut changed = Vec::new();
            let result = s.apply_noting(cmd.clone(), &mut changed);
            if result.is_err() {
                assert!(changed.is_empty(), "{cmd:?} refused, reported {changed:?}");
            }
            let differing = before.differences(&s);
            for d in &differing {
                assert!(changed.contains(d), "{cmd:?}: {d:?} changed, not reported");
            }
        }
        assert!(s.requests.is_empty() && s.marks.is_empty(), "purged");
    }
}
