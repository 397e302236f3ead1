//! The web console (`[console]`, docs/console.md): people log in with the organisation's OIDC
//! provider and act through the browser. This slice serves the approvers' inbox: the requests
//! the coordinator lets the person see, live, and their decisions.
//!
//! Layout: [`auth`] is the login (authorization code + PKCE), the login sessions and the CSRF
//! check every state change passes; [`inbox`] is the approvals API the page uses; the pages and
//! their script are static files embedded in the binary ([`assets`]). The auditor's pages
//! (sessions from the audit topic, replay, verification) come as their own module beside
//! `inbox`, under `/sessions` and `/api/sessions`, behind the same login.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles only from the
//! console itself, no inline script, no framing), so a value that slipped through escaping
//! still could not run.

mod assets;
mod auth;
pub mod cookies;
mod grants;
mod inbox;
pub mod index;
pub mod saml;
mod sessions;

use crate::api::TlsListener;
use crate::audit::display;
use crate::config::{IdentityConfig, TokenType};
use crate::core::config_error::{invalid, ConfigError};
use crate::core::secret::{Secret, SecretRef};
use crate::core::Core;
use axum::extract::DefaultBodyLimit;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use vigil_coordinator::tls::ClientTls;

/// The protocol name of the console's audit records (logins, logouts, refusals).
pub const PROTOCOL: &str = "console";

/// The `[console]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key; generated in `<data_dir>/tls-console` when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The console's client at the provider (a web application: authorization code + PKCE).
    pub client_id: String,
    /// The client's secret, by reference; absent: a public client (PKCE alone).
    #[serde(default)]
    pub client_secret: Option<SecretRef>,
    /// `https://HOST[:PORT]` people reach the console at (behind a balancer: the balancer's
    /// name); the redirect URI is this plus `/auth/callback`. Absent: the `Host` the browser
    /// asked for, which the provider checks against the client's registered redirect URIs.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// People of this group will see the recorded sessions (the auditor's pages).
    #[serde(default)]
    pub auditor_group: Option<String>,
    /// People of this group will manage grants.
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Where `/` sends a person without a login: `oidc` (the OIDC provider) or `saml` (the
    /// SAML IdP of `[identity.saml]`). Both sign-ins stay available (`/auth/login`,
    /// `/auth/saml/login`).
    #[serde(default)]
    pub login: LoginWith,
    /// The key the console's cookies are sealed with, by reference: at least 32 bytes, the
    /// same on every node of a cluster (a login is then good on every node). Absent: a key
    /// generated in `<data_dir>/console/cookie.key`, this node's own.
    #[serde(default)]
    pub cookie_key: Option<SecretRef>,
}

/// The sign-in `/` starts.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoginWith {
    #[default]
    Oidc,
    Saml,
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "groups"].map(String::from).to_vec()
}

impl ConsoleConfig {
    /// The console logs in with an ID token, verified like every other token: a client the
    /// node's verifier would refuse is a configuration error.
    pub fn validate(&self, identity: &IdentityConfig) -> Result<(), ConfigError> {
        if self.client_id.is_empty() {
            return Err(invalid("console.client_id", "must not be empty"));
        }
        if !identity.token_types.contains(&TokenType::IdToken) {
            return Err(invalid(
                "console.client_id",
                "the console logs in with ID tokens: add id_token to identity.token_types",
            ));
        }
        if !identity.audiences.contains(&self.client_id) {
            return Err(invalid(
                "console.client_id",
                "an ID token's audience is its client: add the client id to identity.audiences",
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(invalid(
                "console.scopes",
                "an ID token needs the openid scope",
            ));
        }
        if self.login == LoginWith::Saml && identity.saml.is_none() {
            return Err(invalid("console.login", "saml needs [identity.saml]"));
        }
        if let Some(url) = &self.public_url {
            let host = url.strip_prefix("https://").unwrap_or("");
            if host.is_empty() || host.contains('/') {
                return Err(invalid(
                    "console.public_url",
                    "must be https://HOST[:PORT], without a path",
                ));
            }
        }
        Ok(())
    }
}

/// What the console needs of the rest of the node.
struct Console {
    core: Arc<Core>,
    config: ConsoleConfig,
    issuer: String,
    secret: Option<Secret<String>>,
    /// The coordinator API, reached with the person's own token.
    coordinator: Vec<String>,
    coordinator_tls: Option<ClientTls>,
    /// To the provider (discovery, token endpoint).
    http: reqwest::Client,
    sessions: auth::Sessions,
    cookies: Arc<cookies::Sealer>,
    /// The SAML service provider, when `[identity.saml]` is set.
    saml: Option<Arc<crate::core::saml::Sp>>,
    /// The recorded sessions, for the auditors' pages.
    index: Arc<index::Index>,
}

/// Binds the console's listener; serve it with [`serve`].
pub async fn bind(
    config: &ConsoleConfig,
    core: &Arc<Core>,
) -> anyhow::Result<(TlsListener, SocketAddr)> {
    let https = crate::api::Https {
        section: "console",
        listen: config.listen,
        tls_cert: config.tls_cert.as_deref(),
        tls_key: config.tls_key.as_deref(),
        protocol: PROTOCOL,
    };
    https.bind(core).await
}

/// Everything [`serve`] takes from the node's configuration.
pub struct Setup {
    pub config: ConsoleConfig,
    pub issuer: String,
    pub http_timeout: std::time::Duration,
    pub coordinator: Vec<String>,
    pub coordinator_ca: Option<PathBuf>,
    /// The local audit log the session index follows, and where the index is kept.
    pub audit_dir: PathBuf,
    pub index_path: PathBuf,
    /// What the console's cookies are sealed with (shared with the API, which redeems the
    /// codes of `vigil login --saml`).
    pub cookies: Arc<cookies::Sealer>,
    /// The audit topic, when there is one: the index follows it instead of the local log.
    pub kafka: Option<crate::config::KafkaConfig>,
    /// The SAML service provider, loaded (its IdP's metadata read) by the caller.
    pub saml: Option<Arc<crate::core::saml::Sp>>,
}

impl Setup {
    /// Resolves the secrets and reads the CA before anything is served (bad config: no start).
    pub fn prepare(self) -> anyhow::Result<impl FnOnce(Arc<Core>) -> Router> {
        use anyhow::Context as _;
        let secret = match &self.config.client_secret {
            Some(r) => Some(r.resolve().context("console.client_secret")?),
            None => None,
        };
        let coordinator_tls = match &self.coordinator_ca {
            Some(ca) => Some(ClientTls::verify_with(ca).context("coordinator.ca_file")?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(self.http_timeout)
            // The token endpoint answers; a redirect there is not followed with the code.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("console HTTP client")?;
        let index = Arc::new(
            index::Index::open(&self.index_path, &self.audit_dir)
                .with_context(|| format!("console index {}", self.index_path.display()))?,
        );
        Ok(move |core: Arc<Core>| {
            tokio::spawn(sessions::follow(index.clone(), core.clone(), self.kafka));
            router(Arc::new(Console {
                core,
                config: self.config,
                issuer: self.issuer,
                secret,
                coordinator: self.coordinator,
                coordinator_tls,
                http,
                sessions: auth::Sessions::default(),
                cookies: self.cookies,
                saml: self.saml,
                index,
            }))
        })
    }
}

fn router(console: Arc<Console>) -> Router {
    // A SAML response or assertion, in a form.
    let saml_form = DefaultBodyLimit::max(
        console
            .saml
            .as_ref()
            .map_or(64 * 1024, |sp| sp.max_form_bytes()),
    );
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{file}", get(assets::file))
        .route("/auth/login", get(auth::login))
        .route("/auth/callback", get(auth::callback))
        .route("/auth/logout", post(auth::logout))
        .route("/saml/metadata", get(saml::metadata))
        .route("/auth/saml/login", get(saml::login))
        .route("/auth/saml/acs", post(saml::acs).layer(saml_form))
        .route("/auth/saml/token", post(saml::token).layer(saml_form))
        .route("/api/me", get(auth::me))
        .route("/api/approvals/events", get(inbox::events))
        .route("/api/approvals/{id}", get(inbox::show))
        .route("/api/approvals/{id}/decision", post(inbox::decide))
        .route("/api/grants", get(grants::list).post(grants::create))
        .route("/api/grants/{id}/revoke", post(grants::revoke))
        .route("/api/sessions", get(sessions::list))
        .route("/api/sessions/{id}", get(sessions::show))
        .route("/api/sessions/{id}/records.jsonl", get(sessions::download))
        .route(
            "/api/sessions/{id}/verification",
            get(sessions::verification),
        )
        .route(
            "/api/sessions/{id}/asciicast/{channel}",
            get(sessions::asciicast),
        )
        .layer(axum::middleware::from_fn(security_headers))
        // A vote, a grant, a token request: a few KiB.
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(console)
}

pub async fn serve(
    listener: TlsListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    crate::core::http::serve(listener, app, crate::api::MAX_HEAD, shutdown).await;
}

/// The body of a change: JSON only (a cross-site form cannot send it), read as `T`; else the
/// refusal's status and what to send (`hint`).
fn json_body<'a, T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: &[u8],
    hint: &'a str,
) -> Result<T, (axum::http::StatusCode, &'a str)> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err((axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "send JSON"));
    }
    serde_json::from_slice(body).map_err(|_| (axum::http::StatusCode::BAD_REQUEST, hint))
}

impl Console {
    /// A change: the person (who must have sent their CSRF token) and the JSON body as `T`;
    /// else the refusal, with `hint` saying what to send.
    async fn change<T: serde::de::DeserializeOwned>(
        &self,
        visit: &auth::Visit,
        body: &[u8],
        hint: &str,
    ) -> Result<(Arc<auth::LoginSession>, T), Response> {
        let person = self.person_for_change(visit).await?;
        let value = json_body(&visit.headers, body, hint)
            .map_err(|(status, why)| auth::refuse(status, why))?;
        Ok((person, value))
    }
}

/// `value` with every text in it (and every key) escaped as `vigil` escapes what it prints
/// ([`display::escape_lines`]): a control character, a bidirectional override or isolate or a
/// zero-width character shows as `\x…`/`\u{…}`, and each line after a line break starts with
/// the continuation marker. Every JSON answer the pages read passes here, once, so statements,
/// commands, paths, principal names, intents and row values read on every page as the CLI
/// prints them: what the page shows is what ran, or will run.
fn escaped(value: Value) -> Value {
    let text = |s: String| match display::escape_lines(&s, "") {
        Cow::Borrowed(_) => s,
        Cow::Owned(e) => e,
    };
    match value {
        Value::String(s) => Value::String(text(s)),
        Value::Array(a) => Value::Array(a.into_iter().map(escaped).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, v)| (text(k), escaped(v))).collect())
        }
        other => other,
    }
}

/// A JSON answer for the pages: `value`, [`escaped`].
fn page_json(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        escaped(value).to_string(),
    )
        .into_response()
}

/// The coordinator's refusal of a call made as the person, as the console's answer.
fn coordinator_refusal(s: &tonic::Status) -> Response {
    use axum::http::StatusCode;
    use tonic::Code;
    let status = match s.code() {
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    auth::refuse(status, &display::escape(s.message()))
}

/// Scripts, styles and connections only from the console itself, never inline (WebAssembly may
/// be compiled: the terminal player's emulator is one); no framing
/// (clickjacking an approve button); nothing cached (pages show live, per-person data).
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // A page of another site that opened the console keeps no handle on it: it cannot
    // navigate it (a fragment change would open a session in the person's name).
    set(
        h,
        axum::http::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(
        h,
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=31536000; includeSubDomains",
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    res
}

#[cfg(test)]
mod tests {
    use crate::config::IdentityConfig;

    fn identity(extra: &str) -> IdentityConfig {
        toml::from_str(&format!(
            "issuer = \"http://127.0.0.1:1\"\naudiences = [\"urn:vigil:gateway\", \"vigil-console\"]\n{extra}"
        ))
        .unwrap()
    }

    fn check(console: &str, identity: &IdentityConfig) -> Result<(), String> {
        let c: super::ConsoleConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\nclient_id = \"vigil-console\"\n{console}"
        ))
        .map_err(|e| e.to_string())?;
        c.validate(identity).map_err(|e| e.to_string())
    }

    /// A console whose ID tokens the node's verifier would refuse is caught at load, naming
    /// the key.
    #[test]
    fn a_console_the_verifier_would_refuse_is_a_config_error() {
        let good = identity("");
        check("", &good).unwrap();
        check(
            "client_secret = { env = \"S\" }\npublic_url = \"https://v.example.com:9443\"",
            &good,
        )
        .unwrap();

        let without = IdentityConfig {
            audiences: vec!["urn:vigil:gateway".into()],
            ..identity("")
        };
        let e = check("", &without).unwrap_err();
        assert!(
            e.contains("console.client_id") && e.contains("audiences"),
            "{e}"
        );
        let e = check("", &identity("token_types = [\"access_token\"]")).unwrap_err();
        assert!(e.contains("id_token"), "{e}");
        let e = check("scopes = [\"profile\"]", &good).unwrap_err();
        assert!(e.contains("console.scopes"), "{e}");
        for url in [
            "http://v.example.com",
            "https://v.example.com/console",
            "https://",
        ] {
            let e = check(&format!("public_url = \"{url}\""), &good).unwrap_err();
            assert!(e.contains("console.public_url"), "{url}: {e}");
        }
        let e = check("listen_on = \"x\"", &good).unwrap_err();
        assert!(e.contains("listen_on"), "{e}");
    }
}
