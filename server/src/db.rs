//! Durable upload records: what must survive a server restart.
//!
//! [`UploadStore`] is the seam: the upload table keeps its working set in memory and writes
//! changes through to the store. [`SqliteStore`] (one file in the data directory, WAL journal) is
//! the default; a shared database for several servers can implement the same trait.
//!
//! The schema is versioned by numbered migrations in `server/migrations/`, applied in order at
//! start and counted in SQLite's `user_version`. A row carries the format of its record, so a
//! record written by an older release is read as what it is (`uploads::stored`).

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use shared::{ClientId, FileName, UploadId};

/// The migrations, in order; the database's `user_version` counts those applied.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_uploads",
        include_str!("../migrations/0001_uploads.sql"),
    ),
    (
        "0002_uploads_millis",
        include_str!("../migrations/0002_uploads_millis.sql"),
    ),
    ("0003_tokens", include_str!("../migrations/0003_tokens.sql")),
    ("0004_stores", include_str!("../migrations/0004_stores.sql")),
    (
        "0005_collections",
        include_str!("../migrations/0005_collections.sql"),
    ),
    (
        "0006_schedules",
        include_str!("../migrations/0006_schedules.sql"),
    ),
    (
        "0007_collection_encoding",
        include_str!("../migrations/0007_collection_encoding.sql"),
    ),
    (
        "0008_part_manifests",
        include_str!("../migrations/0008_part_manifests.sql"),
    ),
];

/// One upload as the store holds it: the columns it is indexed by, and the record itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub id: UploadId,
    pub client_id: ClientId,
    pub created_ms: i64,
    pub terminal: bool,
    /// The version of the record's form (`uploads::stored`).
    pub format: u32,
    pub record: String,
}

/// A row as read back: its id column as text (so that a row whose id no longer parses is still
/// reported by name), its format and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedRow {
    pub id: String,
    pub format: u32,
    pub record: String,
}

/// The part manifest of a share's latest verified object (`uploads::manifest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRow {
    pub client_id: ClientId,
    pub share: FileName,
    pub finished_ms: i64,
    pub format: u32,
    pub record: String,
}

pub trait UploadStore: Send + Sync {
    /// Inserts or replaces a record.
    fn save(&self, row: &StoredRow) -> anyhow::Result<()>;
    /// Every unfinished record, plus the newest `recent` finished ones, oldest first.
    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<LoadedRow>>;
    fn get(&self, id: UploadId) -> anyhow::Result<Option<LoadedRow>>;
    /// The newest `limit` records of `client_id`, newest first.
    fn recent_for(&self, client_id: &ClientId, limit: usize) -> anyhow::Result<Vec<LoadedRow>>;
    /// Deletes the finished records created before `created_before_ms`; unfinished ones stay
    /// whatever their age. Returns how many went.
    fn delete_finished_before(&self, created_before_ms: i64) -> anyhow::Result<usize>;
    /// Keeps `row` as its share's manifest, unless the share has a later one.
    fn save_manifest(&self, row: &ManifestRow) -> anyhow::Result<()>;
    fn manifest(
        &self,
        client_id: &ClientId,
        share: &FileName,
    ) -> anyhow::Result<Option<ManifestRow>>;
}

/// One connection to the server's database, for one owner (the inventory, collections,
/// schedules), used one call at a time under its lock.
pub struct Db(Mutex<Connection>);

impl Db {
    pub fn new(conn: Connection) -> Self {
        Self(Mutex::new(conn))
    }

    /// The connection. Every call leaves it consistent (a transaction commits or rolls back
    /// before the guard is dropped), so a poisoned lock is taken over.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// A connection to the server's database at `path`, created and migrated as needed. The upload
/// store and the token ledger each hold one.
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

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            conn: Mutex::new(open(path)?),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
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

fn loaded(row: &rusqlite::Row<'_>) -> rusqlite::Result<LoadedRow> {
    Ok(LoadedRow {
        id: row.get(0)?,
        format: row.get(1)?,
        record: row.get(2)?,
    })
}

impl UploadStore for SqliteStore {
    fn save(&self, r: &StoredRow) -> anyhow::Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO uploads (id, client_id, created_ms, terminal, format, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET terminal = ?4, format = ?5, record = ?6",
            )?
            .execute(params![
                r.id.to_string(),
                r.client_id.as_str(),
                r.created_ms,
                r.terminal,
                r.format,
                r.record
            ])?;
        Ok(())
    }

    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<LoadedRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, format, record FROM (
                 SELECT id, format, record, created_ms FROM uploads WHERE terminal = 0
                 UNION ALL
                 SELECT * FROM (SELECT id, format, record, created_ms FROM uploads
                                WHERE terminal = 1 ORDER BY created_ms DESC LIMIT ?1)
             ) ORDER BY created_ms",
        )?;
        let rows = stmt.query_map(params![recent as i64], loaded)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_finished_before(&self, created_before_ms: i64) -> anyhow::Result<usize> {
        Ok(self
            .conn()
            .prepare_cached("DELETE FROM uploads WHERE terminal = 1 AND created_ms < ?1")?
            .execute(params![created_before_ms])?)
    }

    fn get(&self, id: UploadId) -> anyhow::Result<Option<LoadedRow>> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, format, record FROM uploads WHERE id = ?1")?
            .query_row(params![id.to_string()], loaded)
            .optional()?)
    }

    fn save_manifest(&self, r: &ManifestRow) -> anyhow::Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO part_manifests (client_id, share, finished_ms, format, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (client_id, share) DO UPDATE
                     SET finished_ms = ?3, format = ?4, record = ?5
                     WHERE finished_ms <= ?3",
            )?
            .execute(params![
                r.client_id.as_str(),
                r.share.as_str(),
                r.finished_ms,
                r.format,
                r.record
            ])?;
        Ok(())
    }

    fn manifest(
        &self,
        client_id: &ClientId,
        share: &FileName,
    ) -> anyhow::Result<Option<ManifestRow>> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT finished_ms, format, record FROM part_manifests
                 WHERE client_id = ?1 AND share = ?2",
            )?
            .query_row(params![client_id.as_str(), share.as_str()], |row| {
                Ok(ManifestRow {
                    client_id: client_id.clone(),
                    share: share.clone(),
                    finished_ms: row.get(0)?,
                    format: row.get(1)?,
                    record: row.get(2)?,
                })
            })
            .optional()?)
    }

    fn recent_for(&self, client_id: &ClientId, limit: usize) -> anyhow::Result<Vec<LoadedRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, format, record FROM uploads WHERE client_id = ?1
             ORDER BY created_ms DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![client_id.as_str(), limit as i64], loaded)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("backhaul-db-{}", UploadId::new_random()));
        let path = dir.join("backhaul.db");
        (dir, path)
    }

    fn row(ms: i64, client: &str, terminal: bool) -> StoredRow {
        StoredRow {
            id: UploadId::new_random(),
            client_id: ClientId::parse(client).unwrap(),
            created_ms: ms,
            terminal,
            format: 2,
            record: format!("{{\"n\":{ms}}}"),
        }
    }

    #[test]
    fn records_survive_reopening() {
        let (dir, path) = temp_db();
        let first = row(1000, "a", true);
        let second = row(1500, "a", false);
        let third = row(3000, "b", true);
        {
            let db = SqliteStore::open(&path).unwrap();
            for r in [&first, &second, &third] {
                db.save(r).unwrap();
            }
            // An update replaces the document, not the row's identity.
            let mut updated = row(1000, "a", true);
            updated.id = first.id;
            updated.record = "{\"n\":10}".into();
            db.save(&updated).unwrap();
        }
        let db = SqliteStore::open(&path).unwrap();
        let record = |r: Option<LoadedRow>| r.map(|r| r.record);
        assert_eq!(
            record(db.get(first.id).unwrap()).as_deref(),
            Some("{\"n\":10}")
        );
        assert_eq!(db.get(UploadId::new_random()).unwrap(), None);
        // 1500 ms is newer than 1000 ms (as RFC 3339 text, "...:01.5Z" sorted before "...:01Z").
        assert_eq!(
            record(
                db.recent_for(&ClientId::parse("a").unwrap(), 1)
                    .unwrap()
                    .pop()
            )
            .as_deref(),
            Some("{\"n\":1500}")
        );
        // Unfinished always; of the finished, only the newest one.
        let working: Vec<_> = db
            .load_working_set(1)
            .unwrap()
            .into_iter()
            .map(|r| r.record)
            .collect();
        assert_eq!(working, vec!["{\"n\":1500}", "{\"n\":3000}"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_database_from_a_newer_release_is_refused() {
        let (dir, path) = temp_db();
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(
            format!("{err:#}").contains("newer than this release"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
