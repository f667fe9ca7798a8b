//! JWT claims and the one place tokens are signed and checked.
//!
//! The server signs with an Ed25519 key that never leaves its host ([`TokenKeys::ed25519`]); each
//! token names its key in the header's `kid` and carries its own id (`jti`). Tokens signed with
//! the legacy HS256 `JWT_SECRET` ([`TokenKeys::new`]) carry no `kid`. Agents, operators and admins
//! get tokens of the same shape; the [`Role`] claim tells them apart, and `sub` is the agent's
//! client id (or the operator's name, for audit).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::ClientId;

/// The `iss` claim of every Backhaul token.
pub const ISSUER: &str = "backhaul";
/// The `aud` claim of every Backhaul token.
pub const AUDIENCE: &str = "backhaul";
/// Clock skew tolerated when checking `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest operator name (the subject of an operator or admin token).
pub const MAX_NAME_CHARS: usize = 64;
/// A secret shorter than this is refused: HS256 is only as strong as its key.
pub const MIN_SECRET_LEN: usize = 32;

/// A secret or token taken from a flag or the environment. `Debug` prints `***`, so a config
/// struct can derive `Debug` without leaking it into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    Agent,
    /// Uses the operator API: triggers, status, downloads, per-store revocation.
    Operator,
    /// An operator who also mints and revokes tokens and rotates the signing key.
    Admin,
}

impl Role {
    /// Whether this role may use the operator API.
    pub fn operates(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: agent, operator or admin")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    /// Optional "not before"; checked with the same leeway as `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Token id, unique per token. Tokens minted before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("JWT secret must be at least {MIN_SECRET_LEN} bytes")]
    WeakSecret,
    #[error("JWT secret looks like a placeholder; generate a random one")]
    PlaceholderSecret,
    #[error("token is issued in the future")]
    IssuedInFuture,
    #[error("agent tokens need a valid client id as subject")]
    InvalidSubject,
    #[error(
        "operator names are 1 to {MAX_NAME_CHARS} characters: letters, digits, '.', '_', '@', '-'"
    )]
    InvalidName,
    #[error("not an Ed25519 private key in PKCS#8 form")]
    InvalidKey,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Signs and verifies tokens with one key: an Ed25519 key pair named by its key id, or the
/// legacy HS256 secret. Cheap to clone.
#[derive(Clone)]
pub struct TokenKeys {
    /// `None` for the HS256 secret, whose tokens carry no `kid`.
    kid: Option<String>,
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(***)")
    }
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(AuthError::WeakSecret);
        }
        if is_placeholder(secret) {
            return Err(AuthError::PlaceholderSecret);
        }
        Ok(Self {
            kid: None,
            algorithm: Algorithm::HS256,
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256),
        })
    }

    /// The key pair of an Ed25519 private key in PKCS#8 form. Its key id is derived from the
    /// public key ([`key_id`]), so the same key always has the same id.
    pub fn ed25519(pkcs8: &[u8]) -> Result<Self, AuthError> {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| AuthError::InvalidKey)?;
        let public = pair.public_key().as_ref();
        Ok(Self {
            kid: Some(key_id(public)),
            algorithm: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(pkcs8),
            decoding: DecodingKey::from_ed_der(public),
            validation: validation(Algorithm::EdDSA),
        })
    }

    /// A new random Ed25519 private key, in PKCS#8 form.
    pub fn generate_ed25519() -> Result<Vec<u8>, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| AuthError::InvalidKey)
    }

    /// The key id its tokens carry in their header; `None` for the HS256 secret.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Mints a token valid for `ttl` from now.
    pub fn issue(&self, sub: &str, role: Role, ttl: Duration) -> Result<String, AuthError> {
        self.mint(sub, role, ttl).map(|(token, _)| token)
    }

    /// Mints a token valid for `ttl` from now, with a fresh token id, and returns its claims.
    pub fn mint(
        &self,
        sub: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<(String, Claims), AuthError> {
        check_subject(sub, role)?;
        let now = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
            nbf: None,
            jti: Some(uuid::Uuid::new_v4().to_string()),
        };
        Ok((self.encode(&claims)?, claims))
    }

    /// Signs arbitrary claims. Tests use it to build expired or odd tokens.
    pub fn encode(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut header = Header::new(self.algorithm);
        header.kid = self.kid.clone();
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    /// Checks signature, algorithm, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        // `iat` is required by the type; one from the future means a wrong clock or a forgery,
        // and would dodge a per-client revocation.
        if claims.iat > unix_now().saturating_add(LEEWAY_SECS) {
            return Err(AuthError::IssuedInFuture);
        }
        Ok(claims)
    }
}

/// An agent token names a valid client id; an operator's, a plain name (it shows in audit lines).
pub fn check_subject(sub: &str, role: Role) -> Result<(), AuthError> {
    match role {
        Role::Agent => ClientId::parse(sub)
            .map(drop)
            .map_err(|_| AuthError::InvalidSubject),
        Role::Operator | Role::Admin => {
            let plain = |c: char| c.is_ascii_alphanumeric() || "._@-".contains(c);
            if (1..=MAX_NAME_CHARS).contains(&sub.len()) && sub.chars().all(plain) {
                Ok(())
            } else {
                Err(AuthError::InvalidName)
            }
        }
    }
}

/// Checks pinned to one algorithm: a token that names any other one, `none` included, is refused.
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    validation
}

/// The id of an Ed25519 public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    hex::encode(&digest.as_ref()[..8])
}

/// The key id a token names in its header, without checking anything else.
pub fn token_kid(token: &str) -> Result<Option<String>, AuthError> {
    Ok(jsonwebtoken::decode_header(token)?.kid)
}

/// The claims of `token` *without* checking its signature or expiry: for an agent to show what
/// it holds (`client --check-config`), never to decide anything.
pub fn peek_claims(token: &str) -> Result<Claims, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.insecure_disable_signature_validation();
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.algorithms = vec![
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ];
    Ok(jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&[]), &validation)?.claims)
}

/// Secrets that were obviously copied from an example or typed by hand.
fn is_placeholder(secret: &[u8]) -> bool {
    let lower = String::from_utf8_lossy(secret).to_ascii_lowercase();
    let known = [
        "changeme",
        "change-me",
        "change_me",
        "placeholder",
        "your-secret",
        "your_secret",
        "example",
    ];
    let mut distinct = secret.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    known.iter().any(|k| lower.contains(k)) || distinct.len() < 8
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2-hunter2");
    }

    #[test]
    fn issued_tokens_verify() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let token = keys
            .issue("restaurant-1", Role::Agent, Duration::from_secs(60))
            .unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, "restaurant-1");
        assert_eq!(claims.role, Role::Agent);
    }

    #[test]
    fn short_and_placeholder_secrets_are_refused() {
        assert!(matches!(
            TokenKeys::new(b"short"),
            Err(AuthError::WeakSecret)
        ));
        for placeholder in [
            "changeme-changeme-changeme-changeme".as_bytes(),
            b"please-replace-this-placeholder-value",
            &[b'a'; 64],
            b"abababababababababababababababab",
        ] {
            assert!(
                matches!(
                    TokenKeys::new(placeholder),
                    Err(AuthError::PlaceholderSecret)
                ),
                "{}",
                String::from_utf8_lossy(placeholder)
            );
        }
    }

    #[test]
    fn future_and_not_yet_valid_tokens_are_rejected() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let now = unix_now();
        let base = Claims {
            sub: "a".into(),
            role: Role::Agent,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: None,
        };
        let future_iat = keys
            .encode(&Claims {
                iat: now + 600,
                ..base.clone()
            })
            .unwrap();
        assert!(matches!(
            keys.verify(&future_iat),
            Err(AuthError::IssuedInFuture)
        ));
        let not_yet = keys
            .encode(&Claims {
                nbf: Some(now + 600),
                ..base.clone()
            })
            .unwrap();
        assert!(keys.verify(&not_yet).is_err());
        let skewed = keys
            .encode(&Claims {
                iat: now + 10,
                ..base
            })
            .unwrap();
        assert!(
            keys.verify(&skewed).is_ok(),
            "a small clock skew is tolerated"
        );
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let other = TokenKeys::new(b"another-secret-another-secret-xx").unwrap();
        let expired = keys
            .encode(&Claims {
                sub: "a".into(),
                role: Role::Agent,
                iss: ISSUER.into(),
                aud: AUDIENCE.into(),
                iat: 0,
                exp: unix_now() - 3600,
                nbf: None,
                jti: None,
            })
            .unwrap();
        let wrong_secret = other
            .issue("a", Role::Agent, Duration::from_secs(60))
            .unwrap();
        // {"alg":"none","typ":"JWT"} . {"sub":"a","role":"agent",...} . (empty signature)
        let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwicm9sZSI6ImFnZW50IiwiaXNzIjoiYmFja2hhdWwiLCJhdWQiOiJiYWNraGF1bCIsImlhdCI6MCwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        for bad in [
            expired.as_str(),
            wrong_secret.as_str(),
            alg_none,
            "",
            "x.y.z",
        ] {
            assert!(keys.verify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ed25519_tokens_name_their_key_and_verify_only_with_it() {
        let pkcs8 = TokenKeys::generate_ed25519().unwrap();
        let keys = TokenKeys::ed25519(&pkcs8).unwrap();
        let again = TokenKeys::ed25519(&pkcs8).unwrap();
        assert_eq!(keys.kid(), again.kid(), "the key id is the key's");
        let kid = keys.kid().unwrap().to_owned();
        assert_eq!(kid.len(), 16);
        let (token, claims) = keys
            .mint("alice", Role::Admin, Duration::from_secs(60))
            .unwrap();
        assert_eq!(token_kid(&token).unwrap().as_deref(), Some(kid.as_str()));
        assert_eq!(keys.verify(&token).unwrap(), claims);
        assert_eq!(peek_claims(&token).unwrap().role, Role::Admin);

        // Another key, and the HS256 secret, refuse it; the HS256 key refuses Ed25519 tokens.
        let other = TokenKeys::ed25519(&TokenKeys::generate_ed25519().unwrap()).unwrap();
        assert_ne!(other.kid(), keys.kid());
        assert!(other.verify(&token).is_err());
        let legacy = TokenKeys::new(SECRET).unwrap();
        assert!(legacy.verify(&token).is_err());
        let hs = legacy
            .issue("a", Role::Agent, Duration::from_secs(60))
            .unwrap();
        assert_eq!(token_kid(&hs).unwrap(), None);
        assert!(keys.verify(&hs).is_err());
        assert!(matches!(
            TokenKeys::ed25519(b"not a key"),
            Err(AuthError::InvalidKey)
        ));
    }

    #[test]
    fn roles_parse_and_print() {
        for role in [Role::Agent, Role::Operator, Role::Admin] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Admin.operates() && Role::Operator.operates() && !Role::Agent.operates());
    }

    #[test]
    fn agent_tokens_need_a_valid_subject() {
        let keys = TokenKeys::new(SECRET).unwrap();
        assert!(matches!(
            keys.issue("../x", Role::Agent, Duration::from_secs(60)),
            Err(AuthError::InvalidSubject)
        ));
        for name in ["", "a b", "x\n[audit=true]", &"n".repeat(65)] {
            assert!(matches!(
                keys.issue(name, Role::Operator, Duration::from_secs(60)),
                Err(AuthError::InvalidName)
            ));
        }
        assert!(
            keys.issue("alice@hq", Role::Admin, Duration::from_secs(60))
                .is_ok()
        );
    }
}
