//! Checkpoints: a node's signed statement "stream S reached seq N, whose record hashes to H, at
//! time T". The coordinator keeps the latest one per stream (the witness); a verifier uses it to
//! prove that a stream is complete up to N, so that losing or rolling back its tail is
//! detectable, not only edits in the middle.
//!
//! What is signed is fixed here, byte for byte: the ASCII text
//! `vigil-checkpoint-v1\n{stream}\n{seq}\n{hash}\n{time_ms}`, signed with Ed25519. Keys and
//! signatures travel as lowercase hex.
//!
//! A signature proves only that the key it names signed; which key is a node's is published by
//! the witness (trust on first use per node id) and can be pinned by a verifier ([`PinnedKeys`]).

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// A signed checkpoint as published (in the topic, and held by the coordinator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub stream: String,
    pub seq: u64,
    /// Hex SHA-256 of the record at `seq`.
    pub hash: String,
    /// Milliseconds since the Unix epoch, when the node signed.
    pub time_ms: u64,
    /// Hex Ed25519 public key of the signing node.
    pub public_key: String,
    /// Hex Ed25519 signature over [`signed_bytes`].
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("the public key is not a hex Ed25519 key")]
    BadKey,
    #[error("the signature is not a hex Ed25519 signature")]
    BadSignatureEncoding,
    #[error("the signature does not match the checkpoint")]
    BadSignature,
    #[error("the hash is not 64 lowercase hex digits")]
    BadHash,
}

/// The exact bytes a checkpoint's signature covers.
pub fn signed_bytes(stream: &str, seq: u64, hash: &str, time_ms: u64) -> Vec<u8> {
    format!("vigil-checkpoint-v1\n{stream}\n{seq}\n{hash}\n{time_ms}").into_bytes()
}

impl Checkpoint {
    /// Signs `{stream, seq, hash, time}` with `key`.
    pub fn sign(key: &SigningKey, stream: &str, seq: u64, hash: &str, time_ms: u64) -> Self {
        let signature = key.sign(&signed_bytes(stream, seq, hash, time_ms));
        Self {
            stream: stream.to_string(),
            seq,
            hash: hash.to_string(),
            time_ms,
            public_key: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Checks the signature against the key the checkpoint names. Whether that key is one the
    /// verifier trusts is the caller's question.
    pub fn verify(&self) -> Result<(), CheckpointError> {
        if self.hash.len() != 64
            || !self
                .hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(CheckpointError::BadHash);
        }
        let key: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or(CheckpointError::BadKey)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| CheckpointError::BadKey)?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(CheckpointError::BadSignatureEncoding)?;
        key.verify(
            &signed_bytes(&self.stream, self.seq, &self.hash, self.time_ms),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| CheckpointError::BadSignature)
    }
}

/// A public key's fingerprint, for people comparing keys: `SHA256:` and the first 16 hex digits
/// of the SHA-256 of the key's 32 raw bytes. `None` when `public_key` is not 64 hex digits.
pub fn fingerprint(public_key: &str) -> Option<String> {
    let raw: [u8; 32] = hex::decode(public_key).ok()?.try_into().ok()?;
    Some(format!(
        "SHA256:{}",
        &hex::encode(Sha256::digest(raw))[..16]
    ))
}

/// Public keys a verifier trusts, per node id (the `--keys` file).
///
/// The text form, one key a line: `<node id> <64 hex digits>`, blank lines and lines starting
/// with `#` ignored. A node may have several keys (one line each). `vigil witness keys` prints
/// the witness's registry in this form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedKeys(BTreeMap<String, BTreeSet<String>>);

impl PinnedKeys {
    /// Parses the text form; the error names the first bad line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(node), Some(key), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {}: expected `<node id> <public key>`", n + 1));
            };
            let key = key.to_ascii_lowercase();
            if fingerprint(&key).is_none() {
                return Err(format!(
                    "line {}: the public key is not 64 hex digits",
                    n + 1
                ));
            }
            keys.insert(node, &key);
        }
        Ok(keys)
    }

    pub fn insert(&mut self, node: &str, public_key: &str) {
        self.0
            .entry(node.to_string())
            .or_default()
            .insert(public_key.to_string());
    }

    /// Whether `public_key` is pinned for `node`.
    pub fn trusts(&self, node: &str, public_key: &str) -> bool {
        self.0.get(node).is_some_and(|k| k.contains(public_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let hash = "ab".repeat(32);
        let cp = Checkpoint::sign(&key, "n1:1", 41, &hash, 1_700_000_000_000);
        assert_eq!(cp.verify(), Ok(()));
        let mut moved = cp.clone();
        moved.seq = 40;
        assert_eq!(moved.verify(), Err(CheckpointError::BadSignature));
        let mut other_stream = cp.clone();
        other_stream.stream = "n2:1".into();
        assert_eq!(other_stream.verify(), Err(CheckpointError::BadSignature));
        let mut other_key = cp.clone();
        other_key.public_key = hex::encode(
            SigningKey::from_bytes(&[8u8; 32])
                .verifying_key()
                .as_bytes(),
        );
        assert_eq!(other_key.verify(), Err(CheckpointError::BadSignature));
        let mut garbage = cp;
        garbage.signature = "zz".into();
        assert_eq!(garbage.verify(), Err(CheckpointError::BadSignatureEncoding));
    }

    #[test]
    fn pinned_keys_parse_and_refuse_junk() {
        let a = "ab".repeat(32);
        let text = format!(
            "# keys\n\ngw-1 {a}\ngw-1 {}\n  gw-2   {}  \n",
            "CD".repeat(32),
            "ef".repeat(32)
        );
        let keys = PinnedKeys::parse(&text).unwrap();
        assert!(keys.trusts("gw-1", &a));
        assert!(keys.trusts("gw-1", &"cd".repeat(32)));
        assert!(keys.trusts("gw-2", &"ef".repeat(32)));
        assert!(!keys.trusts("gw-2", &a));
        assert!(!keys.trusts("gw-3", &a));
        assert!(PinnedKeys::parse("gw-1").unwrap_err().starts_with("line 1"));
        assert!(PinnedKeys::parse("gw-1 abc").is_err());
        assert!(PinnedKeys::parse(&format!("gw-1 {a} extra")).is_err());
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        let key = hex::encode(
            SigningKey::from_bytes(&[7u8; 32])
                .verifying_key()
                .as_bytes(),
        );
        let f = fingerprint(&key).unwrap();
        assert!(f.starts_with("SHA256:") && f.len() == 23, "{f}");
        assert_eq!(fingerprint(&key), Some(f));
        assert_eq!(fingerprint("zz"), None);
    }
}
