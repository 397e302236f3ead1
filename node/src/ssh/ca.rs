//! Vigil's SSH user CA: signs short-lived OpenSSH user certificates for a verified principal's
//! public key, and tells the SSH listener which certificates are its own.

use super::config::SshConfig;
use super::session::PRINCIPAL_EXTENSION;
use anyhow::Context as _;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Fingerprint, HashAlg};
use russh::keys::{PrivateKey, PublicKey};
use std::time::{SystemTime, UNIX_EPOCH};
use vigil_proto::record::Principal;

/// Certificates start this long before they are issued, for clients whose clock is behind.
const BACKDATE_SECS: u64 = 60;

pub struct UserCa {
    key: PrivateKey,
    fingerprint: Fingerprint,
    /// The longest validity of a certificate; a token that expires sooner shortens it.
    max_validity_secs: u64,
}

/// A certificate, as the endpoint hands it out.
pub struct Issued {
    /// One line, as in an OpenSSH `-cert.pub` file.
    pub certificate: String,
    pub serial: u64,
    pub valid_before: u64,
    /// The SHA-256 fingerprint of the certified key.
    pub key_fingerprint: String,
}

impl UserCa {
    /// The CA of `[ssh]`, when it names one.
    pub fn load(section: &SshConfig) -> anyhow::Result<Option<Self>> {
        let Some(r) = &section.user_ca_key else {
            return Ok(None);
        };
        let key = PrivateKey::from_openssh(r.resolve()?.expose())
            .context("ssh.user_ca_key is not an OpenSSH private key")?;
        let fingerprint = key.public_key().fingerprint(HashAlg::Sha256);
        Ok(Some(Self {
            key,
            fingerprint,
            max_validity_secs: section.max_certificate_validity_secs,
        }))
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Signs a user certificate for `public_key` (an OpenSSH public key line): valid from a
    /// minute ago until the token expires (at most `max_certificate_validity_secs`), for the
    /// principal's subject, carrying the principal as the `principal@vigil` extension and the
    /// token's `jti` as `jti@vigil` (it is in the principal too).
    pub fn issue(&self, public_key: &str, principal: &Principal) -> Result<Issued, String> {
        let key = PublicKey::from_openssh(public_key.trim())
            .map_err(|e| format!("not an OpenSSH public key: {e}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut valid_before = now + self.max_validity_secs;
        if let Some(exp) = principal.token_exp {
            valid_before = valid_before.min(exp);
        }
        if valid_before <= now {
            return Err("the token has expired".into());
        }
        let serial: u64 = rand::random();
        let nonce: [u8; 32] = rand::random();
        let json = serde_json::to_string(principal).map_err(|e| e.to_string())?;
        let key_id = match (&principal.client_id, &principal.model) {
            (Some(c), Some(m)) => format!("{} ({c}, {m})", principal.subject),
            (Some(c), None) => format!("{} ({c})", principal.subject),
            _ => principal.subject.clone(),
        };
        let sign = || -> Result<_, russh::keys::ssh_key::Error> {
            let mut b = Builder::new(
                nonce.to_vec(),
                key.key_data().clone(),
                now.saturating_sub(BACKDATE_SECS),
                valid_before,
            )?;
            b.serial(serial)?
                .cert_type(CertType::User)?
                .key_id(key_id)?
                .valid_principal(principal.subject.clone())?
                .extension("permit-pty", "")?
                .extension(PRINCIPAL_EXTENSION, json)?;
            if let Some(jti) = &principal.token_id {
                b.extension(JTI_EXTENSION, jti.clone())?;
            }
            b.sign(&self.key)
        };
        let cert = sign().map_err(|e| format!("cannot sign the certificate: {e}"))?;
        let certificate = cert
            .to_openssh()
            .map_err(|e| format!("cannot encode the certificate: {e}"))?;
        Ok(Issued {
            certificate,
            serial,
            valid_before,
            key_fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        })
    }
}

/// The certificate extension that carries the token's `jti`, so a certificate can be tied to
/// the token it was issued for.
pub const JTI_EXTENSION: &str = "jti@vigil";
