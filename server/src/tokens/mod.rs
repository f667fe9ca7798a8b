//! Tokens and the keys that sign them, behind one owner ([`Tokens`]).
//!
//! - The signing keys ([`keyfile`]) never leave the server host. New tokens are signed with the
//!   active key; older keys still verify until an admin retires them.
//! - Every token signed is recorded in the [`ledger`], so admins can list them and revoke one by
//!   its id (`jti`). Revoked ids are kept in memory and checked on every request.
//! - The legacy HS256 `JWT_SECRET`, when set, still verifies tokens minted with it (they carry no
//!   key id); the server never signs with it.

pub mod keyfile;
pub mod ledger;

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context;
use shared::auth::{AuthError, Claims, Role, TokenKeys, unix_now};
use tokio::sync::watch;

use keyfile::{KeyFile, KeySet};
use ledger::{Entry, Filter, Ledger};

/// The longest lifetime of any token.
pub const MAX_TTL_SECS: u64 = 366 * 24 * 3600;
/// Tokens that expired this long ago leave the ledger.
const LEDGER_KEEP_EXPIRED: Duration = Duration::from_secs(30 * 24 * 3600);

/// A token that verified, and which key signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    /// `None` for a legacy HS256 token.
    pub kid: Option<String>,
}

/// A token just signed.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub entry: Entry,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Invalid(#[from] AuthError),
    #[error("token is signed by an unknown or retired key")]
    UnknownKey,
    #[error("token has no key id and this server has no JWT_SECRET to check it with")]
    NoLegacySecret,
    #[error("token has been revoked")]
    Revoked,
}

#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("no signing key {0:?}")]
    NotFound(String),
    #[error("key {0} is the active key; rotate to a new one first")]
    Active(String),
    #[error(
        "key {kid} still signs {outstanding} valid token(s), the last expiring at unix {last_expiry}; wait, revoke them, or force"
    )]
    InUse {
        kid: String,
        outstanding: u64,
        last_expiry: u64,
    },
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

pub struct Tokens {
    file: KeyFile,
    keys: RwLock<KeySet>,
    /// Tells connected agents' renewals that the active key changed.
    active: watch::Sender<String>,
    legacy: Option<TokenKeys>,
    ledger: Ledger,
    /// Ids of revoked tokens that have not expired, and when they expire.
    revoked: RwLock<HashMap<String, u64>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Loads (or creates) the keys at `key_file` and opens the ledger in `database`.
    pub fn open(
        key_file: &Path,
        database: &crate::db::Location,
        legacy: Option<TokenKeys>,
    ) -> anyhow::Result<Self> {
        let file = KeyFile::new(key_file.to_owned());
        let keys = file.load_or_create()?;
        let ledger = Ledger::new(database.connect()?);
        let revoked = ledger
            .revoked_since(unix_now().saturating_sub(shared::auth::LEEWAY_SECS))
            .context("loading revoked tokens")?;
        let (active, _) = watch::channel(keys.active.clone());
        Ok(Self {
            file,
            keys: RwLock::new(keys),
            active,
            legacy,
            ledger,
            revoked: RwLock::new(revoked.into_iter().collect()),
        })
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a token: the key its header names (or the legacy secret), its claims, and that its
    /// id was not revoked.
    pub fn verify(&self, token: &str) -> Result<Verified, VerifyError> {
        let kid = shared::auth::token_kid(token)?;
        let claims = match &kid {
            Some(kid) => {
                let keys = self.read_keys();
                let key = keys.keys.get(kid).ok_or(VerifyError::UnknownKey)?;
                key.keys.verify(token)?
            }
            None => self
                .legacy
                .as_ref()
                .ok_or(VerifyError::NoLegacySecret)?
                .verify(token)?,
        };
        if let Some(jti) = &claims.jti
            && self.is_revoked(jti)
        {
            return Err(VerifyError::Revoked);
        }
        Ok(Verified { claims, kid })
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(jti)
    }

    /// Signs a token with the active key and records it. Nothing is handed out unrecorded.
    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        ttl: Duration,
        issued_by: &str,
    ) -> anyhow::Result<Minted> {
        anyhow::ensure!(
            (1..=MAX_TTL_SECS).contains(&ttl.as_secs()),
            "a token lives from 1 second to {MAX_TTL_SECS} seconds"
        );
        let active = self.read_keys().active().keys.clone();
        let (token, claims) = active.mint(subject, role, ttl)?;
        let entry = Entry {
            jti: claims.jti.clone().unwrap_or_default(),
            kid: active.kid().unwrap_or_default().to_owned(),
            subject: claims.sub,
            role,
            issued_by: issued_by.to_owned(),
            issued_at: claims.iat,
            expires_at: claims.exp,
            revoked_at: None,
        };
        self.ledger.insert(&entry)?;
        Ok(Minted { token, entry })
    }

    pub fn active_kid(&self) -> String {
        self.read_keys().active.clone()
    }

    /// Changes whenever the active key does.
    pub fn watch_active(&self) -> watch::Receiver<String> {
        self.active.subscribe()
    }

    pub fn list(&self, filter: &Filter) -> anyhow::Result<Vec<Entry>> {
        self.ledger.list(filter, unix_now())
    }

    /// Revokes one token by its id. `None` if no such token was ever signed here.
    pub fn revoke(&self, jti: &str) -> anyhow::Result<Option<Entry>> {
        let entry = self.ledger.revoke(jti, unix_now())?;
        if let Some(entry) = &entry {
            self.revoked
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(jti.to_owned(), entry.expires_at);
        }
        Ok(entry)
    }

    /// A token another replica revoked (the ledger has it already): refused here too.
    pub fn note_revoked(&self, jti: &str, expires_at: u64) {
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(jti.to_owned(), expires_at);
    }

    /// Makes a new key the active one; the previous keys still verify. Returns the new key id.
    pub fn rotate(&self) -> anyhow::Result<String> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let next = keys.rotated()?;
        // Nothing changes unless the file was written.
        self.file.save(&next)?;
        *keys = next;
        let kid = keys.active.clone();
        drop(keys);
        self.active.send_replace(kid.clone());
        Ok(kid)
    }

    /// Removes a key that no valid token needs any more (or, with `force`, one that some still
    /// do: they stop working).
    pub fn retire(&self, kid: &str, force: bool) -> Result<(), RetireError> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if !keys.keys.contains_key(kid) {
            return Err(RetireError::NotFound(kid.to_owned()));
        }
        if keys.active == kid {
            return Err(RetireError::Active(kid.to_owned()));
        }
        // A token verifies until `exp` plus the leeway.
        let (outstanding, last) = self
            .ledger
            .outstanding(kid, unix_now().saturating_sub(shared::auth::LEEWAY_SECS))?;
        if outstanding > 0 && !force {
            return Err(RetireError::InUse {
                kid: kid.to_owned(),
                outstanding,
                last_expiry: last.unwrap_or_default(),
            });
        }
        let next = keys.without(kid);
        self.file.save(&next)?;
        *keys = next;
        Ok(())
    }

    /// Each key with what its tokens still depend on, and the legacy secret's presence aside.
    pub fn keys(&self) -> anyhow::Result<Vec<KeyStatus>> {
        let now = unix_now().saturating_sub(shared::auth::LEEWAY_SECS);
        let keys = self.read_keys().clone();
        keys.keys
            .values()
            .map(|k| {
                let kid = k.keys.kid().unwrap_or_default().to_owned();
                let (outstanding, last_expiry) = self.ledger.outstanding(&kid, now)?;
                Ok(KeyStatus {
                    active: kid == keys.active,
                    kid,
                    algorithm: k.algorithm().to_owned(),
                    created_at: k.created_at,
                    outstanding,
                    last_expiry,
                })
            })
            .collect()
    }

    /// Forgets long-expired tokens, in the ledger and in memory.
    pub fn forget_expired(&self) {
        let now = unix_now();
        match self
            .ledger
            .forget_expired(now.saturating_sub(LEDGER_KEEP_EXPIRED.as_secs()))
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(tokens = n, "forgot long-expired tokens"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "could not prune the token ledger"),
        }
        // A revoked token that expired fails its check anyway.
        let verifies_until = now.saturating_sub(shared::auth::LEEWAY_SECS);
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, exp| *exp > verifies_until);
    }
}

/// One signing key and the valid tokens it signed.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    pub kid: String,
    pub algorithm: String,
    pub created_at: u64,
    pub active: bool,
    pub outstanding: u64,
    pub last_expiry: Option<u64>,
}
