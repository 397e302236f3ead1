//! The gRPC services of one coordinator member: `Coordinator` (nodes and operators), `Cluster`
//! (membership) and `Raft` (members), with their authentication.
//!
//! Who may call what:
//! - gateway nodes and members present the cluster token (`x-vigil-cluster-token`);
//! - operators present an OIDC token (`authorization: Bearer …`), verified by the
//!   [`OperatorAuth`] the member was started with; decisions are recorded under the identity
//!   the token proves, never one the request names;
//! - grants need an operator in the admin group (or the cluster token, for automation);
//! - membership changes need the cluster token, or an operator in the admin group only where
//!   members speak TLS to each other (see [`Shared::membership_change`]); the embedded
//!   coordinator refuses them all.
//!
//! The caller is authenticated once, from the request's headers, before its body is read
//! ([`crate::gate`]); the methods here decide from that [`Caller`] what it may do.
//!
//! Writes go through Raft (`client_write`); reads that authorise an action first confirm
//! leadership with `ensure_linearizable`. A member that is not the leader answers `UNAVAILABLE`
//! with the leader's address in `x-vigil-leader`.

use crate::approvals::{
    ActionKey, Actor, Applied, ApprovalRequest, Checkpoint, Command, DomainError, Grant, Millis,
    NewRequest, Scope, Shown, ShownBinding, ShownCommand, ShownParam, ShownRequest,
};
use crate::metrics::Metrics;
use crate::store::{NodeId, Raft, StateMachine};
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{BasicNode, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::HeaderMap;
use tonic::{Request, Response, Status};
use vigil_proto::coordinator as pb;

/// Metadata key carrying the cluster token (nodes and members).
pub const CLUSTER_TOKEN_HEADER: &str = "x-vigil-cluster-token";
/// Metadata key naming the leader's address on an `UNAVAILABLE` answer.
pub const LEADER_HEADER: &str = "x-vigil-leader";
/// How long a write may wait for its commit before the caller hears "outcome unknown".
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a mark is kept (a login lasts no longer than its token, an assertion no longer
/// than its conditions).
const MAX_MARK_AGE: Millis = 7 * 24 * 3600 * 1000;
/// The longest window a grant may have, in minutes: a week, the console's cap. Longer access is
/// a rule, not a grant.
pub const MAX_GRANT_MINUTES: u64 = 7 * 24 * 60;
/// How far before the leader's "now" a grant may start: the caller's clock may be behind.
const GRANT_START_SKEW: Millis = 5 * 60 * 1000;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Verifies an operator's bearer token and says who it names.
pub trait OperatorAuth: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>>;

    /// Where the person key comes from, when one is configured (what a refusal names): a
    /// decision by an operator whose token carries none ([`Actor::person`]) is refused, since
    /// who they are across identity providers cannot be told.
    fn person_key(&self) -> Option<&str> {
        None
    }
}

/// Who is calling, as the gate established it ([`Shared::authenticate`]).
#[derive(Clone, Debug)]
pub enum Caller {
    /// A gateway node or a member: holds the cluster token.
    Member,
    Operator(Actor),
}

impl Caller {
    /// Only holders of the cluster token: gateway nodes and members.
    pub fn member(&self) -> Result<(), Status> {
        match self {
            Caller::Member => Ok(()),
            Caller::Operator(_) => Err(Status::permission_denied(
                "only gateway nodes and members (cluster token) may call this",
            )),
        }
    }
}

/// The caller the gate authenticated and put in the request's extensions. None (a service
/// served without its gate) is refused: nothing is answered unauthenticated.
fn caller<T>(req: &Request<T>) -> Result<&Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("this call was not authenticated"))
}

fn member<T>(req: &Request<T>) -> Result<(), Status> {
    caller(req)?.member()
}

fn operator<T>(req: &Request<T>) -> Result<Actor, Status> {
    match caller(req)? {
        Caller::Operator(a) => Ok(a.clone()),
        Caller::Member => Err(Status::permission_denied(
            "this call needs an operator's OIDC token: the decision is recorded under it",
        )),
    }
}

/// What every service of one member shares.
pub struct Shared {
    pub proposer: Proposer,
    pub id: NodeId,
    /// The address other members and clients reach this member at.
    pub advertise: String,
    pub raft: Raft,
    pub sm: StateMachine,
    pub cluster_token: Arc<str>,
    pub operators: Option<Arc<dyn OperatorAuth>>,
    pub admin_group: String,
    pub metrics: Arc<Metrics>,
    /// TLS on the gRPC port: `Raft` RPCs then need a member's client certificate.
    pub tls: bool,
    /// A gateway node's in-process member: its membership never changes.
    pub embedded: bool,
}

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Compares secrets without an early exit.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// Who presented the credentials in `headers`: the cluster token (compared in constant
    /// time), or an operator token the [`OperatorAuth`] verifies. Runs in the gate, before the
    /// request's body is read.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        if let Some(token) = headers.get(CLUSTER_TOKEN_HEADER) {
            return if same_secret(token.as_bytes(), self.cluster_token.as_bytes()) {
                Ok(Caller::Member)
            } else {
                Err(Status::unauthenticated(
                    "the cluster token is not this cluster's",
                ))
            };
        }
        if let Some(auth) = headers.get("authorization") {
            let bearer = auth
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
            let verifier = self.operators.as_ref().ok_or_else(|| {
                Status::unauthenticated(
                    "this coordinator accepts no operator tokens (a member without [identity], \
                     or an embedded one without coordinator.operator_audiences)",
                )
            })?;
            return verifier
                .authenticate(bearer.trim())
                .await
                .map(Caller::Operator)
                .map_err(|why| Status::unauthenticated(format!("operator token refused: {why}")));
        }
        Err(Status::unauthenticated(
            "no credentials: nodes send x-vigil-cluster-token, operators authorization: Bearer <OIDC token>",
        ))
    }

    /// The cluster token, or an operator in the admin group; answers who, for the record.
    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match caller(req)? {
            Caller::Member => Ok("cluster-token".into()),
            Caller::Operator(a) if a.groups.contains(&self.admin_group) => Ok(a.subject.clone()),
            Caller::Operator(a) => Err(Status::permission_denied(format!(
                "{} is not in the admin group {}",
                a.subject, self.admin_group
            ))),
        }
    }

    /// Who may add or remove a member; answers who, for the log.
    ///
    /// A new member gets the leader's Raft RPCs at once, and every one carries the cluster
    /// token, with which the holder is the cluster (creates requests in anyone's name, consumes
    /// approvals, registers checkpoints). So whoever names the address must already hold the
    /// token, unless TLS protects it: with `[member.tls]` the leader sends nothing to a peer
    /// whose certificate the cluster CA did not issue. The embedded coordinator is a cluster of
    /// one with a token only its process knows: it has nothing to add or remove.
    fn membership_change<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let caller = caller(req)?;
        if self.embedded {
            return Err(Status::failed_precondition(
                "the embedded coordinator is a single in-process member: its membership does \
                 not change (run separate vigil-coordinator members for a cluster, \
                 docs/operations.md)",
            ));
        }
        match caller {
            Caller::Member => Ok("cluster-token".into()),
            Caller::Operator(a) if !self.tls => Err(Status::permission_denied(format!(
                "{} may not change membership with an operator token: these members speak \
                 without TLS, so the leader would send the cluster token in the clear to the \
                 address named; use the cluster token (--cluster-token-env), or configure \
                 [member.tls]",
                a.subject
            ))),
            Caller::Operator(a) if a.groups.contains(&self.admin_group) => Ok(a.subject.clone()),
            Caller::Operator(a) => Err(Status::permission_denied(format!(
                "{} is not in the admin group {}",
                a.subject, self.admin_group
            ))),
        }
    }

    /// The operator's login: the mark of their verified bearer token (`logout:` and its
    /// SHA-256).
    fn login<T>(&self, req: &Request<T>) -> Result<String, Status> {
        use sha2::Digest as _;
        operator(req)?;
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        Ok(format!(
            "logout:{}",
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        ))
    }

    async fn write(&self, cmd: Command) -> Result<Applied, Status> {
        self.proposer.propose(cmd).await
    }

    /// Confirms, with a quorum, that this member leads and has applied everything committed
    /// before the call: what it then reads is not stale.
    async fn linearizable(&self) -> Result<(), Status> {
        let checked = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.ensure_linearizable())
            .await
            .map_err(|_| Status::unavailable("leadership could not be confirmed in time"))?;
        match checked {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(not_leader(f)),
            Err(e) => Err(Status::unavailable(format!(
                "cannot confirm leadership: {e}"
            ))),
        }
    }

    /// Whether `caller` may read this request: nodes and admins read all; an operator reads
    /// the requests they asked for or may decide.
    fn may_read(&self, caller: &Caller, r: &ApprovalRequest) -> bool {
        match caller {
            Caller::Member => true,
            Caller::Operator(a) => {
                a.groups.contains(&self.admin_group)
                    || a.groups.contains(&r.asked.approver_group)
                    || a.is(&r.asked.requester)
            }
        }
    }

    /// One request as `caller` may see it (not found when they may not).
    fn visible_request(&self, caller: &Caller, id: &str) -> Result<pb::Approval, Status> {
        self.sm
            .read(|s| {
                s.requests
                    .get(id)
                    .filter(|r| self.may_read(caller, r))
                    .map(|r| approval_pb(r, now_ms()))
            })
            .ok_or_else(|| Status::not_found(format!("no approval request {id}")))
    }

    fn request_view(&self, id: &str) -> Result<pb::Approval, Status> {
        self.sm
            .read(|s| s.requests.get(id).map(|r| approval_pb(r, now_ms())))
            .ok_or_else(|| Status::not_found(format!("no approval request {id}")))
    }
}

type Waiting = (
    Command,
    tokio::sync::oneshot::Sender<Result<Applied, Status>>,
);

/// Proposes commands to Raft in batches: the commands that arrive while earlier batches are
/// being committed go into one entry (a [`Command::Batch`]), so the per-entry cost of Raft is
/// shared. Two batches are in flight at once ([`IN_FLIGHT`]).
pub struct Proposer {
    queue: tokio::sync::mpsc::Sender<Waiting>,
}

/// Commands in one entry, at most.
const MAX_BATCH: usize = 512;
/// Batches committing at once: one being committed while the next fills. openraft 0.9's
/// leader writes each entry to its log and waits for the fsync before it does anything else,
/// and sends each follower one AppendEntries at a time, so more batches in flight only make
/// more, smaller entries for the same rounds (bench.sh coordinator, 64 callers, back to back:
/// 4 in flight 5,552-5,739 creates/s, p99 23-26 ms; 2 in flight 8,412-9,079/s, p99 14-16 ms).
const IN_FLIGHT: usize = 2;

impl Proposer {
    pub fn start(raft: Raft, metrics: Arc<Metrics>) -> Self {
        let (queue, mut waiting) = tokio::sync::mpsc::channel::<Waiting>(8 * MAX_BATCH);
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = waiting.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match waiting.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let raft = raft.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    commit(&raft, batch, &metrics).await;
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    pub(crate) async fn propose(&self, cmd: Command) -> Result<Applied, Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue
            .send((cmd, tx))
            .await
            .map_err(|_| Status::unavailable("this member is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("this member is shutting down"))?
    }
}

/// Commits one batch and answers each of its callers.
async fn commit(raft: &Raft, mut batch: Vec<Waiting>, metrics: &Metrics) {
    let (entry, single) = if batch.len() == 1 {
        (batch[0].0.clone(), true)
    } else {
        (
            Command::Batch(batch.iter().map(|(c, _)| c.clone()).collect()),
            false,
        )
    };
    let started = std::time::Instant::now();
    let committed = tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(entry)).await;
    if matches!(committed, Ok(Ok(_))) {
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
    } else {
        metrics.commit_errors.inc();
    }
    let answer: Result<Vec<Result<Applied, DomainError>>, Status> = match committed {
        Err(_) => Err(Status::deadline_exceeded(
            "the write was not committed in time (no quorum?); its outcome is unknown",
        )),
        Ok(Ok(resp)) => match resp.data.0 {
            Some(Ok(Applied::Batch(results))) if !single => Ok(results),
            Some(result) if single => Ok(vec![result]),
            _ => Err(Status::internal("the command produced no reply")),
        },
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(not_leader(f)),
        Ok(Err(e)) => Err(Status::unavailable(format!("cannot commit: {e}"))),
    };
    match answer {
        Ok(results) if results.len() == batch.len() => {
            for ((_, tx), result) in batch.drain(..).zip(results) {
                let _ = tx.send(result.map_err(domain_status));
            }
        }
        Ok(_) => {
            for (_, tx) in batch.drain(..) {
                let _ = tx.send(Err(Status::internal(
                    "a batch answered with the wrong count",
                )));
            }
        }
        Err(status) => {
            // The same answer for every caller, the leader's address included.
            for (_, tx) in batch.drain(..) {
                let _ = tx.send(Err(status.clone()));
            }
        }
    }
}

fn not_leader(f: ForwardToLeader<NodeId, BasicNode>) -> Status {
    let addr = f.leader_node.map(|n| n.addr);
    let mut status = Status::unavailable(match &addr {
        Some(a) => format!("not the leader; the leader is {a}"),
        None => "not the leader; no leader is known yet".to_string(),
    });
    if let Some(v) = addr.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(LEADER_HEADER, v);
    }
    status
}

fn domain_status(e: DomainError) -> Status {
    let msg = e.to_string();
    match e {
        DomainError::NotFound(_) => Status::not_found(msg),
        DomainError::Duplicate(_) => Status::already_exists(msg),
        DomainError::SelfApproval | DomainError::NotApprover(_) => Status::permission_denied(msg),
        DomainError::Invalid(_) => Status::invalid_argument(msg),
        DomainError::AlreadyDecided
        | DomainError::AlreadyVoted(_)
        | DomainError::Expired
        | DomainError::NothingToConsume
        | DomainError::CheckpointRegression { .. }
        | DomainError::CheckpointConflict { .. }
        | DomainError::CheckpointKey(_)
        | DomainError::NodeKey { .. } => Status::failed_precondition(msg),
    }
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn actor_pb(a: &Actor) -> pb::Actor {
    pb::Actor {
        subject: a.subject.clone(),
        groups: a.groups.clone(),
        issuer: a.issuer.clone(),
        person: a.person.clone().unwrap_or_default(),
    }
}

fn scope_from_pb(s: Option<pb::Scope>) -> Result<Scope, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("scope is required"))?;
    let scope = Scope {
        protocol: s.protocol,
        target: s.target,
    };
    match scope.invalid() {
        Some(why) => Err(Status::invalid_argument(format!("scope: {why}"))),
        None => Ok(scope),
    }
}

fn key_from_pb(k: Option<pb::ActionKey>) -> Result<ActionKey, Status> {
    let k = k.ok_or_else(|| Status::invalid_argument("key is required"))?;
    required("key.hash", &k.hash)?;
    Ok(ActionKey {
        scope: scope_from_pb(k.scope)?,
        hash: k.hash,
    })
}

fn shown_from_pb(s: pb::ShownAction) -> Option<Shown> {
    match s.protocol? {
        pb::shown_action::Protocol::Postgres(b) => Some(Shown::Postgres(binding_from_pb(b))),
        pb::shown_action::Protocol::Ssh(c) => Some(Shown::Ssh(ShownCommand {
            login: c.login,
            request_type: c.request_type,
            command: c.command,
        })),
        pb::shown_action::Protocol::Kubernetes(r) => Some(Shown::Kubernetes(ShownRequest {
            method: r.method,
            path: r.path,
            body: r.body,
            body_sha256: r.body_sha256,
        })),
    }
}

fn shown_pb(s: &Shown) -> pb::ShownAction {
    let protocol = match s {
        Shown::Postgres(b) => pb::shown_action::Protocol::Postgres(binding_pb(b)),
        Shown::Ssh(c) => pb::shown_action::Protocol::Ssh(pb::SshCommand {
            login: c.login.clone(),
            request_type: c.request_type.clone(),
            command: c.command.clone(),
        }),
        Shown::Kubernetes(r) => pb::shown_action::Protocol::Kubernetes(pb::KubeRequest {
            method: r.method.clone(),
            path: r.path.clone(),
            body: r.body.clone(),
            body_sha256: r.body_sha256.clone(),
        }),
    };
    pb::ShownAction {
        protocol: Some(protocol),
    }
}

fn binding_from_pb(b: pb::StatementBinding) -> ShownBinding {
    ShownBinding {
        mode: b.mode,
        text: b.text,
        runs: b.runs.into_iter().map(|r| (r.name, r.text)).collect(),
        params: b
            .params
            .into_iter()
            .map(|p| ShownParam {
                value: (!p.null).then_some(p.value),
                binary: p.binary,
                type_oid: p.type_oid,
            })
            .collect(),
        database: b.database,
        role: b.role,
        search_path: b.search_path,
        settings: b.settings,
    }
}

fn binding_pb(b: &ShownBinding) -> pb::StatementBinding {
    pb::StatementBinding {
        mode: b.mode.clone(),
        text: b.text.clone(),
        runs: b
            .runs
            .iter()
            .map(|(name, text)| pb::PreparedStatement {
                name: name.clone(),
                text: text.clone(),
            })
            .collect(),
        params: b
            .params
            .iter()
            .map(|p| pb::Parameter {
                null: p.value.is_none(),
                value: p.value.clone().unwrap_or_default(),
                binary: p.binary,
                type_oid: p.type_oid,
            })
            .collect(),
        database: b.database.clone(),
        role: b.role.clone(),
        search_path: b.search_path.clone(),
        settings: b.settings.clone(),
    }
}

pub fn approval_pb(r: &ApprovalRequest, now: Millis) -> pb::Approval {
    let a = &r.asked;
    pb::Approval {
        id: a.id.clone(),
        requester: Some(actor_pb(&a.requester)),
        key: Some(pb::ActionKey::from(&a.key)),
        action: a.action.clone(),
        shown: a.shown.as_deref().map(shown_pb),
        reason: a.reason.clone().unwrap_or_default(),
        created_at_ms: r.created_at,
        expires_at_ms: r.expires_at,
        approver_group: a.approver_group.clone(),
        approvals_required: a.approvals_required,
        votes: r
            .votes
            .iter()
            .map(|v| pb::Vote {
                approver: v.approver.clone(),
                approve: v.approve,
                comment: v.comment.clone().unwrap_or_default(),
                at_ms: v.at,
            })
            .collect(),
        state: r.state_at(now).to_string(),
        consumed_at_ms: r.consumed_at.unwrap_or(0),
        node: a.node.clone(),
        rule: a.rule.clone(),
        summarized: false,
    }
}

/// A request whose action and shown action together are larger than this is listed
/// summarised ([`listed`]).
pub const LISTED_WHOLE: usize = 16 * 1024;
/// How much of a summarised request's action a list carries.
pub const SUMMARY_ACTION: usize = 1024;
/// A list page ends once it holds this much (at least one request): with requests of up to
/// [`LISTED_WHOLE`], a page stays within a client's default 4 MiB message limit.
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// `a` as a list carries it: whole when it is small; otherwise its action cut to its first
/// [`SUMMARY_ACTION`] bytes, its shown action left out and `summarized` set, so that a few
/// requests of megabytes (a statement may be shown up to 2 MiB) cannot make every list too
/// large to answer. `GetApproval` answers a request whole.
fn listed(mut a: pb::Approval) -> pb::Approval {
    use prost::Message as _;
    let size = a.action.len() + a.shown.as_ref().map_or(0, |s| s.encoded_len());
    if size <= LISTED_WHOLE {
        return a;
    }
    let mut end = SUMMARY_ACTION.min(a.action.len());
    while !a.action.is_char_boundary(end) {
        end -= 1;
    }
    a.action.truncate(end);
    a.shown = None;
    a.summarized = true;
    a
}

fn grant_pb(g: &Grant) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        subject: g.subject.clone(),
        issuer: g.issuer.clone(),
        scope: Some(pb::Scope::from(&g.scope)),
        access_class: g.access_class.clone(),
        not_before_ms: g.not_before,
        not_after_ms: g.not_after,
        granted_by: g.granted_by.clone(),
        revoked_at_ms: g.revoked_at.unwrap_or(0),
        reason: g.reason.clone().unwrap_or_default(),
    }
}

fn expect_request(applied: Applied, now: Millis) -> Result<pb::Approval, Status> {
    match applied {
        Applied::Request(r) => Ok(approval_pb(&r, now)),
        _ => Err(Status::internal("unexpected reply")),
    }
}

fn expect_grant(applied: Applied) -> Result<pb::Grant, Status> {
    match applied {
        Applied::Grant(g) => Ok(grant_pb(&g)),
        _ => Err(Status::internal("unexpected reply")),
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Requests in one page of `ListApprovals`, at most (and when the caller names no limit).
pub const PAGE_SIZE: usize = 1000;
/// The largest approval request a node may create (as sent), so that every request can be read
/// back whole (`GetApproval`, `WatchApproval`) with its votes: half the largest message a
/// client reads ([`crate::server::MAX_MESSAGE`]). A node sends at most about 4 MiB (a statement
/// shown up to 2 MiB, and the same text as its action). It is the `Coordinator` service's
/// limit on any message it reads, so a larger one is refused (`OUT_OF_RANGE`) as its length is
/// read, before it is.
pub const MAX_REQUEST: usize = crate::server::MAX_MESSAGE / 2;
/// The longest comment a vote may carry, in bytes.
pub const MAX_COMMENT: usize = 4096;

/// Where a page token (`<created ms>.<id>`, the last request of the previous page) points.
fn page_position(token: &str) -> Result<(Millis, String), Status> {
    token
        .split_once('.')
        .and_then(|(t, id)| Some((t.parse().ok()?, id.to_string())))
        .filter(|(_, id)| !id.is_empty())
        .ok_or_else(|| Status::invalid_argument(format!("not a page token: {token:?}")))
}

/// A fresh random id with a readable prefix (`g-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

pub struct CoordinatorService(pub Arc<Shared>);

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn create_approval(
        &self,
        req: Request<pb::CreateApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        member(&req)?;
        let r = req.into_inner();
        required("id", &r.id)?;
        let key = key_from_pb(r.key)?;
        let requester = r
            .requester
            .filter(|a| !a.subject.is_empty())
            .ok_or_else(|| Status::invalid_argument("requester.subject is required"))?;
        let now = now_ms();
        let cmd = Command::CreateRequest {
            request: NewRequest {
                id: r.id,
                requester: Actor {
                    subject: requester.subject,
                    groups: requester.groups,
                    issuer: requester.issuer,
                    person: opt(requester.person),
                },
                key,
                action: r.action,
                reason: opt(r.reason),
                ttl: r.ttl_ms,
                approver_group: r.approver_group,
                approvals_required: r.approvals_required,
                node: r.node,
                rule: r.rule,
                shown: r.shown.and_then(shown_from_pb).map(Box::new),
            },
            now,
        };
        Ok(Response::new(expect_request(
            self.0.write(cmd).await?,
            now,
        )?))
    }

    async fn consume_approval(
        &self,
        req: Request<pb::ConsumeApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        member(&req)?;
        let r = req.into_inner();
        required("subject", &r.subject)?;
        let key = key_from_pb(r.key)?;
        required("attempt", &r.attempt)?;
        let now = now_ms();
        let cmd = Command::Consume {
            subject: r.subject,
            issuer: r.issuer,
            key,
            attempt: r.attempt,
            request: (!r.request_id.is_empty()).then_some(r.request_id),
            now,
        };
        Ok(Response::new(expect_request(
            self.0.write(cmd).await?,
            now,
        )?))
    }

    type WatchApprovalStream = ReceiverStream<Result<pb::Approval, Status>>;

    async fn watch_approval(
        &self,
        req: Request<pb::ApprovalId>,
    ) -> Result<Response<Self::WatchApprovalStream>, Status> {
        let caller = caller(&req)?.clone();
        // From the leader, up to date: a member that has not applied the request yet (a new
        // leader just after an election, a lagging follower) would call it unknown.
        self.0.linearizable().await?;
        let id = req.into_inner().id;
        let first = self.0.visible_request(&caller, &id)?;
        let shared = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut applied = shared.sm.subscribe();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                let now = now_ms();
                if !matches!(last.state.as_str(), "pending" | "approved") {
                    return; // settled: nothing will change any more
                }
                let until_expiry = last.expires_at_ms.saturating_sub(now).max(1);
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(until_expiry)) => {}
                    _ = tx.closed() => return,
                }
                let Ok(view) = shared.request_view(&id) else {
                    return;
                };
                if view != last {
                    last = view;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_approval(
        &self,
        req: Request<pb::ApprovalId>,
    ) -> Result<Response<pb::Approval>, Status> {
        let caller = caller(&req)?.clone();
        self.0.linearizable().await?;
        Ok(Response::new(
            self.0.visible_request(&caller, &req.into_inner().id)?,
        ))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ApprovalList>, Status> {
        let caller = caller(&req)?.clone();
        let r = req.into_inner();
        let after = match r.page_token.as_str() {
            "" => None,
            t => Some(page_position(t)?),
        };
        let limit = match r.limit {
            0 => PAGE_SIZE,
            n => (n as usize).min(PAGE_SIZE),
        };
        self.0.linearizable().await?;
        let now = now_ms();
        let (approvals, more) = self.0.sm.read(|s| {
            // Newest first: (created, id) descending; a page starts below the token's position.
            let mut found: Vec<&ApprovalRequest> = s
                .requests
                .values()
                .map(Arc::as_ref)
                .filter(|q| r.state.is_empty() || q.state_at(now) == r.state)
                .filter(|q| self.0.may_read(&caller, q))
                .filter(|q| {
                    after
                        .as_ref()
                        .is_none_or(|(t, id)| (q.created_at, q.id()) < (*t, id.as_str()))
                })
                .collect();
            found.sort_by(|a, b| (b.created_at, b.id()).cmp(&(a.created_at, a.id())));
            let mut page = Vec::new();
            let mut bytes = 0;
            for q in found.iter().take(limit) {
                let a = listed(approval_pb(q, now));
                let size = prost::Message::encoded_len(&a);
                if !page.is_empty() && bytes + size > PAGE_BYTES {
                    break;
                }
                bytes += size;
                page.push(a);
            }
            let more = found.len() > page.len();
            (page, more)
        });
        let next_page_token = match approvals.last() {
            Some(last) if more => format!("{}.{}", last.created_at_ms, last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ApprovalList {
            approvals,
            next_page_token,
        }))
    }

    async fn decide_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let approver = operator(&req)?;
        let person_key = self.0.operators.as_ref().and_then(|o| o.person_key());
        if let (Some(key), None) = (person_key, &approver.person) {
            return Err(Status::permission_denied(format!(
                "{} cannot decide: the token names no person ({key}), so whether they asked \
                 for the request under another identity cannot be told",
                approver.subject
            )));
        }
        let r = req.into_inner();
        required("id", &r.id)?;
        if r.comment.len() > MAX_COMMENT {
            return Err(Status::invalid_argument(format!(
                "the comment is longer than {MAX_COMMENT} bytes"
            )));
        }
        let now = now_ms();
        let cmd = Command::Decide {
            id: r.id,
            approver,
            approve: r.approve,
            comment: opt(r.comment),
            now,
        };
        Ok(Response::new(expect_request(
            self.0.write(cmd).await?,
            now,
        )?))
    }

    async fn create_grant(
        &self,
        req: Request<pb::CreateGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        // Who, as `admin` checks it, keeping the operator to compare with the grantee.
        let admin = match caller(&req)?.clone() {
            Caller::Member => None,
            Caller::Operator(a) if a.groups.contains(&self.0.admin_group) => Some(a),
            Caller::Operator(a) => {
                return Err(Status::permission_denied(format!(
                    "{} is not in the admin group {}",
                    a.subject, self.0.admin_group
                )))
            }
        };
        let r = req.into_inner();
        required("subject", &r.subject)?;
        required("issuer", &r.issuer)?;
        let by = match admin {
            None => "cluster-token".to_string(),
            Some(a) => {
                refuse_self_grant(&a, &r.subject, &r.issuer)?;
                a.subject
            }
        };
        let scope = scope_from_pb(r.scope)?;
        required("access_class", &r.access_class)?;
        let now = now_ms();
        let (not_before, not_after) =
            grant_window(r.not_before_ms, r.not_after_ms, r.duration_ms, now)?;
        let grant = Grant {
            id: new_id("g"),
            subject: r.subject,
            issuer: r.issuer,
            scope,
            access_class: r.access_class,
            not_before,
            not_after,
            granted_by: by,
            revoked_at: None,
            reason: opt(r.reason),
        };
        let applied = self.0.write(Command::CreateGrant { grant }).await?;
        Ok(Response::new(expect_grant(applied)?))
    }

    async fn revoke_grant(&self, req: Request<pb::GrantId>) -> Result<Response<pb::Grant>, Status> {
        self.0.admin(&req)?;
        let id = req.into_inner().id;
        required("id", &id)?;
        let applied = self
            .0
            .write(Command::RevokeGrant { id, now: now_ms() })
            .await?;
        Ok(Response::new(expect_grant(applied)?))
    }

    async fn list_grants(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::GrantList>, Status> {
        let caller = caller(&req)?.clone();
        self.0.linearizable().await?;
        // Nodes and admins see every grant; an operator sees their own.
        let grants = self.0.sm.read(|s| {
            s.grants
                .values()
                .map(Arc::as_ref)
                .filter(|g| match &caller {
                    Caller::Member => true,
                    Caller::Operator(a) => {
                        a.groups.contains(&self.0.admin_group)
                            || (a.subject == g.subject && a.issuer == g.issuer)
                    }
                })
                .map(grant_pb)
                .collect()
        });
        Ok(Response::new(pb::GrantList { grants }))
    }

    async fn check_grant(
        &self,
        req: Request<pb::CheckGrantRequest>,
    ) -> Result<Response<pb::CheckGrantResponse>, Status> {
        member(&req)?;
        self.0.linearizable().await?;
        let r = req.into_inner();
        let scope = scope_from_pb(r.scope)?;
        let now = now_ms();
        let grant = self.0.sm.read(|s| {
            s.active_grant(&r.subject, &r.issuer, &scope, &r.access_class, now)
                .map(grant_pb)
        });
        Ok(Response::new(pb::CheckGrantResponse { grant }))
    }

    async fn put_checkpoint(
        &self,
        req: Request<pb::Checkpoint>,
    ) -> Result<Response<pb::Checkpoint>, Status> {
        member(&req)?;
        let checkpoint = Checkpoint::from(req.into_inner());
        required("stream", &checkpoint.stream)?;
        checkpoint
            .verify()
            .map_err(|e| Status::invalid_argument(format!("checkpoint refused: {e}")))?;
        let now = now_ms();
        match self
            .0
            .write(Command::PutCheckpoint { checkpoint, now })
            .await?
        {
            Applied::Checkpoint(c) => Ok(Response::new(c.into())),
            _ => Err(Status::internal("unexpected reply")),
        }
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointList>, Status> {
        caller(&req)?;
        self.0.linearizable().await?;
        let checkpoints = self.0.sm.read(|s| {
            s.checkpoints
                .values()
                .map(|c| c.as_ref().clone().into())
                .collect()
        });
        Ok(Response::new(pb::CheckpointList { checkpoints }))
    }

    async fn end_login(
        &self,
        req: Request<pb::EndLoginRequest>,
    ) -> Result<Response<pb::LoginState>, Status> {
        let login = self.0.login(&req)?;
        let now = now_ms();
        let until = req.into_inner().until_ms.clamp(now, now + MAX_MARK_AGE);
        let mark = Command::Mark {
            key: login,
            until,
            now,
        };
        match self.0.write(mark).await? {
            Applied::Marked { at, .. } => Ok(Response::new(pb::LoginState {
                ended: true,
                ended_at_ms: at,
            })),
            _ => Err(Status::internal("unexpected reply")),
        }
    }

    async fn mark(
        &self,
        req: Request<pb::MarkRequest>,
    ) -> Result<Response<pb::MarkResult>, Status> {
        member(&req)?;
        let r = req.into_inner();
        if r.key.starts_with("logout:") {
            return Err(Status::invalid_argument(
                "logout marks are made by EndLogin, as the person",
            ));
        }
        let now = now_ms();
        let until = r.until_ms.clamp(now, now + MAX_MARK_AGE);
        let mark = Command::Mark {
            key: r.key,
            until,
            now,
        };
        match self.0.write(mark).await? {
            Applied::Marked { at, first } => Ok(Response::new(pb::MarkResult { first, at_ms: at })),
            _ => Err(Status::internal("unexpected reply")),
        }
    }

    async fn get_login_state(
        &self,
        req: Request<pb::LoginStateRequest>,
    ) -> Result<Response<pb::LoginState>, Status> {
        let login = self.0.login(&req)?;
        self.0.linearizable().await?;
        let at = self
            .0
            .sm
            .read(|s| s.marks.get(login.as_str()).map(|m| m.at));
        Ok(Response::new(pb::LoginState {
            ended: at.is_some(),
            ended_at_ms: at.unwrap_or(0),
        }))
    }

    async fn list_node_keys(
        &self,
        req: Request<pb::ListNodeKeysRequest>,
    ) -> Result<Response<pb::NodeKeyList>, Status> {
        caller(&req)?;
        self.0.linearizable().await?;
        let keys = self.0.sm.read(|s| {
            s.node_keys
                .iter()
                .map(|(node, k)| pb::NodeKey {
                    node: node.to_string(),
                    fingerprint: vigil_proto::checkpoint::fingerprint(&k.public_key)
                        .unwrap_or_default(),
                    public_key: k.public_key.clone(),
                    first_stream: k.first_stream.clone(),
                    registered_at_ms: k.registered_at,
                })
                .collect()
        });
        Ok(Response::new(pb::NodeKeyList { keys }))
    }
}

pub struct ClusterService(pub Arc<Shared>);

impl ClusterService {
    fn status(&self) -> pb::ClusterStatus {
        let m = self.0.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let member = |id: &NodeId| pb::Member {
            id: *id,
            address: membership
                .get_node(id)
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
        };
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let leader = m.current_leader.unwrap_or(0);
        pb::ClusterStatus {
            id: m.id,
            leader,
            leader_address: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()))
                .unwrap_or_default(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            voters: voters.iter().map(member).collect(),
            learners: membership.learner_ids().map(|id| member(&id)).collect(),
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
        }
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.0
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

fn membership_status(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(e.to_string())
        }
        e => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.0.admin(&req)?;
        match self
            .0
            .raft
            .initialize(first_member(self.0.id, &self.0.advertise))
            .await
        {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                return Err(Status::failed_precondition(format!(
                    "this member is initialised already: {e}"
                )))
            }
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        // A one-member cluster elects itself within an election timeout.
        let _ = self
            .0
            .raft
            .wait(Some(Duration::from_secs(5)))
            .current_leader(self.0.id, "init")
            .await;
        Ok(Response::new(self.status()))
    }

    async fn add_member(
        &self,
        req: Request<pb::Member>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let by = self.0.membership_change(&req)?;
        let m = req.into_inner();
        required("address", &m.address)?;
        if m.id == 0 {
            return Err(Status::invalid_argument("member ids start at 1"));
        }
        tracing::info!(%by, id = m.id, address = %m.address, "adding a member");
        self.0
            .raft
            .add_learner(m.id, BasicNode::new(&m.address), true)
            .await
            .map_err(membership_status)?;
        let mut voters = self.voters();
        voters.insert(m.id);
        self.0
            .raft
            .change_membership(voters, false)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(self.status()))
    }

    async fn remove_member(
        &self,
        req: Request<pb::MemberId>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let by = self.0.membership_change(&req)?;
        let id = req.into_inner().id;
        tracing::info!(%by, id, "removing a member");
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return Err(Status::not_found(format!("{id} is not a voting member")));
        }
        if voters.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last member"));
        }
        self.0
            .raft
            .change_membership(voters, false)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(self.status()))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        caller(&req)?;
        Ok(Response::new(self.status()))
    }
}

pub struct RaftService(pub Arc<Shared>);

fn decode<T: serde::de::DeserializeOwned>(msg: pb::RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&msg.json)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft message: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Response<pb::RaftMessage>, Status> {
    serde_json::to_vec(value)
        .map(|json| {
            Response::new(pb::RaftMessage {
                json,
                snapshot_data: Vec::new(),
            })
        })
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        member(&req)?;
        let rpc = decode(req.into_inner())?;
        encode(&self.0.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        member(&req)?;
        let rpc = decode(req.into_inner())?;
        encode(&self.0.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        member(&req)?;
        let mut msg = req.into_inner();
        let data = std::mem::take(&mut msg.snapshot_data);
        let mut rpc: openraft::raft::InstallSnapshotRequest<crate::store::TypeConfig> =
            decode(msg)?;
        if !data.is_empty() {
            rpc.data = data;
        }
        encode(&self.0.raft.install_snapshot(rpc).await)
    }
}

/// Refuses a grant an admin makes for someone who may be themselves: the same subject (from any
/// issuer, as for self-approval: [`Actor::maybe_same_person`]), or a subject that is the
/// admin's person key. A grant is standing access without a second person; an admin who needs
/// it asks another admin. What is not caught: the admin's other identity under another subject
/// and another person key (the grant names no person key; see docs/threat-model.md).
fn refuse_self_grant(admin: &Actor, subject: &str, issuer: &str) -> Result<(), Status> {
    let grantee = Actor {
        subject: subject.into(),
        issuer: issuer.into(),
        ..Actor::default()
    };
    let own_person = admin
        .person
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(subject));
    if admin.maybe_same_person(&grantee) || own_person {
        return Err(Status::permission_denied(format!(
            "{} may not grant access to themselves ({subject}): another admin must",
            admin.subject
        )));
    }
    Ok(())
}

/// A grant's window from the request: it starts at `not_before_ms` (0: `now`), no more than
/// [`GRANT_START_SKEW`] in the past, and ends `duration_ms` after `now` or at `not_after_ms`,
/// after it starts and at most [`MAX_GRANT_MINUTES`] later.
fn grant_window(
    not_before_ms: Millis,
    not_after_ms: Millis,
    duration_ms: Millis,
    now: Millis,
) -> Result<(Millis, Millis), Status> {
    let not_before = if not_before_ms == 0 {
        now
    } else {
        not_before_ms
    };
    let not_after = if duration_ms > 0 {
        now.saturating_add(duration_ms)
    } else {
        not_after_ms
    };
    if not_before < now.saturating_sub(GRANT_START_SKEW) {
        return Err(Status::invalid_argument(
            "the grant would start in the past (not_before_ms is more than 5 minutes ago)",
        ));
    }
    if not_after <= not_before {
        return Err(Status::invalid_argument(
            "the grant's window is empty: it must end after it starts",
        ));
    }
    if not_after - not_before > MAX_GRANT_MINUTES * 60_000 {
        return Err(Status::invalid_argument(format!(
            "a grant lasts at most {MAX_GRANT_MINUTES} minutes (7 days)"
        )));
    }
    Ok((not_before, not_after))
}

/// The single-member membership a fresh cluster starts from.
pub fn first_member(id: NodeId, addr: &str) -> BTreeMap<NodeId, BasicNode> {
    BTreeMap::from([(id, BasicNode::new(addr))])
}
