//! The store inventory: every agent the server has ever seen, connected now or not, with its
//! labels and versions, persisted in the server's database. A store is recorded when it says
//! `hello` and stamped again when it leaves; `GET /clients?all=true` lists it together with the
//! live registry.

use anyhow::Context;
use shared::ClientId;
use shared::labels::{Label, Labels};

use crate::args;
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
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// A store said `hello`: its labels and versions now, first seen kept from before.
    pub fn connected(&self, store: &Store) -> anyhow::Result<()> {
        self.db
            .execute(
                "INSERT INTO stores (client_id, labels, agent_version, protocol_version,
                                     first_seen_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (client_id) DO UPDATE SET labels = ?2, agent_version = ?3,
                     protocol_version = ?4, last_seen_ms = ?6",
                args![
                    store.client_id.as_str(),
                    serde_json::to_string(&store.labels)?,
                    store.agent_version.as_str(),
                    store.protocol_version,
                    store.first_seen_ms,
                    store.last_seen_ms
                ],
            )
            .context("recording a store in the inventory")?;
        Ok(())
    }

    /// A store's connection ended; it was last heard from at `last_seen_ms`.
    pub fn left(&self, client_id: &ClientId, last_seen_ms: i64) -> anyhow::Result<()> {
        self.db.execute(
            "UPDATE stores SET last_seen_ms = ?2 WHERE client_id = ?1 AND last_seen_ms < ?2",
            args![client_id.as_str(), last_seen_ms],
        )?;
        Ok(())
    }

    /// Every store whose labels include all of `wanted`, by client id. A row that no longer
    /// reads (it cannot happen short of editing the database) is skipped and logged.
    pub fn list(&self, wanted: &[Label]) -> anyhow::Result<Vec<Store>> {
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
        for location in crate::db::testing::locations(dir.path()) {
            let inv = Inventory::new(location.connect().unwrap());
            inv.connected(&store("a", &["region=north", "brand=x"], 1_000))
                .unwrap();
            inv.connected(&store("b", &["region=south"], 2_000))
                .unwrap();
            // Seen again, with new labels: first seen stays.
            inv.connected(&store("a", &["region=north"], 3_000))
                .unwrap();
            inv.left(&ClientId::parse("a").unwrap(), 4_000).unwrap();
            inv.left(&ClientId::parse("b").unwrap(), 1_500).unwrap();

            let inv = Inventory::new(location.connect().unwrap());
            let all = inv.list(&[]).unwrap();
            assert_eq!(all.len(), 2, "{location:?}");
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
}
