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

const SAML_COOKIE: &str = "__Host-vigil-saml";

/// The SAML cookie's sealed contents: a sign-in under way at the IdP.
#[derive(Serialize, Deserialize)]
struct Started {
    request_id: String,
    started_ms: u64,
}

/// `GET /saml/metadata`: this service provider's metadata, to register at the IdP.
pub async fn metadata(State(console): State<Arc<Console>>) -> Response {
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

/// `GET /auth/saml/login`: off to the IdP with a new AuthnRequest.
pub async fn login(State(console): State<Arc<Console>>) -> Response {
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
pub struct Posted {
    #[serde(rename = "SAMLResponse")]
    response: String,
}

/// `POST /auth/saml/acs`: the IdP's response, by the browser that asked for it.
pub async fn acs(
    State(console): State<Arc<Console>>,
    visit: Visit,
    axum::Form(posted): axum::Form<Posted>,
) -> Response {
    let session = crate::core::new_session_id();
    let Some(sp) = &console.saml else {
        return refuse(StatusCode::NOT_FOUND, "SAML is not configured");
    };
    let sign_in = match verified(&console, sp, &visit, &posted.response).await {
        Ok(s) => s,
        Err(why) => {
            return console
                .refused_login(visit.origin, &session, None, &why)
                .await
        }
    };
    let Some(keys) = console.core.verifier.issued() else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "no [identity.tokens]");
    };
    let until = sign_in.session_ends.unwrap_or(u64::MAX);
    let token = keys.issue(&sign_in.principal, &sp.token_audience, until);
    // The token is verified like any other: what the console keeps is what every node and
    // the coordinator will accept.
    let principal = match console.core.verifier.verify(&token).await {
        Ok(p) => p,
        Err(e) => {
            let why = format!("the token issued for the assertion was refused: {e}");
            let principal = Some(&sign_in.principal);
            return console
                .refused_login(visit.origin, &session, principal, &why)
                .await;
        }
    };
    console
        .logged_in(visit.origin, session, principal, token, SAML_COOKIE)
        .await
}

/// The response checked: for a request this browser started on this cluster, verified, and
/// its assertion not seen before anywhere in the cluster.
async fn verified(
    console: &Console,
    sp: &Sp,
    visit: &Visit,
    response: &str,
) -> Result<SignIn, String> {
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
    let sign_in = sp.verify(response, &started.request_id).map_err(|e| e.0)?;
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
        Err(e) => Err(format!(
            "the assertion cannot be checked against replays (the coordinator: {})",
            e.message()
        )),
    }
}
