//! The stored form of schedules: the `schedules` table (migration 0006). A row that no longer
//! reads is reported and left out, never deleted.

use anyhow::Context;
use shared::ScheduleId;
use shared::api::collections::CollectionTemplate;

use super::{Schedule, check};
use crate::args;
use crate::db::Db;
use crate::uploads::UnixMs;

pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn insert(&self, s: &Schedule) -> anyhow::Result<()> {
        self.db
            .execute(
                "INSERT INTO schedules (id, cron, time_zone, template, created_by, created_from,
                                        created_ms, last_fired_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                args![
                    s.id.to_string(),
                    s.pattern.as_str(),
                    s.time_zone.name(),
                    serde_json::to_string(&s.template)?,
                    s.created_by.as_str(),
                    s.created_from.as_str(),
                    s.created.0,
                    s.last_fired.0,
                ],
            )
            .context("recording a schedule")?;
        Ok(())
    }

    pub fn set_last_fired(&self, id: ScheduleId, at: UnixMs) -> anyhow::Result<()> {
        self.db.execute(
            "UPDATE schedules SET last_fired_ms = ?2 WHERE id = ?1 AND last_fired_ms < ?2",
            args![id.to_string(), at.0],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: ScheduleId) -> anyhow::Result<()> {
        self.db
            .execute("DELETE FROM schedules WHERE id = ?1", args![id.to_string()])?;
        Ok(())
    }

    /// Every schedule that reads.
    pub fn load(&self) -> anyhow::Result<Vec<Schedule>> {
        let rows = self.db.query(
            "SELECT id, cron, time_zone, template, created_by, created_from, created_ms,
                    last_fired_ms
             FROM schedules ORDER BY created_ms",
            args![],
        )?;
        let mut all = Vec::new();
        for row in rows {
            let (id, pattern, tz, template) =
                (row.text(0)?, row.text(1)?, row.text(2)?, row.text(3)?);
            let (created_by, created_from) = (row.text(4)?, row.text(5)?);
            let (created, last_fired) = (row.int(6)?, row.int(7)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_read_back_as_written_on_both_engines() {
        let dir = tempfile::tempdir().unwrap();
        for location in crate::db::testing::locations(dir.path()) {
            let store = Store::new(location.connect().unwrap());
            let a =
                super::super::tests::schedule("0 2 * * *", "Europe/Paris", "2026-01-01T00:00:00Z");
            let b = super::super::tests::schedule("*/5 * * * *", "UTC", "2026-01-02T00:00:00Z");
            store.insert(&a).unwrap();
            store.insert(&b).unwrap();
            assert!(store.insert(&a).is_err(), "an id is unique");
            // The latest firing only moves forward.
            store
                .set_last_fired(a.id, UnixMs(a.last_fired.0 + 60_000))
                .unwrap();
            store
                .set_last_fired(a.id, UnixMs(a.last_fired.0 - 60_000))
                .unwrap();
            store.delete(b.id).unwrap();
            let back = store.load().unwrap();
            assert_eq!(back.len(), 1, "{location:?}");
            assert_eq!(back[0].id, a.id);
            assert_eq!(back[0].pattern, a.pattern);
            assert_eq!(back[0].time_zone, a.time_zone);
            assert_eq!(back[0].last_fired, UnixMs(a.last_fired.0 + 60_000));
        }
    }
}
