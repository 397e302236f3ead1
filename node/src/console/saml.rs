//! SAML sign-in to the console (`[identity.saml]`, docs/saml.md): SP-initiated Web SSO, the
//! AuthnRequest by HTTP-Redirect, the response by HTTP-POST to `/auth/saml/acs`.
//!
//! The request's id is sealed into a cookie of this browser (`__Host-vigil-saml`, 10 minutes,
//! `SameSite=None`: the IdP's page posts the response back from another site), so a response
//! is accepted only by the browser that asked for it, in answer to a request this cluster made,
//! on any node. A verified assertion's id is marked in the coordinator until the assertion
//! expires: an assertion any node accepted before is refused. The person then gets a token the
//! cluster issues (`[identity.tokens]`), verified like any other, and a console login like an
//! OIDC person's.

use super::auth::{cookie, from_ms, ms, refuse, set_cookie_for, Visit, LOGIN_TTL};
use super::Console;
use crate::core::saml::{SignIn, Sp};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::SystemTime;
use vigil_proto::record::{Outcome, Principal};

const SAML_COOKIE: &str = "__Host-vigil-saml";

/// The SAML cookie's sealed contents: a sign-in under way at the IdP.
#[derive(Serialize, Deserialize)]
struct Started {
    request_id: String,
    started_ms: u64,
    /// Set when `vigil login --saml` started it: the token goes to the CLI, not the console.
    #[serde(default)]
    cli: Option<Cli>,
}

/// `vigil login --saml` (RFC 8252 style): where its loopback listener waits, the state it
/// checks, the S256 challenge of the verifier it redeems the code with.
#[derive(Clone, Deserialize, Serialize)]
struct Cli {
    cli_port: u16,
    cli_state: String,
    cli_challenge: String,
}

/// The query of `/auth/saml/login`: all three of [`Cli`]'s, or none.
#[derive(Deserialize)]
pub(super) struct CliParams {
    cli_port: Option<u16>,
    cli_state: Option<String>,
    cli_challenge: Option<String>,
}

impl Cli {
    fn valid(&self) -> bool {
        let b64url = |s: &str| {
            (16..=128).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        self.cli_port != 0 && b64url(&self.cli_state) && b64url(&self.cli_challenge)
    }
}

/// The code the CLI's listener gets: the token, sealed, for the holder of the verifier.
const CODE: &str = "vigil-saml-code";
/// How long a code may wait to be redeemed.
const CODE_TTL_MS: u64 = 60_000;

#[derive(Serialize, Deserialize)]
struct Code {
    token: String,
    challenge: String,
    expires_ms: u64,
}

/// The token of a code, once: sealed by this cluster, not expired, the verifier's S256 the
/// challenge, and not redeemed before anywhere in the cluster.
pub async fn redeem(
    core: &crate::core::Core,
    cookies: &super::cookies::Sealer,
    code: &str,
    verifier: &str,
) -> Result<String, String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let sealed: Code = cookies
        .open(CODE, code)
        .ok_or("not a code of this cluster's")?;
    if sealed.expires_ms <= ms(SystemTime::now()) {
        return Err("the code has expired: log in again".into());
    }
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    if challenge != sealed.challenge {
        return Err("the verifier does not match the login's challenge".into());
    }
    let key = format!(
        "saml-code:{}",
        hex::encode(sha2::Sha256::digest(code.as_bytes()))
    );
    match core.approvals.mark_once(key, sealed.expires_ms).await {
        Ok(true) => Ok(sealed.token),
        Ok(false) => Err("the code was used before".into()),
        Err(e) => Err(format!(
            "the code cannot be checked against reuse (the coordinator: {})",
            e.message()
        )),
    }
}

/// `GET /saml/metadata`: this service provider's metadata, to register at the IdP.
pub(super) async fn metadata(State(console): State<Arc<Console>>) -> Response {
    let Some(sp) = &console.saml else {
        return refuse(StatusCode::NOT_FOUND, "SAML is not configured");
    };
    let xml = sp.metadata_xml();
    (
        [(header::CONTENT_TYPE, "application/samlmetadata+xml")],
        xml,
    )
        .into_response()
}

/// `GET /auth/saml/login`: off to the IdP with a new AuthnRequest; with `cli_port`,
/// `cli_state` and `cli_challenge`, for `vigil login --saml`.
pub(super) async fn login(
    State(console): State<Arc<Console>>,
    axum::extract::Query(asked): axum::extract::Query<CliParams>,
) -> Response {
    let cli = match (asked.cli_port, asked.cli_state, asked.cli_challenge) {
        (None, None, None) => None,
        (Some(cli_port), Some(cli_state), Some(cli_challenge)) => Some(Cli {
            cli_port,
            cli_state,
            cli_challenge,
        }),
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "cli_port, cli_state and cli_challenge go together",
            )
        }
    };
    if cli.as_ref().is_some_and(|c| !c.valid()) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "cli_port, cli_state and cli_challenge: a port and base64url values of 16 to 128 characters",
        );
    }
    let Some(sp) = &console.saml else {
        return refuse(StatusCode::NOT_FOUND, "SAML is not configured");
    };
    let (request_id, url) = match sp.authn_request() {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let started = Started {
        request_id,
        started_ms: ms(SystemTime::now()),
        cli,
    };
    let sealed = console.cookies.seal(SAML_COOKIE, &started);
    let mut res = Redirect::to(&url).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie_for(SAML_COOKIE, &sealed, LOGIN_TTL, "None"),
    );
    res
}

#[derive(Deserialize)]
pub(super) struct Posted {
    #[serde(rename = "SAMLResponse")]
    response: String,
}

/// `POST /auth/saml/acs`: the IdP's response, by the browser that asked for it.
pub(super) async fn acs(
    State(console): State<Arc<Console>>,
    visit: Visit,
    axum::Form(posted): axum::Form<Posted>,
) -> Response {
    let session = crate::core::new_session_id();
    let Some(sp) = &console.saml else {
        return refuse(StatusCode::NOT_FOUND, "SAML is not configured");
    };
    let done = match verified(&console, sp, &visit, &posted.response).await {
        Ok((started, sign_in)) => issued(
            &console,
            &sign_in,
            sp.config().token_audience(&console.config),
        )
        .await
        .map(|issued| (started, issued)),
        Err(why) => Err(why),
    };
    let (started, (token, principal)) = match done {
        Ok(t) => t,
        Err(why) => {
            return console
                .refused_login(visit.origin, &session, None, &why)
                .await
        }
    };
    if let Some(cli) = started.cli {
        let detail = "signed in with SAML for vigil login (a token was issued to it, handed \
                      over once the person confirms)";
        console
            .record_sign_in(
                visit.origin,
                &session,
                Some(&principal),
                Outcome::Success,
                detail,
            )
            .await;
        let code = Code {
            token,
            challenge: cli.cli_challenge,
            expires_ms: ms(SystemTime::now()) + CODE_TTL_MS,
        };
        let code = console.cookies.seal(CODE, &code);
        let url = format!(
            "http://127.0.0.1:{}/callback?state={}&code={code}",
            cli.cli_port, cli.cli_state
        );
        let mut res = confirmation(cli.cli_port, &principal, &url);
        res.headers_mut().insert(
            header::SET_COOKIE,
            super::auth::set_cookie_for(SAML_COOKIE, "", std::time::Duration::ZERO, "None"),
        );
        return res;
    }
    console
        .logged_in(visit.origin, session, principal, token, SAML_COOKIE)
        .await
}

/// The page that hands a `vigil login --saml` its code: only when the person follows its link.
/// Whoever sent them to the sign-in link chose the port and the PKCE challenge, so the page
/// says which port asks for a token as whom, and nothing goes to that port unless the person
/// confirms they started it (a link, not a redirect). The code is on this page only: the
/// person's browser, not the one who sent the link, holds it.
fn confirmation(port: u16, principal: &Principal, url: &str) -> Response {
    let html = |text: &str| crate::core::saml::xml_attr(&crate::audit::display::escape(text));
    let page = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Vigil: vigil login</title></head>
<body>
<h1>vigil login</h1>
<p>A <code>vigil login --saml</code> listening on port {port} of this computer asks for a token as <b>{subject}</b> (identity provider {idp}).</p>
<p>Continue only if you started it yourself, just now. If you did not, close this page: the token goes nowhere, and the sign-in link you followed came from someone else.</p>
<p><a id="continue" href="{url}">Continue: give the token to vigil login on port {port}</a></p>
</body></html>
"#,
        subject = html(&principal.subject),
        idp = html(principal.saml.as_ref().map_or("", |s| s.idp.as_str())),
        url = html(url),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// The response checked: for a request this browser started on this cluster, verified, and
/// its assertion not seen before anywhere in the cluster.
async fn verified(
    console: &Console,
    sp: &Arc<Sp>,
    visit: &Visit,
    response: &str,
) -> Result<(Started, SignIn), String> {
    let started: Started = cookie(&visit.headers, SAML_COOKIE)
        .and_then(|v| console.cookies.open(SAML_COOKIE, v))
        .filter(|s: &Started| {
            SystemTime::now()
                .duration_since(from_ms(s.started_ms))
                .is_ok_and(|d| d < LOGIN_TTL)
        })
        .ok_or(
            "no SAML sign-in was started in this browser, or it took too long (an \
             unsolicited response is refused)",
        )?;
    let (response, request_id) = (response.to_string(), started.request_id.clone());
    let sign_in = off_the_runtime(sp, move |sp| sp.verify(&response, &request_id)).await?;
    Ok((started, used_once(console, sign_in).await?))
}

/// How long one message's checks may take.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `check` of a message by the IdP's service provider, on a blocking thread and within
/// [`CHECK_TIMEOUT`]: libxml2 and xmlsec1 are synchronous C, and no runtime worker (which
/// serves every other connection of the node) waits for them. A check that takes longer is
/// refused; its thread finishes on its own.
async fn off_the_runtime(
    sp: &Arc<Sp>,
    check: impl FnOnce(&Sp) -> Result<SignIn, crate::core::saml::Refused> + Send + 'static,
) -> Result<SignIn, String> {
    let sp = sp.clone();
    let task = tokio::task::spawn_blocking(move || check(&sp));
    match tokio::time::timeout(CHECK_TIMEOUT, task).await {
        Ok(Ok(checked)) => checked.map_err(|e| e.0),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the SAML check failed");
            Err("the message could not be checked".into())
        }
        Err(_) => Err(format!(
            "the message could not be checked within {} s",
            CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// The sign-in, if its assertion was not used before anywhere in the cluster: its id is
/// marked in the coordinator until the assertion expires (and five minutes of skew).
async fn used_once(console: &Console, sign_in: SignIn) -> Result<SignIn, String> {
    let saml = sign_in
        .principal
        .saml
        .as_ref()
        .expect("a sign-in names its assertion");
    let key = format!("saml:{}|{}", saml.idp, saml.assertion_id);
    let until_ms = (sign_in.not_on_or_after + 300).saturating_mul(1000);
    match console.core.approvals.mark_once(key, until_ms).await {
        Ok(true) => Ok(sign_in),
        Ok(false) => Err(format!(
            "assertion {} was used before (a replay)",
            saml.assertion_id
        )),
        Err(e) => Err(format!("{UNCHECKED} (the coordinator: {})", e.message())),
    }
}

/// Why a sign-in failed when the replay cache could not answer (the assertion is unused: the
/// same request may succeed later).
const UNCHECKED: &str = "the assertion cannot be checked against replays";

/// The token the cluster issues for a sign-in, verified like any other token (what the
/// console keeps or hands out is what every node and the coordinator accept).
async fn issued(
    console: &Console,
    sign_in: &SignIn,
    audience: &str,
) -> Result<(String, Principal), String> {
    let keys = console
        .core
        .verifier
        .issued()
        .ok_or("the cluster issues no tokens ([identity.tokens])")?;
    let until = sign_in.session_ends.unwrap_or(u64::MAX);
    let token = keys.issue(&sign_in.principal, audience, until);
    let principal = console
        .core
        .verifier
        .verify(&token)
        .await
        .map_err(|e| format!("the token issued for the assertion was refused: {e}"))?;
    Ok((token, principal))
}

/// The grant of RFC 7522.
const SAML2_BEARER: &str = "urn:ietf:params:oauth:grant-type:saml2-bearer";

#[derive(Deserialize)]
pub(super) struct TokenRequest {
    grant_type: String,
    #[serde(default)]
    assertion: Option<String>,
}

/// An OAuth 2.0 error answer (RFC 6749 §5.2).
fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::json!({ "error": error, "error_description": description }).to_string(),
    )
        .into_response()
}

/// `POST /auth/saml/token` (RFC 7522): a workload's SAML bearer assertion, signed by the IdP
/// for this token endpoint, exchanged for a token the cluster issues. Issued and refused
/// exchanges are on record like logins.
pub(super) async fn token(
    State(console): State<Arc<Console>>,
    visit: Visit,
    axum::Form(req): axum::Form<TokenRequest>,
) -> Response {
    let session = crate::core::new_session_id();
    let Some(sp) = &console.saml else {
        return refuse(StatusCode::NOT_FOUND, "SAML is not configured");
    };
    let (console, session) = (&*console, session.as_str());
    let refused = |why: String| async move {
        console
            .record_sign_in(visit.origin, session, None, Outcome::Denied, &why)
            .await;
        why
    };
    if req.grant_type != SAML2_BEARER {
        let why = format!(
            "grant_type {}: only {SAML2_BEARER} is accepted here",
            crate::core::echo::client_text(&req.grant_type)
        );
        return oauth_error("unsupported_grant_type", &refused(why).await);
    }
    let Some(audience) = sp.config().workload_audience.clone() else {
        let why = "the token endpoint issues no tokens: identity.saml.workload_audience is not set";
        return oauth_error("unsupported_grant_type", &refused(why.into()).await);
    };
    let Some(assertion) = req.assertion else {
        return oauth_error("invalid_request", &refused("no assertion".into()).await);
    };
    let checked = match off_the_runtime(sp, move |sp| sp.verify_bearer(&assertion)).await {
        Ok(sign_in) => used_once(console, sign_in).await,
        Err(why) => Err(why),
    };
    let done = match checked {
        Ok(sign_in) => issued(console, &sign_in, &audience).await,
        Err(why) => Err(why),
    };
    let (token, principal) = match done {
        Ok(t) => t,
        Err(why) => {
            let why = refused(why).await;
            if why.starts_with(UNCHECKED) {
                let mut res = oauth_error("temporarily_unavailable", &why);
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return res;
            }
            return oauth_error("invalid_grant", &why);
        }
    };
    let detail = "a token was issued for a SAML bearer assertion (RFC 7522)";
    console
        .record_sign_in(
            visit.origin,
            session,
            Some(&principal),
            Outcome::Success,
            detail,
        )
        .await;
    let expires_in = principal
        .token_exp
        .unwrap_or(0)
        .saturating_sub(ms(SystemTime::now()) / 1000);
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::json!({
            "access_token": token,
            "token_type": "Bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "expires_in": expires_in,
        })
        .to_string(),
    )
        .into_response()
}
