//! The console's pages, style and script: plain files embedded in the binary (no build step),
//! and the terminal player, asciinema-player, vendored as its prebuilt bundle with its licence
//! (`assets/vendor/`, fetched by `fetch-asciinema-player.sh`).
//! The page is a shell; everything person-specific arrives through the JSON API and is put in
//! the page as text (`textContent`), never as markup.

use super::auth::Visit;
use super::Console;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use std::sync::Arc;

const INDEX: &str = include_str!("assets/index.html");
const FILES: &[(&str, &str, &str)] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    ),
    (
        "asciinema-player.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/vendor/asciinema-player.min.js"),
    ),
    (
        "asciinema-player.css",
        "text/css; charset=utf-8",
        include_str!("assets/vendor/asciinema-player.css"),
    ),
    (
        "asciinema-player.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("assets/vendor/asciinema-player.LICENSE"),
    ),
];

/// `GET /`: the inbox; without a login, off to log in.
pub async fn index(State(console): State<Arc<Console>>, visit: Visit) -> Response {
    match console.person(&visit).await {
        Ok(_) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response(),
        Err(res) if res.status() == StatusCode::UNAUTHORIZED => {
            let to = match console.config.login {
                super::LoginWith::Oidc => "/auth/login",
                super::LoginWith::Saml => "/auth/saml/login",
            };
            Redirect::to(to).into_response()
        }
        Err(res) => res,
    }
}

/// `GET /static/{file}`: the style and script, for logged-in people only (like every page).
pub async fn file(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    visit: Visit,
) -> Response {
    if let Err(res) = console.person(&visit).await {
        return res;
    }
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => ([(header::CONTENT_TYPE, *kind)], *body).into_response(),
        None => super::auth::refuse(StatusCode::NOT_FOUND, "no such file"),
    }
}
