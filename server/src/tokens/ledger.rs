//! The token ledger: one row per token the server signed, in the server's database. It answers
//! `GET /tokens`, records revocations by token id, and tells whether a key still signs valid
//! tokens. The token itself is never stored.

use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use shared::auth::Role;

/// A ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub jti: String,
    pub kid: String,
    pub subject: String,
    pub role: Role,
    pub issued_by: String,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

/// Which rows `list` returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub role: Option<Role>,
    pub subject: Option<String>,
    /// Expired and revoked ones too.
    pub all: bool,
    pub limit: u32,
}

pub struct Ledger {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "jti, kid, subject, role, issued_by, issued_at, expires_at, revoked_at";

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let role: String = row.get(3)?;
    Ok(Entry {
        jti: row.get(0)?,
        kid: row.get(1)?,
        subject: row.get(2)?,
        // Only `insert` writes roles, from a `Role`.
        role: role.parse().unwrap_or(Role::Agent),
        issued_by: row.get(4)?,
        issued_at: row.get::<_, i64>(5)? as u64,
        expires_at: row.get::<_, i64>(6)? as u64,
        revoked_at: row.get::<_, Option<i64>>(7)?.map(|t| t as u64),
    })
}

impl Ledger {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(conn),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, e: &Entry) -> anyhow::Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO tokens (jti, kid, subject, role, issued_by, issued_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                e.jti,
                e.kid,
                e.subject,
                e.role.as_str(),
                e.issued_by,
                e.issued_at as i64,
                e.expires_at as i64
            ])
            .context("recording a token in the ledger")?;
        Ok(())
    }

    pub fn get(&self, jti: &str) -> anyhow::Result<Option<Entry>> {
        Ok(self
            .conn()
            .prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE jti = ?1"))?
            .query_row(params![jti], entry)
            .optional()?)
    }

    /// Newest first. Without `all`, only tokens valid at `now`.
    pub fn list(&self, f: &Filter, now: u64) -> anyhow::Result<Vec<Entry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tokens
             WHERE (?1 IS NULL OR role = ?1) AND (?2 IS NULL OR subject = ?2)
               AND (?3 OR (revoked_at IS NULL AND expires_at > ?4))
             ORDER BY issued_at DESC, jti LIMIT ?5"
        ))?;
        let rows = stmt.query_map(
            params![
                f.role.map(Role::as_str),
                f.subject,
                f.all,
                now as i64,
                f.limit
            ],
            entry,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a token revoked at `now` (an earlier revocation stands). `None` if the ledger has
    /// no such token.
    pub fn revoke(&self, jti: &str, now: u64) -> anyhow::Result<Option<Entry>> {
        self.conn()
            .prepare_cached(
                "UPDATE tokens SET revoked_at = ?2 WHERE jti = ?1 AND revoked_at IS NULL",
            )?
            .execute(params![jti, now as i64])?;
        self.get(jti)
    }

    /// The ids of revoked tokens that would otherwise still verify at `now`, with their expiry.
    pub fn revoked_since(&self, now: u64) -> anyhow::Result<Vec<(String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT jti, expires_at FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?1",
        )?;
        let rows = stmt.query_map(params![now as i64], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many tokens signed by `kid` are valid after `now`, and when the last one expires.
    pub fn outstanding(&self, kid: &str, now: u64) -> anyhow::Result<(u64, Option<u64>)> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT COUNT(*), MAX(expires_at) FROM tokens
                 WHERE kid = ?1 AND revoked_at IS NULL AND expires_at > ?2",
            )?
            .query_row(params![kid, now as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|t| t as u64),
                ))
            })?)
    }

    /// Forgets tokens that expired before `before`. Returns how many went.
    pub fn forget_expired(&self, before: u64) -> anyhow::Result<usize> {
        Ok(self
            .conn()
            .prepare_cached("DELETE FROM tokens WHERE expires_at < ?1")?
            .execute(params![before as i64])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(jti: &str, kid: &str, role: Role, exp: u64) -> Entry {
        Entry {
            jti: jti.into(),
            kid: kid.into(),
            subject: format!("{role}-{jti}"),
            role,
            issued_by: "alice".into(),
            issued_at: exp - 100,
            expires_at: exp,
            revoked_at: None,
        }
    }

    #[test]
    fn the_ledger_lists_revokes_and_counts_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(crate::db::open(&dir.path().join("b.db")).unwrap());
        ledger.insert(&row("1", "k1", Role::Agent, 1_000)).unwrap();
        ledger
            .insert(&row("2", "k1", Role::Operator, 2_000))
            .unwrap();
        ledger.insert(&row("3", "k2", Role::Admin, 3_000)).unwrap();
        assert!(
            ledger.insert(&row("3", "k2", Role::Admin, 3_000)).is_err(),
            "a token id is unique"
        );

        let valid = |f: Filter| -> Vec<String> {
            let f = Filter { limit: 10, ..f };
            ledger
                .list(&f, 1_500)
                .unwrap()
                .into_iter()
                .map(|e| e.jti)
                .collect()
        };
        assert_eq!(valid(Filter::default()), ["3", "2"]);
        assert_eq!(
            valid(Filter {
                all: true,
                ..Filter::default()
            }),
            ["3", "2", "1"]
        );
        assert_eq!(
            valid(Filter {
                role: Some(Role::Operator),
                ..Filter::default()
            }),
            ["2"]
        );
        assert_eq!(ledger.outstanding("k1", 1_500).unwrap(), (1, Some(2_000)));

        let revoked = ledger.revoke("2", 1_600).unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(1_600));
        assert_eq!(
            ledger.revoke("2", 1_700).unwrap().unwrap().revoked_at,
            Some(1_600)
        );
        assert_eq!(ledger.revoke("nope", 1_700).unwrap(), None);
        assert_eq!(
            ledger.revoked_since(1_500).unwrap(),
            [("2".to_owned(), 2_000)]
        );
        assert_eq!(ledger.outstanding("k1", 1_500).unwrap(), (0, None));
        assert_eq!(valid(Filter::default()), ["3"]);

        assert_eq!(ledger.forget_expired(2_500).unwrap(), 2);
        assert_eq!(ledger.get("3").unwrap().unwrap().role, Role::Admin);
    }
}
