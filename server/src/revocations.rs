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
    pub fn revoke(&self, client_id: &ClientId) -> anyhow::Result<u64> {
        let not_before = shared::auth::unix_now() + 1;
        let snapshot = {
            let mut map = self.lock();
            map.insert(client_id.clone(), not_before);
            serde_json::to_vec_pretty(&*map)?
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, &snapshot).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        Ok(not_before)
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
}
