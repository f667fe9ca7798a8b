//! The operator page at `/ui`: a static page and its script, built into the binary, that drive
//! the same REST API as `cli` (documented at `/openapi.json`), signed in with a session cookie
//! instead of a bearer token ([`session`]).
//!
//! Everything a store supplies (ids, labels, file names, error messages) reaches the page as
//! JSON and is put into the document as text (`textContent`), never as HTML; the
//! Content-Security-Policy allows scripts from this server only, and no inline script.

pub mod session;

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use shared::ErrorCode;
use shared::api::{SessionInfo, SignIn};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use session::{SESSION_COOKIE, Sessions};

use crate::AppState;
use crate::api::unix_rfc3339;
use crate::error::ApiError;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const STYLE_CSS: &str = include_str!("../../ui/style.css");

/// Scripts, styles and connections from this server only; no inline script or style, no
/// plug-ins, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The sign-in routes, which are part of the API document.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(sign_in, session_info, sign_out))
}

/// The page and its assets, outside the API document.
pub fn page_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route(
            "/ui",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The assets change with the binary; the browser asks again each time.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn info(view: session::SessionView) -> SessionInfo {
    SessionInfo {
        expires_at: unix_rfc3339(view.expires_at).unwrap_or_default(),
        operator: view.operator,
        csrf_token: view.csrf_token,
    }
}

fn cookie_header(value: String) -> Result<HeaderValue, ApiError> {
    HeaderValue::try_from(value).map_err(|e| ApiError::internal(&e.into()))
}

/// `POST /ui/session`: signs in with an operator token.
#[utoipa::path(post, path = "/ui/session", tag = "session", request_body = SignIn,
    responses((status = 200, description = "Signed in; the session cookie is set", body = SessionInfo,
        headers(("set-cookie" = String, description = "The HttpOnly, SameSite=Strict session cookie")))))]
pub async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<SignIn>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let opened = state.sessions.open(&state.tokens, &req.token)?;
    tracing::info!(
        audit = true,
        operator = opened.view.operator,
        from = %peer,
        "operator page signed in"
    );
    let cookie = session::set_cookie(
        &opened.cookie_value,
        opened.view.expires_at,
        state.config.serves_tls(),
    );
    Ok((
        [(header::SET_COOKIE, cookie_header(cookie)?)],
        Json(info(opened.view)),
    )
        .into_response())
}

/// `GET /ui/session`: the session of the cookie, with its CSRF token (for a reloaded page).
#[utoipa::path(get, path = "/ui/session", tag = "session",
    responses((status = 200, description = "The session", body = SessionInfo)))]
pub async fn session_info(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SessionInfo>, ApiError> {
    let cookie = session::cookie_value(&headers)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "not signed in"))?;
    let view = state
        .sessions
        .check(&state.tokens, cookie, session::Access::Read)?;
    Ok(Json(info(view)))
}

/// `DELETE /ui/session`: signs out (with the CSRF token); the cookie is removed.
#[utoipa::path(delete, path = "/ui/session", tag = "session",
    responses((status = 204, description = "Signed out; the cookie is removed")))]
pub async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cookie = session::cookie_value(&headers)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "not signed in"))?;
    let csrf = headers
        .get(session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    let view = state
        .sessions
        .check(&state.tokens, cookie, session::Access::Change { csrf })?;
    state.sessions.close(cookie);
    tracing::info!(
        audit = true,
        operator = view.operator,
        "operator page signed out"
    );
    let clear = session::clear_cookie(state.config.serves_tls());
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, cookie_header(clear)?)],
    )
        .into_response())
}
