//! The other gateway nodes of a cluster, and the authenticated calls between nodes.
//!
//! One call so far: a PostgreSQL CancelRequest comes on a connection of its own, and the load
//! balancer may hand it to a node other than the one that serves the session. The cancel key a
//! node gives its clients names the node ([`tag_of`] its id, in the key's pid); the node that
//! receives a cancel for another node's tag passes it on to that node's admin endpoint, which
//! checks it, records it and cancels on its target.
//!
//! A call carries an HMAC-SHA256 over its body with the secret every node of the cluster shares
//! (`cluster.peer_secret`), and the time it was made: a node accepts a call that verifies and is
//! at most [`MAX_AGE`] old. The secret never travels.

use crate::config::{ClusterConfig, PeerConfig};
use crate::core::secret::Secret;
use anyhow::Context as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vigil_proto::record::Connection;

/// The header that carries a call's signature (hex).
pub const SIGNATURE_HEADER: &str = "vigil-peer-signature";

/// The admin endpoint a node passes a PostgreSQL cancel to.
pub const PG_CANCEL_PATH: &str = "/v1/peer/pg-cancel";

/// How old a call may be (clocks of the nodes within this of each other).
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// How long a node waits for a peer's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The 16 bits that name a node in the cancel keys it gives out: the first two bytes of the
/// SHA-256 of its id.
pub fn tag_of(node_id: &str) -> u16 {
    let digest = Sha256::digest(node_id.as_bytes());
    u16::from_be_bytes([digest[0], digest[1]])
}

/// A CancelRequest passed from the node that received it to the node that serves the session.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgCancel {
    /// The node that received it.
    pub from: String,
    /// The key pair the client sent.
    pub pid: i32,
    pub secret: i32,
    /// The client's connection, as the receiving node saw it.
    pub connection: Connection,
    /// When the receiving node made the call (milliseconds since the Unix epoch).
    pub issued_ms: u64,
}

/// What the serving node answers.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgCancelAnswer {
    /// A session of that node holds the key (the cancel went to its target, on record).
    pub held: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("the call is not signed")]
    Unsigned,
    #[error("the call's signature does not verify")]
    BadSignature,
    #[error("the call is not a valid request: {0}")]
    Malformed(String),
    #[error("the call is too old or from the future (clocks more than 30 s apart?)")]
    Stale,
    #[error("this node has no peers configured")]
    NoPeers,
}

pub struct Peers {
    me: String,
    tag: u16,
    by_tag: HashMap<u16, PeerConfig>,
    secret: Option<Secret<Vec<u8>>>,
    http: reqwest::Client,
}

impl Peers {
    /// This node's view of its cluster (its own entry in `cluster.peers` skipped). Refuses
    /// peers without a secret, a secret shorter than 16 characters, and two nodes whose ids
    /// share a tag (rename one).
    pub fn new(me: &str, cluster: &ClusterConfig) -> anyhow::Result<Self> {
        let mut by_tag: HashMap<u16, PeerConfig> = HashMap::new();
        let tag = tag_of(me);
        for peer in cluster.peers.iter().filter(|p| p.id != me) {
            let peer_tag = tag_of(&peer.id);
            let clash = if peer_tag == tag {
                Some(me)
            } else {
                by_tag.get(&peer_tag).map(|p| p.id.as_str())
            };
            if let Some(other) = clash {
                anyhow::bail!(
                    "cluster.peers: the node ids {other:?} and {:?} name the same cancel-key tag; rename one of them",
                    peer.id
                );
            }
            by_tag.insert(peer_tag, peer.clone());
        }
        let secret = match &cluster.peer_secret {
            Some(r) => {
                let s = r.resolve().context("cluster.peer_secret")?;
                anyhow::ensure!(
                    s.expose().len() >= 16,
                    "cluster.peer_secret: the secret must be at least 16 characters"
                );
                Some(Secret::new(s.expose().as_bytes().to_vec()))
            }
            None if by_tag.is_empty() => None,
            None => anyhow::bail!("cluster.peers needs cluster.peer_secret"),
        };
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .context("the HTTP client for peer calls")?;
        Ok(Self {
            me: me.to_string(),
            tag,
            by_tag,
            secret,
            http,
        })
    }

    /// The tag of this node's cancel keys.
    pub fn tag(&self) -> u16 {
        self.tag
    }

    /// The peer whose cancel keys carry `tag`.
    pub fn by_tag(&self, tag: u16) -> Option<&PeerConfig> {
        self.by_tag.get(&tag)
    }

    fn mac(&self) -> Result<Hmac<Sha256>, CallError> {
        let secret = self.secret.as_ref().ok_or(CallError::NoPeers)?;
        Ok(Hmac::<Sha256>::new_from_slice(secret.expose()).expect("HMAC takes any key length"))
    }

    /// Passes a cancel to `peer`: whether a session there held the key.
    pub async fn pass_pg_cancel(
        &self,
        peer: &PeerConfig,
        pid: i32,
        secret: i32,
        connection: &Connection,
    ) -> anyhow::Result<bool> {
        let call = PgCancel {
            from: self.me.clone(),
            pid,
            secret,
            connection: connection.clone(),
            issued_ms: now_ms(),
        };
        let body = serde_json::to_vec(&call)?;
        let mut mac = self.mac()?;
        mac.update(&body);
        let signature = hex::encode(mac.finalize().into_bytes());
        let url = format!("{}{PG_CANCEL_PATH}", peer.url.trim_end_matches('/'));
        let resp = self
            .http
            .post(&url)
            .header(SIGNATURE_HEADER, signature)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot reach node {} at {url}", peer.id))?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "node {} answered {status}: {}",
            peer.id,
            resp.text().await.unwrap_or_default().trim()
        );
        let answer: PgCancelAnswer = resp
            .json()
            .await
            .with_context(|| format!("node {} answered something other than JSON", peer.id))?;
        Ok(answer.held)
    }

    /// Checks a call another node made: signed with the shared secret, fresh, well-formed.
    pub fn verify_pg_cancel(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<PgCancel, CallError> {
        let signature = signature.ok_or(CallError::Unsigned)?;
        let signature = hex::decode(signature).map_err(|_| CallError::BadSignature)?;
        let mut mac = self.mac()?;
        mac.update(body);
        mac.verify_slice(&signature)
            .map_err(|_| CallError::BadSignature)?;
        let call: PgCancel =
            serde_json::from_slice(body).map_err(|e| CallError::Malformed(e.to_string()))?;
        if now_ms().abs_diff(call.issued_ms) > MAX_AGE.as_millis() as u64 {
            return Err(CallError::Stale);
        }
        Ok(call)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::secret::SecretRef;

    fn cluster(peers: &[&str], secret_var: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            peers: peers
                .iter()
                .map(|id| PeerConfig {
                    id: id.to_string(),
                    url: format!("http://{id}:9187"),
                })
                .collect(),
            peer_secret: secret_var.map(|v| SecretRef::Env(v.into())),
        }
    }

    fn signed(peers: &Peers, call: &PgCancel) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(call).unwrap();
        let mut mac = peers.mac().unwrap();
        mac.update(&body);
        (body, hex::encode(mac.finalize().into_bytes()))
    }

    fn call(issued_ms: u64) -> PgCancel {
        PgCancel {
            from: "node-2".into(),
            pid: 42,
            secret: -7,
            connection: Connection {
                protocol: "postgres".into(),
                client_addr: "192.0.2.9:5555".into(),
                ..Connection::default()
            },
            issued_ms,
        }
    }

    #[test]
    fn a_signed_fresh_call_verifies_and_nothing_else_does() {
        std::env::set_var("VIGIL_TEST_PEER_SECRET", "0123456789abcdef-shared");
        let peers = Peers::new(
            "node-1",
            &cluster(&["node-2"], Some("VIGIL_TEST_PEER_SECRET")),
        )
        .unwrap();
        let (body, sig) = signed(&peers, &call(now_ms()));
        assert_eq!(
            peers.verify_pg_cancel(&body, Some(&sig)).unwrap(),
            call(serde_json::from_slice::<PgCancel>(&body).unwrap().issued_ms)
        );
        assert_eq!(
            peers.verify_pg_cancel(&body, None),
            Err(CallError::Unsigned)
        );
        let mut tampered = body.clone();
        let at = tampered.iter().position(|&b| b == b'4').unwrap();
        tampered[at] = b'5';
        assert_eq!(
            peers.verify_pg_cancel(&tampered, Some(&sig)),
            Err(CallError::BadSignature)
        );
        assert_eq!(
            peers.verify_pg_cancel(&body, Some("zz")),
            Err(CallError::BadSignature)
        );
        let old = call(now_ms() - MAX_AGE.as_millis() as u64 - 1_000);
        let (body, sig) = signed(&peers, &old);
        assert_eq!(
            peers.verify_pg_cancel(&body, Some(&sig)),
            Err(CallError::Stale)
        );
        // Signed with another cluster's secret.
        std::env::set_var("VIGIL_TEST_OTHER_SECRET", "another-cluster-secret");
        let other = Peers::new(
            "node-2",
            &cluster(&["node-1"], Some("VIGIL_TEST_OTHER_SECRET")),
        )
        .unwrap();
        let (body, sig) = signed(&other, &call(now_ms()));
        assert_eq!(
            peers.verify_pg_cancel(&body, Some(&sig)),
            Err(CallError::BadSignature)
        );
    }

    #[test]
    fn peers_need_a_long_enough_secret_and_distinct_tags() {
        let e = Peers::new("node-1", &cluster(&["node-2"], None))
            .err()
            .unwrap();
        assert!(e.to_string().contains("peer_secret"), "{e}");
        std::env::set_var("VIGIL_TEST_SHORT_SECRET", "short");
        let e = Peers::new(
            "node-1",
            &cluster(&["node-2"], Some("VIGIL_TEST_SHORT_SECRET")),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("16 characters"), "{e:#}");
        std::env::set_var("VIGIL_TEST_PEER_SECRET2", "0123456789abcdef-shared");
        let e = Peers::new(
            "node-1",
            &cluster(&["node-2", "node-2"], Some("VIGIL_TEST_PEER_SECRET2")),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("same cancel-key tag"), "{e}");
        // Every node may be given the whole list.
        let all = Peers::new(
            "node-1",
            &cluster(&["node-1", "node-2"], Some("VIGIL_TEST_PEER_SECRET2")),
        )
        .unwrap();
        assert!(all.by_tag(tag_of("node-1")).is_none());
        assert_eq!(all.by_tag(tag_of("node-2")).unwrap().id, "node-2");
        // Alone, a node needs no secret.
        let alone = Peers::new("node-1", &cluster(&[], None)).unwrap();
        assert_eq!(alone.tag(), tag_of("node-1"));
        assert!(alone.by_tag(tag_of("node-2")).is_none());
    }
}
