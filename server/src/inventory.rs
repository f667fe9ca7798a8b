//! The store inventory: every agent the server has ever seen, connected now or not, with its
//! labels and versions, persisted in the server's database. A store is recorded when it says
//! `hello` and stamped again when it leaves; `GET /clients?all=true` lists it together with the
//! live registry.

use anyhow::Context;
use rusqlite::{Connection, params};
use shared::ClientId;
use shared::labels::{Label, Labels};

use crate::db::Db;

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

pub struct Inventory {
    db: Db,
}

impl Inventory {
    pub fn new(conn: Connection) -> Self {
        Self { db: Db::new(conn) }
    }

    /// A store said `hello`: its labels and versions now, first seen kept from before.
    pub fn connected(&self, store: &Store) -> anyhow::Result<()> {
        self.db
            .lock()
            .prepare_cached(
                "INSERT INTO stores (client_id, labels, agent_version, protocol_version,
                                     first_seen_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (client_id) DO UPDATE SET labels = ?2, agent_version = ?3,
                     protocol_version = ?4, last_seen_ms = ?6",
            )?
            .execute(params![
                store.client_id.as_str(),
                serde_json::to_string(&store.labels)?,
                store.agent_version,
                store.protocol_version,
                store.first_seen_ms,
                store.last_seen_ms
            ])
            .context("recording a store in the inventory")?;
        Ok(())
    }

    /// A store's connection ended; it was last heard from at `last_seen_ms`.
    pub fn left(&self, client_id: &ClientId, last_seen_ms: i64) -> anyhow::Result<()> {
        self.db
            .lock()
            .prepare_cached(
                "UPDATE stores SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE client_id = ?1",
            )?
            .execute(params![client_id.as_str(), last_seen_ms])?;
        Ok(())
    }

    /// Every store whose labels include all of `wanted`, by client id. A row that no longer
    /// reads (it cannot happen short of editing the database) is skipped and logged.
    pub fn list(&self, wanted: &[Label]) -> anyhow::Result<Vec<Store>> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT client_id, labels, agent_version, protocol_version, first_seen_ms,
                    last_seen_ms
             FROM stores ORDER BY client_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut stores = Vec::new();
        for row in rows {
            let (id, labels, agent_version, protocol_version, first, last) = row?;
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

    #[test]
    fn stores_are_remembered_and_filtered_by_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let inv = Inventory::new(crate::db::open(&path).unwrap());
        inv.connected(&store("a", &["region=north", "brand=x"], 1_000))
            .unwrap();
        inv.connected(&store("b", &["region=south"], 2_000))
            .unwrap();
        // Seen again, with new labels: first seen stays.
        inv.connected(&store("a", &["region=north"], 3_000))
            .unwrap();
        inv.left(&ClientId::parse("a").unwrap(), 4_000).unwrap();
        inv.left(&ClientId::parse("b").unwrap(), 1_500).unwrap();

        let inv = Inventory::new(crate::db::open(&path).unwrap());
        let all = inv.list(&[]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].first_seen_ms, all[0].last_seen_ms), (1_000, 4_000));
        assert_eq!(all[0].labels.to_string(), "region=north");
        assert_eq!(all[1].last_seen_ms, 2_000, "last seen never goes back");
        let north = inv.list(&["region=north".parse().unwrap()]).unwrap();
        assert_eq!(north.len(), 1);
        assert_eq!(north[0].client_id.as_str(), "a");
        let none = inv
            .list(&["region=north".parse().unwrap(), "brand=x".parse().unwrap()])
            .unwrap();
        assert!(none.is_empty());
    }
}
