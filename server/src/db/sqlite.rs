//! SQLite: one file in the data directory, WAL journal. The schema is versioned by numbered
//! migrations in `server/migrations/`, applied in order at start and counted in SQLite's
//! `user_version`.

use std::path::Path;

use anyhow::Context;
use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Row, Value};

/// The migrations, in order; the database's `user_version` counts those applied.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_uploads",
        include_str!("../../migrations/0001_uploads.sql"),
    ),
    (
        "0002_uploads_millis",
        include_str!("../../migrations/0002_uploads_millis.sql"),
    ),
    (
        "0003_tokens",
        include_str!("../../migrations/0003_tokens.sql"),
    ),
    (
        "0004_stores",
        include_str!("../../migrations/0004_stores.sql"),
    ),
    (
        "0005_collections",
        include_str!("../../migrations/0005_collections.sql"),
    ),
    (
        "0006_schedules",
        include_str!("../../migrations/0006_schedules.sql"),
    ),
    (
        "0007_collection_encoding",
        include_str!("../../migrations/0007_collection_encoding.sql"),
    ),
    (
        "0008_part_manifests",
        include_str!("../../migrations/0008_part_manifests.sql"),
    ),
    (
        "0009_revocations",
        include_str!("../../migrations/0009_revocations.sql"),
    ),
    (
        "0010_upload_epoch",
        include_str!("../../migrations/0010_upload_epoch.sql"),
    ),
];

/// A connection to the database at `path`, created and migrated as needed.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    // WAL: readers never block the writer, and a commit survives a killed process. NORMAL
    // syncs at checkpoints, not every commit: a power cut may lose the last moments, which
    // resume (ListParts) recovers from.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&mut conn).with_context(|| format!("migrating {}", path.display()))?;
    Ok(conn)
}

/// Applies the migrations the database has not seen, each in its own transaction together with
/// the new `user_version`. A database newer than this release is refused rather than guessed at.
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    anyhow::ensure!(
        applied <= MIGRATIONS.len(),
        "the database has schema version {applied}, newer than this release knows ({})",
        MIGRATIONS.len()
    );
    for (version, (name, sql)) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("applying migration {name}"))?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(migration = name, "database migrated");
    }
    Ok(())
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

fn run(conn: &Connection, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
    let changed = conn
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(params))?;
    Ok(changed as u64)
}

fn rows(conn: &Connection, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let width = stmt.column_count();
    let mut query = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(r) = query.next()? {
        let mut row = Vec::with_capacity(width);
        for i in 0..width {
            row.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec())?),
                other => anyhow::bail!("column {i} has an unexpected type {:?}", other.data_type()),
            });
        }
        out.push(Row(row));
    }
    Ok(out)
}

/// Statements on a connection.
pub struct Exec<'a>(pub &'a Connection);

/// Statements inside a transaction.
pub struct Tx<'a, 'c>(pub &'a rusqlite::Transaction<'c>);

impl super::Exec for Exec<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        run(self.0, sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        rows(self.0, sql, params)
    }
}

impl super::Exec for Tx<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        run(self.0, sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        rows(self.0, sql, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_a_newer_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backhaul.db");
        drop(open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        drop(conn);
        let err = open(&path).expect_err("refused");
        assert!(
            format!("{err:#}").contains("newer than this release"),
            "{err:#}"
        );
    }
}
