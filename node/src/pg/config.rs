//! The `[postgres]` section: the listener, its limits, and the connections (targets) clients
//! may reach through it.

use crate::core::config_error::{invalid, ConfigError};
use crate::core::secret::{Secret, SecretRef};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub listen: SocketAddr,
    /// Largest message accepted from a client, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Largest message accepted from a target (a row, a notice), in bytes; a longer one ends
    /// the session with `54000`.
    #[serde(default = "default_max_target_message")]
    pub max_target_message_bytes: usize,
    /// Memory the node lends to target messages over 1 MiB at once; a session whose next
    /// message does not fit waits for it (see `budget`).
    #[serde(default = "default_target_message_memory")]
    pub target_message_memory_bytes: usize,
    /// A message over 1 MiB holds the node's memory until the client has taken it: it must
    /// within this many seconds plus its length at `min_client_read_bytes_per_sec`, or the
    /// session ends (see [`PostgresConfig::large_write_deadline`]).
    #[serde(default = "default_client_read_grace")]
    pub client_read_grace_secs: u64,
    #[serde(default = "default_min_client_read_rate")]
    pub min_client_read_bytes_per_sec: u64,
    /// How long the lookup of the tables behind result columns (for column masking rules)
    /// may take; past it, the columns are masked whole.
    #[serde(default = "default_catalog_timeout")]
    pub catalog_timeout_secs: u64,
    /// Largest message accepted before the client is authenticated (startup packets, the
    /// password message): an unauthenticated client cannot make the gateway buffer more. Read
    /// it with [`PostgresConfig::preauth_message_limit`].
    #[serde(default)]
    pub max_preauth_message_bytes: Option<usize>,
    /// Connections not yet authenticated that the listener holds at once; more are refused
    /// with `53300` as they arrive.
    #[serde(default = "default_max_unauthenticated_connections")]
    pub max_unauthenticated_connections: usize,
    /// PEM certificate chain and key for client TLS; generated in `<data_dir>/tls` when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Accept a token over a connection without TLS. Off by default: the token is a bearer
    /// credential.
    #[serde(default)]
    pub allow_cleartext_token: bool,
    /// Time a client has to finish TLS, startup and authentication.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_secs: u64,
    #[serde(default)]
    pub connections: Vec<PgConnectionConfig>,
}

fn default_max_frame() -> usize {
    64 * 1024 * 1024
}
fn default_max_target_message() -> usize {
    256 * 1024 * 1024
}
fn default_target_message_memory() -> usize {
    1024 * 1024 * 1024
}
fn default_client_read_grace() -> u64 {
    30
}
fn default_min_client_read_rate() -> u64 {
    1024 * 1024
}
fn default_catalog_timeout() -> u64 {
    10
}
/// PostgreSQL's own limit for a message.
const MAX_TARGET_MESSAGE: usize = 1 << 30;
/// PostgreSQL caps startup packets at 10,000 bytes; a token takes a few KiB.
const DEFAULT_MAX_PREAUTH_MESSAGE: usize = 16 * 1024;
fn default_max_unauthenticated_connections() -> usize {
    256
}
fn default_startup_timeout() -> u64 {
    15
}

impl PostgresConfig {
    /// The connections marked `read_only`: the node's policy decides on them too (rule
    /// `read-only`), so they are part of its version.
    pub fn read_only_connections(&self) -> Vec<String> {
        self.connections
            .iter()
            .filter(|c| c.read_only)
            .map(|c| c.name.clone())
            .collect()
    }

    /// How long a client may take to take a message of `bytes` over 1 MiB, which holds the
    /// node's memory for large messages until then (`client_read_grace_secs` plus its length
    /// at `min_client_read_bytes_per_sec`).
    pub fn large_write_deadline(&self, bytes: usize) -> std::time::Duration {
        let secs = bytes as f64 / self.min_client_read_bytes_per_sec as f64;
        std::time::Duration::from_secs(self.client_read_grace_secs)
            + std::time::Duration::from_secs_f64(secs)
    }

    /// `max_preauth_message_bytes`; by default 16 KiB, or `max_frame_bytes` if that is smaller.
    pub fn preauth_message_limit(&self) -> usize {
        self.max_preauth_message_bytes
            .unwrap_or(DEFAULT_MAX_PREAUTH_MESSAGE.min(self.max_frame_bytes))
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TargetTls {
    #[default]
    Disable,
    /// TLS without verifying the certificate (like libpq's `sslmode=require`).
    Require,
    /// TLS, certificate verified against `ca_file` (or the web PKI) and the host name.
    VerifyFull,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConnectionConfig {
    /// What clients put in `dbname` to reach this target.
    pub name: String,
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub database: String,
    /// The gateway's own login on the target.
    pub user: String,
    #[serde(default)]
    pub password: Option<SecretRef>,
    #[serde(default)]
    pub tls: TargetTls,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Only reads, transaction control and harmless settings pass (rule `read-only`).
    #[serde(default)]
    pub read_only: bool,
    /// Who may use it (a principal on any list).
    pub allow: crate::core::principals::PrincipalMatch,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_connect_timeout() -> u64 {
    10
}

/// A connection with its secret resolved, ready for use.
#[derive(Clone, Debug)]
pub struct PgTarget {
    pub config: PgConnectionConfig,
    pub password: Option<Secret<String>>,
}

impl PostgresConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.startup_timeout_secs == 0 {
            return Err(invalid(
                "postgres.startup_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.max_frame_bytes < 1024 {
            return Err(invalid("postgres.max_frame_bytes", "must be at least 1024"));
        }
        if self
            .max_preauth_message_bytes
            .is_some_and(|max| max < 1024 || max > self.max_frame_bytes)
        {
            return Err(invalid(
                "postgres.max_preauth_message_bytes",
                "must be at least 1024 and at most postgres.max_frame_bytes",
            ));
        }
        if !(1 << 20..=MAX_TARGET_MESSAGE).contains(&self.max_target_message_bytes) {
            return Err(invalid(
                "postgres.max_target_message_bytes",
                "must be at least 1048576 (1 MiB) and at most 1073741824 (1 GiB)",
            ));
        }
        if self.target_message_memory_bytes < self.max_target_message_bytes
            || self.target_message_memory_bytes > 4 * MAX_TARGET_MESSAGE
        {
            return Err(invalid(
                "postgres.target_message_memory_bytes",
                "must be at least postgres.max_target_message_bytes and at most 4294967296 (4 GiB)",
            ));
        }
        if !(1..=86_400).contains(&self.client_read_grace_secs) {
            return Err(invalid(
                "postgres.client_read_grace_secs",
                "must be at least 1 and at most 86400",
            ));
        }
        if !(1..=300).contains(&self.catalog_timeout_secs) {
            return Err(invalid(
                "postgres.catalog_timeout_secs",
                "must be at least 1 and at most 300",
            ));
        }
        if self.min_client_read_bytes_per_sec < 1024 {
            return Err(invalid(
                "postgres.min_client_read_bytes_per_sec",
                "must be at least 1024",
            ));
        }
        if self.max_unauthenticated_connections == 0 {
            return Err(invalid(
                "postgres.max_unauthenticated_connections",
                "must be at least 1",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "postgres.tls_cert",
                "tls_cert and tls_key must be given together",
            ));
        }
        if self.connections.is_empty() {
            return Err(invalid(
                "postgres.connections",
                "at least one connection is needed",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.connections.iter().enumerate() {
            let key = |k: &str| format!("postgres.connections[{i}].{k}");
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                return Err(invalid(key("name"), "must be non-empty and unique"));
            }
            if c.allow.is_empty() {
                return Err(invalid(
                    key("allow"),
                    "allows no one: list subjects, client_ids, groups or models, or set any_authenticated = true",
                ));
            }
            if c.connect_timeout_secs == 0 || c.connect_timeout_secs >= self.startup_timeout_secs {
                return Err(invalid(
                    key("connect_timeout_secs"),
                    "must be at least 1 and below postgres.startup_timeout_secs",
                ));
            }
            if c.ca_file.is_some() && c.tls != TargetTls::VerifyFull {
                return Err(invalid(
                    key("ca_file"),
                    "only used with tls = \"verify-full\"",
                ));
            }
        }
        Ok(())
    }

    /// Resolves every secret reference; a missing one is an error naming its key.
    pub fn targets(&self) -> Result<Vec<PgTarget>, ConfigError> {
        self.connections
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let password = c
                    .password
                    .as_ref()
                    .map(|r| r.resolve())
                    .transpose()
                    .map_err(|e| {
                        invalid(format!("postgres.connections[{i}].password"), e.to_string())
                    })?;
                Ok(PgTarget {
                    config: c.clone(),
                    password,
                })
            })
            .collect()
    }
}
