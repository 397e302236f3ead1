//! `vigil login` for people: the OIDC authorization code flow with PKCE through a browser
//! (RFC 8252: the code comes back to a listener on a loopback port of this machine), or the
//! device authorization grant (RFC 8628) on a box with no browser. The gateway names the
//! provider and the client (`GET /v1/login`); the token the provider hands back is kept in
//! the Vigil home (0600) for `vigil token`, `vigil ssh-config` and the SSH certificate.

use crate::ssh::GatewayArgs;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreGrantType, CoreIdTokenVerifier,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
    CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl,
    IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, ProviderMetadata, RedirectUrl, Scope,
    TokenResponse,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How a person proves who they are.
pub enum Flow {
    /// Authorization code + PKCE; the browser is opened unless `open_browser` is false (the
    /// URL is printed either way). The code comes back to `127.0.0.1:callback_port` (0: any).
    Browser {
        open_browser: bool,
        callback_port: u16,
    },
    /// The device authorization grant: a URL and a code to enter on any other device.
    Device,
}

/// What the gateway says about logging people in (`GET /v1/login`).
#[derive(Deserialize)]
struct LoginInfo {
    issuer: String,
    client_id: String,
    scopes: Vec<String>,
    /// `id_token` or `access_token`: which token of the provider's answer the gateway takes.
    token: String,
}

/// The provider's discovery document, with the device endpoint standard metadata lacks.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}
type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// How long a person has to finish in the browser or on the other device.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest HTTP request the loopback listener reads (the provider's redirect: a code and a
/// state in the query).
const MAX_CALLBACK_REQUEST: usize = 16 * 1024;

/// Runs the person's login and returns the token the gateway accepts.
pub async fn person(gateway: &GatewayArgs, flow: Flow) -> Result<String, String> {
    let info: LoginInfo = serde_json::from_value(crate::ssh::get(gateway, "/v1/login").await?)
        .map_err(|e| format!("the gateway's login answer: {e}"))?;
    // The provider's redirects are not followed: a redirect to an attacker's address must not
    // receive the code or the token request.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let issuer = IssuerUrl::new(info.issuer.clone()).map_err(|e| format!("issuer: {e}"))?;
    let metadata = Metadata::discover_async(issuer, &http)
        .await
        .map_err(|e| format!("the provider {}: {}", info.issuer, chain(&e)))?;
    let device = metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone();
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(info.client_id), None);
    // The algorithms the gateway can be configured to accept; never `none` or HMAC.
    let verifier = client.id_token_verifier().set_allowed_algs([
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        CoreJwsSigningAlgorithm::EcdsaP256Sha256,
        CoreJwsSigningAlgorithm::EdDsa,
    ]);
    let scopes = info.scopes.iter().filter(|s| *s != "openid").cloned();
    let (answer, nonce) = match flow {
        Flow::Browser {
            open_browser,
            callback_port,
        } => {
            let listener = TcpListener::bind(("127.0.0.1", callback_port))
                .await
                .map_err(|e| format!("cannot listen on 127.0.0.1:{callback_port}: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            let redirect = RedirectUrl::new(format!("http://127.0.0.1:{port}/callback"))
                .map_err(|e| e.to_string())?;
            let client = client.clone().set_redirect_uri(redirect);
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            let (url, state, nonce) = client
                .authorize_url(
                    CoreAuthenticationFlow::AuthorizationCode,
                    CsrfToken::new_random,
                    Nonce::new_random,
                )
                .add_scopes(scopes.map(Scope::new))
                .set_pkce_challenge(challenge)
                .url();
            eprintln!("Log in at your identity provider. If no browser opens, go to:\n  {url}");
            if open_browser {
                open(url.as_str());
            }
            let answer = callback(&listener, state.secret(), &info.issuer);
            let code = tokio::time::timeout(LOGIN_TIMEOUT, answer)
                .await
                .map_err(|_| "no answer from the browser in 5 minutes".to_string())??;
            let answer = client
                .exchange_code(AuthorizationCode::new(code))
                .map_err(|e| e.to_string())?
                .set_pkce_verifier(verifier)
                .request_async(&http)
                .await
                .map_err(|e| format!("the provider refused the code: {}", chain(&e)))?;
            (answer, Some(nonce))
        }
        Flow::Device => {
            let device = device.ok_or("the provider offers no device authorization endpoint")?;
            let client = client.clone().set_device_authorization_url(device);
            let details: CoreDeviceAuthorizationResponse = client
                .exchange_device_code()
                .add_scopes(scopes.map(Scope::new))
                .request_async(&http)
                .await
                .map_err(|e| format!("the provider refused the device login: {}", chain(&e)))?;
            eprintln!(
                "To log in, open {} on any device and enter the code {}",
                details.verification_uri().as_str(),
                details.user_code().secret()
            );
            if let Some(complete) = details.verification_uri_complete() {
                eprintln!("or open:\n  {}", complete.secret());
            }
            let answer = client
                .exchange_device_access_token(&details)
                .map_err(|e| e.to_string())?
                .request_async(&http, tokio::time::sleep, Some(LOGIN_TIMEOUT))
                .await
                .map_err(|e| format!("the device login did not finish: {}", chain(&e)))?;
            (answer, None)
        }
    };
    pick(&answer, &info.token, &verifier, nonce.as_ref())
        .map_err(|e| format!("the provider's answer: {e}"))
}

/// The token the gateway takes. An ID token is checked first (signed by the provider, for
/// this client, unexpired, and in the browser flow carrying this login's nonce): a token the
/// gateway would refuse, or one injected into this login, is not kept.
fn pick(
    answer: &CoreTokenResponse,
    kind: &str,
    verifier: &CoreIdTokenVerifier,
    nonce: Option<&Nonce>,
) -> Result<String, String> {
    match kind {
        "access_token" => Ok(answer.access_token().secret().clone()),
        "id_token" => {
            let id = answer
                .id_token()
                .ok_or("no ID token (was the openid scope granted?)")?;
            let checked = match nonce {
                Some(nonce) => id.claims(verifier, nonce).map(|_| ()),
                None => id
                    .claims(verifier, |_: Option<&Nonce>| Ok::<(), String>(()))
                    .map(|_| ()),
            };
            checked.map_err(|e| format!("the ID token does not verify: {e}"))?;
            Ok(id.to_string())
        }
        other => Err(format!(
            "the gateway asks for an unknown token kind {other:?}"
        )),
    }
}

/// `vigil login --saml`: the person signs in at the SAML IdP through the gateway's console,
/// which sends its code to a listener on a loopback port of this machine; the code and the
/// verifier of the challenge this login started with (PKCE's S256, RFC 7636) buy the token
/// the gateway issued, once.
pub async fn saml(
    gateway: &GatewayArgs,
    open_browser: bool,
    callback_port: u16,
) -> Result<String, String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let info = crate::ssh::get(gateway, "/v1/login").await?;
    let login = info["saml_login"]
        .as_str()
        .ok_or("this gateway offers no SAML login ([identity.saml])")?;
    let listener = TcpListener::bind(("127.0.0.1", callback_port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{callback_port}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let state = b64(&rand::random::<[u8; 32]>());
    let verifier = b64(&rand::random::<[u8; 32]>());
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    let mut url = reqwest::Url::parse(login).map_err(|e| format!("saml_login: {e}"))?;
    url.query_pairs_mut()
        .append_pair("cli_port", &port.to_string())
        .append_pair("cli_state", &state)
        .append_pair("cli_challenge", &challenge);
    eprintln!("Sign in at your identity provider. If no browser opens, go to:\n  {url}");
    if open_browser {
        open(url.as_str());
    }
    let code = tokio::time::timeout(LOGIN_TIMEOUT, callback(&listener, &state, ""))
        .await
        .map_err(|_| "no answer from the browser in 5 minutes".to_string())??;
    let body = serde_json::json!({ "code": code, "code_verifier": verifier });
    let answer = crate::ssh::post(gateway, "/v1/saml/code", body).await?;
    answer["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the gateway's answer has no token".into())
}

/// A JWT's claims, read without checking the signature: for what the CLI shows and compares
/// with its own values (the gateway verifies every token it is given).
pub fn unverified_claims(token: &str) -> Result<serde_json::Value, String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "not a JWT (payload)")?;
    serde_json::from_slice(&bytes).map_err(|_| "not a JWT (claims)".into())
}

/// Waits for the provider's redirect on the loopback listener; the code, once the state
/// matches (and the issuer, when the provider names itself, RFC 9207). Other requests (a
/// favicon) get a 404 and the wait goes on.
async fn callback(listener: &TcpListener, state: &str, issuer: &str) -> Result<String, String> {
    loop {
        let (mut stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_CALLBACK_REQUEST {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let line = String::from_utf8_lossy(&buf);
        let target = line
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default();
        let url = reqwest::Url::parse(&format!("http://127.0.0.1{target}")).ok();
        let Some(url) = url.filter(|u| u.path() == "/callback") else {
            reply(&mut stream, "404 Not Found", "Not found.").await;
            continue;
        };
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        if param("state").as_deref() != Some(state) {
            // Not the answer to this login (a stale tab, a forged link): keep waiting.
            reply(
                &mut stream,
                "400 Bad Request",
                "This is not the login vigil is waiting for.",
            )
            .await;
            continue;
        }
        if param("iss").is_some_and(|iss| iss != issuer) {
            reply(
                &mut stream,
                "400 Bad Request",
                "This answer is from another provider.",
            )
            .await;
            return Err("the answer names another identity provider (iss)".into());
        }
        if let Some(error) = param("error") {
            let why = param("error_description").unwrap_or_default();
            reply(
                &mut stream,
                "200 OK",
                "The login was refused. You can close this tab.",
            )
            .await;
            return Err(format!("the provider refused the login: {error} {why}"));
        }
        let Some(code) = param("code") else {
            reply(&mut stream, "400 Bad Request", "No code in the answer.").await;
            return Err("the provider's answer has no code".into());
        };
        reply(
            &mut stream,
            "200 OK",
            "Logged in to Vigil. You can close this tab.",
        )
        .await;
        return Ok(code);
    }
}

async fn reply(stream: &mut tokio::net::TcpStream, status: &str, text: &str) {
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Vigil</title></head>\
         <body><p>{text}</p></body></html>"
    );
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Opens the URL in the person's browser: `$BROWSER URL` when set, else the desktop's opener.
/// It runs on its own; the URL is printed anyway, so a failure here is not an error.
fn open(url: &str) {
    use std::process::{Command, Stdio};
    let mut command = match std::env::var("BROWSER") {
        Ok(b) if !b.trim().is_empty() => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{b} \"$1\""))
                .arg("vigil-login")
                .arg(url);
            c
        }
        _ => {
            let opener = if cfg!(target_os = "macos") {
                "open"
            } else {
                "xdg-open"
            };
            let mut c = Command::new(opener);
            c.arg(url);
            c
        }
    };
    if let Err(e) = command.stdin(Stdio::null()).stdout(Stdio::null()).spawn() {
        eprintln!("(could not open a browser: {e})");
    }
}

/// The error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out += &format!(": {c}");
        cause = c.source();
    }
    out
}

/// Where the token of the last login is kept.
pub fn token_path(home: PathBuf) -> PathBuf {
    home.join("token")
}
