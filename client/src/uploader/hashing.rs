//! Describing a shared file for the server: its size, and the CRC64NVME and manifest digest
//! ([`super::digest`]) of each part, on `HASH_THREADS` threads. CRC64NVME runs at memory speed
//! and SHA-256 on the CPU's SHA extensions where it has them; the SHA-256 of the whole is
//! computed while the parts upload ([`super::whole`]).
//! A file that is to be compressed is encoded instead ([`super::encode`]), which checksums the
//! compressed parts and hashes the plaintext in the same pass.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::encoding::Compression;
use shared::hash::{Crc64Nvme, Crc64NvmeHasher};
use shared::protocol::{MIN_PART_SIZE, plan_parts};
use shared::{ErrorCode, FileName};

use super::UploadError;
use super::digest::PartDigester;
use super::encode::{
    EncodeJob, Encoded, compression_pays, encode, hint_boundaries, target_part_size,
};
use super::file::{Snapshot, changed_while_hashing, io_error, stored_name};
use super::pacing::DiskPacer;

/// A shared file, described and checksummed for the server.
#[derive(Debug, Clone)]
pub struct Described {
    pub file_name: FileName,
    pub snapshot: Snapshot,
    /// The part size of the layout; for an encoded file, the stored size its parts aim at.
    pub part_size: u64,
    /// CRC64NVME of each part's stored bytes, in part order.
    pub part_crc64nvme: Vec<Crc64Nvme>,
    /// The manifest digest of each part's plaintext, in part order.
    pub part_digests: Vec<String>,
    /// The compressed parts, when the file is to be stored compressed.
    pub encoded: Option<Arc<Encoded>>,
}

/// How to describe a file: the agent's limits, and what compression applies.
#[derive(Debug, Clone)]
pub struct DescribeSettings {
    pub max_size: u64,
    pub min_part_size: u64,
    pub threads: usize,
    pub pacer: Option<Arc<DiskPacer>>,
    /// What the operator asked for over what the share is configured with.
    pub compression: Compression,
    pub zstd_level: i32,
    /// Where encoded parts wait to be sent (in unnamed files).
    pub spool_dir: std::path::PathBuf,
    /// The plaintext part lengths of the share's previous object, when it was compressed: an
    /// encoded layout follows them where it can.
    pub layout_hint: Vec<u64>,
    /// The store key of an encrypted share: the file is then always encoded, every block
    /// sealed, whatever compression applies.
    pub seal: Option<Arc<shared::sealed::StoreKey>>,
}

/// Read size while hashing, for the describe threads and the whole-file pass. 1 MiB reads were
/// no faster (describe 119-130 against 113-118 ms per GiB, side by side), and glibc's malloc
/// keeps what they leave in each thread's arena: an idle agent held 21.7-25.1 MiB after twelve
/// 100 MiB uploads with them, 18.4-19.9 MiB with these (`scripts/bench-agent-memory.sh`,
/// BENCHMARKS.md).
pub(super) const HASH_CHUNK: usize = 256 * 1024;

#[cfg(test)]
impl DescribeSettings {
    /// Uncompressed, unpaced: the plain layout.
    pub(crate) fn for_test(max_size: u64, min_part_size: u64, threads: usize) -> Self {
        Self {
            max_size,
            min_part_size,
            threads,
            pacer: None,
            compression: Compression::None,
            zstd_level: 3,
            spool_dir: std::env::temp_dir(),
            layout_hint: Vec::new(),
            seal: None,
        }
    }
}

/// Looks at a shared file and checksums it: its name as stored, its size and the CRC64NVME of
/// each part laid out by [`plan_parts`]. Errors carry the agent-side codes. A symbolic link is
/// refused: swapping a shared file for a link must not widen what is shared.
///
/// It runs on blocking threads, off the caller's task; dropping the future stops them at their
/// next read. `pacer` caps their reads together.
pub async fn describe_file(
    path: &Path,
    settings: &DescribeSettings,
) -> Result<Described, UploadError> {
    let max_size = settings.max_size;
    let link = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    if link.file_type().is_symlink() {
        return Err(UploadError::new(
            ErrorCode::FileNotShared,
            format!(
                "{} is a symbolic link; share the file itself",
                path.display()
            ),
        ));
    }
    if !link.is_file() {
        return Err(UploadError::new(
            ErrorCode::FileReadError,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if link.len() > max_size {
        return Err(UploadError::new(
            ErrorCode::FileTooLarge,
            format!(
                "{} has {} bytes, more than MAX_FILE_SIZE ({max_size})",
                path.display(),
                link.len()
            ),
        ));
    }
    let name = path
        .file_name()
        .map(|n| stored_name(&n.to_string_lossy()))
        .ok_or_else(|| UploadError::new(ErrorCode::InvalidFileName, "the path has no file name"))?;
    let owned = path.to_owned();
    let stop = StopOnDrop::default();
    let flag = stop.0.clone();
    let job = HashJob {
        settings: settings.clone(),
        stop: flag,
    };
    let hashed = tokio::task::spawn_blocking(move || hash_file(&owned, name, &job))
        .await
        .map_err(|e| UploadError::new(ErrorCode::FileReadError, format!("hashing failed: {e}")))?;
    drop(stop);
    hashed
}

/// Sets its flag when dropped: a describe whose future is dropped stops its threads.
#[derive(Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How to hash, and the flag that stops it.
struct HashJob {
    settings: DescribeSettings,
    stop: Arc<AtomicBool>,
}

fn hash_file(path: &Path, file_name: FileName, job: &HashJob) -> Result<Described, UploadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let before = Snapshot::of(&file.metadata().map_err(|e| io_error(path, &e))?);
    let settings = &job.settings;
    let too_large = || {
        UploadError::new(
            ErrorCode::FileTooLarge,
            format!("{} is larger than one S3 object may be", path.display()),
        )
    };
    let (part_size, parts) =
        plan_parts(before.size, settings.min_part_size).ok_or_else(too_large)?;
    let compress = match settings.compression {
        Compression::None => false,
        Compression::Zstd => true,
        Compression::Auto => compression_pays(&file, path, before.size)?,
    };
    let seal = settings.seal.as_deref();
    if compress || seal.is_some() {
        let overhead = seal.map_or(0, shared::sealed::StoreKey::overhead);
        let target = target_part_size(before.size, settings.min_part_size, overhead)
            .ok_or_else(too_large)?;
        let boundaries =
            hint_boundaries(&settings.layout_hint, before.size, MIN_PART_SIZE, overhead);
        let encoded = encode(
            &file,
            path,
            before.size,
            &settings.spool_dir,
            &EncodeJob {
                level: compress.then_some(settings.zstd_level),
                seal,
                threads: settings.threads.max(1),
                target,
                boundaries: &boundaries,
                min_part: MIN_PART_SIZE,
                pacer: settings.pacer.as_deref(),
                stop: &job.stop,
            },
        )?;
        let after = Snapshot::of(&file.metadata().map_err(|e| io_error(path, &e))?);
        if after != before {
            return Err(changed_while_hashing(path));
        }
        return Ok(Described {
            file_name,
            snapshot: before,
            part_size: target,
            part_crc64nvme: encoded.part_crc64nvme.clone(),
            part_digests: encoded.part_digests.clone(),
            encoded: Some(Arc::new(encoded)),
        });
    }
    let src = HashSource {
        file: &file,
        path,
        size: before.size,
        part_size,
        parts: parts as usize,
        pacer: settings.pacer.as_deref(),
        stop: &job.stop,
    };
    let (part_crc64nvme, part_digests) = src.checksum_parts(settings.threads.max(1))?;
    let after = Snapshot::of(&file.metadata().map_err(|e| io_error(path, &e))?);
    if after != before {
        return Err(changed_while_hashing(path));
    }
    Ok(Described {
        file_name,
        snapshot: before,
        part_size,
        part_crc64nvme,
        part_digests,
        encoded: None,
    })
}

/// The open file being hashed and its part layout. Reads are positioned (`pread`), so threads
/// can share the one descriptor.
struct HashSource<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    size: u64,
    part_size: u64,
    parts: usize,
    pacer: Option<&'a DiskPacer>,
    /// Set when the describe was abandoned.
    stop: &'a AtomicBool,
}

impl HashSource<'_> {
    /// Feeds `[offset, offset + len)` to `f` in [`HASH_CHUNK`] pieces. A file that ends early
    /// changed under the agent.
    fn read_range(
        &self,
        offset: u64,
        len: u64,
        buf: &mut [u8],
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), UploadError> {
        use std::os::unix::fs::FileExt;
        let mut done = 0u64;
        while done < len {
            if self.stop.load(Ordering::Relaxed) {
                return Err(UploadError::new(ErrorCode::Cancelled, "hashing stopped"));
            }
            let want = (len - done).min(buf.len() as u64) as usize;
            if let Some(pacer) = self.pacer {
                pacer.acquire(want);
            }
            let n = self
                .file
                .read_at(&mut buf[..want], offset + done)
                .map_err(|e| io_error(self.path, &e))?;
            if n == 0 {
                return Err(changed_while_hashing(self.path));
            }
            f(&buf[..n]);
            done += n as u64;
        }
        Ok(())
    }

    fn part(&self, index: usize) -> (u64, u64) {
        let offset = index as u64 * self.part_size;
        (offset, self.size.saturating_sub(offset).min(self.part_size))
    }

    /// `threads` threads take parts from a shared counter and checksum and digest them.
    fn checksum_parts(&self, threads: usize) -> Result<(Vec<Crc64Nvme>, Vec<String>), UploadError> {
        use std::sync::OnceLock;
        use std::sync::atomic::AtomicUsize;
        let next = AtomicUsize::new(0);
        let slots: Vec<OnceLock<(Crc64Nvme, String)>> =
            (0..self.parts).map(|_| OnceLock::new()).collect();
        let work = || -> Result<(), UploadError> {
            let mut buf = vec![0u8; HASH_CHUNK];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= self.parts {
                    return Ok(());
                }
                let (offset, len) = self.part(i);
                let mut crc = Crc64NvmeHasher::default();
                let mut digest = PartDigester::default();
                self.read_range(offset, len, &mut buf, |c| {
                    crc.update(c);
                    digest.update(c);
                })
                .inspect_err(|_| next.store(self.parts, Ordering::Relaxed))?;
                let _ = slots[i].set((crc.finish(), digest.finish()));
            }
        };
        on_threads(threads, work)?;
        slots
            .into_iter()
            .map(OnceLock::into_inner)
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.into_iter().unzip())
            .ok_or_else(|| changed_while_hashing(self.path))
    }
}

/// Runs `work` on `threads` threads, this one among them, and returns the first error. A
/// thread that panics counts as a read error.
pub(super) fn on_threads(
    threads: usize,
    work: impl Fn() -> Result<(), UploadError> + Sync,
) -> Result<(), UploadError> {
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(&work)).collect();
        let mut result = work();
        for helper in helpers {
            let joined = helper.join().unwrap_or_else(|_| {
                Err(UploadError::new(
                    ErrorCode::FileReadError,
                    "a file-reading thread panicked",
                ))
            });
            if let (Ok(()), Err(e)) = (&result, joined) {
                result = Err(e);
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN_PART: u64 = 5 * 1024 * 1024;

    #[tokio::test]
    async fn checksums_cover_each_part() {
        let dir = std::env::temp_dir().join(format!("backhaul-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Two full parts and a 3-byte tail; the chunked reader must cut exactly at part edges.
        let data: Vec<u8> = (0..2 * MIN_PART + 3).map(|i| (i % 251) as u8).collect();
        let file = dir.join("data.bin");
        std::fs::write(&file, &data).unwrap();
        let expected: Vec<Crc64Nvme> = data.chunks(MIN_PART as usize).map(Crc64Nvme::of).collect();
        assert_eq!(expected.len(), 3);
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        for threads in [1, 2, 3, 8] {
            let d = describe_file(
                &file,
                &DescribeSettings::for_test(u64::MAX, MIN_PART, threads),
            )
            .await
            .unwrap();
            assert_eq!(d.part_size, MIN_PART);
            assert_eq!(d.part_crc64nvme, expected, "{threads} threads");
            let digests: Vec<String> = data
                .chunks(MIN_PART as usize)
                .map(|part| {
                    let mut digest = PartDigester::default();
                    digest.update(part);
                    digest.finish()
                })
                .collect();
            assert_eq!(d.part_digests, digests, "{threads} threads");

            let e = describe_file(
                &empty,
                &DescribeSettings::for_test(u64::MAX, MIN_PART, threads),
            )
            .await
            .unwrap();
            assert_eq!(e.part_crc64nvme, vec![Crc64Nvme::of(b"")]);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file shorter than its snapshot said (it shrank mid-hash) is FILE_CHANGED, and every
    /// thread stops.
    #[test]
    fn a_file_that_ends_early_while_hashing_is_changed() {
        let dir = std::env::temp_dir().join(format!("backhaul-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("short.bin");
        std::fs::write(&path, vec![7u8; (MIN_PART + 10) as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let stop = AtomicBool::new(false);
        let src = HashSource {
            file: &file,
            path: &path,
            size: 3 * MIN_PART,
            part_size: MIN_PART,
            parts: 3,
            pacer: None,
            stop: &stop,
        };
        for threads in [1, 2, 4] {
            assert_eq!(
                src.checksum_parts(threads).unwrap_err().code,
                ErrorCode::FileChanged
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
