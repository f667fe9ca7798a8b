//! Schedules: a cron pattern read in a time zone (a store's closing time is local), and the
//! collection each firing creates.
//!
//! The server looks once a second for firings due ([`Schedules::fire_due`]): the latest moment the
//! pattern matched that is later than the schedule's last firing. So a server that was down
//! over one firing, or several, runs the latest of them once when it is back (if that firing's
//! collection would not already have expired), never once per missed firing. A firing is
//! recorded after its collection is created; a collection carries its schedule and firing, so a
//! crash in between is seen at the next look and the firing is not run twice.
//!
//! Parsing and evaluating cron patterns is `croner`'s; time zones are `chrono-tz`'s (the IANA
//! database, compiled in).

mod store;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::api::collections::{CreateSchedule, ScheduleInfo};
use shared::{ErrorCode, ScheduleId};

use crate::collections::{Collections, Firing};
use crate::error::ApiError;
use crate::inventory::Inventory;
use crate::uploads::{Requester, UnixMs, rfc3339};

pub use store::Store;

/// How often the server looks for firings due.
pub const TICK: Duration = Duration::from_secs(1);
/// The most schedules one server keeps.
pub const MAX_SCHEDULES: usize = 1_000;

/// One schedule, checked.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub id: ScheduleId,
    pub pattern: String,
    pub cron: croner::Cron,
    pub time_zone: chrono_tz::Tz,
    pub template: shared::api::collections::CollectionTemplate,
    pub created_by: String,
    pub created_from: String,
    pub created: UnixMs,
    /// The latest firing handled (the moment it was due).
    pub last_fired: UnixMs,
}

/// A cron pattern that parses and fires at least once more, read in a time zone that exists.
pub fn check(pattern: &str, time_zone: &str) -> Result<(croner::Cron, chrono_tz::Tz), String> {
    let cron =
        croner::Cron::from_str(pattern).map_err(|e| format!("cron pattern {pattern:?}: {e}"))?;
    let tz = chrono_tz::Tz::from_str(time_zone)
        .map_err(|_| format!("{time_zone:?} is not an IANA time zone (such as Europe/Berlin)"))?;
    let now = Utc::now().with_timezone(&tz);
    cron.find_next_occurrence(&now, false)
        .map_err(|e| format!("cron pattern {pattern:?} never fires: {e}"))?;
    Ok((cron, tz))
}

/// `t` in UTC, to the whole second (cron's finest grain; croner keeps a search's fraction).
fn to_utc(t: UnixMs) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.div_euclid(1000), 0)
}

impl Schedule {
    /// The firing due at `now`: the latest moment the pattern matched, if later than the last
    /// firing handled.
    pub fn due(&self, now: UnixMs) -> Option<UnixMs> {
        let now = to_utc(now)?.with_timezone(&self.time_zone);
        let latest = self.cron.find_previous_occurrence(&now, true).ok()?;
        let latest = UnixMs(latest.timestamp_millis());
        (latest > self.last_fired).then_some(latest)
    }

    /// The next firing after `now`.
    pub fn next(&self, now: UnixMs) -> Option<UnixMs> {
        let now = to_utc(now)?.with_timezone(&self.time_zone);
        let next = self.cron.find_next_occurrence(&now, false).ok()?;
        Some(UnixMs(next.timestamp_millis()))
    }

    fn info(&self, now: UnixMs) -> ScheduleInfo {
        ScheduleInfo {
            schedule_id: self.id,
            cron: self.pattern.clone(),
            time_zone: self.time_zone.name().to_owned(),
            template: self.template.clone(),
            created_by: self.created_by.clone(),
            created_at: rfc3339(self.created.to_datetime()),
            next_fire_at: self.next(now).map(|t| rfc3339(t.to_datetime())),
            last_fired_at: (self.last_fired > self.created)
                .then(|| rfc3339(self.last_fired.to_datetime())),
        }
    }
}

/// The schedule service. Cheap to clone.
#[derive(Clone)]
pub struct Schedules(Arc<Core>);

struct Core {
    store: Store,
    /// Every schedule; the store has the same. The one owner of this lock is this type.
    all: Mutex<BTreeMap<ScheduleId, Schedule>>,
    collections: Collections,
    inventory: Arc<Inventory>,
}

impl Schedules {
    pub fn open(
        store: Store,
        collections: Collections,
        inventory: Arc<Inventory>,
    ) -> anyhow::Result<Self> {
        let all = store.load()?.into_iter().map(|s| (s.id, s)).collect();
        Ok(Self(Arc::new(Core {
            store,
            all: Mutex::new(all),
            collections,
            inventory,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ScheduleId, Schedule>> {
        self.0.all.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `POST /schedules`.
    pub fn create(
        &self,
        req: CreateSchedule,
        requester: &Requester,
    ) -> Result<ScheduleInfo, ApiError> {
        let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
        let time_zone = req.time_zone.as_deref().unwrap_or("UTC");
        let (cron, time_zone) = check(&req.cron, time_zone).map_err(bad)?;
        Collections::check_template(&req.template)?;
        let now = UnixMs::now();
        let schedule = Schedule {
            id: ScheduleId::new_random(),
            pattern: req.cron,
            cron,
            time_zone,
            template: req.template,
            created_by: requester.operator.clone(),
            created_from: requester.from.to_string(),
            created: now,
            last_fired: now,
        };
        let mut all = self.lock();
        if all.len() >= MAX_SCHEDULES {
            return Err(bad(format!("at most {MAX_SCHEDULES} schedules")));
        }
        self.0
            .store
            .insert(&schedule)
            .map_err(|e| ApiError::internal(&e))?;
        tracing::info!(
            audit = true,
            schedule_id = %schedule.id,
            cron = schedule.pattern,
            time_zone = schedule.time_zone.name(),
            operator = requester.operator,
            from = %requester.from,
            "schedule created"
        );
        let info = schedule.info(now);
        all.insert(schedule.id, schedule);
        Ok(info)
    }

    pub fn list(&self) -> Vec<ScheduleInfo> {
        let now = UnixMs::now();
        self.lock().values().map(|s| s.info(now)).collect()
    }

    pub fn get(&self, id: ScheduleId) -> Result<ScheduleInfo, ApiError> {
        self.lock()
            .get(&id)
            .map(|s| s.info(UnixMs::now()))
            .ok_or_else(|| not_found(id))
    }

    /// `DELETE /schedules/{id}`: no more firings; collections it created go on.
    pub fn delete(&self, id: ScheduleId, requester: &Requester) -> Result<ScheduleInfo, ApiError> {
        let mut all = self.lock();
        let Some(schedule) = all.get(&id) else {
            return Err(not_found(id));
        };
        self.0
            .store
            .delete(id)
            .map_err(|e| ApiError::internal(&e))?;
        let info = schedule.info(UnixMs::now());
        all.remove(&id);
        tracing::info!(audit = true, schedule_id = %id, operator = requester.operator, from = %requester.from, "schedule deleted");
        Ok(info)
    }

    /// Creates the collection of every firing due at `now`, and records each firing.
    pub fn fire_due(&self, now: UnixMs) {
        let due: Vec<(Schedule, UnixMs)> = self
            .lock()
            .values()
            .filter_map(|s| s.due(now).map(|at| (s.clone(), at)))
            .collect();
        for (schedule, at) in due {
            let firing = Firing {
                schedule: schedule.id,
                at,
            };
            if !self.fire(&schedule, firing) {
                continue;
            }
            if let Err(e) = self.0.store.set_last_fired(schedule.id, at) {
                tracing::error!(schedule_id = %schedule.id, error = format!("{e:#}"), "recording a firing failed");
            }
            if let Some(s) = self.lock().get_mut(&schedule.id) {
                s.last_fired = s.last_fired.max(at);
            }
        }
    }

    /// Creates one firing's collection. Returns whether the firing is handled (created, found
    /// created already, or past its expiry); one that is not is tried again at the next look.
    fn fire(&self, schedule: &Schedule, firing: Firing) -> bool {
        let id = schedule.id;
        let at = rfc3339(firing.at.to_datetime());
        match self.0.collections.fired_since(id, firing.at) {
            Ok(true) => {
                tracing::info!(schedule_id = %id, firing = at, "this firing's collection exists already");
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                // Better a late firing than a doubled one: it is tried at the next look.
                tracing::error!(schedule_id = %id, error = format!("{e:#}"), "could not read the schedule's collections");
                return false;
            }
        }
        let requester = Requester::recorded(schedule.created_by.clone(), &schedule.created_from);
        match self
            .0
            .collections
            .fire(firing, &schedule.template, &self.0.inventory, &requester)
        {
            Ok(Some(c)) => {
                tracing::info!(schedule_id = %id, firing = at, collection_id = %c.collection_id, "schedule fired");
                true
            }
            Ok(None) => {
                tracing::warn!(schedule_id = %id, firing = at, "a firing missed while the server was down is past its expiry; skipped");
                true
            }
            Err(e) => {
                tracing::error!(schedule_id = %id, firing = at, code = %e.code(), "a schedule's collection could not be created; trying again");
                false
            }
        }
    }
}

fn not_found(id: ScheduleId) -> ApiError {
    ApiError::new(ErrorCode::ScheduleNotFound, format!("no schedule {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::api::collections::{CollectionTemplate, Target};

    pub(super) fn schedule(pattern: &str, tz: &str, last_fired: &str) -> Schedule {
        let (cron, time_zone) = check(pattern, tz).unwrap();
        let last = DateTime::parse_from_rfc3339(last_fired).unwrap();
        Schedule {
            id: ScheduleId::new_random(),
            pattern: pattern.into(),
            cron,
            time_zone,
            template: CollectionTemplate {
                target: Target::All,
                file: None,
                expires_in_secs: None,
                max_concurrent: None,
                encoding: None,
            },
            created_by: "op".into(),
            created_from: "127.0.0.1:1".into(),
            created: UnixMs(0),
            last_fired: UnixMs(last.timestamp_millis()),
        }
    }

    fn at(s: &str) -> UnixMs {
        UnixMs(DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis())
    }

    /// 23:00 in Berlin is 22:00 UTC in winter and 21:00 UTC in summer; a server down over
    /// three nights fires once, for the latest night.
    #[test]
    fn firings_follow_the_local_clock_and_a_missed_run_fires_once() {
        let s = schedule("0 23 * * *", "Europe/Berlin", "2026-01-10T22:00:00Z");
        assert_eq!(
            s.next(at("2026-01-10T22:00:00Z")),
            Some(at("2026-01-11T22:00:00Z"))
        );
        assert_eq!(
            s.next(at("2026-07-01T12:00:00Z")),
            Some(at("2026-07-01T21:00:00Z"))
        );
        assert_eq!(s.due(at("2026-01-11T21:59:59Z")), None, "not yet");
        assert_eq!(
            s.due(at("2026-01-11T22:00:00Z")),
            Some(at("2026-01-11T22:00:00Z"))
        );
        // Down from the 11th to the 14th at noon: the night of the 13th, once.
        assert_eq!(
            s.due(at("2026-01-14T12:00:00Z")),
            Some(at("2026-01-13T22:00:00Z"))
        );
    }

    #[test]
    fn a_pattern_with_seconds_fires_every_few_seconds() {
        let s = schedule("*/2 * * * * *", "Europe/Berlin", "2026-01-10T22:00:00Z");
        assert_eq!(s.due(at("2026-01-10T22:00:01.500Z")), None);
        assert_eq!(
            s.due(at("2026-01-10T22:00:03Z")),
            Some(at("2026-01-10T22:00:02Z"))
        );
        assert_eq!(
            s.next(at("2026-01-10T22:00:03Z")),
            Some(at("2026-01-10T22:00:04Z"))
        );
    }

    #[test]
    fn bad_patterns_and_zones_are_refused() {
        assert!(check("61 * * * *", "UTC").is_err());
        assert!(check("not cron", "UTC").is_err());
        assert!(check("0 23 * * *", "Mars/Olympus").is_err());
        assert!(check("*/5 * * * * *", "UTC").is_ok(), "seconds first");
        assert!(check("@daily", "America/New_York").is_ok());
    }
}
