//! SQLite: one file in the data directory, WAL journal. The schema is versioned by numbered
//! migrations in `server/migrations/`, applied in order at start and counted in SQLite's
//! `user_version`.

use std::path::Path;

use anyhow::Context;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension};

use super::schema::{self, Change, Migration, Plan, Schema};
use super::{Row, Value};

/// The migrations, in order; the database's `user_version` counts those applied.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_uploads",
        sql: include_str!("../../migrations/0001_uploads.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0002_uploads_millis",
        sql: include_str!("../../migrations/0002_uploads_millis.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0003_tokens",
        sql: include_str!("../../migrations/0003_tokens.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0004_stores",
        sql: include_str!("../../migrations/0004_stores.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0005_collections",
        sql: include_str!("../../migrations/0005_collections.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0006_schedules",
        sql: include_str!("../../migrations/0006_schedules.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0007_collection_encoding",
        sql: include_str!("../../migrations/0007_collection_encoding.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0008_part_manifests",
        sql: include_str!("../../migrations/0008_part_manifests.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0009_revocations",
        sql: include_str!("../../migrations/0009_revocations.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0010_upload_epoch",
        sql: include_str!("../../migrations/0010_upload_epoch.sql"),
        change: Change::Breaking,
    },
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
/// the new `user_version`, and records the oldest release that may still use it
/// (`backhaul_schema`, outside the numbered migrations). A newer database is used as it is when
/// every migration this release lacks is additive, and refused otherwise ([`schema::plan`]).
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS backhaul_schema (
             one INTEGER PRIMARY KEY CHECK (one = 1),
             compatible_from INTEGER NOT NULL
         )",
    )?;
    let found = Schema {
        version: conn.pragma_query_value(None, "user_version", |row| row.get(0))?,
        compatible_from: conn
            .query_row("SELECT compatible_from FROM backhaul_schema", [], |row| {
                row.get(0)
            })
            .optional()?,
    };
    let Plan::Migrate { from } = schema::plan(found, MIGRATIONS.len())? else {
        return Ok(());
    };
    for (version, m) in MIGRATIONS.iter().enumerate().skip(from) {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql)
            .with_context(|| format!("applying migration {}", m.name))?;
        tx.pragma_update(None, "user_version", version + 1)?;
        record_compatible_from(&tx, &MIGRATIONS[..=version])?;
        tx.commit()?;
        tracing::info!(migration = m.name, "database migrated");
    }
    // A database that was up to date, made by a release that kept no record.
    record_compatible_from(conn, MIGRATIONS)?;
    Ok(())
}

/// Records which releases may use a database with `applied` migrations: in the transaction
/// that applied the last of them, so that a crash never leaves a newer schema with an older
/// release's record.
fn record_compatible_from(conn: &Connection, applied: &[Migration]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO backhaul_schema (one, compatible_from) VALUES (1, ?1)
         ON CONFLICT (one) DO UPDATE SET compatible_from = excluded.compatible_from",
        [schema::compatible_from(applied)],
    )?;
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

    /// What a newer release leaves: `user_version` past this release's, and the fewest
    /// migrations a release must know.
    fn as_if_newer(path: &Path, compatible_from: usize) {
        drop(open(path).unwrap());
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        conn.execute(
            "UPDATE backhaul_schema SET compatible_from = ?1",
            [compatible_from],
        )
        .unwrap();
    }

    /// The schema's record: `user_version`, and the fewest migrations a release must know.
    fn recorded(path: &Path) -> (usize, usize) {
        let conn = Connection::open(path).unwrap();
        let version = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        let compatible_from = conn
            .query_row("SELECT compatible_from FROM backhaul_schema", [], |r| {
                r.get(0)
            })
            .unwrap();
        (version, compatible_from)
    }

    #[test]
    fn a_database_from_a_newer_release_is_refused_past_a_breaking_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backhaul.db");
        as_if_newer(&path, MIGRATIONS.len() + 1);
        let err = open(&path).expect_err("refused");
        assert!(
            format!("{err:#}").contains("newer than this release"),
            "{err:#}"
        );
        let newer = MIGRATIONS.len() + 1;
        assert_eq!(recorded(&path), (newer, newer), "left as it was");
    }

    #[test]
    fn a_database_from_a_newer_release_is_used_as_it_is_past_additive_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backhaul.db");
        as_if_newer(&path, MIGRATIONS.len());
        drop(open(&path).expect("a compatible newer database opens"));
        let newer = MIGRATIONS.len() + 1;
        assert_eq!(recorded(&path), (newer, MIGRATIONS.len()), "left as it was");
    }

    #[test]
    fn a_new_database_records_the_oldest_release_that_may_use_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backhaul.db");
        drop(open(&path).unwrap());
        let want = (MIGRATIONS.len(), schema::compatible_from(MIGRATIONS));
        assert_eq!(recorded(&path), want);
    }
}
