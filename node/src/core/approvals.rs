//! The node's link to the coordinator, and the approval flow of a held statement.
//!
//! With `[coordinator] endpoints`, the node is a client of a remote cluster (cluster token).
//! Without, it starts a one-member coordinator in-process, from the same code, listening on
//! `[coordinator] listen` so that operators can decide with `vigil approvals`; the node then
//! talks to it over gRPC exactly as it would to a remote cluster.
//!
//! The flow of a statement that needs approval ([`Approvals::settle`]): an active grant of the
//! rule's class lets it run; else an approved request for the same principal, connection and
//! statement is consumed (exactly once, cluster-wide) and it runs; else a request is created
//! and the statement is held while the node watches the request, up to the rule's wait. Every
//! step the client can observe is reported to the caller for the audit log. When the
//! coordinator cannot be reached the statement is refused (fail closed).

use crate::config::{Config, IdentityConfig};
use crate::core::identity::TokenVerifier;
use crate::core::metrics::Metrics;
use crate::core::Refusal;
use crate::policy::ApprovalSpec;
use anyhow::Context as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use vigil_coordinator::approvals::{ActionKey, Actor};
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::server::{Member, MemberConfig};
use vigil_coordinator::service::{new_id, BoxFuture, OperatorAuth};
use vigil_coordinator::tls::ClientTls;
use vigil_proto::coordinator as pb;
use vigil_proto::record::{ApprovalRef, Body, Kind, Outcome, PolicyRef, Principal, Request};

/// Operators are verified like any other principal: an OIDC token (or a token the cluster
/// issued) checked by the verifier; the approver's identity is the token's subject, issuer,
/// groups and person key. When a person key is configured (`identity.claims.person`), a
/// token without one may not decide.
pub struct OidcOperators {
    verifier: Arc<TokenVerifier>,
    person_key: Option<String>,
}

impl OidcOperators {
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        let person_key = verifier.config().claims.person.as_ref().map(|claim| {
            format!(
                "the claim {claim} of identity.claims.person; for SAML identities, the attribute \
                 of identity.saml.person_attribute"
            )
        });
        Self {
            verifier,
            person_key,
        }
    }
}

impl OperatorAuth for OidcOperators {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Actor, String>> {
        Box::pin(async move {
            let p = self
                .verifier
                .verify(token)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Actor {
                subject: p.subject,
                groups: p.groups,
                issuer: p.issuer,
                person: p.person,
            })
        })
    }

    fn person_key(&self) -> Option<&str> {
        self.person_key.as_deref()
    }
}

/// The node's coordinator: a client, and the embedded member when there is one.
pub struct Coordination {
    pub approvals: Arc<Approvals>,
    /// The embedded member (none with a remote cluster).
    pub member: Option<Member>,
    /// Where the coordinator API is reachable from this node.
    pub endpoints: Vec<String>,
}

pub async fn start(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Coordination> {
    let co = &config.coordinator;
    let timeout = Duration::from_secs(co.timeout_secs);
    if !co.endpoints.is_empty() {
        let token = co
            .cluster_token
            .as_ref()
            .context("coordinator.cluster_token")?
            .resolve()
            .context("coordinator.cluster_token")?;
        anyhow::ensure!(
            token.expose().len() >= 16,
            "coordinator.cluster_token: must be at least 16 characters"
        );
        let mut client = Client::new(
            co.endpoints.clone(),
            Credential::Cluster(token.expose().as_str().into()),
        )
        .map_err(|s| anyhow::anyhow!("coordinator.endpoints: {}", s.message()))?
        .retry_for(timeout);
        if let Some(ca) = &co.ca_file {
            client = client.tls(ClientTls::verify_with(ca).context("coordinator.ca_file")?);
        }
        return Ok(Coordination {
            approvals: Arc::new(Approvals::new(client, &config.node.id)),
            member: None,
            endpoints: co.endpoints.clone(),
        });
    }
    // Embedded: a cluster of one, its token known only to this process.
    let token: Arc<str> = hex::encode(rand::random::<[u8; 32]>()).into();
    let mut member = MemberConfig::new(1, co.listen, config.coordinator_dir(), token.clone());
    member.admin_group = co.admin_group.clone();
    member.bootstrap = true;
    member.discard_other_format = true;
    // Nobody adds members to it: the leader would hand them this token (docs/threat-model.md).
    member.embedded = true;
    // Operators' tokens are verified as the node's, but only for the audiences people's
    // tokens carry (config.operator_audiences): an agent's token is not an approver's.
    let audiences = config.operator_audiences();
    let operators: Option<Arc<dyn OperatorAuth>> = if audiences.is_empty() {
        tracing::warn!(
            "the embedded coordinator takes no operator's token: nobody can approve or deny \
             (set coordinator.operator_audiences, docs/configuration.md)"
        );
        None
    } else {
        let identity = IdentityConfig {
            audiences,
            ..config.identity.clone()
        };
        Some(Arc::new(OidcOperators::new(TokenVerifier::new(
            identity, metrics,
        )?)))
    };
    let member = Member::start(member, operators)
        .await
        .with_context(|| format!("embedded coordinator on coordinator.listen {}", co.listen))?;
    member
        .wait_for_leader(Duration::from_secs(10))
        .await
        .context("embedded coordinator")?;
    let addr: SocketAddr = member.addr;
    let endpoints = vec![addr.to_string()];
    let client = Client::new(endpoints.clone(), Credential::Cluster(token))
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .retry_for(timeout);
    Ok(Coordination {
        approvals: Arc::new(Approvals::new(client, &config.node.id)),
        member: Some(member),
        endpoints,
    })
}

/// An action held for approval.
pub struct Hold<'a> {
    pub principal: &'a Principal,
    /// The protocol, the target and the hash of everything the approval binds.
    pub key: ActionKey,
    /// Where the action runs, as this node's configuration names the target's server
    /// (PostgreSQL `host:port`, an SSH host's `host:port`, a cluster's API server URL): bound,
    /// so that nodes whose configurations give one target name to different servers (two
    /// fleets sharing a coordinator) do not carry approvals over.
    pub place: String,
    /// What the approver reads: all of it, masked.
    pub action: &'a str,
    pub shown: pb::ShownAction,
    pub rule: &'a str,
    pub reason: Option<&'a str>,
    pub spec: &'a ApprovalSpec,
}

/// The hash an approval is requested and used under: the protocol's hash of the action
/// (`hold.key.hash`: what runs, under which settings) and its server (`hold.place`), with
/// the deciding rule and what
/// it asks of approvers, and the principal as far as rules tell a subject's tokens apart
/// (client, model, groups, person). So an approval given under a lenient rule, or for one of
/// a subject's tokens, is never used under a stricter rule, or by another token of the subject
/// that rules (or, on Kubernetes, RBAC through the impersonated groups) treat otherwise. The
/// stated intent is not bound: an agent words it anew on each try, and each record carries its
/// own.
fn bound_hash(hold: &Hold<'_>) -> String {
    use sha2::{Digest as _, Sha256};
    let p = hold.principal;
    let mut groups: Vec<&str> = p.groups.iter().map(String::as_str).collect();
    groups.sort_unstable();
    groups.dedup();
    let mut h = Sha256::new();
    let mut put = |field: Option<&str>| match field {
        // Length-prefixed, and an absent field apart from an empty one.
        Some(f) => {
            h.update([1]);
            h.update((f.len() as u64).to_be_bytes());
            h.update(f.as_bytes());
        }
        None => h.update([0]),
    };
    put(Some("vigil-approval-binding-v1"));
    put(Some(&hold.key.hash));
    put(Some(&hold.place));
    put(Some(hold.rule));
    put(Some(&hold.spec.approvers));
    put(Some(&hold.spec.required.to_string()));
    put(p.client_id.as_deref());
    put(p.model.as_deref());
    put(p.model_version.as_deref());
    put(p.person.as_deref());
    put(Some(&groups.len().to_string()));
    for g in groups {
        put(Some(g));
    }
    hex::encode(h.finalize())
}

/// A step worth an audit record.
pub struct Step {
    pub outcome: Outcome,
    pub approval: ApprovalRef,
    pub detail: String,
    /// `true`: the request was created; `false`: it was decided, or the wait ended.
    pub requested: bool,
}

impl Step {
    /// A recorder of a hold's steps: each becomes an `approval_requested` (with the held
    /// `request`) or `approval_decided` record of `base`'s session, principal and connection,
    /// under statement `stmt` and the deciding `policy`.
    pub fn recorder(
        audit: crate::audit::AuditLog,
        base: Body,
        stmt: u64,
        request: Request,
        policy: PolicyRef,
    ) -> impl FnMut(Step) + Send {
        move |step: Step| {
            let kind = if step.requested {
                Kind::ApprovalRequested
            } else {
                Kind::ApprovalDecided
            };
            let mut rec = audit.body(base.session.as_deref(), kind);
            rec.principal = base.principal.clone();
            rec.connection = base.connection.clone();
            rec.stmt = Some(stmt);
            if step.requested {
                rec.request = Some(request.clone());
            }
            rec.outcome = Some(step.outcome);
            rec.policy = Some(policy.clone());
            rec.approval = Some(step.approval);
            rec.detail = Some(step.detail);
            audit.record(rec);
        }
    }
}

/// How a hold ended.
pub enum Verdict {
    /// Run it; this approval (or grant) allowed it.
    Run(ApprovalRef),
    /// Refuse it (the protocol says why in its terms).
    Refuse {
        refusal: Refusal,
        approval: Option<ApprovalRef>,
    },
}

impl Verdict {
    fn refuse(refusal: Refusal, approval: Option<ApprovalRef>) -> Self {
        Verdict::Refuse { refusal, approval }
    }
}

/// How a `require_approval` decision is to be held; a decision without approval settings is
/// refused (its verdict).
pub fn spec_of(decision: &crate::policy::Decision) -> Result<&ApprovalSpec, Box<Verdict>> {
    decision.approval.as_deref().ok_or_else(|| {
        Box::new(Verdict::refuse(
            Refusal::NoApprovalSettings {
                rule: decision.rule.clone(),
            },
            None,
        ))
    })
}

/// Why a held request's wait ended early: its client went away.
pub const CLIENT_LEFT: &str = "the client left while it was held";

/// Why a held request's wait ended early: the token it was made with expired
/// (`identity.session_expiry`), and it would run without authority.
pub const TOKEN_EXPIRED: &str = "the token expired while it was held";

/// Why a held request's wait ended early: the node's drain deadline came and it ends its
/// sessions.
pub const NODE_ENDING: &str = "the node ended its sessions (drain deadline) while it was held";

/// Why a held request's wait ended early: the target ended the session (an administrator's
/// `pg_terminate_backend`, a restart), and nothing can run on it.
pub const TARGET_CLOSED: &str = "the target ended the session while it was held";

/// Why an approved request did not run: the approval came (or a call to the coordinator that
/// used it finished) as its client left or its session ended.
pub const APPROVED_TOO_LATE: &str =
    "approved, but the client had left (or its session ended): not run";

/// Whether `left` has resolved already (without waiting for it): why, if so.
async fn gone(
    left: std::pin::Pin<&mut impl Future<Output = &'static str>>,
) -> Option<&'static str> {
    tokio::select! {
        biased;
        why = left => Some(why),
        () = std::future::ready(()) => None,
    }
}

pub struct Approvals {
    client: Client,
    node: String,
}

fn reference(a: &pb::Approval, state: &str) -> ApprovalRef {
    ApprovalRef {
        id: a.id.clone(),
        state: state.to_string(),
        by: a.votes.iter().map(|v| v.approver.clone()).collect(),
    }
}

fn unavailable(e: &tonic::Status) -> Verdict {
    Verdict::refuse(
        Refusal::CoordinatorUnavailable {
            why: e.message().to_string(),
        },
        None,
    )
}

impl Approvals {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_string(),
        }
    }

    /// Marks `key` (`kind:name`) as used in the whole cluster until `until_ms`: whether this
    /// call was the first use (a SAML assertion seen on any node before is not).
    pub async fn mark_once(&self, key: String, until_ms: u64) -> Result<bool, tonic::Status> {
        let r = self.client.mark(pb::MarkRequest { key, until_ms }).await?;
        Ok(r.first)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Decides what happens to a held statement; `record` is told every step on the way.
    /// `left` resolves, with why, when the client goes away ([`CLIENT_LEFT`]) or cannot be
    /// waited for any longer: that ends the wait for a decision (the request stays pending,
    /// and a client that sends the statement again can use its approval), never a call to the
    /// coordinator halfway (an approval consumed must be on record, with its statement run or,
    /// when its client or its session went meanwhile, [`APPROVED_TOO_LATE`]; a request created
    /// must be on record).
    pub async fn settle(
        &self,
        hold: Hold<'_>,
        record: &mut (dyn FnMut(Step) + Send),
        left: impl Future<Output = &'static str>,
    ) -> Verdict {
        let mut hold = hold;
        hold.key.hash = bound_hash(&hold);
        let mut left = std::pin::pin!(left);
        if let Some(verdict) = self.granted(&hold).await {
            return verdict;
        }
        // Each call to the coordinator is finished once begun; none begins for a client that
        // went, or a session that ended, meanwhile.
        if let Some(why) = gone(left.as_mut()).await {
            return Verdict::refuse(Refusal::NotHeld { why }, None);
        }
        let key = pb::ActionKey::from(&hold.key);
        let consume = pb::ConsumeApprovalRequest {
            subject: hold.principal.subject.clone(),
            issuer: hold.principal.issuer.clone(),
            key: Some(key.clone()),
            attempt: new_id(&format!("{}-try", self.node)),
            request_id: String::new(),
        };
        match self.consume(&consume).await {
            Ok(a) => return Verdict::Run(reference(&a, "consumed")),
            Err(e) if e.code() == Code::FailedPrecondition => {}
            Err(e) => return unavailable(&e),
        }
        if let Some(why) = gone(left.as_mut()).await {
            return Verdict::refuse(Refusal::NotHeld { why }, None);
        }
        let (spec, rule) = (hold.spec, hold.rule.to_string());
        let id = match self.request(hold, key, record).await {
            Ok(id) => id,
            Err(e) => return unavailable(&e),
        };
        let wait = Duration::from_secs(spec.wait_secs);
        let waited = tokio::select! {
            w = tokio::time::timeout(wait, self.await_decision(&id)) => {
                w.map_err(|_| format!("no decision within {} s", spec.wait_secs))
            }
            why = &mut left => Err(why.to_string()),
        };
        match waited {
            Ok(Ok(decided)) => self.decided(decided, &consume, record).await,
            Ok(Err(e)) => unavailable(&e),
            Err(detail) => {
                let pending = ApprovalRef {
                    id: id.clone(),
                    state: "pending".into(),
                    by: Vec::new(),
                };
                record(Step {
                    outcome: Outcome::Pending,
                    approval: pending.clone(),
                    detail,
                    requested: false,
                });
                Verdict::refuse(
                    Refusal::Pending {
                        rule,
                        request: id,
                        approvers: spec.approvers.clone(),
                    },
                    Some(pending),
                )
            }
        }
    }

    /// An active grant of the rule's class for the principal on the target lets it run.
    async fn granted(&self, hold: &Hold<'_>) -> Option<Verdict> {
        let class = hold.spec.grant_class.as_ref()?;
        let check = pb::CheckGrantRequest {
            subject: hold.principal.subject.clone(),
            issuer: hold.principal.issuer.clone(),
            scope: Some(pb::Scope::from(&hold.key.scope)),
            access_class: class.clone(),
        };
        match self.client.check_grant(check).await {
            Ok(pb::CheckGrantResponse { grant: Some(g) }) => Some(Verdict::Run(ApprovalRef {
                id: g.id,
                state: "granted".into(),
                by: vec![g.granted_by],
            })),
            Ok(_) => None,
            Err(e) => Some(unavailable(&e)),
        }
    }

    /// Creates the approval request (recorded as `approval_requested`); returns its id.
    async fn request(
        &self,
        hold: Hold<'_>,
        key: pb::ActionKey,
        record: &mut (dyn FnMut(Step) + Send),
    ) -> Result<String, tonic::Status> {
        let create = pb::CreateApprovalRequest {
            id: new_id("apr"),
            requester: Some(pb::Actor {
                subject: hold.principal.subject.clone(),
                groups: hold.principal.groups.clone(),
                issuer: hold.principal.issuer.clone(),
                person: hold.principal.person.clone().unwrap_or_default(),
            }),
            key: Some(key),
            action: hold.action.to_string(),
            shown: Some(hold.shown),
            reason: hold.reason.unwrap_or_default().to_string(),
            ttl_ms: hold.spec.ttl_secs.saturating_mul(1000),
            approver_group: hold.spec.approvers.clone(),
            approvals_required: hold.spec.required,
            node: self.node.clone(),
            rule: hold.rule.to_string(),
        };
        let created = self.client.create_approval(create).await?;
        record(Step {
            outcome: Outcome::Pending,
            approval: reference(&created, "pending"),
            detail: format!(
                "held for approval by {} ({} needed)",
                hold.spec.approvers, hold.spec.required
            ),
            requested: true,
        });
        Ok(created.id)
    }

    /// What a decision made while the action was held means for it: approved, it runs once
    /// its approval is consumed; otherwise it is refused with who denied it and why.
    async fn decided(
        &self,
        decided: pb::Approval,
        consume: &pb::ConsumeApprovalRequest,
        record: &mut (dyn FnMut(Step) + Send),
    ) -> Verdict {
        let id = decided.id.clone();
        if decided.state == "approved" {
            record(Step {
                outcome: Outcome::Success,
                approval: reference(&decided, "approved"),
                detail: "approved while held".into(),
                requested: false,
            });
            // This request, the one the approvers saw: not an older approval of the same
            // action, whose approvers the records would then name.
            let consume = pb::ConsumeApprovalRequest {
                request_id: id.clone(),
                ..consume.clone()
            };
            return match self.consume(&consume).await {
                Ok(a) => Verdict::Run(reference(&a, "consumed")),
                Err(e) if e.code() == Code::FailedPrecondition => Verdict::refuse(
                    Refusal::UsedElsewhere { request: id },
                    Some(reference(&decided, "consumed")),
                ),
                Err(e) => unavailable(&e),
            };
        }
        let state = decided.state.as_str();
        let by = decided
            .votes
            .iter()
            .filter(|v| !v.approve)
            .map(|v| match v.comment.as_str() {
                "" => v.approver.clone(),
                c => format!("{} ({c})", v.approver),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let r = reference(&decided, state);
        record(Step {
            outcome: Outcome::Denied,
            approval: r.clone(),
            detail: format!("request {state}"),
            requested: false,
        });
        let refusal = if state == "denied" {
            Refusal::Denied { request: id, by }
        } else {
            Refusal::Ended {
                request: id,
                state: state.to_string(),
            }
        };
        Verdict::refuse(refusal, Some(r))
    }

    /// Consumes, retrying the same attempt while the outcome is unknown (a commit that timed
    /// out may have happened: the same attempt then answers with what it consumed), so an
    /// approval is never used up without its statement running.
    async fn consume(
        &self,
        req: &pb::ConsumeApprovalRequest,
    ) -> Result<pb::Approval, tonic::Status> {
        let mut tries = 0;
        loop {
            match self.client.consume_approval(req.clone()).await {
                Err(e) if e.code() == Code::DeadlineExceeded && tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// Watches a request until it is decided (approved, denied, consumed, expired). A broken
    /// stream (a leader change) is opened again.
    async fn await_decision(&self, id: &str) -> Result<pb::Approval, tonic::Status> {
        loop {
            let mut stream = self.client.watch_approval(id).await?;
            loop {
                match stream.message().await {
                    Ok(Some(a)) if a.state != "pending" => return Ok(a),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an approval binds besides the action: its server, the rule and what it asks of
    /// approvers, and the principal's client, model, groups (in any order) and person; not
    /// the stated intent.
    #[test]
    fn an_approval_binds_the_place_the_rule_and_the_token() {
        let principal = Principal {
            subject: "agent-x".into(),
            issuer: "https://idp".into(),
            model: Some("small".into()),
            groups: vec!["dba".into(), "ops".into()],
            ..Principal::default()
        };
        let spec = ApprovalSpec {
            approvers: "approvers".into(),
            required: 1,
            ttl_secs: 600,
            wait_secs: 0,
            grant_class: None,
        };
        let hash = |principal: &Principal, place: &str, rule: &str, spec: &ApprovalSpec| {
            bound_hash(&Hold {
                principal,
                key: ActionKey {
                    scope: vigil_coordinator::approvals::Scope::new("postgres", "app"),
                    hash: "ab".repeat(32),
                },
                place: place.into(),
                action: "UPDATE t SET v = 1",
                shown: pb::ShownAction::default(),
                rule,
                reason: None,
                spec,
            })
        };
        let base = hash(&principal, "db-1:5432", "writes", &spec);
        let same = |p: &Principal| hash(p, "db-1:5432", "writes", &spec) == base;
        let mut reordered = principal.clone();
        reordered.groups.reverse();
        let mut intent = principal.clone();
        intent.intent = Some("retrying after the approval".into());
        assert!(same(&reordered) && same(&intent));
        let mut model = principal.clone();
        model.model = Some("gpt-5".into());
        let mut groups = principal.clone();
        groups.groups.push("admins".into());
        let mut client = principal.clone();
        client.client_id = Some("agent-ops".into());
        let mut person = principal.clone();
        person.person = Some("alice".into());
        for other in [&model, &groups, &client, &person] {
            assert!(!same(other), "{other:?}");
        }
        assert_ne!(hash(&principal, "db-2:5432", "writes", &spec), base);
        assert_ne!(hash(&principal, "db-1:5432", "other-rule", &spec), base);
        let stricter = ApprovalSpec {
            required: 2,
            ..spec.clone()
        };
        assert_ne!(hash(&principal, "db-1:5432", "writes", &stricter), base);
        let security = ApprovalSpec {
            approvers: "security".into(),
            ..spec.clone()
        };
        assert_ne!(hash(&principal, "db-1:5432", "writes", &security), base);
    }
}
