//! The `[kubernetes]` section: the listener clients' kubeconfigs point at, and the clusters
//! (API servers) behind it.

use crate::core::config_error::{invalid, ConfigError};
use crate::core::principals::PrincipalMatch;
use crate::core::secret::SecretRef;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The path prefix that names a cluster: a kubeconfig's `server` is
/// `https://GATEWAY:PORT/clusters/NAME`, and kubectl appends `/api/…` to it.
pub const CLUSTER_PREFIX: &str = "/clusters/";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    /// TLS only; HTTP/1.1 and HTTP/2 (ALPN).
    pub listen: SocketAddr,
    /// PEM certificate chain and key; generated in `<data_dir>/tls-kubernetes` when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The largest request body the gateway accepts (it reads a body whole before deciding
    /// and recording it); larger ones get 413.
    #[serde(default = "default_max_request_body")]
    pub max_request_body_bytes: usize,
    /// How much of a request or response body a record keeps; the rest is counted, and its
    /// digest covers all of it.
    #[serde(default = "default_max_record_body")]
    pub max_record_body_bytes: usize,
    /// Largest request head (request line and headers).
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Client connections held at once (accepted, before TLS too); one more is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// An exec, attach or port-forward stream on which no byte crosses either way for this
    /// long is ended by the gateway; `0`: never.
    #[serde(default)]
    pub idle_timeout_secs: u64,
    #[serde(default)]
    pub clusters: Vec<KubeClusterConfig>,
}

fn default_max_request_body() -> usize {
    3 * 1024 * 1024
}

/// The most of a body a record may keep (`kubernetes.max_record_body_bytes`).
const MAX_RECORD_BODY: usize = 64 << 20;

fn default_max_record_body() -> usize {
    64 * 1024
}
fn default_max_header() -> usize {
    64 * 1024
}
fn default_max_connections() -> usize {
    1024
}

/// One API server clients may reach as `/clusters/NAME`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeClusterConfig {
    pub name: String,
    /// The API server's URL (`https://host:port`).
    pub server: String,
    /// PEM file of the CA the API server's certificate chains to; default: the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The gateway's own credential, one of two kinds. A bearer token (a ServiceAccount
    /// token), by reference. The caller never sees it; the API server sees the caller only
    /// through impersonation.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// Or a client certificate: its PEM chain (public) and its private key (PEM, by
    /// reference).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<SecretRef>,
    /// Prepended to each of the principal's groups in `Impersonate-Group` (`vigil:` makes
    /// `dba` the Kubernetes group `vigil:dba`), so RBAC can tell Vigil's groups from the
    /// cluster's own.
    #[serde(default)]
    pub group_prefix: String,
    /// Groups every impersonated caller gets in addition (for example
    /// `system:authenticated`, which impersonation does not add by itself for groups named
    /// explicitly).
    #[serde(default = "default_extra_groups")]
    pub extra_groups: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// The longest wait for the API server's answer to a forwarded request (its status and
    /// headers; a watch's or a stream's body is not bounded by it).
    #[serde(default = "default_response_timeout")]
    pub response_timeout_secs: u64,
    /// Who may use this cluster. Required: an empty match admits nobody.
    pub allow: PrincipalMatch,
}

fn default_extra_groups() -> Vec<String> {
    vec!["system:authenticated".into()]
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_response_timeout() -> u64 {
    120
}

impl KubeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("kubernetes.max_connections", "must be at least 1"));
        }
        if self.max_request_body_bytes == 0 || self.max_header_bytes < 1024 {
            return Err(invalid(
                "kubernetes.max_request_body_bytes",
                "must be at least 1 (and max_header_bytes at least 1024)",
            ));
        }
        if self.max_record_body_bytes > MAX_RECORD_BODY {
            return Err(invalid(
                "kubernetes.max_record_body_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = |field: &str| format!("kubernetes.clusters[{i}].{field}");
            let name_ok = !c.name.is_empty()
                && c.name != "."
                && c.name != ".."
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.');
            if !name_ok {
                return Err(invalid(
                    at("name"),
                    "must be non-empty, not . or .., and use only letters, digits, '-', '_' and '.' (it is a path segment)",
                ));
            }
            if !names.insert(&c.name) {
                return Err(invalid(at("name"), "is used by another cluster"));
            }
            let url = c
                .server
                .parse::<http::Uri>()
                .map_err(|e| invalid(at("server"), e.to_string()))?;
            if url.scheme_str() != Some("https") || url.host().is_none() {
                return Err(invalid(
                    at("server"),
                    "must be an https:// URL with a host (the API server's address)",
                ));
            }
            match (&c.token, &c.client_cert, &c.client_key) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                _ => {
                    return Err(invalid(
                        at("token"),
                        "the gateway's credential is either `token` or both `client_cert` and `client_key`",
                    ))
                }
            }
            if c.allow.is_empty() {
                return Err(invalid(at("allow"), "admits nobody: name who may use it"));
            }
            if c.response_timeout_secs == 0 {
                return Err(invalid(at("response_timeout_secs"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_at_most_64_mib_of_a_body() {
        let with = |bytes: usize| {
            toml::from_str::<KubeConfig>(&format!(
                "listen = \"127.0.0.1:0\"\nmax_record_body_bytes = {bytes}"
            ))
            .unwrap()
            .validate()
        };
        assert!(with(MAX_RECORD_BODY).is_ok());
        let e = with(MAX_RECORD_BODY + 1).unwrap_err().to_string();
        assert!(e.contains("kubernetes.max_record_body_bytes"), "{e}");
        assert!(with(i64::MAX as usize).is_err());
    }
}
