//! The bad-token matrix: tokens that each differ from a valid one in exactly one defect, with
//! the words of the refusal a gateway must give. Every authentication path runs it (the
//! PostgreSQL login, the SSH keyboard-interactive login, the Kubernetes bearer token).

use base64::Engine as _;
use serde_json::{json, Value};

/// One defective token and what its refusal says (a piece of the verifier's message).
pub struct BadToken {
    pub name: &'static str,
    pub token: String,
    pub reason: &'static str,
}

pub fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// Valid claims of the agent `agent-ops` (group `dba`), before any defect.
pub fn agent_ops_claims() -> Value {
    let mut c = crate::base_claims();
    c["sub"] = json!("agent-ops");
    c["client_id"] = json!("agent-ops");
    c["groups"] = json!(["dba"]);
    c
}

/// `claims` with `key` set to `value`.
pub fn with(claims: &Value, key: &str, value: Value) -> Value {
    let mut c = claims.clone();
    c[key] = value;
    c
}

/// An RSA key (PEM) the provider does not know.
pub fn other_key() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genpkey");
    std::fs::read(path).unwrap()
}

/// The public key of the provider's signing key, as PEM: what an attacker uses as an HMAC
/// secret in the algorithm-confusion attack.
pub fn public_pem() -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in", crate::env().get("VIGIL_OIDC_KEY")])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// `token` with its payload's `sub` changed (the signature no longer matches).
pub fn tamper_payload(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    claims["sub"] = json!("admin");
    format!(
        "{}.{}.{}",
        parts[0],
        b64(serde_json::to_string(&claims).unwrap().as_bytes()),
        parts[2]
    )
}

/// `token` with a byte of its signature flipped.
pub fn tamper_signature(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .unwrap();
    bytes[10] ^= 0x55;
    format!("{head}.{}", b64(&bytes))
}

/// The matrix for a principal whose valid claims are `claims` (signed with the dev provider's
/// real key, `claims` itself is a token that passes: the control).
pub fn bad_tokens(claims: &Value) -> Vec<BadToken> {
    let kid = crate::env().get("VIGIL_OIDC_KID");
    let now = crate::now_secs();
    let forge = |c: &Value| crate::forge(c, kid, None);
    let good = forge(claims);
    let unsigned = |alg: &str| {
        let header = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
        format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    };
    let hs256 = {
        let input = unsigned("HS256");
        let key = jsonwebtoken::EncodingKey::from_secret(&public_pem());
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap();
        format!("{input}.{sig}")
    };
    // Signed with the real key under a header of its own.
    let with_header = |header: Value, claims: &Value| {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let pem = std::fs::read(crate::env().get("VIGIL_OIDC_KEY")).expect("the dev signing key");
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, jsonwebtoken::Algorithm::RS256)
                .unwrap();
        format!("{input}.{sig}")
    };
    let critical = with_header(
        json!({"alg": "RS256", "typ": "at+jwt", "kid": kid, "crit": ["urn:example:must-understand"]}),
        claims,
    );
    let without_exp = {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove("exp");
        c
    };
    let bad = |name, token, reason| BadToken {
        name,
        token,
        reason,
    };
    vec![
        bad(
            "expired",
            forge(&with(claims, "exp", json!(now - 600))),
            "expired",
        ),
        bad(
            "not yet valid",
            forge(&with(claims, "nbf", json!(now + 600))),
            "not valid yet",
        ),
        bad(
            "issued in the future",
            forge(&with(claims, "iat", json!(now + 600))),
            "issued in the future",
        ),
        bad(
            "wrong issuer",
            forge(&with(claims, "iss", json!("http://evil.example"))),
            "another issuer",
        ),
        bad(
            "wrong audience",
            forge(&with(claims, "aud", json!("urn:someone:else"))),
            "audience",
        ),
        bad(
            "alg none",
            format!("{}.", unsigned("none")),
            "algorithm none",
        ),
        bad("HS256 with the RSA public key", hs256, "HS256"),
        bad(
            "unknown kid",
            crate::forge(claims, "no-such-key", None),
            "unknown key",
        ),
        bad(
            "signed by another key under the real kid",
            crate::forge(claims, kid, Some(&other_key())),
            "signature",
        ),
        bad("tampered payload", tamper_payload(&good), "signature"),
        bad("tampered signature", tamper_signature(&good), "signature"),
        bad("garbage", "not-a-token-at-all".into(), "well-formed"),
        bad("missing exp", forge(&without_exp), "exp"),
        bad(
            "an exp that is not a time",
            forge(&with(claims, "exp", json!("tomorrow"))),
            "exp claim",
        ),
        bad("a critical header", critical, "critical header"),
        bad(
            "a line break in the subject",
            forge(&with(claims, "sub", json!("agent-ops\nFORGED log line"))),
            "sub claim is not valid",
        ),
        bad(
            "an escape sequence in the model",
            forge(&with(claims, "model", json!("gpt\u{1b}]52;c;aGk=\u{7}"))),
            "model claim is not valid",
        ),
    ]
}
