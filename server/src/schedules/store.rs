//! The stored form of schedules: the `schedules` table (migration 0006). A row that no longer
//! reads is reported and left out, never deleted.

use anyhow::Context;
use rusqlite::{Connection, params};
use shared::ScheduleId;
use shared::api::collections::CollectionTemplate;

use super::{Schedule, check};
use crate::db::Db;
use crate::uploads::UnixMs;

pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(conn: Connection) -> Self {
        Self { db: Db::new(conn) }
    }

    pub fn insert(&self, s: &Schedule) -> anyhow::Result<()> {
        self.db
            .lock()
            .execute(
                "INSERT INTO schedules (id, cron, time_zone, template, created_by, created_from,
                                        created_ms, last_fired_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    s.id.to_string(),
                    s.pattern,
                    s.time_zone.name(),
                    serde_json::to_string(&s.template)?,
                    s.created_by,
                    s.created_from,
                    s.created.0,
                    s.last_fired.0,
                ],
            )
            .context("recording a schedule")?;
        Ok(())
    }

    pub fn set_last_fired(&self, id: ScheduleId, at: UnixMs) -> anyhow::Result<()> {
        self.db.lock().execute(
            "UPDATE schedules SET last_fired_ms = MAX(last_fired_ms, ?2) WHERE id = ?1",
            params![id.to_string(), at.0],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: ScheduleId) -> anyhow::Result<()> {
        self.db.lock().execute(
            "DELETE FROM schedules WHERE id = ?1",
            params![id.to_string()],
        )?;
        Ok(())
    }

    /// Every schedule that reads.
    pub fn load(&self) -> anyhow::Result<Vec<Schedule>> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare(
            "SELECT id, cron, time_zone, template, created_by, created_from, created_ms,
                    last_fired_ms
             FROM schedules ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        let mut all = Vec::new();
        for row in rows {
            let (id, pattern, tz, template, created_by, created_from, created, last_fired) = row?;
            let read = || -> anyhow::Result<Schedule> {
                let (cron, time_zone) = check(&pattern, &tz).map_err(anyhow::Error::msg)?;
                Ok(Schedule {
                    id: ScheduleId::parse(&id)?,
                    pattern: pattern.clone(),
                    cron,
                    time_zone,
                    template: serde_json::from_str::<CollectionTemplate>(&template)?,
                    created_by: created_by.clone(),
                    created_from: created_from.clone(),
                    created: UnixMs(created),
                    last_fired: UnixMs(last_fired),
                })
            };
            match read() {
                Ok(s) => all.push(s),
                Err(e) => {
                    tracing::error!(
                        schedule_id = id,
                        error = format!("{e:#}"),
                        "a schedule cannot be read; it does not fire"
                    )
                }
            }
        }
        Ok(all)
    }
}
