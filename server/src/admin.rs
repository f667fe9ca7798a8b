//! The admin API: tokens (`/tokens`) and the keys that sign them (`/keys`). Only admin tokens
//! get in, and every change is logged with `audit=true`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use shared::ErrorCode;
use shared::api::tokens::{
    IssueTokenRequest, IssuedToken, RetireKeyParams, SigningKeyInfo, TokenInfo, TokenListParams,
};
use shared::auth::{Role, check_subject};

use crate::AppState;
use crate::api::unix_rfc3339;
use crate::auth::Admin;
use crate::error::ApiError;
use crate::tokens::{KeyStatus, MAX_TTL_SECS, RetireError, ledger};

/// Lifetime of an operator or admin token when the request names none.
pub const OPERATOR_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Rows `GET /tokens` returns unless asked for fewer, and at most.
const DEFAULT_LIST_LIMIT: u32 = 1_000;
const MAX_LIST_LIMIT: u32 = 10_000;

fn internal(what: &str, e: &anyhow::Error) -> ApiError {
    tracing::error!(error = format!("{e:#}"), "{what}");
    ApiError::new(ErrorCode::Internal, format!("{what} (see the server log)"))
}

pub fn token_info(e: ledger::Entry) -> TokenInfo {
    TokenInfo {
        issued_at: unix_rfc3339(e.issued_at).unwrap_or_default(),
        expires_at: unix_rfc3339(e.expires_at).unwrap_or_default(),
        revoked_at: e.revoked_at.and_then(unix_rfc3339),
        jti: e.jti,
        kid: e.kid,
        subject: e.subject,
        role: e.role,
        issued_by: e.issued_by,
    }
}

/// `POST /tokens`: mints a token for an agent, an operator or an admin.
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = IssueTokenRequest,
    responses((status = 201, description = "The token, shown once, and its ledger entry", body = IssuedToken)))]
pub async fn issue_token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    admin: Admin,
    body: Result<Json<IssueTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    check_subject(&req.subject, req.role).map_err(|e| {
        let code = match req.role {
            Role::Agent => ErrorCode::InvalidClientId,
            Role::Operator | Role::Admin => ErrorCode::BadRequest,
        };
        ApiError::new(code, e.to_string())
    })?;
    let ttl = match (req.ttl_secs, req.role) {
        (Some(secs), _) if (1..=MAX_TTL_SECS).contains(&secs) => Duration::from_secs(secs),
        (Some(_), _) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("ttl_secs must be between 1 and {MAX_TTL_SECS}"),
            ));
        }
        (None, Role::Agent) => state.config.agent_token_ttl(),
        (None, Role::Operator | Role::Admin) => OPERATOR_TOKEN_TTL,
    };
    let minted = state
        .tokens
        .mint(&req.subject, req.role, ttl, &admin.name)
        .map_err(|e| internal("the token could not be minted", &e))?;
    tracing::info!(
        audit = true,
        admin = admin.name,
        from = %peer,
        jti = minted.entry.jti,
        kid = minted.entry.kid,
        subject = minted.entry.subject,
        role = %minted.entry.role,
        expires_at = minted.entry.expires_at,
        "token issued"
    );
    Ok((
        StatusCode::CREATED,
        Json(IssuedToken {
            token: minted.token,
            info: token_info(minted.entry),
        }),
    ))
}

/// `GET /tokens`: what the ledger holds, newest first; never a token itself.
#[utoipa::path(get, path = "/tokens", tag = "tokens", params(TokenListParams),
    responses((status = 200, description = "The ledger, newest first", body = Vec<TokenInfo>)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    _: Admin,
    params: Result<Query<TokenListParams>, QueryRejection>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let filter = ledger::Filter {
        role: params.role,
        subject: params.subject,
        all: params.all,
        limit: params
            .limit
            .unwrap_or(DEFAULT_LIST_LIMIT)
            .min(MAX_LIST_LIMIT),
    };
    let rows = state
        .tokens
        .list(&filter)
        .map_err(|e| internal("the token ledger could not be read", &e))?;
    Ok(Json(rows.into_iter().map(token_info).collect()))
}

/// `DELETE /tokens/{jti}`: that token is refused from now on; an agent connected with it is
/// disconnected.
#[utoipa::path(delete, path = "/tokens/{jti}", tag = "tokens",
    params(("jti" = String, Path, description = "The token's id, a UUID",
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses((status = 200, description = "The token, revoked", body = TokenInfo)))]
pub async fn revoke_token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    admin: Admin,
    Path(raw): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let jti = uuid::Uuid::parse_str(&raw)
        .map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidTokenId,
                "a token id is a UUID (see GET /tokens)",
            )
        })?
        .to_string();
    let entry = state
        .tokens
        .revoke(&jti)
        .map_err(|e| {
            internal(
                "the revocation could not be saved, so nothing was revoked",
                &e,
            )
        })?
        .ok_or_else(|| ApiError::new(ErrorCode::TokenNotFound, format!("no token {jti}")))?;
    // The other replicas refuse it too, and close a connection of theirs that holds it.
    state.bus.broadcast(
        &crate::bus::Broadcast::TokenRevoked {
            jti: jti.clone(),
            expires_at: entry.expires_at,
            client_id: (entry.role == Role::Agent)
                .then(|| shared::ClientId::parse(&entry.subject).ok())
                .flatten(),
        },
        &state.tracker,
    );
    let mut disconnected = false;
    if entry.role == Role::Agent
        && let Some(handle) = shared::ClientId::parse(&entry.subject)
            .ok()
            .and_then(|id| state.registry.get(&id))
        && handle.token.get().jti.as_deref() == Some(jti.as_str())
    {
        handle.close_revoked();
        disconnected = true;
    }
    tracing::info!(
        audit = true,
        admin = admin.name,
        from = %peer,
        jti,
        subject = entry.subject,
        role = %entry.role,
        disconnected,
        "token revoked"
    );
    Ok(Json(token_info(entry)))
}

fn key_info(state: &AppState, k: KeyStatus) -> SigningKeyInfo {
    let agents_connected = state
        .registry
        .count(|h| h.token.get().kid.as_deref() == Some(k.kid.as_str()))
        as u64;
    SigningKeyInfo {
        created_at: unix_rfc3339(k.created_at).unwrap_or_default(),
        last_expiry: k.last_expiry.and_then(unix_rfc3339),
        kid: k.kid,
        algorithm: k.algorithm,
        active: k.active,
        tokens_outstanding: k.outstanding,
        agents_connected,
    }
}

fn all_keys(state: &AppState) -> Result<Vec<SigningKeyInfo>, ApiError> {
    let keys = state
        .tokens
        .keys()
        .map_err(|e| internal("the token ledger could not be read", &e))?;
    Ok(keys.into_iter().map(|k| key_info(state, k)).collect())
}

/// `GET /keys`: the signing keys and what still depends on each.
#[utoipa::path(get, path = "/keys", tag = "keys",
    responses((status = 200, description = "The signing keys", body = Vec<SigningKeyInfo>)))]
pub async fn list_keys(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<SigningKeyInfo>>, ApiError> {
    all_keys(&state).map(Json)
}

/// `POST /keys/rotate`: a new key signs from now on; the old ones still verify. Connected agents
/// get tokens signed by the new key within `TOKEN_ROTATION_SPREAD_SECS`.
#[utoipa::path(post, path = "/keys/rotate", tag = "keys",
    responses((status = 201, description = "The keys, the new one active", body = Vec<SigningKeyInfo>)))]
pub async fn rotate_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    admin: Admin,
) -> Result<(StatusCode, Json<Vec<SigningKeyInfo>>), ApiError> {
    let previous = state.tokens.active_kid();
    let kid = state
        .tokens
        .rotate()
        .map_err(|e| internal("the new key could not be saved, so nothing changed", &e))?;
    tracing::info!(
        audit = true,
        admin = admin.name,
        from = %peer,
        kid,
        previous,
        "token signing key rotated"
    );
    Ok((StatusCode::CREATED, Json(all_keys(&state)?)))
}

/// `DELETE /keys/{kid}`: the key stops verifying. Refused for the active key, and while tokens
/// it signed are still valid unless `force=true`.
#[utoipa::path(delete, path = "/keys/{kid}", tag = "keys",
    params(("kid" = String, Path, description = "The key's id"), RetireKeyParams),
    responses((status = 200, description = "The keys left", body = Vec<SigningKeyInfo>)))]
pub async fn retire_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    admin: Admin,
    Path(kid): Path<String>,
    params: Result<Query<RetireKeyParams>, QueryRejection>,
) -> Result<Json<Vec<SigningKeyInfo>>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    state
        .tokens
        .retire(&kid, params.force)
        .map_err(|e| match e {
            RetireError::NotFound(_) => ApiError::new(ErrorCode::KeyNotFound, e.to_string()),
            RetireError::Active(_) | RetireError::InUse { .. } => {
                ApiError::new(ErrorCode::KeyInUse, e.to_string())
            }
            RetireError::Failed(e) => internal("the key file could not be saved", &e),
        })?;
    tracing::info!(
        audit = true,
        admin = admin.name,
        from = %peer,
        kid,
        force = params.force,
        "token signing key retired"
    );
    all_keys(&state).map(Json)
}
