//! The stored form of collections: the `collections` and `collection_rows` tables (migration
//! 0005). Every change is written through before it is acted on; a row that no longer reads is
//! reported, never taken as absent.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use rusqlite::{Connection, OptionalExtension, params};
use shared::api::ErrorDetail;
use shared::api::collections::{CollectionState, Target};
use shared::encoding::Compression;
use shared::{ClientId, CollectionId, FileName, ScheduleId, UploadId};

use super::record::{Collection, Firing, Row, Spec, Stage};
use super::target::Matcher;
use crate::db::Db;
use crate::uploads::UnixMs;

pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(conn: Connection) -> Self {
        Self { db: Db::new(conn) }
    }

    /// A new collection and its first rows, in one transaction.
    pub fn insert(&self, c: &Collection) -> anyhow::Result<()> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        let s = &c.spec;
        tx.execute(
            "INSERT INTO collections (id, target, share, max_concurrent, created_by, created_from,
                                      created_ms, expires_ms, state, schedule_id, fired_ms,
                                      compression)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                s.id.to_string(),
                serde_json::to_string(s.matcher.target())?,
                s.share.as_str(),
                s.max_concurrent,
                s.created_by,
                s.created_from,
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
            save_row(&tx, s.id, client, row)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_state(&self, id: CollectionId, state: CollectionState) -> anyhow::Result<()> {
        self.db.lock().execute(
            "UPDATE collections SET state = ?2 WHERE id = ?1",
            params![id.to_string(), state.as_str()],
        )?;
        Ok(())
    }

    /// Saves rows of one collection, in one transaction.
    pub fn save_rows<'a>(
        &self,
        id: CollectionId,
        rows: impl IntoIterator<Item = (&'a ClientId, &'a Row)>,
    ) -> anyhow::Result<()> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        for (client, row) in rows {
            save_row(&tx, id, client, row)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The collections that can still change (open, or with a store waiting or running), whole.
    pub fn load_live(&self) -> anyhow::Result<Vec<Collection>> {
        let ids: Vec<String> = {
            let conn = self.db.lock();
            let mut stmt = conn.prepare(
                "SELECT id FROM collections WHERE state = 'open' OR EXISTS (
                     SELECT 1 FROM collection_rows r
                     WHERE r.collection_id = collections.id AND r.state IN ('waiting', 'running'))",
            )?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
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
        let conn = self.db.lock();
        let head = conn
            .query_row(
                "SELECT target, share, max_concurrent, created_by, created_from, created_ms,
                        expires_ms, state, schedule_id, fired_ms, compression
                 FROM collections WHERE id = ?1",
                params![id.to_string()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Option<String>>(8)?,
                        r.get::<_, Option<i64>>(9)?,
                        r.get::<_, String>(10)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            target,
            share,
            max_concurrent,
            created_by,
            created_from,
            created,
            expires,
            state,
            schedule,
            fired,
            compression,
        )) = head
        else {
            return Ok(None);
        };
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
        let mut stmt = conn.prepare_cached(
            "SELECT client_id, state, upload_id, object_key, size, sha256, error_code,
                    error_message, matched_ms, finished_ms
             FROM collection_rows WHERE collection_id = ?1",
        )?;
        let mut rows = BTreeMap::new();
        let mut query = stmt.query(params![id.to_string()])?;
        while let Some(r) = query.next()? {
            let client: String = r.get(0)?;
            let stored = StoredRow {
                state: r.get(1)?,
                upload_id: r.get(2)?,
                key: r.get(3)?,
                size: r.get(4)?,
                sha256: r.get(5)?,
                error_code: r.get(6)?,
                error_message: r.get(7)?,
                matched_ms: r.get(8)?,
                finished_ms: r.get(9)?,
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
        let conn = self.db.lock();
        let mut stmt =
            conn.prepare_cached("SELECT id FROM collections ORDER BY created_ms DESC LIMIT ?1")?;
        let ids: Vec<String> = stmt
            .query_map(params![limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        ids.iter()
            .map(|id| CollectionId::parse(id).map_err(Into::into))
            .collect()
    }

    /// Whether a collection of `schedule` exists for its firing at `at` or a later one.
    pub fn fired_since(&self, schedule: ScheduleId, at: UnixMs) -> anyhow::Result<bool> {
        let found: Option<i64> = self
            .db
            .lock()
            .query_row(
                "SELECT 1 FROM collections WHERE schedule_id = ?1 AND fired_ms >= ?2 LIMIT 1",
                params![schedule.to_string(), at.0],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// How many collections are in each state, for `/metrics`.
    pub fn count_by_state(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let conn = self.db.lock();
        let mut stmt =
            conn.prepare_cached("SELECT state, COUNT(*) FROM collections GROUP BY state")?;
        let counts = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(counts)
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
    conn: &Connection,
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
    conn.prepare_cached(
        "INSERT OR REPLACE INTO collection_rows (collection_id, client_id, state, upload_id,
             object_key, size, sha256, error_code, error_message, matched_ms, finished_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
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
    ])
    .context("saving a collection row")?;
    Ok(())
}
