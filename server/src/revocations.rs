//! Per-client token revocation: every agent token of a client issued before a recorded instant is
//! refused. Revoking one store does not disturb the rest of the fleet, and no secret rotates.
//!
//! The list is small (one entry per revoked client) and lives in the server's database (the
//! `store_revocations` table), held in memory for the checks. Releases before it kept the list
//! as `revocations.json` in the data directory: a start imports that file once and renames it
//! `revocations.json.imported`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use shared::ClientId;

use crate::args;
use crate::db::Db;

pub struct Revocations {
    db: Db,
    /// Client id to the first `iat` (unix seconds) still accepted.
    not_before: Mutex<HashMap<ClientId, u64>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("clients", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// Loads the list from the database, after importing `legacy` (the JSON list of earlier
    /// releases) when it is there. A corrupt legacy file is an error: starting with revocations
    /// silently dropped would re-admit revoked stores.
    pub fn open(db: Db, legacy: &Path) -> anyhow::Result<Self> {
        let revocations = Self {
            db,
            not_before: Mutex::new(HashMap::new()),
        };
        revocations.import(legacy)?;
        let mut map = HashMap::new();
        for row in revocations.db.query(
            "SELECT client_id, not_before FROM store_revocations",
            args![],
        )? {
            let client = ClientId::parse(&row.text(0)?).context("a revoked client id")?;
            map.insert(client, u64::try_from(row.int(1)?)?);
        }
        *revocations.lock() = map;
        Ok(revocations)
    }

    fn import(&self, legacy: &Path) -> anyhow::Result<()> {
        let bytes = match std::fs::read(legacy) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", legacy.display())),
        };
        let map = serde_json::from_slice::<HashMap<ClientId, u64>>(&bytes)
            .with_context(|| format!("{} is not a valid revocation list", legacy.display()))?;
        for (client, not_before) in &map {
            self.record(client, *not_before)?;
        }
        let done = legacy.with_extension("json.imported");
        std::fs::rename(legacy, &done)
            .with_context(|| format!("renaming {} after importing it", legacy.display()))?;
        tracing::info!(clients = map.len(), from = %legacy.display(), "revocations imported");
        Ok(())
    }

    /// Stores `not_before` for `client`, keeping a later one already there.
    fn record(&self, client: &ClientId, not_before: u64) -> anyhow::Result<()> {
        self.db
            .execute(
                "INSERT INTO store_revocations (client_id, not_before) VALUES (?1, ?2)
                 ON CONFLICT (client_id) DO UPDATE SET not_before = ?2
                     WHERE store_revocations.not_before < ?2",
                args![client.as_str(), i64::try_from(not_before)?],
            )
            .context("recording a revocation")?;
        Ok(())
    }

    pub fn is_revoked(&self, client_id: &ClientId, issued_at: u64) -> bool {
        self.lock()
            .get(client_id)
            .is_some_and(|&not_before| issued_at < not_before)
    }

    /// Refuses every token of `client_id` issued up to now, and persists that. Returns the first
    /// `iat` accepted again: the next whole second, so a token minted in the same second as the
    /// revocation is refused too. Nothing changes in memory unless the database took it.
    pub fn revoke(&self, client_id: &ClientId) -> anyhow::Result<u64> {
        let not_before = shared::auth::unix_now() + 1;
        self.record(client_id, not_before)?;
        let mut map = self.lock();
        let entry = map.entry(client_id.clone()).or_insert(not_before);
        *entry = (*entry).max(not_before);
        Ok(not_before)
    }

    /// A revocation another replica saved: applied in memory only.
    pub fn note(&self, client_id: &ClientId, not_before: u64) {
        let mut map = self.lock();
        let entry = map.entry(client_id.clone()).or_insert(not_before);
        *entry = (*entry).max(not_before);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, u64>> {
        self.not_before.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::locations;

    #[test]
    fn revocation_persists_and_spares_newer_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("revocations.json");
        for location in locations(dir.path()) {
            let id = ClientId::parse("store-1").unwrap();
            let other = ClientId::parse("store-2").unwrap();
            let revs = Revocations::open(location.connect().unwrap(), &legacy).unwrap();
            let now = shared::auth::unix_now();
            assert!(!revs.is_revoked(&id, now));
            let nb = revs.revoke(&id).unwrap();
            assert!(revs.is_revoked(&id, now));
            assert!(!revs.is_revoked(&id, nb));
            assert!(!revs.is_revoked(&other, now));

            let reloaded = Revocations::open(location.connect().unwrap(), &legacy).unwrap();
            assert!(reloaded.is_revoked(&id, now), "{location:?}");
        }
    }

    #[test]
    fn the_list_of_an_earlier_release_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("revocations.json");
        for location in locations(dir.path()) {
            std::fs::write(&legacy, br#"{"store-1": 2000000000, "store-2": 5}"#).unwrap();
            let revs = Revocations::open(location.connect().unwrap(), &legacy).unwrap();
            let one = ClientId::parse("store-1").unwrap();
            assert!(revs.is_revoked(&one, 1_999_999_999), "{location:?}");
            assert!(!revs.is_revoked(&ClientId::parse("store-2").unwrap(), 5));
            assert!(!legacy.exists(), "the file is renamed once imported");
            assert!(dir.path().join("revocations.json.imported").exists());
            // A revocation made since is kept over an older one from the file.
            let again = Revocations::open(location.connect().unwrap(), &legacy).unwrap();
            assert!(again.is_revoked(&one, 1_999_999_999));

            std::fs::write(&legacy, b"{not json").unwrap();
            let err = Revocations::open(location.connect().unwrap(), &legacy).unwrap_err();
            assert!(format!("{err:#}").contains("not a valid revocation list"));
            std::fs::remove_file(&legacy).unwrap();
        }
    }

    #[test]
    fn concurrent_revocations_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("revocations.json");
        for location in locations(dir.path()) {
            let revs = std::sync::Arc::new(
                Revocations::open(location.connect().unwrap(), &legacy).unwrap(),
            );
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let revs = revs.clone();
                    std::thread::spawn(move || {
                        for j in 0..10 {
                            let id = ClientId::parse(&format!("store-{i}-{j}")).unwrap();
                            revs.revoke(&id).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let reloaded = Revocations::open(location.connect().unwrap(), &legacy).unwrap();
            assert_eq!(reloaded.lock().len(), 80, "{location:?}");
        }
    }

    #[test]
    fn a_revocation_that_cannot_be_saved_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backhaul.db");
        let location = crate::db::Location::Sqlite(path.clone());
        let revs =
            Revocations::open(location.connect().unwrap(), &dir.path().join("r.json")).unwrap();
        // The table is gone under it, as a database that refuses writes.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE store_revocations")
            .unwrap();
        let id = ClientId::parse("store-1").unwrap();
        assert!(revs.revoke(&id).is_err());
        assert!(!revs.is_revoked(&id, shared::auth::unix_now()));
    }
}
