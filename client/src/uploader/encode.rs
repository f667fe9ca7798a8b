//! Compressing a shared file before it is described: zstd, one frame per [`BLOCK`] of the file,
//! the frames grouped into parts of at least the target stored size.
//!
//! A part's URL signs the CRC64NVME of its stored bytes, so those bytes must exist before the
//! server is told about the part. They are written once, here, to a spool file that has no name
//! (it vanishes with the agent, even after a kill), and the parts are sent from it. The file
//! itself is read once: the same pass computes the SHA-256 of the plaintext.
//!
//! Blocks compress on `threads` threads; each writes its frame to the spool in block order, so
//! parts are laid out by stored size alone: every part but the last holds at least `target`
//! stored bytes. Frames are independent, so any part decodes on its own and a resume needs only
//! the missing ones.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::encoding::EncodedPart;
use shared::hash::Crc64Nvme;
use shared::protocol::plan_parts;

use super::UploadError;
use super::file::{changed_while_hashing, io_error};
use super::hashing::on_threads;
use super::pacing::DiskPacer;

/// Plaintext bytes per zstd frame.
pub const BLOCK: usize = 1024 * 1024;

/// Bytes read from each sample when `auto` decides whether compression pays.
const SAMPLE: usize = 128 * 1024;
/// Samples spread over the file.
const SAMPLES: u64 = 8;
/// Compression pays when the samples shrink to at most this fraction (90 %): below that,
/// zstd's CPU buys too little on the wire.
const PAYS_BELOW: f64 = 0.9;

/// The spool of an encoded file and its layout.
#[derive(Debug)]
pub struct Encoded {
    /// The stored bytes of every part, back to back. Unnamed: gone when the last handle is.
    pub spool: File,
    pub parts: Vec<EncodedPart>,
    /// Where each part starts in the spool.
    offsets: Vec<u64>,
    /// CRC64NVME of each part's stored bytes.
    pub part_crc64nvme: Vec<Crc64Nvme>,
    /// Lowercase hex SHA-256 of the plaintext.
    pub sha256: String,
}

impl Encoded {
    /// `(offset, len)` of part `index` (from 0) in the spool.
    pub fn stored_range(&self, index: usize) -> Option<(u64, u64)> {
        Some((*self.offsets.get(index)?, self.parts.get(index)?.stored_len))
    }

    pub fn stored_size(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_len).sum()
    }
}

/// The stored size parts aim at: what [`plan_parts`] gives for the most that `size` bytes can
/// take compressed, so that even a file zstd cannot shrink fits in 10,000 parts. `None` if
/// that is too large for one S3 object.
pub fn target_part_size(size: u64, min_part_size: u64) -> Option<u64> {
    let blocks = size.div_ceil(BLOCK as u64).max(1);
    let bound = blocks.checked_mul(zstd::zstd_safe::compress_bound(BLOCK) as u64)?;
    plan_parts(bound, min_part_size).map(|(part_size, _)| part_size)
}

/// Whether zstd shrinks a sample of the file enough to be worth its CPU: [`SAMPLES`] pieces
/// spread over the file, compressed at level 1. An empty file never pays.
pub fn compression_pays(file: &File, path: &Path, size: u64) -> Result<bool, UploadError> {
    if size == 0 {
        return Ok(false);
    }
    let mut compressor = zstd::bulk::Compressor::new(1).map_err(zstd_error)?;
    let mut buf = vec![0u8; SAMPLE];
    let (mut plain, mut packed) = (0usize, 0usize);
    let step = size / SAMPLES;
    for i in 0..SAMPLES {
        let offset = i * step;
        let want = (size - offset).min(SAMPLE as u64) as usize;
        let n = read_full(file, path, &mut buf[..want], offset)?;
        let out = compressor.compress(&buf[..n]).map_err(zstd_error)?;
        plain += n;
        packed += out.len();
        if size <= SAMPLE as u64 {
            break;
        }
    }
    Ok(plain > 0 && (packed as f64) <= plain as f64 * PAYS_BELOW)
}

/// How to encode: zstd level, threads, the stored size each part reaches, the read pace and the
/// stop flag.
pub struct EncodeJob<'a> {
    pub level: i32,
    pub threads: usize,
    /// A part is closed once it holds at least this many stored bytes.
    pub target: u64,
    pub pacer: Option<&'a DiskPacer>,
    pub stop: &'a AtomicBool,
}

/// Compresses `file` (of `size` bytes) into a new spool in `spool_dir`.
pub fn encode(
    file: &File,
    path: &Path,
    size: u64,
    spool_dir: &Path,
    job: &EncodeJob<'_>,
) -> Result<Encoded, UploadError> {
    let spool = tempfile::tempfile_in(spool_dir).map_err(|e| {
        UploadError::new(
            ErrorCode::FileReadError,
            format!("creating a spool file in {}: {e}", spool_dir.display()),
        )
    })?;
    // An empty file is one empty frame, so the object is still valid zstd.
    let blocks = size.div_ceil(BLOCK as u64).max(1) as usize;
    let shared = Turns {
        state: Mutex::new(Layout::new(
            spool.try_clone().map_err(|e| io_error(spool_dir, &e))?,
            job.target,
        )),
        turn: Condvar::new(),
    };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || -> Result<(), UploadError> {
        let mut compressor = zstd::bulk::Compressor::new(job.level).map_err(zstd_error)?;
        let mut plain = vec![0u8; BLOCK];
        let mut packed = Vec::with_capacity(zstd::zstd_safe::compress_bound(BLOCK));
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= blocks || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            if job.stop.load(Ordering::Relaxed) {
                return Err(UploadError::new(ErrorCode::Cancelled, "encoding stopped"));
            }
            let offset = i as u64 * BLOCK as u64;
            let len = (size - offset.min(size)).min(BLOCK as u64) as usize;
            if let Some(pacer) = job.pacer {
                pacer.acquire(len);
            }
            let n = read_full(file, path, &mut plain[..len], offset)?;
            if n < len {
                return Err(changed_while_hashing(path));
            }
            packed.clear();
            compressor
                .compress_to_buffer(&plain[..len], &mut packed)
                .map_err(zstd_error)?;
            let crc = Crc64Nvme::of(&packed);
            shared.in_turn(i, &failed, |layout| {
                layout.push(&plain[..len], &packed, crc)
            })?;
        }
    };
    on_threads(job.threads.max(1), || {
        work().inspect_err(|_| shared.fail(&failed))
    })?;
    let layout = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let (parts, part_crc64nvme, sha256) = layout.finish(spool_dir)?;
    let offsets = parts
        .iter()
        .scan(0u64, |at, p| {
            let start = *at;
            *at += p.stored_len;
            Some(start)
        })
        .collect();
    Ok(Encoded {
        spool,
        parts,
        offsets,
        part_crc64nvme,
        sha256,
    })
}

/// The layout being built, which the blocks join one at a time, in order.
struct Turns {
    state: Mutex<Layout>,
    turn: Condvar,
}

impl Turns {
    /// Waits until block `i` is next, then runs `f` on the layout. Gives up once another
    /// thread failed.
    fn in_turn(
        &self,
        i: usize,
        failed: &AtomicBool,
        f: impl FnOnce(&mut Layout) -> Result<(), UploadError>,
    ) -> Result<(), UploadError> {
        let mut layout = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while layout.blocks != i {
            if failed.load(Ordering::Relaxed) {
                return Err(UploadError::new(ErrorCode::Cancelled, "encoding stopped"));
            }
            layout = self.turn.wait(layout).unwrap_or_else(|e| e.into_inner());
        }
        let result = f(&mut layout);
        layout.blocks += 1;
        drop(layout);
        self.turn.notify_all();
        result
    }

    fn fail(&self, failed: &AtomicBool) {
        failed.store(true, Ordering::Relaxed);
        let _guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.turn.notify_all();
    }
}

/// Parts closed so far, the one being filled, and the plaintext's SHA-256.
struct Layout {
    spool: std::io::BufWriter<File>,
    target: u64,
    /// Blocks written so far.
    blocks: usize,
    parts: Vec<EncodedPart>,
    crcs: Vec<Crc64Nvme>,
    open: Option<(EncodedPart, Crc64Nvme)>,
    sha256: Sha256,
    error: Option<std::io::Error>,
}

impl Layout {
    fn new(spool: File, target: u64) -> Self {
        Self {
            spool: std::io::BufWriter::with_capacity(BLOCK, spool),
            target,
            blocks: 0,
            parts: Vec::new(),
            crcs: Vec::new(),
            open: None,
            sha256: Sha256::new(),
            error: None,
        }
    }

    /// The next block: its plaintext, its frame and the frame's CRC64NVME.
    fn push(&mut self, plain: &[u8], frame: &[u8], crc: Crc64Nvme) -> Result<(), UploadError> {
        self.sha256.update(plain);
        if let Err(e) = self.spool.write_all(frame) {
            let message = format!("writing the spool: {e}");
            self.error = Some(e);
            return Err(UploadError::new(ErrorCode::FileReadError, message));
        }
        let (part, part_crc) = self.open.get_or_insert((
            EncodedPart {
                plain_len: 0,
                stored_len: 0,
            },
            Crc64Nvme::of(b""),
        ));
        *part_crc = part_crc.combine(crc, frame.len() as u64);
        part.plain_len += plain.len() as u64;
        part.stored_len += frame.len() as u64;
        if part.stored_len >= self.target {
            self.close();
        }
        Ok(())
    }

    fn close(&mut self) {
        if let Some((part, crc)) = self.open.take() {
            self.parts.push(part);
            self.crcs.push(crc);
        }
    }

    fn finish(
        mut self,
        spool_dir: &Path,
    ) -> Result<(Vec<EncodedPart>, Vec<Crc64Nvme>, String), UploadError> {
        self.close();
        self.spool
            .flush()
            .map_err(|e| io_error(spool_dir, &self.error.take().unwrap_or(e)))?;
        Ok((self.parts, self.crcs, hex::encode(self.sha256.finalize())))
    }
}

/// Reads `buf.len()` bytes at `offset`, fewer only at the end of the file.
fn read_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize, UploadError> {
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| io_error(path, &e))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn zstd_error(e: std::io::Error) -> UploadError {
    UploadError::new(ErrorCode::FileReadError, format!("zstd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn encode_bytes(data: &[u8], target: u64, threads: usize) -> Encoded {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        let stop = AtomicBool::new(false);
        let job = EncodeJob {
            level: 3,
            threads,
            target,
            pacer: None,
            stop: &stop,
        };
        encode(&file, &path, data.len() as u64, dir.path(), &job).unwrap()
    }

    fn spooled(e: &Encoded, index: usize) -> Vec<u8> {
        let (offset, len) = e.stored_range(index).unwrap();
        let mut buf = vec![0u8; len as usize];
        e.spool.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// Text-like data that compresses about 4x.
    fn text(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut n = 0u64;
        while out.len() < len {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(
                format!(
                    "{},2026-12-02T10:{:02},SKU{:05},{}.{:02}\n",
                    n >> 40,
                    n % 60,
                    n % 977,
                    n % 300,
                    n % 100
                )
                .as_bytes(),
            );
        }
        out.truncate(len);
        out
    }

    #[test]
    fn parts_decode_alone_and_join_into_the_file() {
        let data = text(9 * MIB as usize + 12_345);
        for threads in [1, 2, 3] {
            let e = encode_bytes(&data, MIB, threads);
            assert!(e.parts.len() > 1, "{:?}", e.parts);
            let mut joined = Vec::new();
            for (i, part) in e.parts.iter().enumerate() {
                let stored = spooled(&e, i);
                assert_eq!(Crc64Nvme::of(&stored), e.part_crc64nvme[i]);
                if i + 1 < e.parts.len() {
                    assert!(part.stored_len >= MIB, "part {i}: {part:?}");
                }
                let plain = zstd::stream::decode_all(&stored[..]).unwrap();
                assert_eq!(plain.len() as u64, part.plain_len);
                joined.extend_from_slice(&plain);
            }
            assert_eq!(joined, data, "{threads} threads");
            assert_eq!(e.sha256, hex::encode(Sha256::digest(&data)));
            assert!(e.stored_size() < data.len() as u64 / 2);
        }
    }

    #[test]
    fn the_same_file_encodes_the_same_way() {
        let data = text(3 * MIB as usize);
        let a = encode_bytes(&data, MIB / 2, 2);
        let b = encode_bytes(&data, MIB / 2, 1);
        assert_eq!(a.parts, b.parts);
        assert_eq!(a.part_crc64nvme, b.part_crc64nvme);
    }

    #[test]
    fn an_empty_file_is_one_empty_frame() {
        let e = encode_bytes(b"", MIB, 2);
        assert_eq!(e.parts.len(), 1);
        assert_eq!(e.parts[0].plain_len, 0);
        assert!(e.parts[0].stored_len > 0);
        assert!(
            zstd::stream::decode_all(&spooled(&e, 0)[..])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn sampling_tells_text_from_noise() {
        let dir = tempfile::tempdir().unwrap();
        let check = |data: &[u8]| {
            let path = dir.path().join("s");
            std::fs::write(&path, data).unwrap();
            let file = File::open(&path).unwrap();
            compression_pays(&file, &path, data.len() as u64).unwrap()
        };
        assert!(check(&text(4 * MIB as usize)));
        assert!(check(&vec![0u8; 100_000]));
        let random: Vec<u8> = {
            use rand::RngCore;
            let mut v = vec![0u8; 2 * MIB as usize];
            rand::thread_rng().fill_bytes(&mut v);
            v
        };
        assert!(!check(&random));
        assert!(!check(b""));
    }
}
