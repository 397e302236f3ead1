//! The node's HTTPS API (`[api]`): what clients ask of Vigil itself rather than of a target.
//! Today: how a person logs in (the provider and client `vigil login` uses), SSH user
//! certificates for a verified token, and the SSH hosts a principal may use (what
//! `vigil login` and `vigil ssh-config` call). Every call is authenticated with the
//! caller's token (`Authorization: Bearer`), like every protocol, and every certificate issued
//! or refused is on record before the answer leaves.

use crate::config::{IdentityConfig, TokenType};
use crate::core::config_error::{invalid, ConfigError};
use crate::core::http::{Accept, ConnectionLimit};
use crate::core::proxy_protocol::{self, FirstWord, Origin};
use crate::core::Core;
use crate::ssh::ca::UserCa;
use crate::ssh::config::SshTargetConfig;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use vigil_proto::record::{Connection, Kind, Outcome, Principal, Request, SshRequest};

/// The `[api]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key; generated in `<data_dir>/tls-api` when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// How `vigil login` logs a person in; absent: only `vigil login --token`.
    #[serde(default)]
    pub login: Option<LoginConfig>,
}

/// `[api.login]`: the OIDC client people log in with (`vigil login` runs the authorization
/// code flow with PKCE, or the device authorization grant, against the node's issuer).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The public (native) client registered at the provider for `vigil login`.
    pub client_id: String,
    #[serde(default = "default_login_scopes")]
    pub scopes: Vec<String>,
    /// Which token of the provider's answer Vigil is then given.
    #[serde(default = "default_login_token")]
    pub token: TokenType,
}

fn default_login_scopes() -> Vec<String> {
    ["openid", "profile", "groups"].map(String::from).to_vec()
}

fn default_login_token() -> TokenType {
    TokenType::IdToken
}

impl ApiConfig {
    /// A login whose token the node would refuse is a configuration error, not a puzzle for
    /// the first person who tries it.
    pub fn validate(&self, identity: &IdentityConfig) -> Result<(), ConfigError> {
        let Some(login) = &self.login else {
            return Ok(());
        };
        if login.client_id.is_empty() {
            return Err(invalid("api.login.client_id", "must not be empty"));
        }
        if !identity.token_types.contains(&login.token) {
            return Err(invalid(
                "api.login.token",
                "names a token kind identity.token_types does not accept",
            ));
        }
        if login.token == TokenType::IdToken {
            if !identity.audiences.contains(&login.client_id) {
                return Err(invalid(
                    "api.login.client_id",
                    "an ID token's audience is its client: add the client id to identity.audiences",
                ));
            }
            if !login.scopes.iter().any(|s| s == "openid") {
                return Err(invalid(
                    "api.login.scopes",
                    "an ID token needs the openid scope",
                ));
            }
        }
        Ok(())
    }

    /// What `GET /v1/login` answers: enough for `vigil login` to run the flow.
    pub fn login_answer(&self, identity: &IdentityConfig) -> Option<serde_json::Value> {
        self.login.as_ref().map(|l| {
            json!({
                "issuer": identity.issuer,
                "client_id": l.client_id,
                "scopes": l.scopes,
                "token": match l.token {
                    TokenType::IdToken => "id_token",
                    TokenType::AccessToken => "access_token",
                },
            })
        })
    }
}

/// What the API knows of the SSH listener.
pub struct SshApi {
    pub ca: Arc<UserCa>,
    /// The gateway's host key, one OpenSSH line (for the client's known_hosts).
    pub host_key: String,
    pub port: u16,
    pub targets: Vec<SshTargetConfig>,
}

#[derive(Clone)]
struct ApiState {
    core: Arc<Core>,
    ssh: Option<Arc<SshApi>>,
    /// `GET /v1/login`'s answer, when people may log in.
    login: Option<Arc<serde_json::Value>>,
    saml: Option<Arc<SamlCli>>,
}

/// How people log in with `vigil login`: the OIDC client (`[api.login]`), SAML (the console's
/// sign-in, when `[identity.saml]` is set).
pub struct Logins {
    pub oidc: Option<serde_json::Value>,
    pub saml: Option<SamlCli>,
}

/// `vigil login --saml`: where the browser signs in, and the key its codes are sealed with.
pub struct SamlCli {
    pub login_url: String,
    pub cookies: Arc<crate::console::cookies::Sealer>,
}

/// Largest request body (a public key, a few hundred bytes).
const MAX_BODY: usize = 16 * 1024;

/// Time a client has to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request's body, of at most [`MAX_BODY`] bytes sent within [`BODY_TIMEOUT`]; `Err` when
/// it is larger, slower or broken.
async fn read_body(body: axum::body::Body) -> Result<Bytes, ()> {
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        _ => Err(()),
    }
}

/// Binds the API listener; serve it with [`serve`].
pub async fn bind(
    config: &ApiConfig,
    core: &Arc<Core>,
) -> anyhow::Result<(TlsListener, SocketAddr)> {
    let https = Https {
        section: "api",
        listen: config.listen,
        tls_cert: config.tls_cert.as_deref(),
        tls_key: config.tls_key.as_deref(),
        // The API's records are the SSH certificate endpoint's: a refusal is one.
        protocol: crate::ssh::PROTOCOL,
    };
    https.bind(core).await
}

/// One of the node's own HTTPS listeners (`[api]`, `[console]`).
pub(crate) struct Https<'a> {
    /// The config section, for messages and the generated certificate's directory
    /// (`<data_dir>/tls-<section>`).
    pub section: &'static str,
    pub listen: SocketAddr,
    pub tls_cert: Option<&'a std::path::Path>,
    pub tls_key: Option<&'a std::path::Path>,
    /// The protocol of the records of clients refused before TLS.
    pub protocol: &'static str,
}

impl Https<'_> {
    pub(crate) async fn bind(self, core: &Arc<Core>) -> anyhow::Result<(TlsListener, SocketAddr)> {
        use anyhow::Context as _;
        let section = self.section;
        let tls = crate::core::tls::server_config(
            self.tls_cert,
            self.tls_key,
            &core.data_dir.join(format!("tls-{section}")),
        )
        .with_context(|| format!("{section} TLS certificate"))?;
        let tcp = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot bind {section}.listen {}", self.listen))?;
        let addr = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(tls);
        let listener = TlsListener::new(tcp, acceptor, core.clone(), self.protocol);
        Ok((listener, addr))
    }
}

pub async fn serve(
    listener: TlsListener,
    core: Arc<Core>,
    ssh: Option<Arc<SshApi>>,
    logins: Logins,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let login = match (logins.oidc, &logins.saml) {
        (Some(mut answer), Some(saml)) => {
            answer["saml_login"] = json!(saml.login_url);
            Some(answer)
        }
        (None, Some(saml)) => Some(json!({ "saml_login": saml.login_url })),
        (answer, None) => answer,
    };
    let app = Router::new()
        .route("/v1/login", get(login_info))
        .route("/v1/saml/code", post(saml_code))
        .route("/v1/ssh/certificate", post(certificate))
        .route("/v1/ssh/hosts", get(hosts))
        .with_state(ApiState {
            core,
            ssh,
            login: login.map(Arc::new),
            saml: logins.saml.map(Arc::new),
        });
    crate::core::http::serve(listener, app, MAX_HEAD, shutdown).await;
}

/// Largest request head on the API and console listeners (a token, a cookie).
pub(crate) const MAX_HEAD: usize = 32 * 1024;

/// A JSON error answer: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, json_body(&json!({ "error": message.into() }))).into_response()
}

fn json_body(v: &serde_json::Value) -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string())
}

/// `GET /v1/login`: the issuer, client and scopes `vigil login` uses, and which token of
/// the provider's answer to keep. Public: it is what the provider's discovery document and
/// the client registration already tell anyone.
async fn login_info(State(state): State<ApiState>) -> Response {
    match &state.login {
        Some(answer) => json_body(answer).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "this gateway offers no login for people (no [api.login]); use vigil login --token",
        ),
    }
}

/// `POST /v1/saml/code` `{"code": …, "code_verifier": …}`: the token of a `vigil login --saml`,
/// for the code the console sent to the CLI's loopback listener (once, within a minute, with
/// the verifier of the challenge the CLI started with).
async fn saml_code(State(state): State<ApiState>, body: axum::body::Body) -> Response {
    let Some(saml) = &state.saml else {
        return error(StatusCode::NOT_FOUND, "this gateway offers no SAML login");
    };
    let body = read_body(body).await.unwrap_or_default();
    let asked = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let field = |name: &str| {
        asked
            .as_ref()
            .and_then(|v| v[name].as_str().map(str::to_string))
    };
    let (Some(code), Some(verifier)) = (field("code"), field("code_verifier")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"code\", \"code_verifier\"}",
        );
    };
    match crate::console::saml::redeem(&state.core, &saml.cookies, &code, &verifier).await {
        Ok(token) => json_body(&json!({ "token": token })).into_response(),
        Err(why) => error(StatusCode::BAD_REQUEST, why),
    }
}

/// The caller's principal, from `Authorization: Bearer TOKEN`.
async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Principal, (StatusCode, String)> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "send the token as Authorization: Bearer TOKEN".to_string(),
        ))?;
    state.core.verifier.verify(token).await.map_err(|e| {
        let status = if e == crate::core::identity::TokenError::ProviderUnavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        (status, format!("authentication failed: {e}"))
    })
}

/// `POST /v1/ssh/certificate` `{"public_key": "ssh-ed25519 AAAA…"}`: a user certificate for
/// the key, valid no longer than the token. On record (issued or refused) before the answer.
async fn certificate(
    State(state): State<ApiState>,
    ConnectInfo(ClientAddr(origin)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(ssh) = state.ssh.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "this gateway issues no SSH certificates (no [ssh] user_ca_key)",
        );
    };
    let core = &state.core;
    let mut rec = core.audit.body(None, Kind::Request);
    rec.connection = Some(Arc::new(Connection {
        client_tls: true,
        name: Some("certificate".into()),
        ..origin.connection(crate::ssh::PROTOCOL)
    }));
    let mut request = SshRequest {
        request_type: "certificate".into(),
        ..SshRequest::default()
    };
    let issued = match caller(&state, &headers).await {
        Err((status, why)) => Err((status, why)),
        Ok(principal) => {
            rec.principal = Some(Arc::new(principal.clone()));
            // Read only once the caller is known, and only so much.
            let body = read_body(body).await;
            let key = body
                .as_ref()
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v["public_key"].as_str().map(str::to_string));
            match key {
                None if body.is_err() => Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the body is too large (or was not sent in time)".into(),
                )),
                None => Err((
                    StatusCode::BAD_REQUEST,
                    "send {\"public_key\": \"ssh-ed25519 AAAA…\"}".into(),
                )),
                Some(key) => ssh
                    .ca
                    .issue(&key, &principal)
                    .map_err(|why| (StatusCode::BAD_REQUEST, why)),
            }
        }
    };
    match &issued {
        Ok(i) => {
            request.command = Some(i.key_fingerprint.clone());
            rec.outcome = Some(Outcome::Success);
            rec.detail = Some(format!(
                "certificate serial {} valid until {}",
                i.serial, i.valid_before
            ));
        }
        Err((_, why)) => {
            rec.outcome = Some(Outcome::Denied);
            rec.detail = Some(core.scrub(why));
        }
    }
    rec.request = Some(Request::Ssh(request));
    if let Err(e) = core.audit.append(&rec).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the gateway cannot record this: {e}"),
        );
    }
    match issued {
        Ok(i) => json_body(&json!({
            "certificate": i.certificate,
            "serial": i.serial,
            "valid_before": i.valid_before,
        }))
        .into_response(),
        Err((status, why)) => error(status, why),
    }
}

/// `GET /v1/ssh/hosts`: the gateway's SSH port and host key, and the hosts (with their
/// logins) the caller may use.
async fn hosts(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(ssh) = state.ssh.clone() else {
        return error(StatusCode::NOT_FOUND, "this gateway has no SSH listener");
    };
    let principal = match caller(&state, &headers).await {
        Ok(p) => p,
        Err((status, why)) => return error(status, why),
    };
    let hosts: Vec<_> = ssh
        .targets
        .iter()
        .filter(|t| t.allow.admits(&principal))
        .map(|t| json!({ "name": t.name, "logins": t.logins }))
        .collect();
    json_body(&json!({
        "port": ssh.port,
        "host_key": ssh.host_key,
        "separator": crate::ssh::config::USER_SEPARATOR.to_string(),
        "hosts": hosts,
    }))
    .into_response()
}

/// The TLS side of the API listener: TCP connections are accepted and their first steps (the
/// PROXY protocol, [`proxy_protocol::admit`], and the handshake) run in their own tasks (a slow
/// client holds up no one), finished streams are handed to axum.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Origin, OwnedSemaphorePermit)>,
}

impl TlsListener {
    /// Accepts on `tcp`; a client refused before TLS (a bad PROXY protocol header) is on
    /// record as a session of `protocol`.
    fn new(
        tcp: TcpListener,
        acceptor: TlsAcceptor,
        core: Arc<Core>,
        protocol: &'static str,
    ) -> Self {
        let (tx, ready) = mpsc::channel(64);
        let limit = ConnectionLimit::new(crate::core::http::MAX_CONNECTIONS);
        tokio::spawn(async move {
            loop {
                let (mut stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // A place is taken before anything is read: the TLS handshake counts too.
                let Some(place) = limit.enter() else {
                    core.metrics.preauth_refused.inc();
                    continue;
                };
                let (acceptor, ready, core) = (acceptor.clone(), tx.clone(), core.clone());
                tokio::spawn(async move {
                    let admitted = proxy_protocol::admit(
                        &core,
                        protocol,
                        &mut stream,
                        peer,
                        FirstWord::Client,
                    );
                    let Ok(origin) = admitted.await else {
                        return;
                    };
                    let handshake = tokio::time::timeout(
                        crate::core::http::HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    );
                    if let Ok(Ok(tls)) = handshake.await {
                        let _ = ready.send((tls, origin, place)).await;
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Self { ready }
    }
}

impl Accept for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> (Self::Io, Origin, OwnedSemaphorePermit) {
        match self.ready.recv().await {
            Some(s) => s,
            // The accept task is gone (the runtime is shutting down): never yield again.
            None => std::future::pending().await,
        }
    }
}

/// Who the client is (behind a load balancer: the client it named), for records.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub Origin);
