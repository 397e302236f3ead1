//! The protocol-independent core: the services every protocol server is given ([`Core`]:
//! token verification, the audit writer, metrics, masking, the approvals client), the
//! [`ProtocolServer`] trait a protocol implements, and the refusal model each protocol maps to
//! its own error form.

pub mod approvals;
pub mod config_error;
pub mod echo;
pub mod http;
pub mod identity;
pub mod idle;
pub mod issued;
pub mod lifecycle;
pub mod metrics;
pub mod peers;
pub mod principals;
pub mod proxy_protocol;
pub mod reachability;
pub mod refusal;
pub mod saml;
pub mod secret;
pub mod server;
pub mod session_threads;
pub mod tls;
pub mod trace;

pub use refusal::Refusal;
pub use server::{ProtocolServer, Shutdown};

use crate::audit::AuditLog;
use crate::policy::masking::Masker;
use std::path::PathBuf;
use std::sync::Arc;

/// The shared services a protocol server is built with.
pub struct Core {
    /// Verifies every caller's token (OIDC), whatever the protocol.
    pub verifier: Arc<identity::TokenVerifier>,
    /// This node's audit stream: a request is forwarded only once its record is in it.
    pub audit: AuditLog,
    pub metrics: Arc<metrics::Metrics>,
    /// Where actions that need approval are held and decided.
    pub approvals: Arc<approvals::Approvals>,
    /// Masks values in records (detectors and column rules).
    pub masker: Masker,
    /// The load balancers whose PROXY protocol headers name the client (`node.proxy_protocol_from`).
    pub balancers: proxy_protocol::Balancers,
    /// Where the node keeps its state (a protocol's generated TLS material, for example).
    pub data_dir: PathBuf,
    /// Serving, draining or ending: when sessions must end.
    pub lifecycle: Arc<lifecycle::Lifecycle>,
    /// The other gateway nodes, and the calls between them.
    pub peers: Arc<peers::Peers>,
    /// Where accepted connections run ([`session_threads`]).
    pub threads: session_threads::SessionThreads,
}

/// A new session id: 96 random bits, hex (every protocol's sessions share the form).
pub fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

impl Core {
    /// A value a client chose, as the gateway may write it anywhere (records, its log): masked
    /// by the detectors (column rules do not apply outside results).
    pub fn scrub(&self, value: &str) -> String {
        self.masker.mask(value, None, false, None).into_owned()
    }
}
