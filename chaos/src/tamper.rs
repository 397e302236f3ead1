//! A fault-injecting TCP proxy between a gateway node and the dev PostgreSQL, for scenarios
//! where a real PostgreSQL must break the protocol in exactly one place. What the gateway sends
//! passes unchanged; what PostgreSQL sends is read message by message (tag, length, body) and
//! each message passes through the scenario's rewrite before the gateway gets it.
//!
//! Point a node at it with `NodeOptions::target_port`. Plaintext only: the target connection
//! must keep `tls = "disable"` (the harness default), so that PostgreSQL's first byte is a
//! message tag rather than the answer to an SSLRequest.

use crate::env;
use crate::wire::Msg;
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Turns one message from PostgreSQL into what the gateway receives in its place.
type Rewrite = dyn Fn(Msg) -> Vec<Msg> + Send + Sync;

pub struct TamperProxy {
    port: u16,
    rewrite: Arc<RwLock<Arc<Rewrite>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TamperProxy {
    /// Listens on an ephemeral port; every connection is forwarded to the dev PostgreSQL and,
    /// until `rewrite` is called, passes unchanged.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let target = format!(
            "{}:{}",
            env().get("VIGIL_PG_HOST"),
            env().get("VIGIL_PG_PORT")
        );
        let rewrite: Arc<RwLock<Arc<Rewrite>>> = Arc::new(RwLock::new(Arc::new(|m| vec![m])));
        let shared = rewrite.clone();
        let accept = tokio::spawn(async move {
            while let Ok((gateway, _)) = listener.accept().await {
                // Without PostgreSQL the gateway's connection is dropped: it sees a target
                // that refuses connections.
                if let Ok(target) = TcpStream::connect(&target).await {
                    tokio::spawn(relay(gateway, target, shared.clone()));
                }
            }
        });
        Self {
            port,
            rewrite,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on every message PostgreSQL sends, on every connection (open ones included),
    /// goes through `f`: the gateway receives what it returns instead (nothing, the message
    /// itself, a changed message, several).
    pub fn rewrite(&self, f: impl Fn(Msg) -> Vec<Msg> + Send + Sync + 'static) {
        *self.rewrite.write().expect("not poisoned") = Arc::new(f);
    }

    /// Passes every message unchanged again.
    pub fn pass(&self) {
        self.rewrite(|m| vec![m]);
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(gateway: TcpStream, target: TcpStream, rewrite: Arc<RwLock<Arc<Rewrite>>>) {
    let (mut from_gateway, mut to_gateway) = gateway.into_split();
    let (from_target, mut to_target) = target.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_gateway, &mut to_target).await;
        let _ = to_target.shutdown().await;
    });
    let mut from_target = BufReader::new(from_target);
    while let Ok(msg) = Msg::read_from(&mut from_target).await {
        let f = rewrite.read().expect("not poisoned").clone();
        let out: Vec<u8> = f(msg).iter().flat_map(Msg::to_bytes).collect();
        if to_gateway.write_all(&out).await.is_err() {
            break;
        }
    }
    // PostgreSQL or the gateway hung up: so does the other side.
    upstream.abort();
}
