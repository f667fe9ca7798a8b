//! The signing keys on disk: one JSON file, mode 0600, that never leaves the server host. The
//! server creates it with one Ed25519 key on first start (`TOKEN_KEY_FILE`, by default
//! `token-keys.json` in `DATA_DIR`); a rotation adds a key and makes it active, a retirement
//! removes one. Every change is written atomically (a temporary file, fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use shared::auth::TokenKeys;

const FORMAT: u32 = 1;
const ALGORITHM: &str = "EdDSA";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: u32,
    active: String,
    keys: Vec<StoredKey>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    kid: String,
    algorithm: String,
    /// Unix seconds.
    created_at: u64,
    /// The Ed25519 private key, PKCS#8, base64.
    private_key: String,
}

/// One signing key: what signs and verifies, and when it was made.
#[derive(Clone)]
pub struct SigningKey {
    pub keys: TokenKeys,
    pub created_at: u64,
    stored: StoredKey,
}

impl SigningKey {
    pub fn algorithm(&self) -> &str {
        &self.stored.algorithm
    }

    /// A new random key.
    fn generate() -> anyhow::Result<Self> {
        let pkcs8 = TokenKeys::generate_ed25519()?;
        Self::from_stored(StoredKey {
            kid: String::new(),
            algorithm: ALGORITHM.into(),
            created_at: shared::auth::unix_now(),
            private_key: B64.encode(&pkcs8),
        })
    }

    fn from_stored(mut stored: StoredKey) -> anyhow::Result<Self> {
        if stored.algorithm != ALGORITHM {
            bail!(
                "key {:?} is {}, not {ALGORITHM}",
                stored.kid,
                stored.algorithm
            );
        }
        let pkcs8 = B64
            .decode(&stored.private_key)
            .context("a private key is not base64")?;
        let keys = TokenKeys::ed25519(&pkcs8)?;
        let kid = keys.kid().unwrap_or_default().to_owned();
        if stored.kid.is_empty() {
            stored.kid = kid;
        } else if stored.kid != kid {
            bail!(
                "key {:?} does not match its key id (it is {kid})",
                stored.kid
            );
        }
        Ok(Self {
            keys,
            created_at: stored.created_at,
            stored,
        })
    }
}

/// The keys the server signs and verifies with: the active one and those kept for verification
/// until retired. Ordered by key id.
#[derive(Clone)]
pub struct KeySet {
    pub active: String,
    pub keys: BTreeMap<String, SigningKey>,
}

impl KeySet {
    pub fn active(&self) -> &SigningKey {
        // `load` and every change keep the active key in the map.
        &self.keys[&self.active]
    }

    /// This set with a new key, made active.
    pub fn rotated(&self) -> anyhow::Result<Self> {
        let key = SigningKey::generate()?;
        let mut next = self.clone();
        next.active = key.stored.kid.clone();
        next.keys.insert(key.stored.kid.clone(), key);
        Ok(next)
    }

    /// This set without `kid` (not the active key: the caller checks).
    pub fn without(&self, kid: &str) -> Self {
        let mut next = self.clone();
        next.keys.remove(kid);
        next
    }
}

/// Where the keys live.
#[derive(Debug, Clone)]
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the keys, or creates the file with one new key if there is none. Two processes
    /// starting at once (the server and `server token issue`) end up with the same file: the one
    /// that loses the race to create it reads the winner's.
    pub fn load_or_create(&self) -> anyhow::Result<KeySet> {
        match self.load() {
            Ok(Some(set)) => return Ok(set),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let key = SigningKey::generate()?;
        let kid = key.stored.kid.clone();
        let set = KeySet {
            active: kid.clone(),
            keys: BTreeMap::from([(kid.clone(), key)]),
        };
        match self.write(&set, false) {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), kid, "created a token signing key");
                Ok(set)
            }
            Err(e) if is_already_exists(&e) => self
                .load()?
                .with_context(|| format!("{} vanished", self.path.display())),
            Err(e) => Err(e),
        }
    }

    /// `None` when there is no file yet.
    fn load(&self) -> anyhow::Result<Option<KeySet>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        self.check_mode()?;
        let doc: Document = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid key file", self.path.display()))?;
        if doc.format != FORMAT {
            bail!(
                "{} has format {}; this release reads {FORMAT}",
                self.path.display(),
                doc.format
            );
        }
        let mut keys = BTreeMap::new();
        for stored in doc.keys {
            let key = SigningKey::from_stored(stored)
                .with_context(|| format!("in {}", self.path.display()))?;
            keys.insert(key.stored.kid.clone(), key);
        }
        if !keys.contains_key(&doc.active) {
            bail!(
                "{}: the active key {:?} is not in the file",
                self.path.display(),
                doc.active
            );
        }
        Ok(Some(KeySet {
            active: doc.active,
            keys,
        }))
    }

    /// A key file others can read is refused, as ssh refuses such a private key.
    fn check_mode(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {:o}); it holds the token signing keys: chmod 600 it",
                self.path.display(),
                mode & 0o777
            );
        }
        Ok(())
    }

    /// Saves `set`, replacing the file.
    pub fn save(&self, set: &KeySet) -> anyhow::Result<()> {
        self.write(set, true)
    }

    /// Writes `set` atomically with mode 0600; with `replace` false, fails if a file exists.
    fn write(&self, set: &KeySet, replace: bool) -> anyhow::Result<()> {
        use std::io::Write;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let doc = Document {
            format: FORMAT,
            active: set.active.clone(),
            keys: set.keys.values().map(|k| k.stored.clone()).collect(),
        };
        // tempfile creates its files with mode 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".token-keys.")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        tmp.write_all(&serde_json::to_vec_pretty(&doc)?)
            .and_then(|()| tmp.as_file().sync_all())
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        if replace {
            tmp.persist(&self.path).map_err(|e| e.error)
        } else {
            tmp.persist_noclobber(&self.path).map_err(|e| e.error)
        }
        .with_context(|| format!("writing {}", self.path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
        Ok(())
    }
}

fn is_already_exists(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::auth::Role;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn a_key_is_created_once_private_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::new(dir.path().join("keys").join("token-keys.json"));
        let first = file.load_or_create().unwrap();
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = file.load_or_create().unwrap();
        assert_eq!(again.active, first.active, "the same key on the next start");

        let token = first
            .active()
            .keys
            .issue("alice", Role::Admin, Duration::from_secs(60))
            .unwrap();
        let rotated = first.rotated().unwrap();
        assert_ne!(rotated.active, first.active);
        file.save(&rotated).unwrap();
        let loaded = file.load_or_create().unwrap();
        assert_eq!(loaded.active, rotated.active);
        assert!(loaded.keys[&first.active].keys.verify(&token).is_ok());
        let retired = loaded.without(&first.active);
        file.save(&retired).unwrap();
        assert_eq!(file.load_or_create().unwrap().keys.len(), 1);
        let names: Vec<_> = std::fs::read_dir(file.path().parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }

    #[test]
    fn a_readable_or_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::new(dir.path().join("token-keys.json"));
        file.load_or_create().unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = file.load_or_create().err().unwrap();
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");

        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut wrong_kid = doc.clone();
        wrong_kid["keys"][0]["kid"] = "0000000000000000".into();
        let mut no_active = doc.clone();
        no_active["active"] = "ffffffffffffffff".into();
        for bad in [
            "{not json".to_owned(),
            wrong_kid.to_string(),
            no_active.to_string(),
        ] {
            std::fs::write(file.path(), bad).unwrap();
            assert!(file.load_or_create().is_err());
        }
    }
}
