//! Logging people in: the OIDC authorization code flow with PKCE (S256), a `state` bound to the
//! browser that started the login and a `nonce` bound to the ID token. The ID token is checked
//! by the node's own [`TokenVerifier`](crate::core::identity::TokenVerifier), as any token on
//! any protocol is; the login lasts no longer than the token.
//!
//! A login is good on every node: the session cookie carries it, sealed with the cluster's
//! cookie key ([`cookies`](super::cookies)): the login's id, the person's ID token (which the
//! browser cannot read), the CSRF token and the end of the login. A node that sees a login for
//! the first time checks the token with its verifier again and records the login continuing
//! there as an audit session of its own. A logout is kept by the coordinator (the SHA-256 of
//! the token, until it expires), and every request asks it whether the login was ended: a
//! logout on one node ends the login on all of them at once, and when the coordinator cannot
//! answer, the console does not either. The cookie is `__Host-` prefixed (Secure, path `/`,
//! no domain), HttpOnly, SameSite=Lax. Every state change must carry the session's CSRF token
//! in a header (`X-CSRF-Token`) that only the console's own script, which reads it from
//! `/api/me`, can send.

use super::cookies::MAX_SEALED_LEN;
use super::{Console, PROTOCOL};
use crate::api::ClientAddr;
use crate::core::echo::client_text;
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vigil_coordinator::client::{Client, Credential};
use vigil_proto::coordinator as pb;
use vigil_proto::record::{Connection, Kind, Outcome, Principal};

const SESSION_COOKIE: &str = "__Host-vigil-session";
const LOGIN_COOKIE: &str = "__Host-vigil-login";
/// How long a started login may take at the provider.
pub(super) const LOGIN_TTL: Duration = Duration::from_secs(600);
/// How long a coordinator call of the console may keep trying.
const COORDINATOR_RETRY: Duration = Duration::from_secs(5);

/// A logged-in person, as this node knows them.
pub struct LoginSession {
    /// This node's audit session of the login (never the cookie's value): the login's own id
    /// on the node it was made on, a fresh one on every other node it continues on.
    pub id: String,
    /// The login's id: the audit session of the login itself.
    login: String,
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

/// The session cookie's sealed contents.
#[derive(Serialize, Deserialize)]
struct SessionCookie {
    login: String,
    token: String,
    csrf: String,
    expires_ms: u64,
}

/// The login cookie's sealed contents: a login under way at the provider.
#[derive(Serialize, Deserialize)]
struct LoginCookie {
    state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    started_ms: u64,
}

/// The logins this node has seen, by login id.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Arc<LoginSession>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LoginSession>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the logins that expired; returns them, to be recorded.
    fn prune(&self, now: SystemTime) -> Vec<Arc<LoginSession>> {
        let mut inner = self.lock();
        let expired: Vec<String> = inner
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        expired.iter().filter_map(|k| inner.remove(k)).collect()
    }
}

/// Who sends a console request: their cookies and their address.
pub struct Visit {
    pub headers: HeaderMap,
    pub origin: ClientAddr,
}

impl<S: Send + Sync> FromRequestParts<S> for Visit {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let origin = parts
            .extensions
            .get::<ConnectInfo<ClientAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| refuse(StatusCode::INTERNAL_SERVER_ERROR, "no peer address"))?;
        Ok(Self {
            headers: parts.headers.clone(),
            origin,
        })
    }
}

pub(super) fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(super) fn set_cookie(name: &str, value: &str, max_age: Duration) -> HeaderValue {
    set_cookie_for(name, value, max_age, "Lax")
}

/// A cookie sent `same_site` (`Lax`; `None` for the SAML login, which the IdP's page posts
/// back from another site).
pub(super) fn set_cookie_for(
    name: &str,
    value: &str,
    max_age: Duration,
    same_site: &str,
) -> HeaderValue {
    HeaderValue::try_from(format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={}",
        max_age.as_secs()
    ))
    .expect("cookie values are base64url")
}

pub(super) fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
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
    /// The person behind the request's session cookie, if the login is live: sealed by this
    /// cluster, not expired, and not ended at the coordinator (asked on every request; when it
    /// cannot answer, neither does the console). An expired login is ended (and recorded) here.
    pub(super) async fn person(&self, visit: &Visit) -> Result<Arc<LoginSession>, Response> {
        self.expire().await;
        let first = || refuse(StatusCode::UNAUTHORIZED, "log in first");
        let sealed: SessionCookie = cookie(&visit.headers, SESSION_COOKIE)
            .and_then(|v| self.cookies.open(SESSION_COOKIE, v))
            .ok_or_else(first)?;
        if from_ms(sealed.expires_ms) <= SystemTime::now() {
            return Err(first());
        }
        let known = self.sessions.lock().get(&sealed.login).cloned();
        let (person, first_here) = match known {
            Some(p) => (p, false),
            None => (Arc::new(self.verified(visit.origin, sealed).await?), true),
        };
        let state = person
            .coordinator
            .get_login_state(pb::LoginStateRequest {})
            .await;
        match state {
            Ok(state) if !state.ended => {
                if first_here {
                    return Ok(self.continued(visit.origin, person).await);
                }
                Ok(person)
            }
            Ok(_) => {
                let forgot = self.sessions.lock().remove(&person.login);
                if forgot.is_some() {
                    self.record_end(&person, "logged out (on another node)")
                        .await;
                }
                Err(refuse(StatusCode::UNAUTHORIZED, "logged out: log in again"))
            }
            Err(e) => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "whether this login is still live cannot be confirmed (the coordinator: {})",
                    e.message()
                ),
            )),
        }
    }

    /// A login made on another node (or before this node restarted), first seen here: its
    /// token is verified again.
    async fn verified(
        &self,
        origin: ClientAddr,
        sealed: SessionCookie,
    ) -> Result<LoginSession, Response> {
        let principal = self
            .core
            .verifier
            .verify(&sealed.token)
            .await
            .map_err(|e| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    &format!("log in again: the login's token was refused: {e}"),
                )
            })?;
        self.login_session(crate::core::new_session_id(), principal, sealed, origin)
            .map_err(|s| refuse(StatusCode::INTERNAL_SERVER_ERROR, s.message()))
    }

    /// A live login, first seen here, continues as an audit session of this node (unless a
    /// request beside this one got there first).
    async fn continued(&self, origin: ClientAddr, person: Arc<LoginSession>) -> Arc<LoginSession> {
        let kept = self
            .sessions
            .lock()
            .entry(person.login.clone())
            .or_insert_with(|| person.clone())
            .clone();
        if Arc::ptr_eq(&kept, &person) {
            let detail = format!("the console login {} continues on this node", person.login);
            let recorded = Recorded {
                session: &person.id,
                principal: Some(&person.principal),
                detail: &detail,
            };
            self.record(origin, Kind::SessionStart, Outcome::Success, recorded)
                .await;
        }
        kept
    }

    /// A login as this node keeps it, with a coordinator client acting as the person.
    fn login_session(
        &self,
        id: String,
        principal: Principal,
        sealed: SessionCookie,
        origin: ClientAddr,
    ) -> Result<LoginSession, tonic::Status> {
        let SessionCookie {
            login,
            token,
            csrf,
            expires_ms,
        } = sealed;
        let expires = from_ms(expires_ms);
        let mut coordinator = Client::new(self.coordinator.clone(), Credential::Bearer(token))?
            .retry_for(COORDINATOR_RETRY);
        if let Some(tls) = &self.coordinator_tls {
            coordinator = coordinator.tls(tls.clone());
        }
        Ok(LoginSession {
            id,
            login,
            principal,
            csrf,
            expires,
            connection: connection(origin),
            coordinator,
            looks: Default::default(),
        })
    }

    /// The person, if the request also carries their CSRF token.
    pub(super) async fn person_for_change(
        &self,
        visit: &Visit,
    ) -> Result<Arc<LoginSession>, Response> {
        let person = self.person(visit).await?;
        let sent = visit
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok());
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

    /// A login that failed, on record, and the answer saying why.
    pub(super) async fn refused_login(
        &self,
        origin: ClientAddr,
        session: &str,
        principal: Option<&Principal>,
        why: &str,
    ) -> Response {
        self.record_sign_in(origin, session, principal, Outcome::Denied, why)
            .await;
        refuse(StatusCode::UNAUTHORIZED, &format!("login failed: {why}"))
    }

    /// A sign-in (a login, or a token issued), with its outcome, on record.
    pub(super) async fn record_sign_in(
        &self,
        origin: ClientAddr,
        session: &str,
        principal: Option<&Principal>,
        outcome: Outcome,
        detail: &str,
    ) {
        let recorded = Recorded {
            session,
            principal,
            detail,
        };
        self.record(origin, Kind::SessionStart, outcome, recorded)
            .await;
    }

    /// Ends (and records) the logins that expired.
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
    let (state, nonce) = (random_token(), random_token());
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
    let started = LoginCookie {
        state,
        nonce,
        verifier,
        redirect_uri,
        started_ms: ms(SystemTime::now()),
    };
    let sealed = console.cookies.seal(LOGIN_COOKIE, &started);
    let mut res = Redirect::to(url.as_str()).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &sealed, LOGIN_TTL),
    );
    res
}

/// `GET /auth/callback?code=…&state=…`: the provider's answer, on any node. The login it
/// completes must have been started by this browser (the login cookie, sealed by this
/// cluster) with this `state`.
pub async fn callback(
    State(console): State<Arc<Console>>,
    ConnectInfo(origin): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let session = crate::core::new_session_id();
    let (principal, token) =
        match complete(&console, &headers, query.as_deref().unwrap_or("")).await {
            Ok(verified) => verified,
            Err((principal, why)) => {
                return console
                    .refused_login(origin, &session, principal.as_ref(), &why)
                    .await
            }
        };
    console
        .logged_in(origin, session, principal, token, LOGIN_COOKIE)
        .await
}

impl Console {
    /// A verified person (their token verified by the node's verifier) is logged in: the
    /// login is recorded, kept, and its sealed cookie set; `started` (the cookie of the
    /// login under way) is cleared.
    pub(super) async fn logged_in(
        &self,
        origin: ClientAddr,
        session: String,
        principal: Principal,
        token: String,
        started: &str,
    ) -> Response {
        let expires = principal
            .token_exp
            .map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s));
        let expires = match self.core.verifier.session_remaining(&principal) {
            Some(left) => expires.min(SystemTime::now() + left),
            None => expires,
        };
        let contents = SessionCookie {
            login: session.clone(),
            token,
            csrf: random_token(),
            expires_ms: ms(expires),
        };
        let sealed = self.cookies.seal(SESSION_COOKIE, &contents);
        if sealed.len() > MAX_SEALED_LEN {
            let why = format!(
                "the token ({} bytes) is too large for the login cookie: ask the provider for \
                 fewer claims in it (for example fewer groups)",
                contents.token.len()
            );
            return self
                .refused_login(origin, &session, Some(&principal), &why)
                .await;
        }
        let person = match self.login_session(session.clone(), principal, contents, origin) {
            Ok(p) => p,
            Err(s) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, s.message()),
        };
        let recorded = Recorded {
            session: &session,
            principal: Some(&person.principal),
            detail: "logged in to the console",
        };
        self.record(origin, Kind::SessionStart, Outcome::Success, recorded)
            .await;
        self.sessions
            .lock()
            .insert(session.clone(), Arc::new(person));
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let mut res = Redirect::to("/").into_response();
        let h = res.headers_mut();
        h.append(
            header::SET_COOKIE,
            set_cookie(SESSION_COOKIE, &sealed, left),
        );
        h.append(header::SET_COOKIE, set_cookie(started, "", Duration::ZERO));
        res
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
        .and_then(|v| console.cookies.open::<LoginCookie>(LOGIN_COOKIE, v))
        .filter(|p| {
            SystemTime::now()
                .duration_since(from_ms(p.started_ms))
                .is_ok_and(|d| d < LOGIN_TTL)
        })
        .ok_or_else(|| plain("no login was started in this browser, or it took too long"))?;
    if !params.get("state").is_some_and(|s| same(s, &pending.state)) {
        return Err(plain("the provider's answer is not for this login (state)"));
    }
    if let Some(error) = params.get("error") {
        // Whoever calls the callback writes these: quoted, and cut when long.
        let description = params.get("error_description").map_or("", String::as_str);
        return Err(plain(&format!(
            "the provider refused: {} {}",
            client_text(error),
            client_text(description)
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
        ("code_verifier", pending.verifier.as_str()),
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
            client_text(&body)
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

/// `POST /auth/logout` (CSRF-checked): the login ends on every node (the coordinator keeps
/// the logout) and on record. When the coordinator cannot keep it, the logout fails and says
/// so: the login would still hold on the other nodes.
pub async fn logout(State(console): State<Arc<Console>>, visit: Visit) -> Response {
    let person = match console.person_for_change(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    let until_ms = ms(person.expires);
    if let Err(e) = person
        .coordinator
        .end_login(pb::EndLoginRequest { until_ms })
        .await
    {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the logout could not be kept at the coordinator, so the login would still hold \
                 on other nodes: try again ({})",
                e.message()
            ),
        );
    }
    console.sessions.lock().remove(&person.login);
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
pub async fn me(State(console): State<Arc<Console>>, visit: Visit) -> Response {
    let person = match console.person(&visit).await {
        Ok(p) => p,
        Err(res) => return res,
    };
    let p = &person.principal;
    let member = |g: &Option<String>| g.as_ref().is_some_and(|g| p.groups.contains(g));
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "subject": p.subject,
            "issuer": p.issuer,
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
