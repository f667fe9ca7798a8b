//! Durable upload records: what must survive a server restart.
//!
//! [`UploadStore`] is the seam: the upload table keeps its working set in memory and writes
//! changes through to the store. [`SqlStore`] keeps them in the server's database, SQLite or
//! PostgreSQL. A row carries the format of its record, so a record written by an older release
//! is read as what it is (`uploads::stored`).

use shared::{ClientId, FileName, UploadId};

use super::{Db, Row};
use crate::args;

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

/// Whether a save was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Written,
    /// The row was saved under a later claim on its store: another replica holds it now.
    Superseded,
}

pub trait UploadStore: Send + Sync {
    /// Inserts or replaces a record, saved under the claim `epoch` on its store; a row saved
    /// under a later claim stays as it is.
    fn save(&self, row: &StoredRow, epoch: u64) -> anyhow::Result<Saved>;
    /// Every unfinished record, plus the newest `recent` finished ones, oldest first.
    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<LoadedRow>>;
    fn get(&self, id: UploadId) -> anyhow::Result<Option<LoadedRow>>;
    /// The unfinished records of `client_id`, oldest first (what a replica takes on when the
    /// store's agent connects to it).
    fn unfinished_for(&self, client_id: &ClientId) -> anyhow::Result<Vec<LoadedRow>>;
    /// The stores with unfinished records (ids that no longer parse are left out).
    fn unfinished_clients(&self) -> anyhow::Result<Vec<ClientId>>;
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

/// The upload records in the server's database, on either engine.
pub struct SqlStore {
    db: Db,
}

impl SqlStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn loaded(row: &Row) -> anyhow::Result<LoadedRow> {
    Ok(LoadedRow {
        id: row.text(0)?,
        format: u32::try_from(row.int(1)?)?,
        record: row.text(2)?,
    })
}

impl UploadStore for SqlStore {
    fn save(&self, r: &StoredRow, epoch: u64) -> anyhow::Result<Saved> {
        let written = self.db.execute(
            "INSERT INTO uploads (id, client_id, created_ms, terminal, format, record, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET terminal = ?4, format = ?5, record = ?6, epoch = ?7
                 WHERE uploads.epoch <= ?7",
            args![
                r.id.to_string(),
                r.client_id.as_str(),
                r.created_ms,
                r.terminal,
                r.format,
                r.record.as_str(),
                i64::try_from(epoch)?
            ],
        )?;
        Ok(if written == 0 {
            Saved::Superseded
        } else {
            Saved::Written
        })
    }

    fn load_working_set(&self, recent: usize) -> anyhow::Result<Vec<LoadedRow>> {
        self.db
            .query(
                "SELECT id, format, record FROM (
                     SELECT id, format, record, created_ms FROM uploads WHERE terminal = 0
                     UNION ALL
                     SELECT * FROM (SELECT id, format, record, created_ms FROM uploads
                                    WHERE terminal = 1 ORDER BY created_ms DESC LIMIT ?1) AS f
                 ) AS w ORDER BY created_ms",
                args![i64::try_from(recent)?],
            )?
            .iter()
            .map(loaded)
            .collect()
    }

    fn delete_finished_before(&self, created_before_ms: i64) -> anyhow::Result<usize> {
        let gone = self.db.execute(
            "DELETE FROM uploads WHERE terminal = 1 AND created_ms < ?1",
            args![created_before_ms],
        )?;
        Ok(usize::try_from(gone)?)
    }

    fn get(&self, id: UploadId) -> anyhow::Result<Option<LoadedRow>> {
        self.db
            .query_opt(
                "SELECT id, format, record FROM uploads WHERE id = ?1",
                args![id.to_string()],
            )?
            .as_ref()
            .map(loaded)
            .transpose()
    }

    fn unfinished_for(&self, client_id: &ClientId) -> anyhow::Result<Vec<LoadedRow>> {
        self.db
            .query(
                "SELECT id, format, record FROM uploads WHERE client_id = ?1 AND terminal = 0
                 ORDER BY created_ms",
                args![client_id.as_str()],
            )?
            .iter()
            .map(loaded)
            .collect()
    }

    fn unfinished_clients(&self) -> anyhow::Result<Vec<ClientId>> {
        Ok(self
            .db
            .query(
                "SELECT DISTINCT client_id FROM uploads WHERE terminal = 0",
                args![],
            )?
            .iter()
            .filter_map(|r| r.text(0).ok().and_then(|id| ClientId::parse(&id).ok()))
            .collect())
    }

    fn save_manifest(&self, r: &ManifestRow) -> anyhow::Result<()> {
        self.db.execute(
            "INSERT INTO part_manifests (client_id, share, finished_ms, format, record)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (client_id, share) DO UPDATE
                 SET finished_ms = ?3, format = ?4, record = ?5
                 WHERE part_manifests.finished_ms <= ?3",
            args![
                r.client_id.as_str(),
                r.share.as_str(),
                r.finished_ms,
                r.format,
                r.record.as_str()
            ],
        )?;
        Ok(())
    }

    fn manifest(
        &self,
        client_id: &ClientId,
        share: &FileName,
    ) -> anyhow::Result<Option<ManifestRow>> {
        self.db
            .query_opt(
                "SELECT finished_ms, format, record FROM part_manifests
                 WHERE client_id = ?1 AND share = ?2",
                args![client_id.as_str(), share.as_str()],
            )?
            .map(|row| {
                Ok(ManifestRow {
                    client_id: client_id.clone(),
                    share: share.clone(),
                    finished_ms: row.int(0)?,
                    format: u32::try_from(row.int(1)?)?,
                    record: row.text(2)?,
                })
            })
            .transpose()
    }

    fn recent_for(&self, client_id: &ClientId, limit: usize) -> anyhow::Result<Vec<LoadedRow>> {
        self.db
            .query(
                "SELECT id, format, record FROM uploads WHERE client_id = ?1
                 ORDER BY created_ms DESC LIMIT ?2",
                args![client_id.as_str(), i64::try_from(limit)?],
            )?
            .iter()
            .map(loaded)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::locations;

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
        let dir = tempfile::tempdir().unwrap();
        for location in locations(dir.path()) {
            let first = row(1000, "a", true);
            let second = row(1500, "a", false);
            let third = row(3000, "b", true);
            {
                let db = SqlStore::new(location.connect().unwrap());
                for r in [&first, &second, &third] {
                    assert_eq!(db.save(r, 0).unwrap(), Saved::Written);
                }
                // An update replaces the document, not the row's identity; one under an older
                // claim than the row's is refused.
                let mut updated = row(1000, "a", true);
                updated.id = first.id;
                updated.record = "{\"n\":10}".into();
                assert_eq!(db.save(&updated, 7).unwrap(), Saved::Written);
                let mut stale = updated.clone();
                stale.record = "{\"n\":-1}".into();
                assert_eq!(
                    db.save(&stale, 6).unwrap(),
                    Saved::Superseded,
                    "{location:?}"
                );
            }
            let db = SqlStore::new(location.connect().unwrap());
            let record = |r: Option<LoadedRow>| r.map(|r| r.record);
            assert_eq!(
                record(db.get(first.id).unwrap()).as_deref(),
                Some("{\"n\":10}"),
                "{location:?}"
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
            assert_eq!(
                working,
                vec!["{\"n\":1500}", "{\"n\":3000}"],
                "{location:?}"
            );
            assert_eq!(db.delete_finished_before(2000).unwrap(), 1, "{location:?}");
            assert_eq!(db.get(first.id).unwrap(), None);

            // A share's manifest is replaced only by a later one.
            let manifest = |ms: i64| ManifestRow {
                client_id: ClientId::parse("a").unwrap(),
                share: FileName::parse("z.csv").unwrap(),
                finished_ms: ms,
                format: 1,
                record: format!("m{ms}"),
            };
            db.save_manifest(&manifest(10)).unwrap();
            db.save_manifest(&manifest(30)).unwrap();
            db.save_manifest(&manifest(20)).unwrap();
            let m = manifest(0);
            assert_eq!(
                db.manifest(&m.client_id, &m.share).unwrap(),
                Some(manifest(30)),
                "{location:?}"
            );
        }
    }
}
