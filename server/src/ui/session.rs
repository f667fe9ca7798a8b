//! Sign-in for the operator page. An operator pastes a token once; the server keeps it in
//! memory behind a random session id, which the browser holds in an HttpOnly, SameSite=Strict
//! cookie (Secure under TLS). The token never reaches a URL, the page's script, storage or a
//! log. Every request re-verifies the token, so its expiry, its revocation and its key's
//! retirement end the session too; a restart ends every session (the operator signs in again).
//!
//! Requests that change state and ride on the cookie must also carry the session's CSRF token
//! in `x-csrf-token` (the synchronizer-token pattern): a page on another site can make the
//! browser send the cookie, never read the token.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::auth::unix_now;

use crate::error::ApiError;
use crate::tokens::Tokens;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "backhaul_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions held at most; past it, expired ones go, then the oldest.
const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
struct Session {
    token: String,
    csrf: String,
    expires_at: u64,
    created_at: u64,
}

/// What a request asks of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Reads only (`GET`, `HEAD`, `OPTIONS`).
    Read,
    /// Changes state: only with the session's CSRF token, as the request sent it (if at all).
    Change { csrf: Option<&'a str> },
}

/// What the page learns about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub operator: String,
    pub expires_at: u64,
    pub csrf_token: String,
}

/// A new session: the cookie's value (given to the browser once) and what the page sees.
pub struct Opened {
    pub cookie_value: String,
    pub view: SessionView,
}

/// The sessions, by the SHA-256 of their id: a memory dump does not hand out live cookies.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_b64(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| ApiError::internal(&anyhow::anyhow!("the system RNG failed: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

fn key_of(cookie_value: &str) -> [u8; 32] {
    Sha256::digest(cookie_value.as_bytes()).into()
}

/// Compares without an early exit, so the time taken says nothing about the CSRF token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // Every critical section leaves the map whole.
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signs in with `token`: an operator or admin token that verifies now.
    pub fn open(&self, tokens: &Tokens, token: &str) -> Result<Opened, ApiError> {
        let token = token.trim();
        let claims = tokens
            .verify(token)
            .map_err(|e| ApiError::new(ErrorCode::Unauthorized, format!("{e}")))?
            .claims;
        if !claims.role.operates() {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only operator and admin tokens may sign in",
            ));
        }
        let cookie_value = random_b64(32)?;
        let csrf = random_b64(32)?;
        let now = unix_now();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires_at > now);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            key_of(&cookie_value),
            Session {
                token: token.to_owned(),
                csrf: csrf.clone(),
                expires_at: claims.exp,
                created_at: now,
            },
        );
        Ok(Opened {
            cookie_value,
            view: SessionView {
                operator: claims.sub,
                expires_at: claims.exp,
                csrf_token: csrf,
            },
        })
    }

    /// The session of `cookie_value`, if it is live and its token still verifies; a request
    /// that changes state must also carry the session's CSRF token.
    pub fn check(
        &self,
        tokens: &Tokens,
        cookie_value: &str,
        access: Access<'_>,
    ) -> Result<SessionView, ApiError> {
        let key = key_of(cookie_value);
        let (token, expected_csrf) = {
            let map = self.lock();
            let session = map.get(&key).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "the session has ended; sign in again",
                )
            })?;
            (session.token.clone(), session.csrf.clone())
        };
        if let Access::Change { csrf } = access
            && !csrf.is_some_and(|sent| same(sent, &expected_csrf))
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("a request that changes state needs the session's {CSRF_HEADER} header"),
            ));
        }
        match tokens.verify(&token) {
            Ok(verified) => Ok(SessionView {
                operator: verified.claims.sub,
                expires_at: verified.claims.exp,
                csrf_token: expected_csrf,
            }),
            Err(e) => {
                self.lock().remove(&key);
                Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    format!("the session's token no longer verifies ({e}); sign in again"),
                ))
            }
        }
    }

    /// Ends a session; `false` if there was none.
    pub fn close(&self, cookie_value: &str) -> bool {
        self.lock().remove(&key_of(cookie_value)).is_some()
    }
}

/// The value of the session cookie in a `Cookie` header, if any.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that gives the browser its session until `expires_at`.
pub fn set_cookie(cookie_value: &str, expires_at: u64, secure: bool) -> String {
    let max_age = expires_at.saturating_sub(unix_now());
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={cookie_value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, header};

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; backhaul_session=abc; b=2"),
        );
        assert_eq!(cookie_value(&h), Some("abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("backhaul_session="),
        );
        assert_eq!(cookie_value(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("xbackhaul_session=abc"),
        );
        assert_eq!(cookie_value(&h), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_under_tls() {
        let c = set_cookie("v", unix_now() + 60, true);
        assert!(c.starts_with("backhaul_session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age="));
        assert!(c.ends_with("; Secure"));
        assert!(!set_cookie("v", unix_now() + 60, false).contains("Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn csrf_tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert!(!same("", "a"));
    }
}
