//! Bearer-token checks for every kind of caller.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use shared::auth::Role;
use shared::{ClientId, ErrorCode};

use crate::AppState;
use crate::error::ApiError;
use crate::registry::TokenIds;
use crate::revocations::Revocations;
use crate::tokens::{Tokens, Verified};
use crate::ui::session;

/// Pulls the token out of `Authorization: Bearer <token>` and verifies it.
pub fn verify_bearer(tokens: &Tokens, headers: &HeaderMap) -> Result<Verified, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "authorization header must be 'Bearer <token>'",
            )
        })?;
    tokens.verify(token).map_err(|err| {
        // The reason (expired, bad signature, revoked, ...) helps the caller fix their setup and
        // reveals nothing about the key.
        ApiError::new(ErrorCode::Unauthorized, format!("{err}"))
    })
}

/// An agent, as its token names it.
#[derive(Debug, Clone)]
pub struct AgentCredential {
    pub client_id: ClientId,
    /// When the token it connected with was issued (unix seconds).
    pub issued_at: u64,
    /// Which token it is.
    pub token: TokenIds,
}

/// The identity of an agent, from an agent token that has not been revoked (by its id, or with
/// every token of its client).
pub fn agent_identity(
    tokens: &Tokens,
    revocations: &Revocations,
    headers: &HeaderMap,
) -> Result<AgentCredential, ApiError> {
    let Verified { claims, kid } = verify_bearer(tokens, headers)?;
    if claims.role != Role::Agent {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only agent tokens may open an agent connection",
        ));
    }
    let client_id = ClientId::parse(&claims.sub).map_err(|_| {
        ApiError::new(
            ErrorCode::Unauthorized,
            "token subject is not a valid client id",
        )
    })?;
    if revocations.is_revoked(&client_id, claims.iat) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "token has been revoked; issue a new one",
        ));
    }
    Ok(AgentCredential {
        client_id,
        issued_at: claims.iat,
        token: TokenIds {
            jti: claims.jti,
            kid,
            expires_at: claims.exp,
        },
    })
}

/// An operator (or admin), authenticated by an operator or admin token, or by the operator
/// page's session cookie (with its CSRF token on requests that change state). Extracting it
/// from a request with any other token fails with 401 (bad credentials) or 403 (an agent token,
/// a missing or forged CSRF token).
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
}

impl Operator {
    /// This operator, asking from `from`, for the audit trail of what the request starts.
    pub fn requester(self, from: std::net::SocketAddr) -> crate::uploads::Requester {
        crate::uploads::Requester {
            operator: self.name,
            from,
        }
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A bearer token wins; without one, the operator page's session cookie will do.
        if !parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
            && let Some(cookie) = session::cookie_value(&parts.headers)
        {
            let access = match parts.method {
                Method::GET | Method::HEAD | Method::OPTIONS => session::Access::Read,
                _ => session::Access::Change {
                    csrf: parts
                        .headers
                        .get(session::CSRF_HEADER)
                        .and_then(|v| v.to_str().ok()),
                },
            };
            let view = state.sessions.check(&state.tokens, cookie, access)?;
            return Ok(Operator {
                name: view.operator,
            });
        }
        let claims = verify_bearer(&state.tokens, &parts.headers)?.claims;
        if claims.role.operates() {
            Ok(Operator { name: claims.sub })
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "agent tokens cannot use the operator API",
            ))
        }
    }
}

/// An admin: mints and revokes tokens, rotates keys. Any other token gets 401 or 403.
#[derive(Debug, Clone)]
pub struct Admin {
    pub name: String,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = verify_bearer(&state.tokens, &parts.headers)?.claims;
        if claims.role == Role::Admin {
            Ok(Admin { name: claims.sub })
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "only admin tokens may manage tokens and keys",
            ))
        }
    }
}
