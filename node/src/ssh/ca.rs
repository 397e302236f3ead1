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
        acceptable(&key)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // A certificate ends with its token; a token without an end gets none.
        let exp = principal
            .token_exp
            .ok_or("the token has no expiry (exp): no certificate outlives its token")?;
        let valid_before = (now + self.max_validity_secs).min(exp);
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
                .critical_option(GATEWAY_ONLY, "")?
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

/// The critical option every certificate Vigil issues carries, and the only one the gateway
/// accepts: sshd refuses a certificate with a critical option it does not know, so a host
/// that trusts Vigil's user CA by mistake still lets no one in with these certificates, past
/// the gateway's policy and recording.
pub const GATEWAY_ONLY: &str = "vigil-gateway-only@vigil";

/// The kinds of key Vigil certifies: Ed25519, ECDSA (and their security-key forms) and RSA of
/// at least 3072 bits; not DSA, short RSA, a certificate, or an unknown algorithm.
fn acceptable(key: &PublicKey) -> Result<(), String> {
    use russh::keys::ssh_key::public::KeyData;
    match key.key_data() {
        KeyData::Ed25519(_)
        | KeyData::Ecdsa(_)
        | KeyData::SkEd25519(_)
        | KeyData::SkEcdsaSha2NistP256(_) => Ok(()),
        KeyData::Rsa(rsa) if rsa.key_size() >= 3072 => Ok(()),
        KeyData::Rsa(rsa) => Err(format!(
            "an RSA key of {} bits is too short: use Ed25519, ECDSA or RSA of at least 3072 bits",
            rsa.key_size()
        )),
        _ => Err(format!(
            "a key of type {} is not certified: use Ed25519, ECDSA or RSA of at least 3072 bits",
            crate::core::echo::client_text(key.algorithm().as_str())
        )),
    }
}

/// The certificate extension that carries the token's `jti`, so a certificate can be tied to
/// the token it was issued for.
pub const JTI_EXTENSION: &str = "jti@vigil";

#[cfg(test)]
mod tests {
    use super::*;

    /// Ed25519, ECDSA and RSA of 3072 bits are certified; DSA and RSA of 2048 bits are not.
    #[test]
    fn only_strong_kinds_of_key_are_certified() {
        let ok = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDCxopPmX3pGNv61ha33UlmMYhKv+c71s9MCzweoimq/VsG8T78bsl9mlWQKdA5d+m/mg8TpldyzqwhZYiz2Xto=",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQC4j3fL57aoBSyWN+VtI7tDXlwgJL6LK3xS6B2YD6wmeINMq38NYSeZC7g9Ta3OJBrdeu6rFEbtHLEIZLrdj7MWQ3xswt8Q6NDxUS/Hc5wXq19wfTyKgbTrYN0XQCXARqmExoaSpWsjPnBt9UK+A5Q1UGxcxQzEJgXkO490xzlLsxWyNXCUGVAv+A/c6J45VptyRi2Skurm34YO0/XHlXJ1nbcGer+NVWuQ5A7SRFcTi/jbL32bvPmTZRsUkIGiOfTI/gdAwF1GZ66YC/7+j4vqujTAPew8QzJ4es12NEKA7U54sU0zWDwApCglSrhvV+L/8BBrBw2r19qfO4Mc/sX86Wa5dJfF6Jto9372LIyeC62noOZWyBf8jQ5h24nBWh1dP3XhMZhvAXRLK105GyO0xasZz2PNRmVqNEA9jujXU7mZwmq8LkIeDyqz25c2KpxTH7sxyXHH1KZ/Jj+QrZvYaE3NiYqhWSDOhNFyGByL+YmmLlh7a2kgEfoJ2Z8jLu8=",
        ];
        for line in ok {
            let key = PublicKey::from_openssh(line).unwrap();
            assert_eq!(acceptable(&key), Ok(()), "{line}");
        }
        let dsa = PublicKey::from_openssh("ssh-dss AAAAB3NzaC1kc3MAAACBAO5zgYDxgcNLiVnG9hYY9abYaWpWAH9C/qPBrYCasMuTW+N+1EmgS9fKQJi/zy4yYprZ9DePFFcA4sjDnhcJkUIp8M74od8ll1wMGn39O1q6t76Y6NSbWRjOmLS1IiHG+/SixRDa5tRZF6EsNueMxRgUX2Q5xbRgp7hzjk4syEN1AAAAFQDSKP1fXdS4aehozK8AmSQMEqCpqwAAAIEAg7WoONzxXNDKOD+rxhDFRCDdL2yCiJ/dd5RIZ5/Hfks1UsOdMmC18obNw4uABQnk0wjCLdz+kvBFGT8kzmu8izw6ygD4/gxwirkIrQ5k3WqYzOfkGdCytPVP5qWX/6xx4N8PTr/a6jMwMNRXtuJfjLNQ2+gXHjWWkaCJOLMCOY4AAACBAITEjL5PTvnmkmlho6wkXQiAN9dTUUV+Z/CcfD1YaaL0OqMq7zpt8rPVh8VZqngEQ19gd1dI3CG/vcH43FNOkc0NoKCh8wM2hqfgu+Jqs+wkoEZNGdaYQGnC+BttWyHX9ev8gIt1fkPKLcidYUl1kkH5d19kmxQjWvUwerpCkcQA").unwrap();
        let why = acceptable(&dsa).unwrap_err();
        assert!(why.contains("\"ssh-dss\" is not certified"), "{why}");
        let short = PublicKey::from_openssh("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC4vOasqBtuG8miFpDmemqYptEGC9t7++wOpbQGjhW5h3RR2qVVN0gv2oDWafP6L/dbViphcouNpDisBlHLWXYfab8CM9SrYjUkjlwWcs0a9/CfwXrgQeIpW0zovpw3NAcM6fcYLKrueV+V3XnDa6C4eklf3rr/7tGxBaamCsuIfmWaaXOt5lbp+Ueg8u7EY7AzEUzaQfGjcj8xXrC/u70xYHJe35ru1HidxS+CN6oGgmY6bm2iYDEJqGc68MN9Tp0HFrLl+6LY/130luqlkdEMByJnep0Ihyp7ePTVM8VEFKJu/mfyWTidClNxADBir/SiTY77HdVDOkWP+U/4wLBd").unwrap();
        let why = acceptable(&short).unwrap_err();
        assert!(why.contains("RSA key of 2048 bits is too short"), "{why}");
    }
}
