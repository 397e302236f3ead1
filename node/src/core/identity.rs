//! OIDC token verification: discovery from the issuer, the JWKS cached by key id, and the checks
//! of design.md (algorithm allow-list, exact `iss`, `aud`, `exp`, `nbf`, `iat`, token type).
//!
//! ID tokens and RFC 9068 JWT access tokens are both JWS-signed JWTs checked against the same
//! key set, so one verifier serves both; they differ only in their `typ` header (`at+jwt` for
//! access tokens). Header fields that would let a token pick its own key (`jku`, `x5u`, `jwk`)
//! are ignored: keys come from the issuer's JWKS only.
//!
//! Tokens the cluster issued itself (`[identity.tokens]`, [`issued`](super::issued)) take the
//! same path: when a token's (still unverified) `iss` is the cluster's issuer, its key comes
//! from the cluster's own key set instead of the provider's JWKS, and every check is the same.

use crate::config::{Algorithm, ClaimNames, IdentityConfig, SessionExpiry, TokenType};
use crate::core::issued::IssuedKeys;
use crate::core::metrics::{Metrics, ReasonLabel};
use base64::Engine as _;
use jsonwebtoken::{jwk::JwkSet, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::Digest as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use vigil_proto::record::{Principal, SamlOrigin};

/// Why a token was refused. The text is what the client is told: precise enough to fix a
/// misconfigured agent, nothing that helps forge a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("signing algorithm {0} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("the token has no key id (kid)")]
    MissingKid,
    #[error("the token is signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is not meant for this gateway (audience)")]
    WrongAudience,
    #[error("token type {0} is not accepted")]
    TypeNotAccepted(String),
    #[error("the token lacks the {0} claim")]
    MissingClaim(String),
    #[error("the token's {0} claim is not valid")]
    BadClaim(String),
    #[error("the token has critical header parameters (crit) the gateway does not understand")]
    CriticalHeader,
    #[error("cannot verify tokens now: the identity provider is unavailable")]
    ProviderUnavailable,
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::AlgorithmNotAllowed(_) => "algorithm",
            TokenError::MissingKid => "missing_kid",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::IssuedInFuture => "issued_in_future",
            TokenError::WrongIssuer => "issuer",
            TokenError::WrongAudience => "audience",
            TokenError::TypeNotAccepted(_) => "type",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::BadClaim(_) => "bad_claim",
            TokenError::CriticalHeader => "critical_header",
            TokenError::ProviderUnavailable => "provider_unavailable",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("discovery document names issuer {found:?}, expected {expected:?}")]
    IssuerMismatch { expected: String, found: String },
}

#[derive(Debug, serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

struct KeyEntry {
    key: DecodingKey,
    /// The `alg` the JWK pins, if any.
    alg: Option<String>,
    family: KeyFamily,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    Ec,
    Okp,
    Other,
}

fn family_of(alg: Algorithm) -> KeyFamily {
    match alg {
        Algorithm::RS256 => KeyFamily::Rsa,
        Algorithm::ES256 => KeyFamily::Ec,
        Algorithm::EdDSA => KeyFamily::Okp,
    }
}

struct FetchState {
    jwks_uri: Option<String>,
    last_fetch: Option<Instant>,
}

/// Verifies tokens of one issuer. Cheap to share (`Arc`).
pub struct TokenVerifier {
    config: IdentityConfig,
    http: reqwest::Client,
    keys: moka::future::Cache<String, Arc<KeyEntry>>,
    /// Tokens verified lately (by SHA-256 of the token), with their principal and key id: a
    /// client that sends the same token with every request (the Kubernetes gateway's callers)
    /// pays for its signature once. An entry is used only while its token has not expired and
    /// its key is still one of the provider's; all are dropped when the keys are fetched again.
    verified: moka::sync::Cache<[u8; 32], Arc<(Principal, String)>>,
    /// Serialises fetches (single flight) and remembers when the last one happened.
    fetch: Mutex<FetchState>,
    ready: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
    /// The cluster's own token keys (`[identity.tokens]`).
    issued: Option<IssuedKeys>,
}

/// How long a verification is reused at most, and how many are kept.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_CAPACITY: u64 = 10_000;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenVerifier {
    /// A verifier for `config`; its `[identity.tokens]` keys are read here (a bad key: no start).
    pub fn new(config: IdentityConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let issued = config.tokens.as_ref().map(IssuedKeys::load).transpose()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.http_timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client builds with static settings");
        Ok(Arc::new(Self {
            config,
            http,
            keys: moka::future::Cache::builder()
                .max_capacity(1024)
                // Keys expire so that a key removed at the provider stops verifying; the next
                // token signed with it triggers a (cooldown-limited) refetch.
                .time_to_live(Duration::from_secs(3600))
                .build(),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build(),
            fetch: Mutex::new(FetchState {
                jwks_uri: None,
                last_fetch: None,
            }),
            ready: std::sync::atomic::AtomicBool::new(false),
            metrics,
            issued,
        }))
    }

    /// The cluster's own token keys, when it issues tokens.
    pub fn issued(&self) -> Option<&IssuedKeys> {
        self.issued.as_ref()
    }

    /// The identity configuration this verifier checks tokens against.
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// Whether the key `kid` of the issuer that signed `principal`'s token still verifies.
    fn key_current(&self, principal: &Principal, kid: &str) -> bool {
        match &self.issued {
            Some(k) if principal.issuer == k.issuer => k.key(kid).is_some(),
            _ => self.keys.contains_key(kid),
        }
    }

    /// Whether keys have been loaded at least once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads discovery and keys now, regardless of the cooldown (used at start).
    pub async fn refresh(&self) -> Result<(), ProviderError> {
        let mut state = self.fetch.lock().await;
        self.fetch_locked(&mut state).await
    }

    async fn fetch_locked(&self, state: &mut FetchState) -> Result<(), ProviderError> {
        state.last_fetch = Some(Instant::now());
        let result = self.fetch_keys(state).await;
        if result.is_err() {
            self.metrics.jwks_fetch_errors.inc();
        }
        result
    }

    async fn fetch_keys(&self, state: &mut FetchState) -> Result<(), ProviderError> {
        let jwks_uri = match &state.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let doc: Discovery = self.get_json(&url).await?;
                if doc.issuer != self.config.issuer {
                    return Err(ProviderError::IssuerMismatch {
                        expected: self.config.issuer.clone(),
                        found: doc.issuer,
                    });
                }
                state.jwks_uri = Some(doc.jwks_uri.clone());
                doc.jwks_uri
            }
        };
        self.metrics.jwks_fetches.inc();
        let set: JwkSet = self.get_json(&jwks_uri).await?;
        // The fetched set replaces the cache: a key the provider no longer publishes is gone,
        // and so is every verification made with the old set.
        self.keys.invalidate_all();
        self.verified.invalidate_all();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            // A key published for another use (encryption) never verifies a signature.
            if !for_signatures(&jwk.common) {
                continue;
            }
            // A key this library cannot use is skipped, not fatal: others may still verify.
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let family = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Okp,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => KeyFamily::Other,
            };
            let alg = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
            self.keys
                .insert(kid, Arc::new(KeyEntry { key, alg, family }))
                .await;
        }
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, ProviderError> {
        let err = |source| ProviderError::Http {
            url: url.to_string(),
            source,
        };
        self.http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(err)?
            .json()
            .await
            .map_err(err)
    }

    /// The key for `kid`, fetching the JWKS again when it is unknown and the cooldown allows.
    async fn key(&self, kid: &str) -> Result<Arc<KeyEntry>, TokenError> {
        if let Some(k) = self.keys.get(kid).await {
            return Ok(k);
        }
        let mut state = self.fetch.lock().await;
        if let Some(k) = self.keys.get(kid).await {
            return Ok(k);
        }
        let cooldown = Duration::from_secs(self.config.jwks_refresh_cooldown_secs);
        let cooling = state.last_fetch.is_some_and(|t| t.elapsed() < cooldown);
        if cooling {
            return Err(if self.is_ready() {
                TokenError::UnknownKey
            } else {
                TokenError::ProviderUnavailable
            });
        }
        if let Err(e) = self.fetch_locked(&mut state).await {
            tracing::warn!(error = %crate::error_chain(&e), "cannot refresh the JWKS");
            return Err(TokenError::ProviderUnavailable);
        }
        self.keys.get(kid).await.ok_or(TokenError::UnknownKey)
    }

    /// How much longer a session of `principal` may run: until the instant from which the same
    /// token is refused at login ([`refused_from`]). `None` when sessions
    /// outlive their token (`identity.session_expiry = "none"`). A principal without `exp`
    /// (never one from [`Self::verify`], which requires it) has no time left.
    pub fn session_remaining(&self, principal: &Principal) -> Option<Duration> {
        session_remaining(&self.config, principal, SystemTime::now())
    }

    /// [`Self::session_remaining`] as the instant it runs out, for a timer.
    pub fn session_deadline(&self, principal: &Principal) -> Option<tokio::time::Instant> {
        self.session_remaining(principal)
            .map(|left| tokio::time::Instant::now() + left)
    }

    /// Loads the provider's keys, retrying with backoff until it answers; until then every
    /// token is refused (fail closed).
    pub async fn load_keys(self: Arc<Self>) {
        let mut delay = Duration::from_millis(200);
        while let Err(e) = self.refresh().await {
            tracing::warn!(error = %crate::error_chain(&e), "identity provider not reachable yet");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        tracing::info!("identity provider keys loaded");
    }

    /// Verifies a token and maps its claims to a principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let token = token.trim();
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.verified.get(&digest) {
            let (principal, kid) = &*hit;
            let live = principal
                .token_exp
                .is_some_and(|exp| SystemTime::now() < refused_from(exp, self.config.leeway_secs));
            if live && self.key_current(principal, kid) {
                return Ok(principal.clone());
            }
            self.verified.invalidate(&digest);
        }
        let result = self.verify_inner(token).await;
        if let Ok((principal, kid)) = &result {
            self.verified
                .insert(digest, Arc::new((principal.clone(), kid.clone())));
        }
        let result = result.map(|(principal, _)| principal);
        if let Err(e) = &result {
            self.metrics
                .token_rejections
                .get_or_create(&ReasonLabel { reason: e.reason() })
                .inc();
        }
        result
    }

    /// Verifies a token: its principal and the key id that verified it.
    async fn verify_inner(&self, token: &str) -> Result<(Principal, String), TokenError> {
        let header = parse_header(token)?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenError::Malformed)?;
        let alg = self
            .config
            .algorithms
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == alg_name)
            .ok_or_else(|| TokenError::AlgorithmNotAllowed(alg_name.to_string()))?;
        // RFC 7515 4.1.11: extensions named critical must be understood; none is.
        if header.contains_key("crit") {
            return Err(TokenError::CriticalHeader);
        }
        let typ = header.get("typ").and_then(Value::as_str).unwrap_or("JWT");
        let token_type = match typ.to_ascii_lowercase().as_str() {
            "at+jwt" | "application/at+jwt" => TokenType::AccessToken,
            "jwt" => TokenType::IdToken,
            _ => return Err(TokenError::TypeNotAccepted(typ.to_string())),
        };
        if !self.config.token_types.contains(&token_type) {
            return Err(TokenError::TypeNotAccepted(typ.to_string()));
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or(TokenError::MissingKid)?;
        let ours = self
            .issued
            .as_ref()
            .filter(|k| unverified_issuer(token).as_deref() == Some(k.issuer.as_str()));
        let default_names = ClaimNames::default();
        let provider_key;
        let (key, issuer, names) = match ours {
            Some(k) => {
                if alg != Algorithm::EdDSA {
                    return Err(TokenError::BadSignature);
                }
                let key = k.key(kid).ok_or(TokenError::UnknownKey)?;
                (key, k.issuer.as_str(), &default_names)
            }
            None => {
                provider_key = self.key(kid).await?;
                let entry = &provider_key;
                if entry.family != family_of(alg)
                    || entry.alg.as_deref().is_some_and(|a| a != alg_name)
                {
                    // The key exists but is not a key for this algorithm: the classic
                    // confusion attack.
                    return Err(TokenError::BadSignature);
                }
                (&entry.key, self.config.issuer.as_str(), &self.config.claims)
            }
        };
        let jwt_alg = match alg {
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        };
        let mut validation = Validation::new(jwt_alg);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => TokenError::BadSignature,
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidIssuer => TokenError::WrongIssuer,
                    K::InvalidAudience => TokenError::WrongAudience,
                    K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                    _ => TokenError::Malformed,
                }
            })?;
        let claims = data.claims;
        let iat =
            numeric_date(&claims, "iat")?.ok_or_else(|| TokenError::MissingClaim("iat".into()))?;
        if iat > now_secs() + self.config.leeway_secs {
            return Err(TokenError::IssuedInFuture);
        }
        let mut principal = principal_from_claims(&claims, names, issuer, token_type)?;
        if ours.is_some() {
            principal.saml = claim_string(&claims, "saml_idp")
                .zip(claim_string(&claims, "saml_assertion"))
                .map(|(idp, assertion_id)| SamlOrigin { idp, assertion_id });
            principal.person = claim_string(&claims, PERSON_CLAIM);
        }
        Ok((principal, kid.to_string()))
    }
}

/// Whether a published key may verify signatures: its `use`, when given, is `sig`, and its
/// `key_ops`, when given, include `verify` (RFC 7517 4.2, 4.3).
fn for_signatures(common: &jsonwebtoken::jwk::CommonParameters) -> bool {
    use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
    common
        .public_key_use
        .as_ref()
        .is_none_or(|u| *u == PublicKeyUse::Signature)
        && common
            .key_operations
            .as_ref()
            .is_none_or(|ops| ops.contains(&KeyOperations::Verify))
}

/// The latest NumericDate a token may give: 9999-12-31T23:59:59Z (later ones are read as it,
/// so that no time computed from them overflows).
const LAST_NUMERIC_DATE: u64 = 253_402_300_799;

/// A NumericDate claim (RFC 7519 2: seconds since the epoch, which may be fractional), in
/// whole seconds rounded down and at most [`LAST_NUMERIC_DATE`]; `Err` when it is present but
/// not such a number.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, TokenError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let secs = value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    });
    match secs {
        Some(secs) => Ok(Some(secs.min(LAST_NUMERIC_DATE))),
        None => Err(TokenError::BadClaim(name.into())),
    }
}

/// Whether a claim's text would be shown otherwise than it reads: a control character (a
/// line break forging a log line, an escape sequence for a terminal) or a bidirectional
/// override reordering what an operator's terminal or browser shows.
fn unshowable(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
}

/// [`TokenVerifier::session_remaining`] at `now`.
fn session_remaining(
    config: &IdentityConfig,
    principal: &Principal,
    now: SystemTime,
) -> Option<Duration> {
    if config.session_expiry == SessionExpiry::Unbounded {
        return None;
    }
    let end = principal
        .token_exp
        .map(|exp| refused_from(exp, config.leeway_secs));
    Some(end.map_or(Duration::ZERO, |end| {
        end.duration_since(now).unwrap_or_default()
    }))
}

/// The first instant at which [`TokenVerifier::verify`] refuses a token with this `exp`: the
/// check compares whole seconds (`exp < now - leeway` is expired), so the token is still good
/// throughout the second `exp + leeway`.
fn refused_from(exp: u64, leeway_secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(exp.saturating_add(leeway_secs).saturating_add(1))
}

/// Decodes the JOSE header without trusting anything in it.
fn parse_header(token: &str) -> Result<Map<String, Value>, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// The `iss` claim of a token not yet verified: only to choose which keys verify it.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    claim_string(&claims, "iss")
}

fn claim_string(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Maps verified claims to the principal fields named in the config.
pub fn principal_from_claims(
    claims: &Map<String, Value>,
    names: &ClaimNames,
    issuer: &str,
    token_type: TokenType,
) -> Result<Principal, TokenError> {
    let subject = claim_string(claims, &names.subject)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::MissingClaim(names.subject.clone()))?;
    let shown = [
        names.subject.as_str(),
        &names.client_id,
        "azp",
        &names.model,
        &names.model_version,
        &names.groups,
    ]
    .into_iter()
    .chain(names.person.as_deref());
    for name in shown {
        let texts: Vec<&str> = match claims.get(name) {
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if texts.into_iter().any(unshowable) {
            return Err(TokenError::BadClaim(name.into()));
        }
    }
    let groups = match claims.get(&names.groups) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    Ok(Principal {
        subject,
        client_id: claim_string(claims, &names.client_id).or_else(|| claim_string(claims, "azp")),
        model: claim_string(claims, &names.model),
        model_version: claim_string(claims, &names.model_version),
        groups,
        intent: None,
        issuer: issuer.to_string(),
        token_type: match token_type {
            TokenType::IdToken => "id_token",
            TokenType::AccessToken => "access_token",
        }
        .to_string(),
        token_exp: numeric_date(claims, "exp")?,
        token_id: claim_string(claims, "jti"),
        saml: None,
        person: names
            .person
            .as_deref()
            .filter(|name| *name != "email" || !unverified_email(claims))
            .and_then(|name| claim_string(claims, name))
            .filter(|p| !p.is_empty()),
    })
}

/// Whether the token says its `email` is not verified (`email_verified` false, as a boolean
/// or, as some providers send it, a string): whoever holds the account may have typed in
/// anyone's address, so it names no person. Providers that do not send the claim are taken at
/// their word.
fn unverified_email(claims: &Map<String, Value>) -> bool {
    match claims.get("email_verified") {
        Some(Value::Bool(verified)) => !verified,
        Some(Value::String(s)) => !s.eq_ignore_ascii_case("true"),
        Some(_) => true,
        None => false,
    }
}

/// The claim of the cluster's own tokens that carries the principal's person key.
pub const PERSON_CLAIM: &str = "person";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_dates_may_be_fractional_and_are_held_to_year_9999() {
        let claims = |v: Value| Map::from_iter([("exp".to_string(), v)]);
        let read = |v: Value| numeric_date(&claims(v), "exp");
        assert_eq!(
            read(serde_json::json!(1_800_000_000)),
            Ok(Some(1_800_000_000))
        );
        assert_eq!(
            read(serde_json::json!(1_800_000_000.9)),
            Ok(Some(1_800_000_000))
        );
        assert_eq!(
            read(serde_json::json!(u64::MAX)),
            Ok(Some(LAST_NUMERIC_DATE))
        );
        assert_eq!(read(serde_json::json!(1e300)), Ok(Some(LAST_NUMERIC_DATE)));
        assert!(read(serde_json::json!(-1)).is_err());
        assert!(read(serde_json::json!("tomorrow")).is_err());
        assert_eq!(numeric_date(&Map::new(), "exp"), Ok(None));
        // A fractional exp bounds the principal (and so its SSH certificate and session).
        let claims = serde_json::json!({"sub": "agent", "exp": 1_800_000_020.5});
        let p = principal_from_claims(
            claims.as_object().unwrap(),
            &ClaimNames::default(),
            "iss",
            TokenType::AccessToken,
        )
        .unwrap();
        assert_eq!(p.token_exp, Some(1_800_000_020));
        // The latest time a token may give is one the clock can add to.
        let far = refused_from(LAST_NUMERIC_DATE, 30);
        assert!(far > SystemTime::now());
    }

    #[test]
    fn claims_shown_to_people_and_logs_hold_no_control_or_reordering_characters() {
        let names = ClaimNames::default();
        let claims = |sub: &str, groups: Value| {
            serde_json::json!({"sub": sub, "groups": groups, "exp": 1_800_000_000})
                .as_object()
                .unwrap()
                .clone()
        };
        let map = |c| principal_from_claims(&c, &names, "iss", TokenType::AccessToken);
        assert!(map(claims("agent", serde_json::json!(["ops"]))).is_ok());
        for (sub, groups) in [
            ("agent\nFORGED", serde_json::json!([])),
            ("agent\u{1b}[2J", serde_json::json!([])),
            ("agent\u{202e}txt.exe", serde_json::json!([])),
            (
                "agent",
                serde_json::json!(["ops\r\nImpersonate-Group: system:masters"]),
            ),
        ] {
            assert_eq!(
                map(claims(sub, groups.clone())).err().map(|e| e.reason()),
                Some("bad_claim"),
                "{sub:?} {groups}"
            );
        }
    }

    #[test]
    fn only_keys_published_for_signatures_verify() {
        use jsonwebtoken::jwk::{CommonParameters, KeyOperations, PublicKeyUse};
        let common = |u: Option<PublicKeyUse>, ops: Option<Vec<KeyOperations>>| CommonParameters {
            public_key_use: u,
            key_operations: ops,
            ..CommonParameters::default()
        };
        assert!(for_signatures(&common(None, None)));
        assert!(for_signatures(&common(Some(PublicKeyUse::Signature), None)));
        assert!(!for_signatures(&common(
            Some(PublicKeyUse::Encryption),
            None
        )));
        assert!(for_signatures(&common(
            None,
            Some(vec![KeyOperations::Verify])
        )));
        assert!(!for_signatures(&common(
            None,
            Some(vec![KeyOperations::Encrypt, KeyOperations::WrapKey])
        )));
    }

    #[test]
    fn headers_are_parsed_without_trust() {
        assert_eq!(parse_header("a.b"), Err(TokenError::Malformed));
        assert_eq!(parse_header("a.b.c.d"), Err(TokenError::Malformed));
        assert_eq!(parse_header("!!.b.c"), Err(TokenError::Malformed));
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        assert_eq!(parse_header(&format!("{h}.e30.")).unwrap()["alg"], "none");
    }

    #[test]
    fn claims_map_to_the_principal() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"sub":"agent-1","azp":"cli","model":"gpt-5","model_version":"2026-08","groups":["a","b"]}"#,
        )
        .unwrap();
        let p = principal_from_claims(
            &claims,
            &ClaimNames::default(),
            "iss",
            TokenType::AccessToken,
        )
        .unwrap();
        assert_eq!(p.subject, "agent-1");
        assert_eq!(p.client_id.as_deref(), Some("cli"));
        assert_eq!(p.model.as_deref(), Some("gpt-5"));
        assert_eq!(p.groups, vec!["a", "b"]);
        assert_eq!(p.token_type, "access_token");
        assert_eq!(p.token_exp, None);
        assert_eq!(p.person, None, "no person key configured");
        let names = ClaimNames {
            person: Some("email".into()),
            ..ClaimNames::default()
        };
        let with = |json: &str| {
            let claims: Map<String, Value> = serde_json::from_str(json).unwrap();
            principal_from_claims(&claims, &names, "iss", TokenType::IdToken)
                .unwrap()
                .person
        };
        assert_eq!(
            with(r#"{"sub":"3f1c","email":"alice@example.com"}"#).as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(with(r#"{"sub":"3f1c"}"#), None);
        // An address the provider has not verified names nobody: anyone can type one in.
        for verified in [r#"true"#, r#""true""#] {
            assert_eq!(
                with(&format!(
                    r#"{{"sub":"3f1c","email":"alice@example.com","email_verified":{verified}}}"#
                ))
                .as_deref(),
                Some("alice@example.com")
            );
        }
        for unverified in [r#"false"#, r#""false""#, r#"0"#, r#"null"#] {
            assert_eq!(
                with(&format!(
                    r#"{{"sub":"3f1c","email":"alice@example.com","email_verified":{unverified}}}"#
                )),
                None,
                "email_verified {unverified}"
            );
        }
        assert_eq!(with(r#"{"sub":"3f1c","email":""}"#), None);
        let none: Map<String, Value> = serde_json::from_str(r#"{"sub":""}"#).unwrap();
        assert!(matches!(
            principal_from_claims(&none, &ClaimNames::default(), "iss", TokenType::IdToken),
            Err(TokenError::MissingClaim(_))
        ));
    }

    #[test]
    fn sessions_end_when_their_token_is_refused_unless_configured_otherwise() {
        let mut config: IdentityConfig = toml::from_str(
            r#"
issuer = "https://idp.example"
audiences = ["a"]
leeway_secs = 5
"#,
        )
        .unwrap();
        assert_eq!(config.session_expiry, SessionExpiry::Token);
        let claims: Map<String, Value> = serde_json::from_str(r#"{"sub":"a","exp":1000}"#).unwrap();
        let p = principal_from_claims(&claims, &config.claims, "iss", TokenType::IdToken).unwrap();
        assert_eq!(p.token_exp, Some(1000));
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let left = |p: &Principal, now| session_remaining(&config, p, at(now));
        assert_eq!(left(&p, 990), Some(Duration::from_secs(16)));
        assert_eq!(left(&p, 1005), Some(Duration::from_secs(1)));
        assert_eq!(left(&p, 1006), Some(Duration::ZERO));
        assert_eq!(left(&p, 2000), Some(Duration::ZERO));
        // No exp, no time: fail closed.
        assert_eq!(left(&Principal::default(), 0), Some(Duration::ZERO));
        config.session_expiry = SessionExpiry::Unbounded;
        assert_eq!(session_remaining(&config, &p, at(2000)), None);
        let none: IdentityConfig = toml::from_str(
            r#"
issuer = "https://idp.example"
audiences = ["a"]
session_expiry = "none"
"#,
        )
        .unwrap();
        assert_eq!(none.session_expiry, SessionExpiry::Unbounded);
    }

    /// An Ed25519 PKCS#8 PEM of the seed `[n; 32]`.
    fn pem(n: u8) -> String {
        let der = [&crate::core::issued::PKCS8_ED25519_PREFIX[..], &[n; 32][..]].concat();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    /// The cluster's own tokens take the verifier's one path: a token it issued verifies (its
    /// SAML origin mapped back), an expired one or one for another audience does not, a
    /// retired key verifies until its end and not after, an unknown key never, and a token
    /// naming the cluster's issuer with another algorithm is refused.
    #[tokio::test]
    async fn the_clusters_own_tokens_verify_until_they_or_their_key_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old.pem"), dir.path().join("new.pem"));
        std::fs::write(&old, pem(1)).unwrap();
        std::fs::write(&new, pem(2)).unwrap();
        let verifier = |current: &std::path::Path, id: &str, retired: Option<u64>| {
            let retired = retired
                .map(|until| {
                    format!(
                        "[[tokens.retired]]\nkey_id = \"old\"\nsigning_key = {{ file = \"{}\" }}\nuntil = {until}\n",
                        old.display()
                    )
                })
                .unwrap_or_default();
            let config: IdentityConfig = toml::from_str(&format!(
                "issuer = \"https://idp.example\"\naudiences = [\"gw\"]\nleeway_secs = 0\n\
                 [tokens]\nissuer = \"https://vigil.example/tokens\"\n\
                 signing_key = {{ file = \"{}\" }}\nkey_id = \"{id}\"\n{retired}",
                current.display()
            ))
            .unwrap();
            TokenVerifier::new(config, Arc::new(Metrics::default())).unwrap()
        };
        let now = now_secs();
        let person = Principal {
            subject: "dave".into(),
            groups: vec!["auditors".into()],
            saml: Some(SamlOrigin {
                idp: "https://idp.example/saml".into(),
                assertion_id: "_a1".into(),
            }),
            person: Some("dave@example.com".into()),
            ..Principal::default()
        };
        let v_old = verifier(&old, "old", None);
        let issue = |aud: &str, until: u64| v_old.issued().unwrap().issue(&person, aud, until);
        let token = issue("gw", now + 600);
        let p = v_old.verify(&token).await.unwrap();
        assert_eq!(p.subject, "dave");
        assert_eq!(p.issuer, "https://vigil.example/tokens");
        assert_eq!(p.token_type, "access_token");
        assert_eq!(p.groups, ["auditors"]);
        assert_eq!(p.saml, person.saml);
        assert_eq!(p.person, person.person);
        assert!(p.token_exp.is_some_and(|e| e <= now + 600));
        assert_eq!(
            v_old.verify(&issue("gw", now - 10)).await,
            Err(TokenError::Expired)
        );
        assert_eq!(
            v_old.verify(&issue("other", now + 600)).await,
            Err(TokenError::WrongAudience)
        );
        // Rotation: the old key, retired, verifies until its end.
        let overlap = verifier(&new, "new", Some(now + 600));
        assert_eq!(overlap.verify(&token).await.unwrap().subject, "dave");
        let over = verifier(&new, "new", Some(now.saturating_sub(1)));
        assert_eq!(over.verify(&token).await, Err(TokenError::UnknownKey));
        let forgotten = verifier(&new, "new", None);
        assert_eq!(forgotten.verify(&token).await, Err(TokenError::UnknownKey));
        // The cluster's issuer with an RSA header: no RSA key of the cluster is asked for.
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let forged = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","kid":"old","typ":"at+jwt"}"#),
            b64(&format!(
                r#"{{"iss":"https://vigil.example/tokens","sub":"x","aud":"gw","exp":{},"iat":{now}}}"#,
                now + 60
            ))
        );
        assert_eq!(v_old.verify(&forged).await, Err(TokenError::BadSignature));
    }
}
