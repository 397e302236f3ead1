//! Vigil-issued tokens (`[identity.tokens]`): short-lived JWTs the cluster signs for a person
//! or workload that signed in some other way than with an OIDC token (SAML), usable wherever a
//! token is (the PostgreSQL password, the Kubernetes bearer token, the console's calls to the
//! coordinator). They are verified by the same [`TokenVerifier`](super::identity::TokenVerifier)
//! as the provider's tokens, with these keys instead of the provider's JWKS when `iss` is the
//! cluster's own issuer.
//!
//! The signing key is Ed25519 (PKCS#8 PEM, `openssl genpkey -algorithm ed25519`), by secret
//! reference, the same on every node. Rotation: a new `signing_key` with a new `key_id`, the old
//! one listed under `retired` with the time until which tokens it signed still verify (at least
//! `lifetime_secs` after the switch).

use crate::core::config_error::{invalid, ConfigError};
use crate::core::secret::SecretRef;
use anyhow::Context as _;
use base64::Engine as _;
use jsonwebtoken::{DecodingKey, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};
use vigil_proto::record::Principal;

/// The `[identity.tokens]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// The cluster's own issuer (`iss`): a URL that is not the OIDC provider's.
    pub issuer: String,
    /// The Ed25519 private key (PKCS#8 PEM) tokens are signed with.
    pub signing_key: SecretRef,
    /// Its key id (`kid`).
    pub key_id: String,
    /// The longest a token lives (less when the sign-in it stands for ends sooner).
    #[serde(default = "default_lifetime")]
    pub lifetime_secs: u64,
    /// Keys no longer used to sign, whose tokens still verify until `until`.
    #[serde(default)]
    pub retired: Vec<RetiredKey>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    pub key_id: String,
    /// The retired private key (its public half is what verifies).
    pub signing_key: SecretRef,
    /// Seconds since the Unix epoch after which its tokens are refused.
    pub until: u64,
}

fn default_lifetime() -> u64 {
    3600
}

impl TokensConfig {
    pub fn validate(&self, oidc_issuer: &str) -> Result<(), ConfigError> {
        if !self.issuer.starts_with("https://") && !self.issuer.starts_with("http://") {
            return Err(invalid("identity.tokens.issuer", "must be a URL"));
        }
        if self.issuer == oidc_issuer {
            return Err(invalid(
                "identity.tokens.issuer",
                "must not be the OIDC provider's issuer: the cluster signs its own tokens",
            ));
        }
        if self.key_id.is_empty() {
            return Err(invalid("identity.tokens.key_id", "must not be empty"));
        }
        if !(60..=86_400).contains(&self.lifetime_secs) {
            return Err(invalid(
                "identity.tokens.lifetime_secs",
                "must be between 60 and 86400",
            ));
        }
        if self.retired.iter().any(|r| r.key_id == self.key_id) {
            return Err(invalid(
                "identity.tokens.retired",
                "a retired key must have another key_id than the signing key",
            ));
        }
        Ok(())
    }
}

/// One verifying key of the cluster's issuer.
pub struct VerifyingKey {
    pub key: DecodingKey,
    /// Seconds since the epoch after which it verifies nothing (`None`: the signing key).
    until: Option<u64>,
}

/// The cluster's token keys: the one that signs, and every one that still verifies.
pub struct IssuedKeys {
    pub issuer: String,
    key_id: String,
    signing: EncodingKey,
    verifying: std::collections::HashMap<String, VerifyingKey>,
    lifetime_secs: u64,
}

/// What every Ed25519 PKCS#8 (RFC 8410) private key's DER starts with, before its seed.
pub(crate) const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The 32-byte seed of an Ed25519 PKCS#8 private key in PEM.
fn ed25519_seed(pem: &str) -> anyhow::Result<[u8; 32]> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect();
    anyhow::ensure!(
        pem.contains("-----BEGIN PRIVATE KEY-----"),
        "not a PKCS#8 PEM private key (openssl genpkey -algorithm ed25519)"
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .context("the PEM body is not base64")?;
    anyhow::ensure!(
        der.len() == 48 && der[..16] == PKCS8_ED25519_PREFIX,
        "not an Ed25519 private key (openssl genpkey -algorithm ed25519)"
    );
    Ok(der[16..].try_into().expect("32 bytes"))
}

fn verifying_key(seed: &[u8; 32]) -> DecodingKey {
    let public = ed25519_dalek::SigningKey::from_bytes(seed).verifying_key();
    DecodingKey::from_ed_der(public.as_bytes())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl IssuedKeys {
    /// Resolves and checks the keys (bad keys: the node does not start).
    pub fn load(config: &TokensConfig) -> anyhow::Result<Self> {
        let pem = config
            .signing_key
            .resolve()
            .context("identity.tokens.signing_key")?;
        let seed = ed25519_seed(pem.expose()).context("identity.tokens.signing_key")?;
        let der = [&PKCS8_ED25519_PREFIX[..], &seed[..]].concat();
        let mut verifying = std::collections::HashMap::new();
        verifying.insert(
            config.key_id.clone(),
            VerifyingKey {
                key: verifying_key(&seed),
                until: None,
            },
        );
        for r in &config.retired {
            let pem = r
                .signing_key
                .resolve()
                .with_context(|| format!("identity.tokens.retired {}", r.key_id))?;
            let seed = ed25519_seed(pem.expose())
                .with_context(|| format!("identity.tokens.retired {}", r.key_id))?;
            verifying.insert(
                r.key_id.clone(),
                VerifyingKey {
                    key: verifying_key(&seed),
                    until: Some(r.until),
                },
            );
        }
        Ok(Self {
            issuer: config.issuer.clone(),
            key_id: config.key_id.clone(),
            signing: EncodingKey::from_ed_der(&der),
            verifying,
            lifetime_secs: config.lifetime_secs,
        })
    }

    /// The key that verifies tokens signed with `kid` now, if there is one.
    pub fn key(&self, kid: &str) -> Option<&DecodingKey> {
        let k = self.verifying.get(kid)?;
        k.until
            .is_none_or(|until| now_secs() < until)
            .then_some(&k.key)
    }

    /// A token for `principal`, for `audience`, living no longer than `lifetime_secs` nor
    /// past `not_after` (seconds since the epoch: when the sign-in it stands for ends).
    /// Its claims are the default claim names the verifier maps back.
    pub fn issue(&self, principal: &Principal, audience: &str, not_after: u64) -> String {
        let now = now_secs();
        let exp = not_after.min(now + self.lifetime_secs);
        let mut claims = json!({
            "iss": self.issuer,
            "sub": principal.subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": hex::encode(rand::random::<[u8; 16]>()),
            "groups": principal.groups,
        });
        let extra = [
            ("model", &principal.model),
            ("model_version", &principal.model_version),
            ("client_id", &principal.client_id),
            (crate::core::identity::PERSON_CLAIM, &principal.person),
        ];
        for (name, value) in extra {
            if let Some(v) = value {
                claims[name] = Value::String(v.clone());
            }
        }
        if let Some(saml) = &principal.saml {
            claims["saml_idp"] = Value::String(saml.idp.clone());
            claims["saml_assertion"] = Value::String(saml.assertion_id.clone());
        }
        let mut header = Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, &claims, &self.signing).expect("Ed25519 signing")
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// An Ed25519 PKCS#8 PEM for tests (RFC 8410's example key).
    pub const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
        -----END PRIVATE KEY-----\n";

    #[test]
    fn only_an_ed25519_pkcs8_key_is_accepted() {
        assert!(ed25519_seed(TEST_KEY).is_ok());
        let rsa_like = TEST_KEY.replace("MC4CAQAw", "MC4CAQEw");
        assert!(ed25519_seed(&rsa_like).is_err());
        assert!(
            ed25519_seed("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err()
        );
        assert!(ed25519_seed("not pem").is_err());
    }
}
