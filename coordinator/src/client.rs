//! How gateway nodes and the `vigil` CLI reach the coordinator: a list of member addresses,
//! a credential, and retries that follow the leader.
//!
//! A member that is not the leader answers `UNAVAILABLE` with the leader's address; the client
//! goes there next. An unreachable member (also `UNAVAILABLE`), or a connection that breaks
//! mid-call, makes it try the next address. Every other answer, success or error, is final. Retrying is safe because the calls that
//! change state are idempotent by construction (request ids, consume attempts) or refuse a
//! repeat with a clear error (a second vote).

use crate::network::channel;
// A member answers up to this much (tonic's default limit, 4 MiB, is below a request holding
// a statement shown at its largest, 2 MiB, with the same text as its action).
use crate::server::MAX_MESSAGE;
use crate::service::{CLUSTER_TOKEN_HEADER, LEADER_HEADER};
use crate::tls::ClientTls;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use vigil_proto::coordinator as pb;
use vigil_proto::coordinator::cluster_client::ClusterClient;
use vigil_proto::coordinator::coordinator_client::CoordinatorClient;

/// What the client presents.
#[derive(Clone)]
pub enum Credential {
    /// Gateway nodes (and members): the cluster token.
    Cluster(Arc<str>),
    /// Operators: an OIDC token.
    Bearer(String),
}

pub struct Client {
    endpoints: Vec<String>,
    metadata: MetadataMap,
    preferred: Mutex<Option<String>>,
    next: AtomicUsize,
    channels: Mutex<HashMap<String, Channel>>,
    retry_for: Duration,
    tls: Option<ClientTls>,
}

/// How long one attempt of a call may take before the call tries another member. Above the
/// time a healthy leader needs to commit (milliseconds), below the members' own commit
/// timeout (5 s), after which a leader that lost its majority would answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Worth another try elsewhere: the member is not the leader or cannot be reached, or the
/// connection broke mid-call (the member died; the call may or may not have taken effect,
/// which the idempotent calls absorb).
fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled | Code::Internal => {
            std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
                || s.message().contains("transport error")
                || s.message().contains("h2 protocol error")
        }
        _ => false,
    }
}

macro_rules! unary {
    ($(#[$doc:meta])* $name:ident, $svc:ident, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, req: $req) -> Result<$resp, Status> {
            self.call(|ch, md| {
                let mut r = Request::new(req.clone());
                *r.metadata_mut() = md;
                async move { $svc::new(ch).max_decoding_message_size(MAX_MESSAGE).$name(r).await }
            })
            .await
        }
    };
}

impl Client {
    pub fn new(endpoints: Vec<String>, credential: Credential) -> Result<Self, Status> {
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("no coordinator address given"));
        }
        let mut metadata = MetadataMap::new();
        let bad =
            |_| Status::invalid_argument("the credential has characters metadata cannot carry");
        match credential {
            Credential::Cluster(token) => {
                metadata.insert(
                    CLUSTER_TOKEN_HEADER,
                    MetadataValue::try_from(&*token).map_err(bad)?,
                );
            }
            Credential::Bearer(token) => {
                metadata.insert(
                    "authorization",
                    MetadataValue::try_from(format!("Bearer {token}")).map_err(bad)?,
                );
            }
        }
        Ok(Self {
            endpoints,
            metadata,
            preferred: Mutex::new(None),
            next: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            retry_for: Duration::from_secs(10),
            tls: None,
        })
    }

    /// Reach the members over TLS, verifying them as `tls` says (before the first call).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long to keep trying (following leaders, skipping dead members) before giving up.
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    fn target(&self) -> String {
        if let Some(p) = self
            .preferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return p;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints[i].clone()
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = channel(addr, self.tls.as_ref())
            .map_err(|e| Status::invalid_argument(format!("coordinator address {addr}: {e}")))?;
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Runs one call, following the leader and skipping unreachable members until
    /// `retry_for` has passed (an attempt under way then may take up to [`ATTEMPT_TIMEOUT`]).
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel, MetadataMap) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(20);
        loop {
            let addr = self.target();
            // A member cut off from the others may still take the call and never commit it;
            // bounded, the call moves on to another member (calls are idempotent by their ids).
            let attempt = f(self.channel(&addr)?, self.metadata.clone());
            let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::unavailable(format!(
                        "coordinator member {addr} did not answer within {ATTEMPT_TIMEOUT:?}"
                    )))
                });
            let status = match answer {
                Ok(r) => {
                    *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
                    return Ok(r.into_inner());
                }
                Err(s) if retryable(&s) => s,
                Err(s) => return Err(s),
            };
            let hint = status
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .filter(|h| *h != addr);
            *self.preferred.lock().unwrap_or_else(|p| p.into_inner()) = hint.clone();
            if Instant::now() >= deadline {
                return Err(status);
            }
            if hint.is_none() {
                tokio::time::sleep(pause).await;
                // Capped low: after a leader dies, the next attempt comes soon after the
                // election (hundreds of milliseconds), not half a second later.
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }

    unary!(
        /// Node: hold a statement for approval.
        create_approval, CoordinatorClient, pb::CreateApprovalRequest => pb::Approval);
    unary!(
        /// Node: use an approval once.
        consume_approval, CoordinatorClient, pb::ConsumeApprovalRequest => pb::Approval);
    unary!(get_approval, CoordinatorClient, pb::ApprovalId => pb::Approval);
    unary!(list_approvals, CoordinatorClient, pb::ListApprovalsRequest => pb::ApprovalList);
    unary!(decide_approval, CoordinatorClient, pb::DecideApprovalRequest => pb::Approval);
    unary!(create_grant, CoordinatorClient, pb::CreateGrantRequest => pb::Grant);
    unary!(revoke_grant, CoordinatorClient, pb::GrantId => pb::Grant);
    unary!(list_grants, CoordinatorClient, pb::ListGrantsRequest => pb::GrantList);
    unary!(check_grant, CoordinatorClient, pb::CheckGrantRequest => pb::CheckGrantResponse);
    unary!(put_checkpoint, CoordinatorClient, pb::Checkpoint => pb::Checkpoint);
    unary!(list_checkpoints, CoordinatorClient, pb::ListCheckpointsRequest => pb::CheckpointList);
    unary!(list_node_keys, CoordinatorClient, pb::ListNodeKeysRequest => pb::NodeKeyList);
    unary!(end_login, CoordinatorClient, pb::EndLoginRequest => pb::LoginState);
    unary!(get_login_state, CoordinatorClient, pb::LoginStateRequest => pb::LoginState);
    unary!(mark, CoordinatorClient, pb::MarkRequest => pb::MarkResult);
    unary!(init, ClusterClient, pb::InitRequest => pb::ClusterStatus);
    unary!(add_member, ClusterClient, pb::Member => pb::ClusterStatus);
    unary!(remove_member, ClusterClient, pb::MemberId => pb::ClusterStatus);
    unary!(status, ClusterClient, pb::StatusRequest => pb::ClusterStatus);

    /// The request's state now and after every change, until it settles.
    pub async fn watch_approval(&self, id: &str) -> Result<tonic::Streaming<pb::Approval>, Status> {
        let req = pb::ApprovalId { id: id.to_string() };
        self.call(|ch, md| {
            let mut r = Request::new(req.clone());
            *r.metadata_mut() = md;
            async move {
                CoordinatorClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .watch_approval(r)
                    .await
            }
        })
        .await
    }
}
