//! Encoding a shared file before it is described: zstd, one frame per [`BLOCK`] of the file, or
//! for an encrypted share one sealed frame per block ([`shared::sealed`]) holding the block's
//! zstd frame or the block itself; the frames grouped into parts of at least the target stored
//! size.
//!
//! A part's URL signs the CRC64NVME of its stored bytes, so those bytes must exist before the
//! server is told about the part. They are written once, here, to a spool file that has no name
//! (it vanishes with the agent, even after a kill), and the parts are sent from it. The file
//! itself is read once: the same pass computes the SHA-256 of the plaintext (for a sealed file,
//! its keyed digest).
//!
//! Blocks compress on `threads` threads; each writes its frame to the spool in block order, so
//! parts are laid out by stored size: every part but the last holds at least `target` stored
//! bytes. Frames are independent, so any part decodes on its own and a resume needs only the
//! missing ones.
//!
//! When the server sends the plaintext layout of the share's previous object (a layout hint), a
//! part closes on one of its boundaries once it holds S3's smallest part, and may grow past
//! `target` to reach the next one: unchanged ranges then compress into the very parts stored
//! before, which the server copies instead of having them sent, and a part that a change made
//! larger does not shift the parts after it. Each part's plaintext digest ([`super::digest`]) is computed on the way.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::encoding::{EncodedPart, Encoding};
use shared::hash::Crc64Nvme;
use shared::ids::MAX_PARTS;
use shared::protocol::plan_parts;
use shared::sealed::{FileDigest, StoreKey};

use super::UploadError;
use super::digest::{BlockDigest, PartDigester, block_digest};
use super::file::{changed_while_hashing, io_error};
use super::hashing::on_threads;
use super::pacing::DiskPacer;

/// Plaintext bytes per zstd frame: the manifest's block, so that frames and digests agree.
pub const BLOCK: usize = super::digest::BLOCK;

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
    /// The manifest digest of each part's plaintext.
    pub part_digests: Vec<String>,
    /// Lowercase hex SHA-256 of the plaintext; for a sealed file, its keyed digest.
    pub sha256: String,
    pub encoding: Encoding,
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
/// take encoded (each frame `overhead` bytes more for sealing), so that even a file zstd cannot
/// shrink fits in 10,000 parts. `None` if that is too large for one S3 object.
pub fn target_part_size(size: u64, min_part_size: u64, overhead: usize) -> Option<u64> {
    plan_parts(stored_bound(size, overhead)?, min_part_size).map(|(part_size, _)| part_size)
}

/// The most that `size` bytes can take encoded, frame by frame.
fn stored_bound(size: u64, overhead: usize) -> Option<u64> {
    let blocks = size.div_ceil(BLOCK as u64).max(1);
    blocks.checked_mul((zstd::zstd_safe::compress_bound(BLOCK) + overhead) as u64)
}

/// Where parts may close to match the previous object: the plaintext offsets its parts ended
/// at, in order. Empty (nothing to follow) when the hint is unusable, or when following it
/// could take more than 10,000 parts: a part closed on a boundary may hold as little as
/// `min_part` stored bytes.
pub fn hint_boundaries(hint: &[u64], size: u64, min_part: u64, overhead: usize) -> Vec<u64> {
    let fits = stored_bound(size, overhead)
        .is_some_and(|bound| bound.div_ceil(min_part.max(1)) <= u64::from(MAX_PARTS));
    if hint.len() > MAX_PARTS as usize || !fits {
        return Vec::new();
    }
    let mut at = 0u64;
    hint.iter()
        .map_while(|len| {
            at = at.checked_add(*len)?;
            Some(at)
        })
        .collect()
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

/// How to encode: zstd level, the store key, threads, the stored size each part reaches, the
/// layout to follow, the read pace and the stop flag.
pub struct EncodeJob<'a> {
    /// `None`: blocks are not compressed (only sealed).
    pub level: Option<i32>,
    /// Set for an encrypted share: every block is sealed with it.
    pub seal: Option<&'a StoreKey>,
    pub threads: usize,
    /// A part is closed once it holds at least this many stored bytes.
    pub target: u64,
    /// Plaintext offsets a part closes at once it holds `min_part` stored bytes
    /// ([`hint_boundaries`]).
    pub boundaries: &'a [u64],
    /// S3's smallest part; smaller in tests.
    pub min_part: u64,
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
            Closing {
                target: job.target,
                boundaries: job.boundaries,
                min_part: job.min_part,
            },
            match job.seal {
                Some(key) => Whole::Keyed(key.file_digest()),
                None => Whole::Sha256(Sha256::new()),
            },
        )),
        turn: Condvar::new(),
    };
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || -> Result<(), UploadError> {
        let mut compressor = job
            .level
            .map(|level| zstd::bulk::Compressor::new(level).map_err(zstd_error))
            .transpose()?;
        let mut plain = vec![0u8; BLOCK];
        let mut packed = Vec::with_capacity(zstd::zstd_safe::compress_bound(BLOCK));
        let mut sealed = Vec::new();
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
            let inner: &[u8] = match &mut compressor {
                Some(compressor) => {
                    packed.clear();
                    compressor
                        .compress_to_buffer(&plain[..len], &mut packed)
                        .map_err(zstd_error)?;
                    &packed
                }
                None => &plain[..len],
            };
            let (frame, digest): (&[u8], BlockDigest) = match job.seal {
                Some(key) => {
                    sealed.clear();
                    key.seal(inner, &mut sealed);
                    (&sealed, key.block_id(&plain[..len]))
                }
                None => (inner, block_digest(&plain[..len])),
            };
            let crc = Crc64Nvme::of(frame);
            shared.in_turn(i, &failed, |layout| {
                layout.push(&plain[..len], &digest, frame, crc)
            })?;
        }
    };
    on_threads(job.threads.max(1), || {
        work().inspect_err(|_| shared.fail(&failed))
    })?;
    let layout = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let Finished {
        parts,
        crcs: part_crc64nvme,
        digests: part_digests,
        sha256,
    } = layout.finish(spool_dir)?;
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
        part_digests,
        sha256,
        encoding: Encoding::of(job.level.is_some(), job.seal.is_some()),
    })
}

/// The layout being built, which the blocks join one at a time, in order.
struct Turns<'a> {
    state: Mutex<Layout<'a>>,
    turn: Condvar,
}

impl<'a> Turns<'a> {
    /// Waits until block `i` is next, then runs `f` on the layout. Gives up once another
    /// thread failed.
    fn in_turn(
        &self,
        i: usize,
        failed: &AtomicBool,
        f: impl FnOnce(&mut Layout<'a>) -> Result<(), UploadError>,
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

/// How many times `target` a part may grow while it looks for the previous layout's next
/// boundary.
const HINTED_GROWTH: u64 = 4;

/// When a part closes.
struct Closing<'a> {
    target: u64,
    boundaries: &'a [u64],
    min_part: u64,
}

impl Closing<'_> {
    /// Whether a part of `stored` bytes closes after the block ending at `plain_at`, with
    /// `next` the first boundary not before it. Where the previous layout has a boundary
    /// ahead, a part closes on it (once it holds S3's smallest part) rather than at `target`,
    /// so that a part grown by a change does not shift every part after it; it is capped, so
    /// a file rewritten throughout still gets parts of a bounded size. Past the last boundary
    /// (an appended tail), parts close at `target` as without a hint.
    fn closes(&self, stored: u64, plain_at: u64, next: Option<u64>) -> bool {
        match next {
            Some(b) if b == plain_at => stored >= self.min_part,
            Some(_) => {
                stored
                    >= self
                        .target
                        .saturating_mul(HINTED_GROWTH)
                        .min(shared::protocol::MAX_PART_SIZE)
            }
            None => stored >= self.target,
        }
    }
}

/// The part being filled.
struct OpenPart {
    part: EncodedPart,
    crc: Crc64Nvme,
    digest: PartDigester,
}

/// The parts closed so far and their checksums.
struct Finished {
    parts: Vec<EncodedPart>,
    crcs: Vec<Crc64Nvme>,
    digests: Vec<String>,
    sha256: String,
}

/// Parts closed so far, the one being filled, and the plaintext's SHA-256.
struct Layout<'a> {
    spool: std::io::BufWriter<File>,
    closing: Closing<'a>,
    /// Blocks written so far, and the plaintext bytes they hold.
    blocks: usize,
    plain_at: u64,
    /// The first boundary not yet passed.
    next_boundary: usize,
    done: Finished,
    open: Option<OpenPart>,
    whole: Whole,
    error: Option<std::io::Error>,
}

/// The digest of the whole plaintext: its SHA-256, or for a sealed file its keyed digest.
enum Whole {
    Sha256(Sha256),
    Keyed(FileDigest),
}

impl Whole {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Whole::Sha256(h) => h.update(bytes),
            Whole::Keyed(d) => d.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Whole::Sha256(h) => hex::encode(h.finalize()),
            Whole::Keyed(d) => d.finish(),
        }
    }
}

impl<'a> Layout<'a> {
    fn new(spool: File, closing: Closing<'a>, whole: Whole) -> Self {
        Self {
            spool: std::io::BufWriter::with_capacity(BLOCK, spool),
            closing,
            blocks: 0,
            plain_at: 0,
            next_boundary: 0,
            done: Finished {
                parts: Vec::new(),
                crcs: Vec::new(),
                digests: Vec::new(),
                sha256: String::new(),
            },
            open: None,
            whole,
            error: None,
        }
    }

    /// The next block: its plaintext and digest, its frame and the frame's CRC64NVME.
    fn push(
        &mut self,
        plain: &[u8],
        digest: &BlockDigest,
        frame: &[u8],
        crc: Crc64Nvme,
    ) -> Result<(), UploadError> {
        self.whole.update(plain);
        if let Err(e) = self.spool.write_all(frame) {
            let message = format!("writing the spool: {e}");
            self.error = Some(e);
            return Err(UploadError::new(ErrorCode::FileReadError, message));
        }
        let open = self.open.get_or_insert_with(|| OpenPart {
            part: EncodedPart {
                plain_len: 0,
                stored_len: 0,
            },
            crc: Crc64Nvme::of(b""),
            digest: PartDigester::default(),
        });
        open.crc = open.crc.combine(crc, frame.len() as u64);
        open.part.plain_len += plain.len() as u64;
        open.part.stored_len += frame.len() as u64;
        if !plain.is_empty() {
            open.digest.push_block(digest);
        }
        self.plain_at += plain.len() as u64;
        let stored = open.part.stored_len;
        let boundaries = self.closing.boundaries;
        while boundaries
            .get(self.next_boundary)
            .is_some_and(|b| *b < self.plain_at)
        {
            self.next_boundary += 1;
        }
        let next = boundaries.get(self.next_boundary).copied();
        if self.closing.closes(stored, self.plain_at, next) {
            self.close();
        }
        Ok(())
    }

    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            self.done.parts.push(open.part);
            self.done.crcs.push(open.crc);
            self.done.digests.push(open.digest.finish());
        }
    }

    fn finish(mut self, spool_dir: &Path) -> Result<Finished, UploadError> {
        self.close();
        self.spool
            .flush()
            .map_err(|e| io_error(spool_dir, &self.error.take().unwrap_or(e)))?;
        self.done.sha256 = self.whole.finish();
        Ok(self.done)
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
        encode_along(data, target, threads, &[])
    }

    /// Encodes with a layout hint; as in production, the smallest part is the target.
    fn encode_along(data: &[u8], target: u64, threads: usize, hint: &[u64]) -> Encoded {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        let stop = AtomicBool::new(false);
        let boundaries = hint_boundaries(hint, data.len() as u64, target, 0);
        let job = EncodeJob {
            level: Some(3),
            seal: None,
            threads,
            target,
            boundaries: &boundaries,
            min_part: target,
            pacer: None,
            stop: &stop,
        };
        encode(&file, &path, data.len() as u64, dir.path(), &job).unwrap()
    }

    fn plain_lens(e: &Encoded) -> Vec<u64> {
        e.parts.iter().map(|p| p.plain_len).collect()
    }

    #[test]
    fn a_file_changed_in_place_keeps_its_other_parts_byte_for_byte() {
        // Parts of about four blocks each.
        let data = text(20 * MIB as usize);
        let before = encode_bytes(&data, MIB, 2);
        assert!(before.parts.len() >= 4, "{:?}", before.parts);
        // One block in the middle becomes noise, which stores four times larger: its part
        // reaches the target a block early, and without the hint every later part would shift
        // by a block.
        let mut changed = data.clone();
        let at = 6 * MIB as usize;
        use rand::RngCore;
        rand::thread_rng().fill_bytes(&mut changed[at..at + MIB as usize]);
        let after = encode_along(&changed, MIB, 2, &plain_lens(&before));
        let kept = |e: &Encoded| -> Vec<(u64, u64, String)> {
            let mut at = 0;
            e.parts
                .iter()
                .zip(&e.part_digests)
                .map(|(p, d)| {
                    at += p.plain_len;
                    (at, p.stored_len, d.clone())
                })
                .collect()
        };
        let old = kept(&before);
        let same = kept(&after).iter().filter(|p| old.contains(p)).count();
        // Only the part that holds the change differs.
        assert!(
            same + 1 >= before.parts.len(),
            "{same} of {} parts kept: {:?} vs {:?}",
            before.parts.len(),
            plain_lens(&before),
            plain_lens(&after)
        );
        assert_ne!(before.part_digests, after.part_digests);
        // The same file along its own layout is the same layout.
        let again = encode_along(&data, MIB, 3, &plain_lens(&before));
        assert_eq!(again.parts, before.parts);
        assert_eq!(again.part_digests, before.part_digests);
        assert_eq!(again.part_crc64nvme, before.part_crc64nvme);
    }

    #[test]
    fn unusable_hints_are_ignored() {
        assert!(hint_boundaries(&[u64::MAX, 5], 10 * MIB, MIB, 0).len() < 2);
        assert!(hint_boundaries(&vec![1; MAX_PARTS as usize + 1], MIB, 1, 0).is_empty());
        // A huge file could not stay within 10,000 parts closing at the smallest part size.
        assert!(hint_boundaries(&[MIB], 100 * 1024 * MIB, 5 * MIB, 0).is_empty());
        assert_eq!(
            hint_boundaries(&[MIB, 2 * MIB], 3 * MIB, MIB, 0),
            vec![MIB, 3 * MIB]
        );
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
