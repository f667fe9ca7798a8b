//! Bearer-token checks for both kinds of caller.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use shared::auth::{Claims, Role, TokenKeys};
use shared::{ClientId, ErrorCode};

use crate::error::ApiError;
use crate::revocations::Revocations;

/// Pulls the token out of `Authorization: Bearer <token>` and verifies it.
pub fn verify_bearer(keys: &TokenKeys, headers: &HeaderMap) -> Result<Claims, ApiError> {
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
    keys.verify(token).map_err(|err| {
        // The reason (expired, bad signature, ...) helps the caller fix their setup and reveals
        // nothing about the secret.
        ApiError::new(ErrorCode::Unauthorized, format!("{err}"))
    })
}

/// An agent, as its token names it.
#[derive(Debug, Clone)]
pub struct AgentCredential {
    pub client_id: ClientId,
    /// When the token it connected with was issued and expires (unix seconds).
    pub issued_at: u64,
    pub expires_at: u64,
}

/// The identity of an agent, from an agent token that has not been revoked.
pub fn agent_identity(
    keys: &TokenKeys,
    revocations: &Revocations,
    headers: &HeaderMap,
) -> Result<AgentCredential, ApiError> {
    let claims = verify_bearer(keys, headers)?;
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
        expires_at: claims.exp,
    })
}

/// An operator, authenticated by an operator token. Extracting it from a request with any other
/// token fails with 401 (bad credentials) or 403 (an agent token).
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
}

impl<S> FromRequestParts<S> for Operator
where
    TokenKeys: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let keys = TokenKeys::from_ref(state);
        let claims = verify_bearer(&keys, &parts.headers)?;
        match claims.role {
            Role::Operator => Ok(Operator { name: claims.sub }),
            Role::Agent => Err(ApiError::new(
                ErrorCode::Forbidden,
                "agent tokens cannot use the operator API",
            )),
        }
    }
}
