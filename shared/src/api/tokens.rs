//! Bodies of the admin API: tokens (`/tokens`) and the keys that sign them (`/keys`).

use serde::{Deserialize, Serialize};

use crate::auth::Role;

/// Body of `POST /tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssueTokenRequest {
    pub role: Role,
    /// The agent's client id, or the operator's name.
    pub subject: String,
    /// Lifetime; the server's default for the role when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// One token the server signed, as its ledger records it. Never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// The token id (`jti`), what `DELETE /tokens/{jti}` takes.
    pub jti: String,
    /// The signing key (`kid`).
    pub kid: String,
    pub subject: String,
    pub role: Role,
    /// Who minted it: an admin's name, `renewal` for an agent's renewed token, or `server-host`
    /// for `server token issue`.
    pub issued_by: String,
    /// RFC 3339.
    pub issued_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// Answer to `POST /tokens` (201): the token, shown once, and its ledger entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// Query of `GET /tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct TokenListParams {
    pub role: Option<Role>,
    pub subject: Option<String>,
    /// Include expired and revoked tokens.
    #[serde(default)]
    pub all: bool,
    /// At most this many, newest first (default 1,000, at most 10,000).
    #[cfg_attr(feature = "openapi", param(maximum = 10000))]
    pub limit: Option<u32>,
}

/// One signing key, as `GET /keys` shows it. Never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SigningKeyInfo {
    pub kid: String,
    pub algorithm: String,
    pub created_at: String,
    /// The key new tokens are signed with.
    pub active: bool,
    /// Tokens it signed that are neither expired nor revoked.
    pub tokens_outstanding: u64,
    /// When the last of those expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_expiry: Option<String>,
    /// Agents connected right now with a token it signed.
    pub agents_connected: u64,
}

/// Query of `DELETE /keys/{kid}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct RetireKeyParams {
    /// Retire it even though tokens it signed are still valid (they stop working).
    #[serde(default)]
    pub force: bool,
}
