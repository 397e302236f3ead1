//! The console's cookies are sealed: AES-256-GCM under a key every node of the cluster holds
//! (`console.cookie_key`), so a login made on one node is good on every other, and a login
//! started on one node completes on whichever node the provider sends the browser back to.
//! The browser holds only ciphertext: it can neither read what is inside (the person's ID
//! token) nor change it. The cookie's name is the sealed value's associated data, so one
//! cookie cannot stand in for another.

use crate::core::secret::{write_private_file, SecretRef};
use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// The shortest `cookie_key` secret accepted (its bytes are the key material).
pub const MIN_SECRET_LEN: usize = 32;
/// What a browser keeps of one cookie, with room for its name and attributes.
pub const MAX_SEALED_LEN: usize = 3800;

pub struct Sealer(LessSafeKey);

impl Sealer {
    /// The key from the configured secret, or from `generated` (created on first start, kept
    /// across restarts) when none is configured: logins then hold on this node only.
    pub fn load(configured: Option<&SecretRef>, generated: &Path) -> anyhow::Result<Self> {
        let material = match configured {
            Some(r) => {
                let s = r.resolve().context("console.cookie_key")?;
                let bytes = s.expose().trim().as_bytes().to_vec();
                anyhow::ensure!(
                    bytes.len() >= MIN_SECRET_LEN,
                    "console.cookie_key: at least {MIN_SECRET_LEN} bytes (for example \
                     `openssl rand -base64 48`)"
                );
                bytes
            }
            None => match std::fs::read(generated) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let fresh = rand::random::<[u8; 32]>().to_vec();
                    write_private_file(generated, &fresh)
                        .with_context(|| format!("writing {}", generated.display()))?;
                    fresh
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", generated.display()))
                }
            },
        };
        Ok(Self::from_material(&material))
    }

    fn from_material(material: &[u8]) -> Self {
        use ring::hkdf;
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"vigil console cookies");
        let prk = salt.extract(material);
        let okm = prk
            .expand(&[b"aes-256-gcm v1"], &AES_256_GCM)
            .expect("the output length is the algorithm's key length");
        Self(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// `value` sealed as the cookie `name`: base64url(nonce ‖ ciphertext ‖ tag).
    pub fn seal<T: Serialize>(&self, name: &str, value: &T) -> String {
        let mut data = serde_json::to_vec(value).expect("cookie contents serialise");
        let nonce = rand::random::<[u8; NONCE_LEN]>();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .expect("a cookie is far below the algorithm's limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The contents of the cookie `name`, if this cluster's key sealed them as that cookie.
    pub fn open<T: DeserializeOwned>(&self, name: &str, sealed: &str) -> Option<T> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let mut data = rest.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Login {
        who: String,
    }

    fn login() -> Login {
        Login { who: "dave".into() }
    }

    /// What one node seals, a node with the same secret opens; a changed byte, another
    /// cookie's name or another key opens nothing.
    #[test]
    fn only_the_clusters_key_opens_a_cookie_unchanged_under_its_own_name() {
        let a = Sealer::from_material(b"the cluster's shared cookie secret!!");
        let b = Sealer::from_material(b"the cluster's shared cookie secret!!");
        let other = Sealer::from_material(b"another cluster's cookie secret.....");
        let sealed = a.seal("session", &login());
        assert_eq!(b.open::<Login>("session", &sealed), Some(login()));
        assert_eq!(other.open::<Login>("session", &sealed), None);
        assert_eq!(b.open::<Login>("login", &sealed), None);
        let mut raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            assert_eq!(
                b.open::<Login>("session", &URL_SAFE_NO_PAD.encode(&raw)),
                None
            );
            raw[i] ^= 1;
        }
        for junk in ["", "AAAA", "not base64!", &sealed[..20]] {
            assert_eq!(b.open::<Login>("session", junk), None, "{junk}");
        }
        // Sealing twice gives two different cookies (a fresh nonce each time).
        assert_ne!(a.seal("session", &login()), sealed);
    }

    /// Without a configured secret the key is generated once, private, and kept; a configured
    /// secret must be long enough.
    #[test]
    fn a_generated_key_is_kept_and_a_short_secret_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console").join("cookie.key");
        let first = Sealer::load(None, &path).unwrap();
        let sealed = first.seal("session", &login());
        let again = Sealer::load(None, &path).unwrap();
        assert_eq!(again.open::<Login>("session", &sealed), Some(login()));

        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let e = Sealer::load(Some(&SecretRef::File(short)), &path)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("console.cookie_key"), "{e:#}");
    }
}
