//! The store inventory: every agent the server has ever seen, connected now or not, with its
//! labels and versions, persisted in the server's database. A store is recorded when it says
//! `hello` and stamped again when it leaves; `GET /clients?all=true` lists it together with the
//! live registry.
//!
//! Its writes are batched: `connected` and `left` only note the change, one entry per store,
//! and a flush writes what has gathered in one transaction of multi-row statements (the server's
//! flusher runs one as soon as there is something to write, and a last one at shutdown). A
//! session waits for the flush that writes its hello before it welcomes the agent, so a store
//! shown as connected anywhere is in the inventory, but sessions that connect together share
//! one flush; its end is written behind. A reconnect storm is then a few statements per flush
//! rather than two round trips per agent. `list` flushes first, so a replica reads its own
//! writes; another replica's last contacts may be a flush behind.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use shared::ClientId;
use shared::labels::{Label, Labels};

use crate::args;
use crate::db::{Db, Exec, Value};

/// One store as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub client_id: ClientId,
    pub labels: Labels,
    pub agent_version: String,
    pub protocol_version: u32,
    /// Unix milliseconds.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// What is known about a store and not written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    /// A hello (its `last_seen_ms` raised by any later contact).
    Hello(Store),
    /// Only a later contact: the connection ended at this Unix millisecond.
    Left(i64),
}

impl Write {
    /// `self` followed by `newer`: the newest hello's labels and versions, the earliest first
    /// contact and the latest last one.
    fn then(self, newer: Write) -> Write {
        match (self, newer) {
            (Write::Hello(old), Write::Hello(mut new)) => {
                new.first_seen_ms = new.first_seen_ms.min(old.first_seen_ms);
                new.last_seen_ms = new.last_seen_ms.max(old.last_seen_ms);
                Write::Hello(new)
            }
            (Write::Hello(mut store), Write::Left(ms))
            | (Write::Left(ms), Write::Hello(mut store)) => {
                store.last_seen_ms = store.last_seen_ms.max(ms);
                Write::Hello(store)
            }
            (Write::Left(a), Write::Left(b)) => Write::Left(a.max(b)),
        }
    }
}

/// Rows per statement, largest first: a batch is cut into these sizes, so that a connection
/// prepares at most a handful of statements of each kind.
const CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

/// How long a session waits for its hello to be written before it goes on without (the
/// flusher keeps trying; the store is listed from the registry meanwhile).
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Inventory {
    db: Db,
    pending: Mutex<Pending>,
    /// Held through a flush, so that batches land in order and `list` sees every write noted
    /// before it.
    flushing: Mutex<()>,
    /// Told when a write is noted.
    noted: tokio::sync::Notify,
    /// The number of the last batch written: every write noted into it or an earlier one is in
    /// the database.
    flushed: tokio::sync::watch::Sender<u64>,
}

/// Writes not in the database yet, one per store, and the number of the batch they will be
/// written in (a failed batch's writes go into the next one).
struct Pending {
    writes: HashMap<ClientId, Write>,
    batch: u64,
}

/// A noted hello, which [`Recorded::written`] waits for.
pub struct Recorded {
    batch: u64,
    flushed: tokio::sync::watch::Receiver<u64>,
}

impl Recorded {
    /// Waits until the hello is in the database, or [`RECORD_WAIT`] has passed (logged).
    pub async fn written(mut self) {
        let batch = self.batch;
        let wait = self.flushed.wait_for(|done| *done >= batch);
        if tokio::time::timeout(RECORD_WAIT, wait).await.is_err() {
            tracing::warn!(
                "the store inventory was not written within {RECORD_WAIT:?}; going on, the store is written later"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data whole, so a poisoned lock is taken over.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inventory {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            pending: Mutex::new(Pending {
                writes: HashMap::new(),
                batch: 1,
            }),
            flushing: Mutex::default(),
            noted: tokio::sync::Notify::new(),
            flushed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A store said `hello`: its labels and versions now, first seen kept from before. A
    /// session awaits the returned [`Recorded::written`] before it welcomes the agent, so that
    /// a store any replica shows as connected is in the inventory (many sessions share a flush).
    pub fn connected(&self, store: Store) -> Recorded {
        Recorded {
            batch: self.note(store.client_id.clone(), Write::Hello(store)),
            flushed: self.flushed.subscribe(),
        }
    }

    /// A store's connection ended; it was last heard from at `last_seen_ms`.
    pub fn left(&self, client_id: &ClientId, last_seen_ms: i64) {
        self.note(client_id.clone(), Write::Left(last_seen_ms));
    }

    /// Notes `write`; returns the number of the batch it will be written in.
    fn note(&self, client_id: ClientId, write: Write) -> u64 {
        let mut pending = lock(&self.pending);
        let merged = match pending.writes.remove(&client_id) {
            Some(older) => older.then(write),
            None => write,
        };
        pending.writes.insert(client_id, merged);
        let batch = pending.batch;
        drop(pending);
        self.noted.notify_one();
        batch
    }

    /// Writes what has been noted, in one transaction. On failure the batch is kept (under any
    /// write noted since) for the next flush.
    pub fn flush(&self) -> anyhow::Result<()> {
        let _one = lock(&self.flushing);
        let (batch, number) = {
            let mut pending = lock(&self.pending);
            pending.batch += 1;
            (std::mem::take(&mut pending.writes), pending.batch - 1)
        };
        if batch.is_empty() {
            self.flushed.send_replace(number);
            return Ok(());
        }
        let (mut hellos, mut lefts) = (Vec::new(), Vec::new());
        for (id, write) in &batch {
            match write {
                Write::Hello(store) => hellos.push(store),
                Write::Left(ms) => lefts.push((id, *ms)),
            }
        }
        let written = self.db.transaction(|tx| {
            for chunk in chunked(&hellos) {
                record_hellos(tx, chunk)?;
            }
            for chunk in chunked(&lefts) {
                stamp_lefts(tx, chunk)?;
            }
            Ok(())
        });
        let count = hellos.len() + lefts.len();
        if let Err(e) = written {
            let mut pending = lock(&self.pending);
            for (id, older) in batch {
                let merged = match pending.writes.remove(&id) {
                    Some(newer) => older.then(newer),
                    None => older,
                };
                pending.writes.insert(id, merged);
            }
            return Err(e.context(format!("recording {count} stores in the inventory")));
        }
        self.flushed.send_replace(number);
        Ok(())
    }

    /// Flushes whenever a write is noted, until `stop`; a failed flush is tried again after
    /// `retry`. The last writes are the caller's to flush after the sessions have ended.
    pub async fn run_flusher(
        &self,
        stop: tokio_util::sync::CancellationToken,
        retry: std::time::Duration,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.noted.notified() => {}
            }
            if let Err(e) = self.flush() {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the store inventory could not be written; trying again"
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry) => self.noted.notify_one(),
                }
            }
        }
    }

    /// Every store whose labels include all of `wanted`, by client id, with every write noted
    /// so far (if they cannot be written, what the database has, and a warning). A row that no
    /// longer reads (it cannot happen short of editing the database) is skipped and logged.
    pub fn list(&self, wanted: &[Label]) -> anyhow::Result<Vec<Store>> {
        if let Err(e) = self.flush() {
            tracing::warn!(
                error = format!("{e:#}"),
                "listing the store inventory without its latest writes"
            );
        }
        let rows = self.db.query(
            "SELECT client_id, labels, agent_version, protocol_version, first_seen_ms,
                    last_seen_ms
             FROM stores ORDER BY client_id",
            args![],
        )?;
        let mut stores = Vec::new();
        for row in rows {
            let id = row.text(0)?;
            let labels = row.text(1)?;
            let (agent_version, protocol_version) = (row.text(2)?, u32::try_from(row.int(3)?)?);
            let (first, last) = (row.int(4)?, row.int(5)?);
            let parsed = ClientId::parse(&id)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    serde_json::from_str::<Labels>(&labels)
                        .map(|labels| (id, labels))
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok((client_id, labels)) if labels.matches_all(wanted) => stores.push(Store {
                    client_id,
                    labels,
                    agent_version,
                    protocol_version,
                    first_seen_ms: first,
                    last_seen_ms: last,
                }),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(client_id = ?id, error = e, "skipping an unreadable store row")
                }
            }
        }
        Ok(stores)
    }
}

/// `items` cut into [`CHUNKS`] sizes, largest first.
fn chunked<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = CHUNKS.into_iter().find(|size| *size <= items.len())?;
        let (chunk, rest) = items.split_at(size);
        items = rest;
        Some(chunk)
    })
}

/// `rows` groups of `columns` numbered parameters, for a `VALUES` list: `(?1, ?2), (?3, ?4)`,
/// each wrapped as `wrap[i]` says (`{}` stands for the parameter).
fn values(rows: usize, wrap: &[&str]) -> String {
    let columns = wrap.len();
    (0..rows)
        .map(|r| {
            let row: Vec<String> = wrap
                .iter()
                .enumerate()
                .map(|(c, w)| w.replace("{}", &format!("?{}", r * columns + c + 1)))
                .collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Upserts one chunk of hellos: labels and versions from the hello, first seen kept, last seen
/// never moved back (another replica may have stamped a later contact).
fn record_hellos(tx: &mut dyn Exec, stores: &[&Store]) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO stores (client_id, labels, agent_version, protocol_version,
                             first_seen_ms, last_seen_ms)
         VALUES {}
         ON CONFLICT (client_id) DO UPDATE SET labels = excluded.labels,
             agent_version = excluded.agent_version,
             protocol_version = excluded.protocol_version,
             last_seen_ms = CASE WHEN excluded.last_seen_ms > stores.last_seen_ms
                                 THEN excluded.last_seen_ms ELSE stores.last_seen_ms END",
        values(stores.len(), &["{}"; 6])
    );
    let mut params = Vec::with_capacity(stores.len() * 6);
    for store in stores {
        params.extend([
            Value::from(store.client_id.as_str()),
            Value::from(serde_json::to_string(&store.labels)?),
            Value::from(store.agent_version.as_str()),
            Value::from(store.protocol_version),
            Value::from(store.first_seen_ms),
            Value::from(store.last_seen_ms),
        ]);
    }
    tx.execute(&sql, &params)?;
    Ok(())
}

/// Stamps one chunk of ended connections, where the stamp is later than the store's last
/// contact. (`VALUES` columns are `column1`, `column2` in both engines; the cast gives
/// PostgreSQL the second one's type.)
fn stamp_lefts(tx: &mut dyn Exec, lefts: &[(&ClientId, i64)]) -> anyhow::Result<()> {
    let sql = format!(
        "UPDATE stores SET last_seen_ms = v.column2
         FROM (VALUES {}) AS v
         WHERE stores.client_id = v.column1 AND stores.last_seen_ms < v.column2",
        values(lefts.len(), &["{}", "CAST({} AS BIGINT)"])
    );
    let params: Vec<Value> = lefts
        .iter()
        .flat_map(|(id, ms)| [Value::from(id.as_str()), Value::from(*ms)])
        .collect();
    tx.execute(&sql, &params)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(id: &str, labels: &[&str], seen: i64) -> Store {
        Store {
            client_id: ClientId::parse(id).unwrap(),
            labels: Labels::from_list(labels.iter().map(|l| l.parse().unwrap())).unwrap(),
            agent_version: "1.0".into(),
            protocol_version: 4,
            first_seen_ms: seen,
            last_seen_ms: seen,
        }
    }

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    /// Each write flushed on its own, so every statement meets a row written by an earlier one.
    #[test]
    fn stores_are_remembered_and_filtered_by_label() {
        let dir = tempfile::tempdir().unwrap();
        for location in crate::db::testing::locations(dir.path()) {
            let inv = Inventory::new(location.connect().unwrap());
            let each = |write: &dyn Fn(&Inventory)| {
                write(&inv);
                inv.flush().unwrap();
            };
            each(&|i| {
                i.connected(store("a", &["region=north", "brand=x"], 1_000));
            });
            each(&|i| {
                i.connected(store("b", &["region=south"], 2_000));
            });
            // Seen again, with new labels: first seen stays.
            each(&|i| {
                i.connected(store("a", &["region=north"], 3_000));
            });
            each(&|i| i.left(&id("a"), 4_000));
            each(&|i| i.left(&id("b"), 1_500));
            // A hello stamped earlier than a contact another replica recorded: its labels
            // count, the last contact stays.
            each(&|i| {
                i.connected(store("b", &["region=south", "new=yes"], 1_800));
            });

            let inv = Inventory::new(location.connect().unwrap());
            let all = inv.list(&[]).unwrap();
            assert_eq!(all.len(), 2, "{location:?}");
            assert_eq!((all[0].first_seen_ms, all[0].last_seen_ms), (1_000, 4_000));
            assert_eq!(all[0].labels.to_string(), "region=north");
            assert_eq!(all[1].last_seen_ms, 2_000, "last seen never goes back");
            assert_eq!(all[1].labels.to_string(), "new=yes,region=south");
            let north = inv.list(&["region=north".parse().unwrap()]).unwrap();
            assert_eq!(north.len(), 1);
            assert_eq!(north[0].client_id.as_str(), "a");
            let none = inv
                .list(&["region=north".parse().unwrap(), "brand=x".parse().unwrap()])
                .unwrap();
            assert!(none.is_empty());
        }
    }

    /// Writes noted between flushes merge per store, and `list` reads them all: more than one
    /// chunk of each kind, in every chunk size.
    #[test]
    fn noted_writes_merge_and_list_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        for location in crate::db::testing::locations(dir.path()) {
            let inv = Inventory::new(location.connect().unwrap());
            // 341 = 256 + 64 + 16 + 4 + 1: every chunk size once.
            for n in 0..341 {
                inv.connected(store(&format!("s{n:03}"), &["v=1"], 1_000));
            }
            inv.flush().unwrap();
            for n in 0..341 {
                let s = format!("s{n:03}");
                if n % 2 == 0 {
                    // Hello, leave, hello again, leave: one upsert.
                    inv.connected(store(&s, &["v=2"], 2_000 + n));
                    inv.left(&id(&s), 2_500 + n);
                    inv.connected(store(&s, &["v=3"], 3_000 + n));
                    inv.left(&id(&s), 3_500 + n);
                } else {
                    // Two stamps: the later one counts.
                    inv.left(&id(&s), 4_000 + n);
                    inv.left(&id(&s), 3_900 + n);
                }
            }
            let all = inv.list(&[]).unwrap();
            assert_eq!(all.len(), 341, "{location:?}");
            for (n, s) in (0..).zip(&all) {
                assert_eq!(s.first_seen_ms, 1_000, "{s:?}");
                let (labels, last) = if n % 2 == 0 {
                    ("v=3", 3_500 + n)
                } else {
                    ("v=1", 4_000 + n)
                };
                assert_eq!(
                    (s.labels.to_string().as_str(), s.last_seen_ms),
                    (labels, last)
                );
            }
        }
    }

    /// A flush that fails keeps its writes, merged under those noted since, for the next one.
    #[test]
    fn a_failed_flush_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for location in crate::db::testing::locations(dir.path()) {
            let inv = Inventory::new(location.connect().unwrap());
            inv.connected(store("a", &["v=1"], 1_000));
            inv.flush().unwrap();
            let other = location.connect().unwrap();
            other
                .execute("ALTER TABLE stores RENAME TO stores_away", args![])
                .unwrap();
            inv.connected(store("b", &["v=1"], 2_000));
            inv.left(&id("a"), 2_500);
            let err = inv.flush().unwrap_err();
            assert!(format!("{err:#}").contains("recording 2 stores"), "{err:#}");
            inv.connected(store("b", &["v=2"], 3_000));
            other
                .execute("ALTER TABLE stores_away RENAME TO stores", args![])
                .unwrap();
            let all = inv.list(&[]).unwrap();
            let seen: Vec<_> = all
                .iter()
                .map(|s| {
                    (
                        s.client_id.as_str(),
                        s.labels.to_string(),
                        s.first_seen_ms,
                        s.last_seen_ms,
                    )
                })
                .collect();
            assert_eq!(
                seen,
                [
                    ("a", "v=1".into(), 1_000, 2_500),
                    ("b", "v=2".into(), 2_000, 3_000)
                ],
                "{location:?}"
            );
        }
    }

    /// A hello's `written` returns once a flush has written it, not before; a failed flush
    /// does not release it, the next good one does.
    #[tokio::test]
    async fn a_hello_is_written_before_its_session_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        for location in crate::db::testing::locations(dir.path()) {
            let inv = Inventory::new(location.connect().unwrap());
            let written = |r: Recorded| {
                let mut f = Box::pin(r.written());
                async move {
                    tokio::time::timeout(std::time::Duration::from_millis(50), &mut f)
                        .await
                        .is_ok()
                }
            };
            let first = inv.connected(store("a", &[], 1_000));
            let again = inv.connected(store("a", &[], 1_000));
            assert!(!written(first).await, "not flushed yet");
            let other = location.connect().unwrap();
            other
                .execute("ALTER TABLE stores RENAME TO stores_away", args![])
                .unwrap();
            inv.flush().unwrap_err();
            let after_failure = inv.connected(store("b", &[], 2_000));
            other
                .execute("ALTER TABLE stores_away RENAME TO stores", args![])
                .unwrap();
            inv.flush().unwrap();
            assert!(written(again).await, "{location:?}");
            assert!(written(after_failure).await);
            assert_eq!(inv.list(&[]).unwrap().len(), 2);
        }
    }

    #[test]
    fn merging_keeps_the_newest_hello_and_the_widest_contact() {
        let hello = |labels: &[&str], first, last| {
            let mut s = store("a", labels, first);
            s.last_seen_ms = last;
            Write::Hello(s)
        };
        let old = hello(&["v=1"], 1_000, 1_000);
        assert_eq!(
            old.clone().then(Write::Left(900)),
            hello(&["v=1"], 1_000, 1_000)
        );
        assert_eq!(
            Write::Left(1_500).then(old.clone()),
            hello(&["v=1"], 1_000, 1_500)
        );
        assert_eq!(
            old.then(hello(&["v=2"], 2_000, 2_000)),
            hello(&["v=2"], 1_000, 2_000)
        );
        assert_eq!(Write::Left(5).then(Write::Left(3)), Write::Left(5));
    }
}
