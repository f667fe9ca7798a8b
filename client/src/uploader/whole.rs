//! The SHA-256 of the whole file, computed while the parts upload rather than before the first
//! byte moves. It has to read the file in order, which the parts (sent several at a time) do
//! not, so it reads it once more, usually from the page cache, on a thread of its own.
//!
//! The same pass checks each part's CRC64NVME against the one the agent declared (and storage
//! enforces): the SHA-256 it reports is of the very bytes that were stored, and a file that
//! changed since it was described is `FILE_CHANGED`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::hash::{Crc64Nvme, Crc64NvmeHasher};

use super::UploadError;
use super::file::{Snapshot, changed_while_hashing, io_error};
use super::hashing::HASH_CHUNK;
use super::pacing::DiskPacer;

/// The file as described: what the whole-file pass checks its bytes against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub snapshot: Snapshot,
    pub part_size: u64,
    pub part_crc64nvme: Arc<[Crc64Nvme]>,
}

/// SHA-256s this agent computed, by path, with the layout they were computed over, kept across
/// connections: a file described again unchanged (after the server restarted mid-completion,
/// say) reports its SHA-256 at once, since the server may not have heard it. One per path.
#[derive(Debug, Clone, Default)]
pub struct KnownHashes(Arc<std::sync::Mutex<HashMap<PathBuf, (Layout, String)>>>);

impl KnownHashes {
    pub fn remember(&self, path: PathBuf, layout: Layout, sha256: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path, (layout, sha256));
    }

    /// The SHA-256 of `path` if it was computed over this very layout.
    pub fn lookup(&self, path: &Path, layout: &Layout) -> Option<String> {
        let known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(path)
            .filter(|(l, _)| l == layout)
            .map(|(_, sha)| sha.clone())
    }
}

/// A running whole-file pass. Dropping it stops the pass at its next chunk.
pub struct WholeFile {
    task: tokio::task::JoinHandle<Result<String, UploadError>>,
    stop: Arc<AtomicBool>,
}

impl WholeFile {
    /// Starts the pass on a thread of its own; `pacer` caps its reads.
    pub fn start(path: PathBuf, layout: Layout, pacer: Option<Arc<DiskPacer>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                sha256_checked(&path, &layout, pacer.as_deref(), &stop)
            })
        };
        Self { task, stop }
    }

    /// Waits for the pass: the lowercase hex SHA-256 of the file.
    pub async fn finish(mut self) -> Result<String, UploadError> {
        (&mut self.task).await.map_err(|e| {
            UploadError::new(
                ErrorCode::FileReadError,
                format!("hashing the file failed: {e}"),
            )
        })?
    }
}

impl Drop for WholeFile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sha256_checked(
    path: &Path,
    layout: &Layout,
    pacer: Option<&DiskPacer>,
    stop: &AtomicBool,
) -> Result<String, UploadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let size = layout.snapshot.size;
    for (index, declared) in layout.part_crc64nvme.iter().enumerate() {
        let offset = index as u64 * layout.part_size;
        let mut left = size.saturating_sub(offset).min(layout.part_size);
        let mut crc = Crc64NvmeHasher::default();
        while left > 0 {
            if stop.load(Ordering::Relaxed) {
                return Err(UploadError::new(ErrorCode::Cancelled, "hashing stopped"));
            }
            let want = left.min(buf.len() as u64) as usize;
            if let Some(pacer) = pacer {
                pacer.acquire(want);
            }
            let n = file
                .read(&mut buf[..want])
                .map_err(|e| io_error(path, &e))?;
            if n == 0 {
                return Err(changed_while_hashing(path));
            }
            whole.update(&buf[..n]);
            crc.update(&buf[..n]);
            left -= n as u64;
        }
        if crc.finish() != *declared {
            return Err(UploadError::new(
                ErrorCode::FileChanged,
                format!(
                    "{}: part {} changed since the file was described",
                    path.display(),
                    index + 1
                ),
            ));
        }
    }
    // Longer than described: changed too.
    if file.read(&mut buf[..1]).map_err(|e| io_error(path, &e))? != 0 {
        return Err(changed_while_hashing(path));
    }
    Ok(hex::encode(whole.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PART: u64 = 5 * 1024 * 1024;

    fn layout_of(path: &Path, data: &[u8]) -> Layout {
        let meta = std::fs::metadata(path).unwrap();
        Layout {
            snapshot: Snapshot::of(&meta),
            part_size: PART,
            part_crc64nvme: data.chunks(PART as usize).map(Crc64Nvme::of).collect(),
        }
    }

    #[tokio::test]
    async fn the_whole_file_is_hashed_and_its_parts_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..2 * PART + 7).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let layout = layout_of(&path, &data);
        let sha = WholeFile::start(path.clone(), layout.clone(), None)
            .finish()
            .await
            .unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));

        // One byte of part 2 changed after the file was described.
        let mut changed = data.clone();
        changed[PART as usize + 3] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        let err = WholeFile::start(path.clone(), layout.clone(), None)
            .finish()
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::FileChanged);
        assert!(err.message.contains("part 2"), "{}", err.message);

        // Grown by a byte.
        let mut longer = data.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let err = WholeFile::start(path, layout, None)
            .finish()
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::FileChanged);
    }
}
