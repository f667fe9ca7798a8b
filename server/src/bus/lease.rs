//! The jobs that must run on one replica at a time, each behind a PostgreSQL advisory lock.
//!
//! A replica asks for a job's lock on a connection of its own before each run and keeps it while
//! that connection lives: when the replica dies, PostgreSQL ends its session and the lock is
//! free for the next replica that asks, at its next tick. One server (`BUS=local`) holds every
//! lease without asking.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::args;
use crate::db::{Db, Location};

/// A job that runs on one replica at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Singleton {
    /// Finds the stores whose unfinished uploads no live replica holds, and takes them on, so
    /// that their stall timeout runs somewhere.
    Abandoned,
    /// The orphan sweep of multipart uploads under the key prefix.
    OrphanSweep,
    /// Retention of upload records and of the token ledger.
    Retention,
    /// Firing schedules.
    Schedules,
    /// Driving the collections: holding the live ones and asking their stores.
    Collections,
}

impl Singleton {
    /// The advisory lock's key: "bkhl" and the job's number.
    fn key(self) -> i64 {
        let n = match self {
            Self::Abandoned => 1,
            Self::OrphanSweep => 2,
            Self::Retention => 3,
            Self::Schedules => 4,
            Self::Collections => 5,
        };
        0x626b_686c_0000_0000 + n
    }
}

pub struct Leases(Option<Mutex<Shared>>);

struct Shared {
    location: Location,
    /// The session that holds the locks; `None` until connected, and after it failed.
    db: Option<Db>,
    held: HashSet<Singleton>,
}

impl Leases {
    /// Every lease, always (one server).
    pub fn alone() -> Self {
        Self(None)
    }

    /// Leases taken in the database at `location`, shared with the other replicas.
    pub fn shared(location: Location) -> Self {
        Self(Some(Mutex::new(Shared {
            location,
            db: None,
            held: HashSet::new(),
        })))
    }

    /// Whether this replica holds `job`'s lease now, taking it if it is free. A database that
    /// does not answer holds nothing: the session (and every lock of it) is dropped, and the
    /// next call starts a new one.
    pub fn holds(&self, job: Singleton) -> bool {
        let Some(shared) = &self.0 else {
            return true;
        };
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.db.is_none() {
            s.held.clear();
            match s.location.connect() {
                Ok(db) => s.db = Some(db),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "no database session for leases");
                    return false;
                }
            }
        }
        let db = s.db.as_ref().expect("connected above");
        let answer = if s.held.contains(&job) {
            // Still the session that holds it?
            db.query_opt("SELECT 1", args![]).map(|_| true)
        } else {
            db.query_opt("SELECT pg_try_advisory_lock(?1)", args![job.key()])
                .and_then(|row| Ok(row.map(|r| r.int(0)).transpose()? == Some(1)))
        };
        match answer {
            Ok(true) => {
                if s.held.insert(job) {
                    tracing::info!(?job, "this replica runs the job now");
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the lease session failed; leases dropped"
                );
                s.db = None;
                s.held.clear();
                false
            }
        }
    }
}

/// The advisory-lock class of replica names (the two-key form, which never meets the one-key
/// locks above): "bkhn".
const NAME_CLASS: i32 = 0x626b_686e;

/// This replica's `REPLICA_ID`, locked in PostgreSQL for as long as the replica runs. Two live
/// replicas under one name would each take the other's stores for its own and stall them; the
/// second is refused at start instead. The lock is keyed by a 32-bit hash of the name
/// (PostgreSQL's `hashtext`): two different names that hash alike are refused too, which the
/// error says. The session's end (the replica's death) frees it.
pub struct NameLock {
    _session: Db,
}

impl NameLock {
    pub fn take(location: &Location, replica: &str) -> anyhow::Result<Self> {
        let session = location.connect()?;
        let row = session.query_opt(
            "SELECT pg_try_advisory_lock(?1, hashtext(?2))",
            args![NAME_CLASS, replica],
        )?;
        let taken = row.map(|r| r.int(0)).transpose()? == Some(1);
        anyhow::ensure!(
            taken,
            "REPLICA_ID {replica} is in use by another running replica (or one whose name hashes \
             alike): give each replica its own, or leave it unset for a random one"
        );
        Ok(Self { _session: session })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh database on the test command's PostgreSQL, which these tests need.
    fn postgres() -> Location {
        let dir = tempfile::tempdir().unwrap();
        crate::db::testing::locations(dir.path())
            .pop()
            .filter(|l| matches!(l, Location::Postgres(_)))
            .expect(
                "this test needs PostgreSQL: set BACKHAUL_TEST_DATABASE_URL (scripts/test.sh does)",
            )
    }

    /// One holder at a time; the lease moves when its holder's session ends.
    #[test]
    fn a_lease_has_one_holder_and_moves_when_it_dies() {
        let postgres = postgres();
        let first = Leases::shared(postgres.clone());
        let second = Leases::shared(postgres);
        assert!(first.holds(Singleton::OrphanSweep));
        assert!(first.holds(Singleton::OrphanSweep), "held, it stays held");
        assert!(!second.holds(Singleton::OrphanSweep));
        assert!(
            second.holds(Singleton::Schedules),
            "each job has its own lease"
        );
        assert!(!first.holds(Singleton::Schedules));
        drop(first);
        // The server ends the session a moment after the connection closes.
        let moved = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            second.holds(Singleton::OrphanSweep)
        });
        assert!(moved, "the lease moved");
        assert!(Leases::alone().holds(Singleton::OrphanSweep));
    }

    /// One live replica per name; the name is free again when its holder's session ends.
    #[test]
    fn a_replica_name_is_held_by_one_replica() {
        let postgres = postgres();
        let first = NameLock::take(&postgres, "replica-a").unwrap();
        let err = NameLock::take(&postgres, "replica-a").err().unwrap();
        assert!(
            format!("{err:#}").contains("REPLICA_ID replica-a is in use"),
            "{err:#}"
        );
        let _other = NameLock::take(&postgres, "replica-b").unwrap();
        drop(first);
        let freed = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            NameLock::take(&postgres, "replica-a").is_ok()
        });
        assert!(freed, "the name is free once its holder is gone");
    }
}
