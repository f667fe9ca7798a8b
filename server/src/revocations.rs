//! Per-client token revocation: every agent token of a client issued before a recorded instant is
//! refused. Revoking one store does not disturb the rest of the fleet, and no secret rotates.
//!
//! The list is small (one entry per revoked client) and kept as JSON in the data directory,
//! written atomically, so it survives restarts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use shared::ClientId;

#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    /// Client id to the first `iat` (unix seconds) still accepted.
    not_before: Mutex<HashMap<ClientId, u64>>,
}

impl Revocations {
    /// Loads the list from `path`; a missing file is an empty list, a corrupt one is an error
    /// (starting with revocations silently dropped would re-admit revoked stores).
    pub fn load(path: PathBuf) -> anyhow::Result<Self> {
        let not_before = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<HashMap<ClientId, u64>>(&bytes)
                .with_context(|| format!("{} is not a valid revocation list", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self {
            path,
            not_before: Mutex::new(not_before),
        })
    }

    pub fn is_revoked(&self, client_id: &ClientId, issued_at: u64) -> bool {
        self.lock()
            .get(client_id)
            .is_some_and(|&not_before| issued_at < not_before)
    }

    /// Refuses every token of `client_id` issued up to now, and persists that. Returns the first
    /// `iat` accepted again: the next whole second, so a token minted in the same second as the
    /// revocation is refused too.
    ///
    /// One revocation at a time: the lock is held while the file is written, so two at once
    /// cannot interleave their writes. Nothing changes in memory unless the file was written
    /// (a full disk is an error, not a revocation that a restart forgets).
    pub fn revoke(&self, client_id: &ClientId) -> anyhow::Result<u64> {
        let not_before = shared::auth::unix_now() + 1;
        let mut map = self.lock();
        let mut next = map.clone();
        next.insert(client_id.clone(), not_before);
        self.persist(&next)?;
        *map = next;
        Ok(not_before)
    }

    /// Writes `map` atomically: a temporary file beside the list, fsync, rename, fsync of the
    /// directory.
    fn persist(&self, map: &HashMap<ClientId, u64>) -> anyhow::Result<()> {
        use std::io::Write;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".revocations.")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        tmp.write_all(&serde_json::to_vec_pretty(map)?)
            .and_then(|()| tmp.as_file().sync_all())
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        tmp.persist(&self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, u64>> {
        self.not_before.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_persists_and_spares_newer_tokens() {
        let dir = std::env::temp_dir().join(format!("backhaul-revocations-{}", std::process::id()));
        let path = dir.join("revocations.json");
        let _ = std::fs::remove_file(&path);
        let id = ClientId::parse("store-1").unwrap();
        let other = ClientId::parse("store-2").unwrap();
        let revs = Revocations::load(path.clone()).unwrap();
        let now = shared::auth::unix_now();
        assert!(!revs.is_revoked(&id, now));
        let nb = revs.revoke(&id).unwrap();
        assert!(revs.is_revoked(&id, now));
        assert!(!revs.is_revoked(&id, nb));
        assert!(!revs.is_revoked(&other, now));

        let reloaded = Revocations::load(path.clone()).unwrap();
        assert!(reloaded.is_revoked(&id, now));

        std::fs::write(&path, b"{not json").unwrap();
        assert!(Revocations::load(path.clone()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_revocations_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.json");
        let revs = std::sync::Arc::new(Revocations::load(path.clone()).unwrap());
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
        let reloaded = Revocations::load(path).unwrap();
        assert_eq!(reloaded.lock().len(), 80);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }

    #[test]
    fn a_revocation_that_cannot_be_saved_changes_nothing() {
        // Nothing can be created in /proc, as on a full disk nothing can be written.
        let revs = Revocations::load("/proc/backhaul-test/revocations.json".into()).unwrap();
        let id = ClientId::parse("store-1").unwrap();
        assert!(revs.revoke(&id).is_err());
        assert!(!revs.is_revoked(&id, shared::auth::unix_now()));
    }
}
