//! TLS: the server certificate clients see (from config, or generated once and persisted), and
//! client configurations for reaching targets.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A byte stream, plain or TLS, client or target side.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Writes all of `bytes` to `stream`, then flushes it. Over TLS, `write_all` can return while
/// the last records are still in the TLS session's buffer (the socket was full when they were
/// made), and nothing sends them before the next write: a peer waiting for them would wait for
/// ever (a client for the end of its answer, a target for the rest of a statement). Every
/// write to a stream that may be TLS goes through here.
pub async fn send_all<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("cannot generate a self-signed certificate")]
    Generate(#[source] rcgen::Error),
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_path_buf(),
            what: "private key",
        })
}

/// The server configuration for client connections. Without a configured certificate one is
/// generated into `generated_dir` on first start and reused afterwards, so clients that pin it
/// keep working across restarts.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    generated_dir: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        _ => {
            let c = generated_dir.join("cert.pem");
            let k = generated_dir.join("key.pem");
            if !c.exists() || !k.exists() {
                generate_self_signed(&c, &k)?;
            }
            (c, k)
        }
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(load_certs(&cert_path)?, load_key(&key_path)?)
        .map_err(TlsError::Rustls)?;
    Ok(Arc::new(config))
}

fn generate_self_signed(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let cert = rcgen::generate_simple_self_signed(names).map_err(TlsError::Generate)?;
    let write = |path: &Path, data: String| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(path, data).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    crate::core::secret::write_private_file(key_path, cert.key_pair.serialize_pem().as_bytes())
        .map_err(|source| TlsError::Read {
            path: key_path.to_path_buf(),
            source,
        })?;
    write(cert_path, cert.cert.pem())
}

/// A client configuration that verifies the target against `ca_file` (or the web PKI roots).
pub fn verifying_client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    verifying_client_config_as(ca_file, None)
}

/// [`verifying_client_config`] that presents a client certificate: the PEM chain in
/// `identity.0` and the private key whose PEM is `identity.1`.
pub fn verifying_client_config_as(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(TlsError::Rustls)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key_pem)) => {
            let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
                .ok()
                .flatten()
                .ok_or_else(|| TlsError::Empty {
                    path: cert.to_path_buf(),
                    what: "private key (of this certificate)",
                })?;
            config
                .with_client_auth_cert(load_certs(cert)?, key)
                .map_err(TlsError::Rustls)?
        }
    };
    Ok(Arc::new(config))
}

/// A client configuration that encrypts without verifying the peer (libpq's `sslmode=require`):
/// protects against passive listeners only. Chosen explicitly per connection in the config.
pub fn unverified_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_persisted_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        server_config(None, None, dir.path()).unwrap();
        let first = std::fs::read(dir.path().join("cert.pem")).unwrap();
        server_config(None, None, dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("cert.pem")).unwrap(), first);
    }

    #[test]
    fn missing_or_empty_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = server_config(Some(&empty), Some(&empty), dir.path()).unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        let e = verifying_client_config(Some(&dir.path().join("nope.pem"))).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }
}
