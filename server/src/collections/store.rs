//! The stored form of collections: the `collections` and `collection_rows` tables (migration
//! 0005). Every change is written through before it is acted on; a row that no longer reads is
//! reported, never taken as absent.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use shared::api::ErrorDetail;
use shared::api::collections::{CollectionState, Target};
use shared::encoding::Compression;
use shared::{ClientId, CollectionId, FileName, ScheduleId, UploadId};

use super::record::{Collection, Firing, Row, Spec, Stage};
use super::target::Matcher;
use crate::args;
use crate::db::{Db, Exec};
use crate::uploads::UnixMs;

pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// A new collection and its first rows, in one transaction.
    pub fn insert(&self, c: &Collection) -> anyhow::Result<()> {
        let s = &c.spec;
        self.db.transaction(|tx| {
            tx.execute(
                "INSERT INTO collections (id, target, share, max_concurrent, created_by,
                                          created_from, created_ms, expires_ms, state,
                                          schedule_id, fired_ms, compression)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                args![
                    s.id.to_string(),
                    serde_json::to_string(s.matcher.target())?,
                    s.share.as_str(),
                    s.max_concurrent,
                    s.created_by.as_str(),
                    s.created_from.as_str(),
                    s.created.0,
                    s.expires.0,
                    c.state.as_str(),
                    s.firing.map(|f| f.schedule.to_string()),
                    s.firing.map(|f| f.at.0),
                    s.compression.as_str(),
                ],
            )
            .context("recording a collection")?;
            for (client, row) in &c.rows {
                save_row(tx, s.id, client, row)?;
            }
            Ok(())
        })
    }

    pub fn set_state(&self, id: CollectionId, state: CollectionState) -> anyhow::Result<()> {
        self.db.execute(
            "UPDATE collections SET state = ?2 WHERE id = ?1",
            args![id.to_string(), state.as_str()],
        )?;
        Ok(())
    }

    /// Saves rows of one collection, in one transaction.
    pub fn save_rows<'a>(
        &self,
        id: CollectionId,
        rows: impl IntoIterator<Item = (&'a ClientId, &'a Row)> + Send,
    ) -> anyhow::Result<()> {
        self.db.transaction(|tx| {
            for (client, row) in rows {
                save_row(tx, id, client, row)?;
            }
            Ok(())
        })
    }

    /// The collections that can still change (open, or with a store waiting or running), whole.
    pub fn load_live(&self) -> anyhow::Result<Vec<Collection>> {
        let ids = self
            .db
            .query(
                "SELECT id FROM collections WHERE state = 'open' OR EXISTS (
                     SELECT 1 FROM collection_rows r
                     WHERE r.collection_id = collections.id AND r.state IN ('waiting', 'running'))",
                args![],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut live = Vec::new();
        for id in ids {
            match CollectionId::parse(&id)
                .map_err(anyhow::Error::from)
                .and_then(|id| self.load(id))
            {
                Ok(Some(c)) => live.push(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(
                        collection_id = id,
                        error = format!("{e:#}"),
                        "a collection cannot be read; it is left alone"
                    );
                }
            }
        }
        Ok(live)
    }

    /// One collection with all its rows.
    pub fn load(&self, id: CollectionId) -> anyhow::Result<Option<Collection>> {
        let Some(head) = self.db.query_opt(
            "SELECT target, share, max_concurrent, created_by, created_from, created_ms,
                    expires_ms, state, schedule_id, fired_ms, compression
             FROM collections WHERE id = ?1",
            args![id.to_string()],
        )?
        else {
            return Ok(None);
        };
        let (target, share, max_concurrent) =
            (head.text(0)?, head.text(1)?, u32::try_from(head.int(2)?)?);
        let (created_by, created_from) = (head.text(3)?, head.text(4)?);
        let (created, expires, state) = (head.int(5)?, head.int(6)?, head.text(7)?);
        let (schedule, fired, compression) = (head.opt_text(8)?, head.opt_int(9)?, head.text(10)?);
        let firing = match (schedule, fired) {
            (Some(schedule), Some(at)) => Some(Firing {
                schedule: ScheduleId::parse(&schedule)?,
                at: UnixMs(at),
            }),
            _ => None,
        };
        let target: Target = serde_json::from_str(&target).context("target")?;
        let spec = Spec {
            id,
            matcher: Matcher::new(target).map_err(|e| anyhow!("target: {e}"))?,
            share: FileName::parse(&share).context("share")?,
            max_concurrent,
            compression: compression.parse::<Compression>().context("compression")?,
            created_by,
            created_from,
            created: UnixMs(created),
            expires: UnixMs(expires),
            firing,
        };
        let state = match state.as_str() {
            "open" => CollectionState::Open,
            "expired" => CollectionState::Expired,
            "cancelled" => CollectionState::Cancelled,
            other => anyhow::bail!("unknown collection state {other:?}"),
        };
        let mut rows = BTreeMap::new();
        for r in self.db.query(
            "SELECT client_id, state, upload_id, object_key, size, sha256, error_code,
                    error_message, matched_ms, finished_ms
             FROM collection_rows WHERE collection_id = ?1",
            args![id.to_string()],
        )? {
            let client = r.text(0)?;
            let stored = StoredRow {
                state: r.text(1)?,
                upload_id: r.opt_text(2)?,
                key: r.opt_text(3)?,
                size: r.opt_int(4)?,
                sha256: r.opt_text(5)?,
                error_code: r.opt_text(6)?,
                error_message: r.opt_text(7)?,
                matched_ms: r.int(8)?,
                finished_ms: r.opt_int(9)?,
            };
            let client_id = ClientId::parse(&client).context("client id")?;
            let row = stored
                .into_row()
                .with_context(|| format!("the row of {client}"))?;
            rows.insert(client_id, row);
        }
        Ok(Some(Collection { spec, state, rows }))
    }

    /// Collection ids, newest first.
    pub fn newest(&self, limit: usize) -> anyhow::Result<Vec<CollectionId>> {
        self.db
            .query(
                "SELECT id FROM collections ORDER BY created_ms DESC LIMIT ?1",
                args![i64::try_from(limit)?],
            )?
            .iter()
            .map(|r| Ok(CollectionId::parse(&r.text(0)?)?))
            .collect()
    }

    /// The ids of the open collections.
    pub fn open_ids(&self) -> anyhow::Result<Vec<CollectionId>> {
        self.db
            .query("SELECT id FROM collections WHERE state = 'open'", args![])?
            .iter()
            .map(|r| Ok(CollectionId::parse(&r.text(0)?)?))
            .collect()
    }

    /// Whether a collection of `schedule` exists for its firing at `at` or a later one.
    pub fn fired_since(&self, schedule: ScheduleId, at: UnixMs) -> anyhow::Result<bool> {
        let found = self.db.query_opt(
            "SELECT 1 FROM collections WHERE schedule_id = ?1 AND fired_ms >= ?2 LIMIT 1",
            args![schedule.to_string(), at.0],
        )?;
        Ok(found.is_some())
    }

    /// How many collections are in each state, for `/metrics`.
    pub fn count_by_state(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.db
            .query(
                "SELECT state, COUNT(*) FROM collections GROUP BY state",
                args![],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, u64::try_from(r.int(1)?)?)))
            .collect()
    }
}

/// A row's columns.
struct StoredRow {
    state: String,
    upload_id: Option<String>,
    key: Option<String>,
    size: Option<i64>,
    sha256: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    matched_ms: i64,
    finished_ms: Option<i64>,
}

impl StoredRow {
    fn into_row(self) -> anyhow::Result<Row> {
        let upload = || -> anyhow::Result<UploadId> {
            let id = self.upload_id.as_deref().context("no upload id")?;
            Ok(UploadId::parse(id)?)
        };
        let stage = match self.state.as_str() {
            "waiting" => Stage::Waiting,
            "running" => Stage::Running { upload: upload()? },
            "completed" => Stage::Completed {
                upload: upload()?,
                key: self.key.clone().context("no key")?,
                size: u64::try_from(self.size.context("no size")?)?,
                sha256: self.sha256.clone(),
            },
            "failed" => Stage::Failed {
                upload: upload()?,
                error: ErrorDetail {
                    code: self
                        .error_code
                        .as_deref()
                        .context("no error code")?
                        .parse()?,
                    message: self.error_message.clone().unwrap_or_default(),
                },
            },
            "cancelled" => Stage::Cancelled {
                upload: self.upload_id.as_deref().map(UploadId::parse).transpose()?,
            },
            "not_reached" => Stage::NotReached,
            other => anyhow::bail!("unknown row state {other:?}"),
        };
        Ok(Row {
            stage,
            matched: UnixMs(self.matched_ms),
            finished: self.finished_ms.map(UnixMs),
        })
    }
}

fn save_row(
    tx: &mut dyn Exec,
    id: CollectionId,
    client: &ClientId,
    row: &Row,
) -> anyhow::Result<()> {
    let (state, key, size, sha256, error) = match &row.stage {
        Stage::Waiting => ("waiting", None, None, None, None),
        Stage::Running { .. } => ("running", None, None, None, None),
        Stage::Completed {
            key, size, sha256, ..
        } => (
            "completed",
            Some(key.as_str()),
            Some(i64::try_from(*size)?),
            sha256.as_deref(),
            None,
        ),
        Stage::Failed { error, .. } => ("failed", None, None, None, Some(error)),
        Stage::Cancelled { .. } => ("cancelled", None, None, None, None),
        Stage::NotReached => ("not_reached", None, None, None, None),
    };
    tx.execute(
        "INSERT INTO collection_rows (collection_id, client_id, state, upload_id, object_key,
             size, sha256, error_code, error_message, matched_ms, finished_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (collection_id, client_id) DO UPDATE SET state = ?3, upload_id = ?4,
             object_key = ?5, size = ?6, sha256 = ?7, error_code = ?8, error_message = ?9,
             matched_ms = ?10, finished_ms = ?11",
        args![
            id.to_string(),
            client.as_str(),
            state,
            row.stage.upload().map(|u| u.to_string()),
            key,
            size,
            sha256,
            error.map(|e| e.code.as_str()),
            error.map(|e| e.message.as_str()),
            row.matched.0,
            row.finished.map(|f| f.0),
        ],
    )
    .context("saving a collection row")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::locations;
    use shared::ErrorCode;

    fn spec(created: i64, firing: Option<Firing>) -> Spec {
        Spec {
            id: CollectionId::new_random(),
            matcher: Matcher::new(Target::Glob {
                pattern: "store-*".into(),
            })
            .unwrap(),
            share: FileName::parse("z.csv").unwrap(),
            max_concurrent: 7,
            compression: Compression::Zstd,
            created_by: "op".into(),
            created_from: "127.0.0.1:1".into(),
            created: UnixMs(created),
            expires: UnixMs(created + 10_000),
            firing,
        }
    }

    fn row(stage: Stage, finished: Option<i64>) -> Row {
        Row {
            stage,
            matched: UnixMs(1_000),
            finished: finished.map(UnixMs),
        }
    }

    /// Every stage of a row, and every column of a collection, reads back as written.
    #[test]
    fn collections_read_back_as_written_on_both_engines() {
        let dir = tempfile::tempdir().unwrap();
        for location in locations(dir.path()) {
            let store = Store::new(location.connect().unwrap());
            let upload = UploadId::new_random;
            let stages = [
                Stage::Waiting,
                Stage::Running { upload: upload() },
                Stage::Completed {
                    upload: upload(),
                    key: "k/1".into(),
                    size: 5_000_000_000,
                    sha256: Some("ab".repeat(32)),
                },
                Stage::Failed {
                    upload: upload(),
                    error: ErrorDetail {
                        code: ErrorCode::FileNotFound,
                        message: "<img src=x>".into(),
                    },
                },
                Stage::Cancelled { upload: None },
                Stage::NotReached,
            ];
            let schedule = ScheduleId::new_random();
            let firing = Firing {
                schedule,
                at: UnixMs(900),
            };
            let c = Collection {
                spec: spec(1_000, Some(firing)),
                state: CollectionState::Open,
                rows: stages
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let id = ClientId::parse(&format!("store-{i}")).unwrap();
                        (id, row(s.clone(), (i > 1).then_some(2_000)))
                    })
                    .collect(),
            };
            store.insert(&c).unwrap();
            let older = Collection {
                spec: spec(500, None),
                state: CollectionState::Open,
                rows: BTreeMap::new(),
            };
            store.insert(&older).unwrap();
            assert!(store.insert(&older).is_err(), "an id is unique");

            let back = store.load(c.spec.id).unwrap().unwrap();
            assert_eq!(back.rows, c.rows, "{location:?}");
            assert_eq!(back.state, CollectionState::Open);
            assert_eq!(back.spec.firing, Some(firing));
            assert_eq!(
                (back.spec.max_concurrent, back.spec.compression),
                (7, Compression::Zstd)
            );
            assert_eq!(back.spec.matcher.target(), c.spec.matcher.target());
            assert!(store.load(CollectionId::new_random()).unwrap().is_none());

            // A row is replaced in place.
            let first = ClientId::parse("store-0").unwrap();
            let done = row(Stage::Cancelled { upload: None }, Some(3_000));
            store.save_rows(c.spec.id, [(&first, &done)]).unwrap();
            let back = store.load(c.spec.id).unwrap().unwrap();
            assert_eq!(back.rows[&first], done);
            assert_eq!(back.rows.len(), stages.len());

            assert_eq!(store.newest(1).unwrap(), [c.spec.id]);
            assert!(store.fired_since(schedule, UnixMs(900)).unwrap());
            assert!(!store.fired_since(schedule, UnixMs(901)).unwrap());
            store
                .set_state(older.spec.id, CollectionState::Cancelled)
                .unwrap();
            let live: Vec<_> = store
                .load_live()
                .unwrap()
                .into_iter()
                .map(|c| c.spec.id)
                .collect();
            assert_eq!(live, [c.spec.id], "{location:?}");
            let mut counts = store.count_by_state().unwrap();
            counts.sort();
            assert_eq!(
                counts,
                [("cancelled".to_owned(), 1), ("open".to_owned(), 1)]
            );
        }
    }
}
