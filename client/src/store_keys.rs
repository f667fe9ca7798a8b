//! The store keys of encrypted shares ([`shared::sealed`]): one per set of recipients, made on
//! first use and kept in `KEY_DIR` (a directory of mode 0700, files of mode 0600), so that a
//! file sealed again (a resume after a kill, the next fetch) seals to the same bytes.
//!
//! A key file that is missing or unreadable is replaced by a new key: objects sealed before
//! still open (each carries its own header), and the next fetch sends every part once.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::sealed::{Recipient, StoreKey};

use crate::uploader::UploadError;

/// One load or creation at a time, so two uploads of one share never make two keys.
static LOCK: Mutex<()> = Mutex::new(());

/// The store key for `recipients` in `dir`, made and saved if there is none yet.
pub fn load_or_create(dir: &Path, recipients: &[Recipient]) -> Result<StoreKey, UploadError> {
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = key_path(dir, recipients);
    match std::fs::read_to_string(&path) {
        Ok(text) => match StoreKey::from_json(&text) {
            Ok(key) if key.is_for(recipients) => return Ok(key),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "store key for other recipients; replacing it")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable store key; replacing it")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(key_error(&path, &e)),
    }
    let key = StoreKey::generate(recipients)
        .map_err(|e| UploadError::new(ErrorCode::FileReadError, e.to_string()))?;
    save(dir, &path, &key).map_err(|e| key_error(&path, &e))?;
    tracing::info!(path = %path.display(), recipients = recipients.len(), "made a store key");
    Ok(key)
}

/// `store-key-<first 16 hex digits of the SHA-256 of the sorted recipients>.json`.
fn key_path(dir: &Path, recipients: &[Recipient]) -> PathBuf {
    let mut sorted: Vec<&str> = recipients.iter().map(Recipient::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let id = hex::encode(Sha256::digest(sorted.join("\n")));
    dir.join(format!("store-key-{}.json", &id[..16]))
}

/// Writes the key under a temporary name, syncs it and renames it into place.
fn save(dir: &Path, path: &Path, key: &StoreKey) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(key.to_json().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn key_error(path: &Path, e: &std::io::Error) -> UploadError {
    UploadError::new(
        ErrorCode::FileReadError,
        format!("the store key {}: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let (_, a) = shared::sealed::Identities::generate();
        let (_, b) = shared::sealed::Identities::generate();
        let first = load_or_create(&keys, &[a.clone(), b.clone()]).unwrap();
        let again = load_or_create(&keys, &[b.clone(), a.clone()]).unwrap();
        assert_eq!(first.to_json(), again.to_json());
        let path = key_path(&keys, &[a.clone(), b]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Other recipients get another key; a damaged file is replaced.
        let other = load_or_create(&keys, std::slice::from_ref(&a)).unwrap();
        assert_ne!(other.to_json(), first.to_json());
        std::fs::write(key_path(&keys, std::slice::from_ref(&a)), "{").unwrap();
        let fresh = load_or_create(&keys, std::slice::from_ref(&a)).unwrap();
        assert_ne!(fresh.to_json(), other.to_json());
    }
}
