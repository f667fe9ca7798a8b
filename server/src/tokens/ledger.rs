//! The token ledger: one row per token the server signed, in the server's database. It answers
//! `GET /tokens`, records revocations by token id, and tells whether a key still signs valid
//! tokens. The token itself is never stored.

use anyhow::Context;
use shared::auth::Role;

use crate::args;
use crate::db::{Db, Row};

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
    db: Db,
}

const COLUMNS: &str = "jti, kid, subject, role, issued_by, issued_at, expires_at, revoked_at";

fn entry(row: &Row) -> anyhow::Result<Entry> {
    let seconds = |i| -> anyhow::Result<u64> { Ok(u64::try_from(row.int(i)?)?) };
    Ok(Entry {
        jti: row.text(0)?,
        kid: row.text(1)?,
        subject: row.text(2)?,
        // Only `insert` writes roles, from a `Role`.
        role: row.text(3)?.parse().unwrap_or(Role::Agent),
        issued_by: row.text(4)?,
        issued_at: seconds(5)?,
        expires_at: seconds(6)?,
        revoked_at: row.opt_int(7)?.map(u64::try_from).transpose()?,
    })
}

impl Ledger {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn insert(&self, e: &Entry) -> anyhow::Result<()> {
        self.db
            .execute(
                "INSERT INTO tokens (jti, kid, subject, role, issued_by, issued_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                args![
                    e.jti.as_str(),
                    e.kid.as_str(),
                    e.subject.as_str(),
                    e.role.as_str(),
                    e.issued_by.as_str(),
                    i64::try_from(e.issued_at)?,
                    i64::try_from(e.expires_at)?
                ],
            )
            .context("recording a token in the ledger")?;
        Ok(())
    }

    pub fn get(&self, jti: &str) -> anyhow::Result<Option<Entry>> {
        self.db
            .query_opt(
                &format!("SELECT {COLUMNS} FROM tokens WHERE jti = ?1"),
                args![jti],
            )?
            .as_ref()
            .map(entry)
            .transpose()
    }

    /// Newest first. Without `all`, only tokens valid at `now`.
    pub fn list(&self, f: &Filter, now: u64) -> anyhow::Result<Vec<Entry>> {
        self.db
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM tokens
                     WHERE (role = ?1 OR ?1 IS NULL) AND (subject = ?2 OR ?2 IS NULL)
                       AND (?3 OR (revoked_at IS NULL AND expires_at > ?4))
                     ORDER BY issued_at DESC, jti LIMIT ?5"
                ),
                args![
                    f.role.map(Role::as_str),
                    f.subject.as_deref(),
                    f.all,
                    i64::try_from(now)?,
                    f.limit
                ],
            )?
            .iter()
            .map(entry)
            .collect()
    }

    /// Marks a token revoked at `now` (an earlier revocation stands). `None` if the ledger has
    /// no such token.
    pub fn revoke(&self, jti: &str, now: u64) -> anyhow::Result<Option<Entry>> {
        self.db.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE jti = ?1 AND revoked_at IS NULL",
            args![jti, i64::try_from(now)?],
        )?;
        self.get(jti)
    }

    /// The ids of revoked tokens that would otherwise still verify at `now`, with their expiry.
    pub fn revoked_since(&self, now: u64) -> anyhow::Result<Vec<(String, u64)>> {
        self.db
            .query(
                "SELECT jti, expires_at FROM tokens
                 WHERE revoked_at IS NOT NULL AND expires_at > ?1",
                args![i64::try_from(now)?],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, u64::try_from(r.int(1)?)?)))
            .collect()
    }

    /// How many tokens signed by `kid` are valid after `now`, and when the last one expires.
    pub fn outstanding(&self, kid: &str, now: u64) -> anyhow::Result<(u64, Option<u64>)> {
        let row = self
            .db
            .query_opt(
                "SELECT COUNT(*), MAX(expires_at) FROM tokens
                 WHERE kid = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                args![kid, i64::try_from(now)?],
            )?
            .context("COUNT gives a row")?;
        Ok((
            u64::try_from(row.int(0)?)?,
            row.opt_int(1)?.map(u64::try_from).transpose()?,
        ))
    }

    /// Forgets tokens that expired before `before`. Returns how many went.
    pub fn forget_expired(&self, before: u64) -> anyhow::Result<usize> {
        let gone = self.db.execute(
            "DELETE FROM tokens WHERE expires_at < ?1",
            args![i64::try_from(before)?],
        )?;
        Ok(usize::try_from(gone)?)
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
        for location in crate::db::testing::locations(dir.path()) {
            let ledger = Ledger::new(location.connect().unwrap());
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
}
