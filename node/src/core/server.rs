//! What a protocol implements to plug into the node: a server built from its config section
//! and the [`Core`](super::Core), bound to its listener, run until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// Resolves when the node stops accepting.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A protocol's listener, bound and ready to serve.
pub trait ProtocolServer: Send {
    /// The protocol's name: `postgres`, `ssh`, `kubernetes` (audit records, approval scopes,
    /// grants, logs).
    fn protocol(&self) -> &'static str;

    /// Where it listens (the bound address when the configured port was 0).
    fn local_addr(&self) -> SocketAddr;

    /// Accepts clients until `shutdown` resolves, then lets open sessions finish (bounded).
    fn serve(self: Box<Self>, shutdown: Shutdown) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}
