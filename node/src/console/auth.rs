//! Logging people in: the OIDC authorization code flow with PKCE (S256), a `state` bound to the
//! browser that started the login and a `nonce` bound to the ID token. The ID token is checked
//! by the node's own [`TokenVerifier`](crate::core::identity::TokenVerifier), as any token on
//! any protocol is; the login lasts no longer than the token.
//!
//! Login sessions live in this node's memory: a login is per node (behind a balancer, sticky
//! sessions, or a second login on another node). The session cookie is a 256-bit random handle,
//! `__Host-` prefixed (Secure, path `/`, no domain), HttpOnly, SameSite=Lax; the token never
//! reaches the browser. Every state change must carry the session's CSRF token in a header
//! (`X-CSRF-Token`) that only the console's own script, which reads it from `/api/me`, can send.

use super::{Console, PROTOCOL};
use crate::api::ClientAddr;
use crate::core::secret::Secret;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vigil_coordinator::client::{Client, Credential};
use vigil_proto::record::{Connection, Kind, Outcome, Principal};

const SESSION_COOKIE: &str = "__Host-vigil-session";
const LOGIN_COOKIE: &str = "__Host-vigil-login";
/// How long a started login may take at the provider.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// How long a coordinator call of the console may keep trying.
const COORDINATOR_RETRY: Duration = Duration::from_secs(5);

/// A logged-in person.
pub struct LoginSession {
    /// The audit session id of the login (never the cookie's value).
    pub id: String,
    pub principal: Principal,
    pub csrf: String,
    pub expires: SystemTime,
    /// Where the login came from (its records' `connection`).
    connection: Arc<Connection>,
    /// The coordinator, as this person (their ID token as an operator's bearer token).
    pub coordinator: Client,
    /// Looks at recorded sessions so far (the `stmt` of their records).
    looks: std::sync::atomic::AtomicU64,
}

/// A login under way at the provider.
struct Pending {
    state: String,
    nonce: String,
    verifier: Secret<String>,
    redirect_uri: String,
    started: SystemTime,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By cookie value.
    sessions: HashMap<String, Arc<LoginSession>>,
    /// By login cookie value.
    pending: HashMap<String, Pending>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes what has expired; returns the logins that ended, to be recorded.
    fn prune(&self, now: SystemTime) -> Vec<Arc<LoginSession>> {
        let mut inner = self.lock();
        inner
            .pending
            .retain(|_, p| now.duration_since(p.started).unwrap_or_default() < LOGIN_TTL);
        let expired: Vec<String> = inner
            .sessions
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .iter()
            .filter_map(|k| inner.sessions.remove(k))
            .collect()
    }
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: Duration) -> HeaderValue {
    HeaderValue::try_from(format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        max_age.as_secs()
    ))
    .expect("cookie values are base64url")
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Equal without telling how much of it was (the CSRF token).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Console {
    /// The person behind the request's session cookie, if the login is live. An expired login
    /// is ended (and recorded) here.
    pub(super) async fn person(&self, headers: &HeaderMap) -> Option<Arc<LoginSession>> {
        self.expire().await;
        let key = cookie(headers, SESSION_COOKIE)?;
        self.sessions.lock().sessions.get(key).cloned()
    }

    /// The person, if the request also carries their CSRF token.
    pub(super) async fn person_for_change(
        &self,
        headers: &HeaderMap,
    ) -> Result<Arc<LoginSession>, Response> {
        let Some(person) = self.person(headers).await else {
            return Err(refuse(StatusCode::UNAUTHORIZED, "log in first"));
        };
        let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if !sent.is_some_and(|t| same(t, &person.csrf)) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the console",
            ));
        }
        Ok(person)
    }

    async fn record(&self, origin: ClientAddr, kind: Kind, outcome: Outcome, f: Recorded<'_>) {
        let mut rec = self.core.audit.body(Some(f.session), kind);
        rec.connection = Some(connection(origin));
        rec.principal = f.principal.map(|p| Arc::new(p.clone()));
        rec.outcome = Some(outcome);
        rec.detail = Some(self.core.scrub(f.detail));
        if let Err(e) = self.core.audit.append(&rec).await {
            tracing::error!(error = %e, "console record could not be written");
        }
    }

    /// Puts `person`'s look at recorded session `session` on record (`action`: what they
    /// look at it with); the content is sent only once this is written.
    pub(super) async fn record_look(
        &self,
        person: &LoginSession,
        action: &str,
        session: &str,
    ) -> Result<(), Response> {
        let mut rec = self
            .core
            .audit
            .body(Some(person.id.as_str()), Kind::Request);
        rec.principal = Some(Arc::new(person.principal.clone()));
        rec.connection = Some(person.connection.clone());
        rec.stmt = Some(
            person
                .looks
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1,
        );
        rec.request = Some(vigil_proto::record::Request::Console(
            vigil_proto::record::ConsoleRequest {
                action: action.into(),
                session: session.into(),
            },
        ));
        rec.outcome = Some(Outcome::Success);
        match self.core.audit.append(&rec).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "console record could not be written");
                Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this look at the session cannot be put on record, so it is not shown",
                ))
            }
        }
    }

    /// Ends (and records) the logins that expired, forgets logins abandoned at the provider.
    async fn expire(&self) {
        for ended in self.sessions.prune(SystemTime::now()) {
            self.record_end(&ended, "the login expired with its token")
                .await;
        }
    }

    async fn record_end(&self, s: &LoginSession, why: &str) {
        let mut rec = self.core.audit.body(Some(s.id.as_str()), Kind::SessionEnd);
        rec.principal = Some(Arc::new(s.principal.clone()));
        rec.connection = Some(s.connection.clone());
        rec.outcome = Some(Outcome::Success);
        rec.detail = Some(why.to_string());
        if let Err(e) = self.core.audit.append(&rec).await {
            tracing::error!(error = %e, "console record could not be written");
        }
    }

    async fn discovery(&self) -> Result<Discovery, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let doc: Discovery = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("the identity provider cannot be reached: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the identity provider's discovery document: {e}"))?;
        if doc.issuer != self.issuer {
            return Err(format!(
                "the provider names itself {}, not {}",
                doc.issuer, self.issuer
            ));
        }
        Ok(doc)
    }

    /// Where the provider sends the browser back.
    fn redirect_uri(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(url) = &self.config.public_url {
            return Some(format!("{url}/auth/callback"));
        }
        let host = headers.get(header::HOST)?.to_str().ok()?;
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
        (!host.is_empty() && host.chars().all(plain))
            .then(|| format!("https://{host}/auth/callback"))
    }
}

fn connection(origin: ClientAddr) -> Arc<Connection> {
    Arc::new(Connection {
        client_tls: true,
        ..origin.0.connection(PROTOCOL)
    })
}

struct Recorded<'a> {
    session: &'a str,
    principal: Option<&'a Principal>,
    detail: &'a str,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

/// A JSON refusal: `{"error": "..."}`.
pub(super) fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": why }).to_string(),
    )
        .into_response()
}

/// `GET /auth/login`: off to the provider.
pub async fn login(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(redirect_uri) = console.redirect_uri(&headers) else {
        return refuse(StatusCode::BAD_REQUEST, "no usable Host header");
    };
    let doc = match console.discovery().await {
        Ok(d) => d,
        Err(why) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &why),
    };
    let verifier = random_token();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let (state, nonce, login_id) = (random_token(), random_token(), random_token());
    let scopes = console.config.scopes.join(" ");
    let url = reqwest::Url::parse_with_params(
        &doc.authorization_endpoint,
        [
            ("response_type", "code"),
            ("client_id", console.config.client_id.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("scope", scopes.as_str()),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    );
    let Ok(url) = url else {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "the provider's authorization endpoint is not a URL",
        );
    };
    console.expire().await;
    console.sessions.lock().pending.insert(
        login_id.clone(),
        Pending {
            state,
            nonce,
            verifier: Secret::new(verifier),
            redirect_uri,
            started: SystemTime::now(),
        },
    );
    let mut res = Redirect::to(url.as_str()).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &login_id, LOGIN_TTL),
    );
    res
}

/// `GET /auth/callback?code=…&state=…`: the provider's answer. The login it completes must
/// have been started by this browser (the login cookie) with this `state`.
pub async fn callback(
    State(console): State<Arc<Console>>,
    ConnectInfo(origin): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let session = crate::core::new_session_id();
    match complete(&console, &headers, query.as_deref().unwrap_or("")).await {
        Ok((principal, token)) => {
            let expires = principal
                .token_exp
                .map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s));
            let expires = match console.core.verifier.session_remaining(&principal) {
                Some(left) => expires.min(SystemTime::now() + left),
                None => expires,
            };
            let mut coordinator =
                match Client::new(console.coordinator.clone(), Credential::Bearer(token)) {
                    Ok(c) => c.retry_for(COORDINATOR_RETRY),
                    Err(s) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, s.message()),
                };
            if let Some(tls) = &console.coordinator_tls {
                coordinator = coordinator.tls(tls.clone());
            }
            let detail = "logged in to the console";
            let recorded = Recorded {
                session: &session,
                principal: Some(&principal),
                detail,
            };
            console
                .record(origin, Kind::SessionStart, Outcome::Success, recorded)
                .await;
            let cookie = random_token();
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            console.sessions.lock().sessions.insert(
                cookie.clone(),
                Arc::new(LoginSession {
                    id: session,
                    principal,
                    csrf: random_token(),
                    expires,
                    connection: connection(origin),
                    looks: Default::default(),
                    coordinator,
                }),
            );
            let mut res = Redirect::to("/").into_response();
            let h = res.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(SESSION_COOKIE, &cookie, left),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(LOGIN_COOKIE, "", Duration::ZERO),
            );
            res
        }
        Err((principal, why)) => {
            let recorded = Recorded {
                session: &session,
                principal: principal.as_ref(),
                detail: &why,
            };
            console
                .record(origin, Kind::SessionStart, Outcome::Denied, recorded)
                .await;
            refuse(StatusCode::UNAUTHORIZED, &format!("login failed: {why}"))
        }
    }
}

type Refusal = (Option<Principal>, String);

/// The code exchanged for a verified ID token of the login this browser started.
async fn complete(
    console: &Console,
    headers: &HeaderMap,
    query: &str,
) -> Result<(Principal, String), Refusal> {
    let plain = |why: &str| -> Refusal { (None, why.to_string()) };
    let url = reqwest::Url::parse(&format!("https://callback/?{query}"))
        .map_err(|_| plain("the callback's query is not valid"))?;
    let params: HashMap<String, String> = url.query_pairs().into_owned().collect();
    let pending = cookie(headers, LOGIN_COOKIE)
        .and_then(|id| console.sessions.lock().pending.remove(id))
        .ok_or_else(|| plain("no login was started in this browser, or it took too long"))?;
    if !params.get("state").is_some_and(|s| same(s, &pending.state)) {
        return Err(plain("the provider's answer is not for this login (state)"));
    }
    if let Some(error) = params.get("error") {
        let description = params.get("error_description").map_or("", String::as_str);
        return Err(plain(&format!(
            "the provider refused: {error} {description}"
        )));
    }
    let code = params
        .get("code")
        .ok_or_else(|| plain("the provider sent no code"))?;
    let doc = console.discovery().await.map_err(|w| plain(&w))?;
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", pending.redirect_uri.as_str()),
        ("code_verifier", pending.verifier.expose().as_str()),
    ];
    let mut req = console.http.post(&doc.token_endpoint);
    match &console.secret {
        Some(secret) => {
            req = req.basic_auth(&console.config.client_id, Some(secret.expose()));
        }
        None => form.push(("client_id", console.config.client_id.as_str())),
    }
    let answer = req
        .form(&form)
        .send()
        .await
        .map_err(|e| plain(&format!("the token endpoint cannot be reached: {e}")))?;
    if !answer.status().is_success() {
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        return Err(plain(&format!(
            "the token endpoint refused the code ({status}): {}",
            body.chars().take(300).collect::<String>()
        )));
    }
    let answer: TokenAnswer = answer
        .json()
        .await
        .map_err(|e| plain(&format!("the token endpoint's answer: {e}")))?;
    let token = answer
        .id_token
        .ok_or_else(|| plain("the provider sent no ID token (is openid among the scopes?)"))?;
    let principal = console
        .core
        .verifier
        .verify(&token)
        .await
        .map_err(|e| plain(&format!("the ID token was refused: {e}")))?;
    // Verified: its claims can be read. The nonce ties the token to this login, the audience
    // to this client (the verifier accepts every configured audience).
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let refused = |why: &str| -> Refusal { (Some(principal.clone()), why.to_string()) };
    if claims["nonce"].as_str() != Some(pending.nonce.as_str()) {
        return Err(refused("the ID token is not for this login (nonce)"));
    }
    let aud = &claims["aud"];
    let ours = aud.as_str() == Some(console.config.client_id.as_str())
        || aud.as_array().is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str() == Some(console.config.client_id.as_str()))
        });
    if !ours {
        return Err(refused("the ID token is for another client"));
    }
    Ok((principal, token))
}

/// `POST /auth/logout` (CSRF-checked): the login ends here and on record.
pub async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let person = match console.person_for_change(&headers).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    if let Some(key) = cookie(&headers, SESSION_COOKIE) {
        console.sessions.lock().sessions.remove(key);
    }
    console.record_end(&person, "logged out").await;
    let mut res = (
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "logged_out": true }).to_string(),
    )
        .into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", Duration::ZERO),
    );
    res
}

/// `GET /api/me`: who is logged in, until when, what the config lets them see, and the CSRF
/// token the page sends with every change.
pub async fn me(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(person) = console.person(&headers).await else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first");
    };
    let p = &person.principal;
    let member = |g: &Option<String>| g.as_ref().is_some_and(|g| p.groups.contains(g));
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "subject": p.subject,
            "groups": p.groups,
            "expires_at_ms": ms(person.expires),
            "auditor": member(&console.config.auditor_group),
            "admin": member(&console.config.admin_group),
            "csrf": person.csrf,
        })
        .to_string(),
    )
        .into_response()
}
