//! The SSH protocol: a listener that stock SSH clients log in to with a Vigil certificate or an
//! OIDC token (keyboard-interactive), a connection per client to the chosen host under the
//! gateway's own key, and every channel request decided and recorded before the host sees it.
//!
//! A client names the login and the host in its user name: `LOGIN+TARGET` (see
//! [`config::USER_SEPARATOR`]). Requests on a channel are handled in order, inside the
//! connection's handler, so that every reply reaches the client in the order SSH requires:
//! the handler forwards a request to the host and relays the host's own answer. Once a channel
//! runs (exec, shell, subsystem), its input goes through a per-channel task that records each
//! chunk before the host sees it, and its output through one that records each chunk before
//! the client sees it (see [`channel`]).

pub mod ca;
mod channel;
pub mod command;
pub mod config;
mod forward;
mod session;
pub mod sftp;
mod sftp_guard;

pub mod target;
pub mod typed;

use crate::core::lifecycle::Sessions;
use crate::core::proxy_protocol::{self, FirstWord};
use crate::core::{Core, ProtocolServer, Shutdown};
use anyhow::Context as _;
use config::SshConfig;
use russh::keys::PrivateKey;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The protocol's name in audit records, approval scopes and grants.
pub const PROTOCOL: &str = "ssh";

/// Everything a connection needs, shared by all connections of the listener.
pub struct SshContext {
    pub core: Arc<Core>,
    pub config: SshConfig,
    pub policy: Arc<crate::policy::Policy>,
    pub targets: HashMap<String, Arc<target::Target>>,
    /// The fingerprint of Vigil's user CA: certificates it signed are accepted.
    pub user_ca: Option<russh::keys::ssh_key::Fingerprint>,
    russh: Arc<russh::server::Config>,
    /// Bytes of client input the node keeps for requests held for approval, all connections
    /// together (bounded by `channel::MAX_NODE_HELD_INPUT`).
    held_input: Arc<std::sync::atomic::AtomicUsize>,
}

/// The SSH listener, bound.
pub struct SshServer {
    listener: TcpListener,
    ctx: Arc<SshContext>,
    /// The host key's public half, one OpenSSH line.
    host_key: String,
}

impl SshServer {
    /// Builds the server from its config section, the node's policy and the core, and binds
    /// its listener; bad key material fails here.
    pub async fn bind(
        section: &SshConfig,
        policy: Arc<crate::policy::Policy>,
        ca: Option<&ca::UserCa>,
        core: Arc<Core>,
    ) -> anyhow::Result<Self> {
        let mut targets = HashMap::new();
        for t in &section.targets {
            let target = target::Target::new(t.clone())
                .with_context(|| format!("ssh target {:?}", t.name))?;
            targets.insert(t.name.clone(), Arc::new(target));
        }
        let host_key = host_key(section.host_key.as_deref(), &core.data_dir)?;
        let user_ca = ca.map(|ca| *ca.fingerprint());
        let host_key_line = host_key
            .public_key()
            .to_openssh()
            .context("encoding the SSH host key")?;
        let russh = Arc::new(russh::server::Config {
            methods: session::methods(user_ca.is_some()),
            keys: vec![host_key],
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: section.max_auth_attempts,
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        });
        let listener = TcpListener::bind(section.listen)
            .await
            .with_context(|| format!("cannot bind ssh.listen {}", section.listen))?;
        let ctx = Arc::new(SshContext {
            core,
            config: section.clone(),
            policy,
            targets,
            user_ca,
            russh,
            held_input: Default::default(),
        });
        Ok(Self {
            listener,
            ctx,
            host_key: host_key_line,
        })
    }

    /// What the node's API tells clients about this listener (`vigil ssh-config`).
    pub fn api(&self, ca: Arc<ca::UserCa>) -> crate::api::SshApi {
        crate::api::SshApi {
            ca,
            host_key: self.host_key.clone(),
            port: self.local_addr().port(),
            targets: self.ctx.config.targets.clone(),
        }
    }
}

/// The gateway's host key: the configured file, or one generated once into the data dir.
fn host_key(configured: Option<&Path>, data_dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => data_dir.join("ssh").join("host_ed25519_key"),
    };
    if configured.is_none() && !path.exists() {
        let seed: [u8; 32] = rand::random();
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &seed,
        ));
        let pem = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .context("encoding the SSH host key")?;
        crate::core::secret::write_private_file(&path, pem.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the SSH host key {}", path.display()))?;
    PrivateKey::from_openssh(&text)
        .with_context(|| format!("{} is not an OpenSSH private key", path.display()))
}

impl ProtocolServer for SshServer {
    fn protocol(&self) -> &'static str {
        PROTOCOL
    }

    fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    fn serve(self: Box<Self>, shutdown: Shutdown) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve(self.listener, self.ctx, shutdown))
    }
}

/// Accepts clients until `shutdown` resolves. A client holds one of
/// `max_unauthenticated_connections` permits until it is authenticated (or for at most
/// `auth_timeout_secs`); a client that finds none free is closed at once.
async fn serve(listener: TcpListener, ctx: Arc<SshContext>, shutdown: impl Future<Output = ()>) {
    let preauth = Arc::new(Semaphore::new(ctx.config.max_unauthenticated_connections));
    let sessions = Sessions::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let Ok(permit) = preauth.clone().try_acquire_owned() else {
                        ctx.core.metrics.preauth_refused.inc();
                        continue;
                    };
                    let threads = &ctx.core.threads;
                    let ctx = ctx.clone();
                    let open = sessions.enter();
                    let session = move |mut tcp| async move {
                        let admitted =
                            proxy_protocol::admit(&ctx.core, PROTOCOL, &mut tcp, peer, FirstWord::Server);
                        if let Ok(origin) = admitted.await {
                            // The session's end record lets go of `open` (see SessionEnd).
                            session::run(ctx, tcp, origin, permit, open).await;
                        }
                    };
                    threads.spawn_connection(tcp, session);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    sessions.drain(&ctx.core.lifecycle).await;
}
