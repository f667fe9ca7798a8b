//! Durable upload records: what must survive a server restart.
//!
//! [`UploadStore`] is the seam: the server keeps its working set in memory and writes every
//! state change through to the store. [`SqliteStore`] (one file in the data directory, WAL
//! journal) is the default; a shared database for several servers can implement the same trait.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use shared::{ClientId, UploadId};

/// Each record is stored as one JSON document: its shape is owned by `uploads.rs`, and the
/// store only needs the id, the client and the creation time to index it.
pub struct StoredRecord {
    pub id: UploadId,
    pub client_id: ClientId,
    pub created_at: String,
    pub terminal: bool,
    pub json: String,
}

pub trait UploadStore: Send + Sync {
    /// Inserts or replaces a record.
    fn save(&self, record: &StoredRecord) -> anyhow::Result<()>;
    /// Every unfinished record, plus the newest `recent` finished ones, oldest first.
    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<String>>;
    fn get(&self, id: UploadId) -> anyhow::Result<Option<String>>;
    fn latest_for(&self, client_id: &ClientId) -> anyhow::Result<Option<String>>;
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // WAL: readers never block the writer, and a commit survives a killed process. NORMAL
        // syncs at checkpoints, not every commit: a power cut may lose the last moments, which
        // resume (ListParts) recovers from.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS uploads (
                 id TEXT PRIMARY KEY,
                 client_id TEXT NOT NULL,
                 created_at TEXT NOT NULL,
                 terminal INTEGER NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS uploads_by_client ON uploads (client_id, created_at);
             CREATE INDEX IF NOT EXISTS uploads_unfinished ON uploads (terminal, created_at);",
        )
        .context("creating the uploads table")?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl UploadStore for SqliteStore {
    fn save(&self, r: &StoredRecord) -> anyhow::Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO uploads (id, client_id, created_at, terminal, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET terminal = ?4, record = ?5",
            )?
            .execute(params![
                r.id.to_string(),
                r.client_id.as_str(),
                r.created_at,
                r.terminal,
                r.json
            ])?;
        Ok(())
    }

    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT record FROM (
                 SELECT record, created_at FROM uploads WHERE terminal = 0
                 UNION ALL
                 SELECT * FROM (SELECT record, created_at FROM uploads WHERE terminal = 1
                                ORDER BY created_at DESC LIMIT ?1)
             ) ORDER BY created_at",
        )?;
        let rows = stmt.query_map(params![recent as i64], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn get(&self, id: UploadId) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .prepare_cached("SELECT record FROM uploads WHERE id = ?1")?
            .query_row(params![id.to_string()], |row| row.get(0))
            .optional()?)
    }

    fn latest_for(&self, client_id: &ClientId) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT record FROM uploads WHERE client_id = ?1 ORDER BY created_at DESC LIMIT 1",
            )?
            .query_row(params![client_id.as_str()], |row| row.get(0))
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32, client: &str, terminal: bool) -> StoredRecord {
        StoredRecord {
            id: UploadId::new_random(),
            client_id: ClientId::parse(client).unwrap(),
            created_at: format!("2026-11-22T00:00:{n:02}Z"),
            terminal,
            json: format!("{{\"n\":{n}}}"),
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("backhaul-db-{}", UploadId::new_random()));
        let path = dir.join("backhaul.db");
        let first = record(1, "a", true);
        let second = record(2, "a", false);
        let third = record(3, "b", true);
        {
            let db = SqliteStore::open(&path).unwrap();
            for r in [&first, &second, &third] {
                db.save(r).unwrap();
            }
            // An update replaces the document, not the row's identity.
            let mut updated = record(1, "a", true);
            updated.id = first.id;
            updated.json = "{\"n\":10}".into();
            db.save(&updated).unwrap();
        }
        let db = SqliteStore::open(&path).unwrap();
        assert_eq!(db.get(first.id).unwrap().as_deref(), Some("{\"n\":10}"));
        assert_eq!(db.get(UploadId::new_random()).unwrap(), None);
        assert_eq!(
            db.latest_for(&ClientId::parse("a").unwrap())
                .unwrap()
                .as_deref(),
            Some("{\"n\":2}")
        );
        // Unfinished always; of the finished, only the newest one.
        assert_eq!(
            db.load_working_set(1).unwrap(),
            vec!["{\"n\":2}".to_owned(), "{\"n\":3}".to_owned()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
