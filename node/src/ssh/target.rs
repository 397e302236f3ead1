//! The gateway's side of a host: one SSH connection per client connection, logged in with the
//! gateway's own key, to a host whose key is one of the pinned ones.

use super::config::SshTargetConfig;
use super::forward::{Endpoint, RemoteForwards};
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A configured host, with its key material resolved at start.
pub struct Target {
    pub config: SshTargetConfig,
    pins: Vec<PublicKey>,
    key: Arc<PrivateKey>,
}

/// Why the gateway could not log in to a host.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("host {target:?} presented a host key that is not pinned ({presented})")]
    HostKeyMismatch { target: String, presented: String },
    #[error("cannot reach host {target:?} at {address}: {why}")]
    Unreachable {
        target: String,
        address: String,
        why: String,
    },
    #[error("host {target:?} refused the gateway's login as {login:?}")]
    LoginRefused { target: String, login: String },
}

impl Target {
    pub fn new(config: SshTargetConfig) -> anyhow::Result<Self> {
        let pins = config
            .host_keys
            .iter()
            .map(|k| PublicKey::from_openssh(k))
            .collect::<Result<Vec<_>, _>>()?;
        let secret = config.login_key.resolve()?;
        let key = PrivateKey::from_openssh(secret.expose())
            .map_err(|e| anyhow::anyhow!("the login key of host {:?}: {e}", config.name))?;
        Ok(Self {
            config,
            pins,
            key: Arc::new(key),
        })
    }

    /// Connects, checks the host key against the pins, and logs in as `login`. Connections
    /// the host accepts on remote forwards go to `forwards`.
    pub async fn connect(
        &self,
        login: &str,
        forwards: Arc<RemoteForwards>,
    ) -> Result<client::Handle<Pinned>, TargetError> {
        let name = &self.config.name;
        let presented = Arc::new(Mutex::new(None));
        let handler = Pinned {
            pins: self.pins.clone(),
            presented: presented.clone(),
            forwards,
        };
        // No Nagle on the host side either: a small request (an exec, a keystroke) must not
        // wait for the host's delayed ACK (~40 ms on Linux).
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        });
        let timeout = Duration::from_secs(self.config.connect_timeout_secs);
        let unreachable = |why: String| TargetError::Unreachable {
            target: name.clone(),
            address: self.config.address.clone(),
            why,
        };
        let connecting = client::connect(config, self.config.address.as_str(), handler);
        let mut handle = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => return Err(unreachable("timed out".into())),
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                let seen = presented.lock().unwrap_or_else(|e| e.into_inner()).take();
                return Err(match seen {
                    Some(presented) => TargetError::HostKeyMismatch {
                        target: name.clone(),
                        presented,
                    },
                    None => unreachable(e.to_string()),
                });
            }
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let key = PrivateKeyWithHashAlg::new(self.key.clone(), hash);
        let auth = tokio::time::timeout(timeout, handle.authenticate_publickey(login, key)).await;
        match auth {
            Ok(Ok(r)) if r.success() => Ok(handle),
            Ok(Ok(_)) => Err(TargetError::LoginRefused {
                target: name.clone(),
                login: login.into(),
            }),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("login timed out".into())),
        }
    }
}

/// The client handler of a host connection: accepts only a pinned host key, and remembers a
/// key it refused so the refusal can name it; hands the channels the host opens for remote
/// forwards to the client connection's [`RemoteForwards`].
pub struct Pinned {
    pins: Vec<PublicKey>,
    presented: Arc<Mutex<Option<String>>>,
    forwards: Arc<RemoteForwards>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.presented.lock().unwrap_or_else(|e| e.into_inner()) =
                Some("a host certificate (only pinned keys are accepted)".into());
            return Ok(false);
        };
        let ok = self.pins.iter().any(|p| p.key_data() == key.key_data());
        if !ok {
            *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(
                key.to_openssh()
                    .unwrap_or_else(|_| key.fingerprint(Default::default()).to_string()),
            );
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let connected = Endpoint {
            address: connected_address.into(),
            port: connected_port,
        };
        let originator = Endpoint {
            address: originator_address.into(),
            port: originator_port,
        };
        self.forwards.opened(channel, reply, connected, originator);
        Ok(())
    }
}
