//! The `[ssh]` section: the listener, the gateway's host key, the user CA whose certificates it
//! accepts, and the hosts (targets) clients may reach through it.

use crate::core::config_error::{invalid, ConfigError};
use crate::core::principals::PrincipalMatch;
use crate::core::secret::SecretRef;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub listen: SocketAddr,
    /// The gateway's own host key (OpenSSH private key file); generated once into
    /// `<data_dir>/ssh/host_ed25519_key` when absent. Every node behind one name should share
    /// it, or clients see a changed host key when the balancer moves them.
    #[serde(default)]
    pub host_key: Option<PathBuf>,
    /// The private key of Vigil's SSH user CA (OpenSSH format), by reference: the same on every
    /// node, so any node accepts any node's certificates. Without it the listener accepts
    /// tokens (keyboard-interactive) only.
    #[serde(default)]
    pub user_ca_key: Option<SecretRef>,
    /// The longest validity of a certificate the endpoint issues; a token that expires sooner
    /// ends it sooner.
    #[serde(default = "default_max_certificate_validity")]
    pub max_certificate_validity_secs: u64,
    /// Time a client has to finish key exchange and authentication.
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_secs: u64,
    /// Connections not yet authenticated that the listener holds at once; more are closed as
    /// they arrive.
    #[serde(default = "default_max_unauthenticated_connections")]
    pub max_unauthenticated_connections: usize,
    /// Authentication attempts per connection.
    #[serde(default = "default_max_auth_attempts")]
    pub max_auth_attempts: usize,
    /// Channels a connection may have open at once (sessions and forwards), as sshd's
    /// `MaxSessions`: each may hold a request for approval and the input sent meanwhile.
    #[serde(default = "default_max_channels")]
    pub max_channels: usize,
    /// A session in which nothing happens for this long (no byte on any channel in either
    /// direction, no channel opened) is ended by the gateway; `0`: never.
    #[serde(default)]
    pub idle_timeout_secs: u64,
    /// Environment variables a client may pass to the host (`env` requests); others are
    /// refused (and recorded).
    #[serde(default = "default_env_allow")]
    pub allowed_env: Vec<String>,
    #[serde(default)]
    pub targets: Vec<SshTargetConfig>,
}

fn default_max_certificate_validity() -> u64 {
    8 * 3600
}
fn default_auth_timeout() -> u64 {
    30
}
fn default_max_unauthenticated_connections() -> usize {
    256
}
fn default_max_auth_attempts() -> usize {
    6
}
fn default_max_channels() -> usize {
    10
}
fn default_env_allow() -> Vec<String> {
    vec!["LANG".into(), "LC_*".into(), "TERM".into()]
}

/// One host clients may reach: `ssh LOGIN+NAME@gateway`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshTargetConfig {
    pub name: String,
    /// `host:port` of the host's sshd.
    pub address: String,
    /// The host keys the host may present (`ssh-ed25519 AAAA…` lines as in `known_hosts`,
    /// without the host name). Anything else is refused: the gateway never trusts on first use.
    pub host_keys: Vec<String>,
    /// The gateway's own private key for this host (OpenSSH format), by reference. The caller
    /// never sees it.
    pub login_key: SecretRef,
    /// The logins on the host a client may ask for (`LOGIN+NAME`); `*` in an entry matches any.
    pub logins: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Who may use this host. Required: an empty match admits nobody.
    pub allow: PrincipalMatch,
}

fn default_connect_timeout() -> u64 {
    10
}

/// How the SSH user name names the login and the host: `LOGIN+TARGET`. Not `:`, which `scp`,
/// `sftp` and `rsync` read as the end of a host name in `user@host:path`.
pub const USER_SEPARATOR: char = '+';

/// `LOGIN+TARGET` split at the first separator (a login never contains `+`).
pub fn split_user(user: &str) -> Option<(&str, &str)> {
    let (login, target) = user.split_once(USER_SEPARATOR)?;
    (!login.is_empty() && !target.is_empty()).then_some((login, target))
}

impl SshConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_unauthenticated_connections == 0 {
            return Err(invalid(
                "ssh.max_unauthenticated_connections",
                "must be at least 1",
            ));
        }
        if self.max_channels == 0 {
            return Err(invalid("ssh.max_channels", "must be at least 1"));
        }
        if self.max_auth_attempts == 0 {
            return Err(invalid("ssh.max_auth_attempts", "must be at least 1"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = |field: &str| format!("ssh.targets[{i}].{field}");
            if t.name.is_empty() || t.name.contains(USER_SEPARATOR) {
                return Err(invalid(
                    at("name"),
                    "must be non-empty and must not contain '+'",
                ));
            }
            if !names.insert(&t.name) {
                return Err(invalid(at("name"), "is used by another target"));
            }
            if t.host_keys.is_empty() {
                return Err(invalid(
                    at("host_keys"),
                    "pin at least one host key: the gateway never trusts a host key it was not given",
                ));
            }
            for k in &t.host_keys {
                russh::keys::PublicKey::from_openssh(k)
                    .map_err(|e| invalid(at("host_keys"), format!("{k:?}: {e}")))?;
            }
            if t.logins.is_empty() || t.logins.iter().any(|l| l.contains(USER_SEPARATOR)) {
                return Err(invalid(
                    at("logins"),
                    "name at least one login, none containing '+'",
                ));
            }
            if t.allow.is_empty() {
                return Err(invalid(at("allow"), "admits nobody: name who may use it"));
            }
        }
        Ok(())
    }
}

impl SshTargetConfig {
    /// Whether a client may ask for `login` on this host.
    pub fn allows_login(&self, login: &str) -> bool {
        self.logins
            .iter()
            .any(|l| l == "*" || crate::ssh::command::glob_match(l, login))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_split_at_the_first_separator() {
        assert_eq!(split_user("ubuntu+web-1"), Some(("ubuntu", "web-1")));
        assert_eq!(split_user("ubuntu+web+1"), Some(("ubuntu", "web+1")));
        assert_eq!(split_user("ubuntu"), None);
        assert_eq!(split_user("+web"), None);
        assert_eq!(split_user("ubuntu+"), None);
    }
}
