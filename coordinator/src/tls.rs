//! TLS on the coordinator's gRPC port (rustls on ring, through tonic).
//!
//! One port serves three kinds of caller, so the server asks for a client certificate without
//! demanding one:
//! - members call each other with mutual TLS: each presents its own certificate (the one it
//!   serves with), verified against the cluster's CA in the handshake, and the gate in front of
//!   the `Raft` service refuses a caller that presented none ([`require_member_certificate`]),
//!   before reading its message; a certificate from
//!   another CA fails the handshake itself;
//! - gateway nodes and operators connect over TLS and verify the member's certificate against
//!   the CA they are given; they authenticate inside with the cluster token or an OIDC token.
//!
//! A member's certificate must name the address the others and the clients reach it at (its
//! `advertise` address, or the host in the membership) in its subject alternative names, and
//! be usable for both server and client authentication.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::codegen::http::Extensions;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::Status;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("invalid TLS settings ({what})")]
    Invalid {
        what: String,
        #[source]
        source: tonic::transport::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A CA file: at least one PEM certificate (an empty trust store would fail every
/// handshake later, with a vaguer message).
fn read_ca(path: &Path) -> Result<Certificate, TlsError> {
    let pem = read(path)?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(Certificate::from_pem(pem))
}

/// `[member.tls]`: the member's certificate and key (PEM; it serves with them and presents
/// them to the other members) and the CA that signed every member's certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

impl MemberTls {
    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read(&self.cert_file)?,
            read(&self.key_file)?,
        ))
    }

    /// The server side: this member's certificate; a client certificate is verified against
    /// the CA when presented.
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        let config = ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(read_ca(&self.ca_file)?)
            .client_auth_optional(true)
            .timeout(HANDSHAKE_TIMEOUT);
        // Built once here so that a bad file stops the member at start, naming the files.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|source| TlsError::Invalid {
                what: format!(
                    "{}, {}, {}",
                    self.cert_file.display(),
                    self.key_file.display(),
                    self.ca_file.display()
                ),
                source,
            })?;
        Ok(config)
    }

    /// The client side towards the other members: verifies them against the CA and presents
    /// this member's certificate.
    pub fn peer_client(&self) -> Result<ClientTls, TlsError> {
        ClientTls::build(
            ClientTlsConfig::new()
                .ca_certificate(read_ca(&self.ca_file)?)
                .identity(self.identity()?),
            &self.ca_file,
        )
    }
}

/// How a client (gateway node, CLI, member) reaches members over TLS.
#[derive(Clone, Debug)]
pub struct ClientTls(ClientTlsConfig);

impl ClientTls {
    /// Verifies members against the CA in `ca_file` (PEM), presenting no certificate.
    pub fn verify_with(ca_file: &Path) -> Result<Self, TlsError> {
        Self::build(
            ClientTlsConfig::new().ca_certificate(read_ca(ca_file)?),
            ca_file,
        )
    }

    fn build(config: ClientTlsConfig, ca_file: &Path) -> Result<Self, TlsError> {
        // Built once here so that a bad file is reported at start, not at the first call.
        tonic::transport::Endpoint::from_static("https://member.invalid")
            .tls_config(config.clone())
            .map_err(|source| TlsError::Invalid {
                what: ca_file.display().to_string(),
                source,
            })?;
        Ok(Self(config))
    }

    pub(crate) fn config(&self) -> ClientTlsConfig {
        self.0.clone()
    }
}

/// With TLS on, a `Raft` RPC must come from a member: a caller that presented a certificate
/// the cluster's CA signed (the handshake verified it; here it is only required). Checked by
/// the gate on the call's extensions, where tonic puts the connection's, before the message is
/// read.
pub fn require_member_certificate(tls: bool, extensions: &Extensions) -> Result<(), Status> {
    let certificates = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|c| c.peer_certs());
    if !tls || certificates.is_some_and(|c| !c.is_empty()) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "Raft RPCs need a member's client certificate (signed by the cluster's CA)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and two member certificates, made by deploy/coordinator-tls.sh (openssl).
    fn certificates() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator-tls.sh");
        let status = std::process::Command::new(script)
            .arg(dir.path())
            .args(["m1=IP:127.0.0.1", "m2=IP:127.0.0.1"])
            .status()
            .expect("deploy/coordinator-tls.sh runs (openssl)");
        assert!(status.success());
        dir
    }

    fn member(dir: &Path, cert: &str, key: &str, ca: &str) -> MemberTls {
        MemberTls {
            cert_file: dir.join(cert),
            key_file: dir.join(key),
            ca_file: dir.join(ca),
        }
    }

    /// What the script makes is taken; a missing file, a CA file without a certificate and a
    /// key that is not the certificate's stop the member at start, naming the files.
    #[test]
    fn bad_tls_files_are_refused_at_start_with_their_names() {
        let dir = certificates();
        let d = dir.path();
        let good = member(d, "m1.pem", "m1.key", "ca.pem");
        good.server().unwrap();
        good.peer_client().unwrap();
        ClientTls::verify_with(&d.join("ca.pem")).unwrap();

        let e = member(d, "m1.pem", "m1.key", "nope.pem")
            .server()
            .unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let e = ClientTls::verify_with(&d.join("m1.key")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} holds no PEM certificate", d.join("m1.key").display())
        );
        let e = member(d, "m1.pem", "m2.key", "ca.pem")
            .server()
            .unwrap_err();
        assert!(matches!(e, TlsError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("m2.key"), "{e}");
    }
}
