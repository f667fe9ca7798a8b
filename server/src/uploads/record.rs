//! One upload as plain data: what it is, what each stage owns, and what only this process knows.
//! How it changes is [`super::machine`].

use std::time::Instant;

use shared::api::{ErrorDetail, PhaseTimes, UploadState};
use shared::encoding::{Compression, EncodedPart, Encoding};
use shared::hash::{ContentMd5, Crc64Nvme, Sha256Hex};
use shared::protocol::{CompletedPart, part_range};
use shared::{ClientId, CollectionId, FileName, PartNumber, UploadId};
use time::OffsetDateTime;

use crate::registry::ConnId;

/// A moment on both clocks: the monotonic one for durations and deadlines, the wall clock for
/// the stamps a record keeps. The state machine is handed one and reads no clock itself.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall: UnixMs,
}

impl Now {
    pub fn read() -> Self {
        Self {
            at: Instant::now(),
            wall: UnixMs::now(),
        }
    }
}

/// Wall-clock time as milliseconds since the Unix epoch: what records store and sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixMs(pub i64);

impl UnixMs {
    pub fn now() -> Self {
        Self::from(OffsetDateTime::now_utc())
    }

    pub fn to_datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl From<OffsetDateTime> for UnixMs {
    fn from(t: OffsetDateTime) -> Self {
        Self(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
    }
}

/// What the agent said about its file, checked where it entered. Kept so that a resumed upload
/// can prove it is the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub file_name: FileName,
    /// The file's own size (before any encoding).
    pub size: u64,
    pub modified_ms: u64,
    /// The layout's part size; for a compressed file, the stored size its parts aim at.
    pub part_size: u64,
    pub digests: Digests,
    pub stored: Stored,
    /// The part manifest: a digest of each part's plaintext, in part order, when the agent
    /// sent one. It decides which parts the next fetch of the share may copy.
    pub part_digests: Option<Vec<Sha256Hex>>,
}

/// How the stored parts relate to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Each part is `part_size` bytes of the file, the last one the remainder.
    Plain,
    /// Protocol 5: each part is zstd frames, sealed frames, or sealed zstd frames (the
    /// encoding, never [`Encoding::None`]: built by [`Stored::encoded`]); its plaintext and
    /// stored lengths, checked (at the boundary) to cover the file, with at most 10,000 parts
    /// of S3's sizes.
    Encoded(Encoding, Vec<EncodedPart>),
}

impl Stored {
    /// Parts stored with `encoding`: `None` for [`Encoding::None`], whose parts have no layout
    /// of their own.
    pub fn encoded(encoding: Encoding, parts: Vec<EncodedPart>) -> Option<Self> {
        (encoding != Encoding::None).then_some(Stored::Encoded(encoding, parts))
    }
}

/// The checksums of a file's parts, as the agent's protocol version computes them. They decide
/// what is signed into each URL and how the stored object is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digests {
    /// Protocol 3: CRC64NVME per part, whose combination is the object's full-object checksum.
    /// The file's SHA-256 arrives with the agent's completion.
    Crc64Nvme {
        parts: Vec<Crc64Nvme>,
        sha256: Option<Sha256Hex>,
    },
    /// Protocol 2: MD5 per part, verified through the multipart ETag, and the SHA-256 known
    /// from the start (and recorded on the object).
    Md5 {
        parts: Vec<ContentMd5>,
        sha256: Sha256Hex,
    },
}

impl Digests {
    pub(super) fn count(&self) -> usize {
        match self {
            Digests::Crc64Nvme { parts, .. } => parts.len(),
            Digests::Md5 { parts, .. } => parts.len(),
        }
    }

    /// The same part checksums (and, for protocol 2, the same SHA-256).
    fn same_parts(&self, other: &Digests) -> bool {
        match (self, other) {
            (Digests::Crc64Nvme { parts: a, .. }, Digests::Crc64Nvme { parts: b, .. }) => a == b,
            (a @ Digests::Md5 { .. }, b @ Digests::Md5 { .. }) => a == b,
            _ => false,
        }
    }
}

/// The checksum a part URL signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartDigest<'a> {
    Crc64Nvme(Crc64Nvme),
    Md5(&'a ContentMd5),
}

impl FileFacts {
    /// The same bytes in the same layout: a resume may go on. The modification time alone
    /// may move (a copy, a `touch`) without the content changing.
    pub fn same_content(&self, other: &FileFacts) -> bool {
        self.size == other.size
            && self.part_size == other.part_size
            && self.stored == other.stored
            && self.digests.same_parts(&other.digests)
            && match (&self.part_digests, &other.part_digests) {
                (Some(a), Some(b)) => a == b,
                // An agent upgraded in between may send a manifest where it sent none.
                _ => true,
            }
    }

    pub fn encoding(&self) -> Encoding {
        match self.stored {
            Stored::Plain => Encoding::None,
            Stored::Encoded(encoding, _) => encoding,
        }
    }

    /// Bytes in storage, and on the wire.
    pub fn stored_size(&self) -> u64 {
        match &self.stored {
            Stored::Plain => self.size,
            Stored::Encoded(_, parts) => parts.iter().map(|p| p.stored_len).sum(),
        }
    }

    pub fn parts_total(&self) -> u32 {
        self.digests.count() as u32
    }

    /// The SHA-256 of the whole file, once the agent has said it.
    pub fn sha256(&self) -> Option<&Sha256Hex> {
        match &self.digests {
            Digests::Crc64Nvme { sha256, .. } => sha256.as_ref(),
            Digests::Md5 { sha256, .. } => Some(sha256),
        }
    }

    /// The checksum signed into part `n`'s URL; `None` past the last part.
    pub fn part_digest(&self, n: PartNumber) -> Option<PartDigest<'_>> {
        let i = n.get() as usize - 1;
        match &self.digests {
            Digests::Crc64Nvme { parts, .. } => parts.get(i).map(|c| PartDigest::Crc64Nvme(*c)),
            Digests::Md5 { parts, .. } => parts.get(i).map(PartDigest::Md5),
        }
    }

    /// Every part with its number and the checksum signed into its URL.
    pub fn parts(&self) -> impl Iterator<Item = (PartNumber, PartDigest<'_>)> {
        let digests: Box<dyn Iterator<Item = PartDigest<'_>> + Send + '_> = match &self.digests {
            Digests::Crc64Nvme { parts, .. } => {
                Box::new(parts.iter().map(|c| PartDigest::Crc64Nvme(*c)))
            }
            Digests::Md5 { parts, .. } => Box::new(parts.iter().map(PartDigest::Md5)),
        };
        digests
            .enumerate()
            .filter_map(|(i, d)| Some((PartNumber::new(i as u32 + 1).ok()?, d)))
    }

    /// Stored bytes of a part.
    pub fn part_len(&self, part_number: PartNumber) -> u64 {
        match &self.stored {
            Stored::Plain => part_range(self.size, self.part_size, part_number).1,
            Stored::Encoded(_, parts) => parts
                .get(part_number.get() as usize - 1)
                .map_or(0, |p| p.stored_len),
        }
    }

    /// `(offset, len)` of each part's plaintext within the file, in part order.
    pub fn plain_ranges(&self) -> Vec<(u64, u64)> {
        match &self.stored {
            Stored::Plain => self
                .parts()
                .map(|(n, _)| part_range(self.size, self.part_size, n))
                .collect(),
            Stored::Encoded(_, parts) => parts
                .iter()
                .scan(0u64, |at, p| {
                    let start = *at;
                    *at += p.plain_len;
                    Some((start, p.plain_len))
                })
                .collect(),
        }
    }

    /// The CRC64NVME of a part's stored bytes (protocol 3 and later).
    pub fn part_crc64nvme(&self, part_number: PartNumber) -> Option<Crc64Nvme> {
        match self.part_digest(part_number)? {
            PartDigest::Crc64Nvme(crc) => Some(crc),
            PartDigest::Md5(_) => None,
        }
    }

    /// Protocol 3: the object's full-object CRC64NVME, combined from the parts'.
    pub fn whole_crc64nvme(&self) -> Option<Crc64Nvme> {
        match &self.digests {
            Digests::Crc64Nvme { parts, .. } => Some(Crc64Nvme::of_pieces(
                parts.iter().enumerate().map(|(i, crc)| {
                    let len = PartNumber::new(i as u32 + 1)
                        .map(|n| self.part_len(n))
                        .unwrap_or(0);
                    (*crc, len)
                }),
            )),
            Digests::Md5 { .. } => None,
        }
    }

    /// Protocol 2: the part list of the completion, every part with the ETag its MD5 gives.
    pub fn md5_completed_parts(&self) -> Option<Vec<CompletedPart>> {
        let Digests::Md5 { parts, .. } = &self.digests else {
            return None;
        };
        Some(
            parts
                .iter()
                .enumerate()
                .filter_map(|(i, md5)| {
                    Some(CompletedPart {
                        part_number: PartNumber::new(i as u32 + 1).ok()?,
                        etag: md5.part_etag(),
                    })
                })
                .collect(),
        )
    }
}

/// An S3 multipart upload: its object key and its upload id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multipart {
    pub key: String,
    pub upload_id: String,
}

/// What an upload owns once its multipart upload exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub file: FileFacts,
    pub multipart: Multipart,
}

/// The stages an upload goes through. See the diagram in the module doc of `uploads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Open(Open),
    /// Being ended: the multipart upload is being aborted. Persisted, so a restart finishes it.
    Ending(Ending),
    Completed {
        transfer: Transfer,
        etag: String,
    },
    Ended(Ending),
}

/// The stages in which an upload is still wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// The agent was asked to describe its file.
    Requested,
    /// The multipart upload exists and the agent has (or will get) its URLs.
    Uploading(Transfer),
    /// The agent completed, or the multipart upload is gone: the object is being checked.
    Verifying(Transfer),
}

impl Open {
    pub fn transfer(&self) -> Option<&Transfer> {
        match self {
            Open::Requested => None,
            Open::Uploading(t) | Open::Verifying(t) => Some(t),
        }
    }

    fn state(&self) -> UploadState {
        match self {
            Open::Requested => UploadState::Requested,
            Open::Uploading(_) => UploadState::Uploading,
            Open::Verifying(_) => UploadState::Verifying,
        }
    }
}

/// How an upload that did not complete ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Failed,
    /// An operator asked for it.
    Cancelled,
}

impl Outcome {
    pub fn state(self) -> UploadState {
        match self {
            Outcome::Failed => UploadState::Failed,
            Outcome::Cancelled => UploadState::Cancelled,
        }
    }
}

/// Why an upload ends, and the stage it ended from (which says what it had in storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub outcome: Outcome,
    pub error: ErrorDetail,
    pub from: Open,
}

impl Stage {
    /// The state the REST API shows. An ending upload shows the stage it is leaving until its
    /// multipart upload is aborted.
    pub fn state(&self) -> UploadState {
        match self {
            Stage::Open(open) => open.state(),
            Stage::Ending(e) => e.from.state(),
            Stage::Completed { .. } => UploadState::Completed,
            Stage::Ended(e) => e.outcome.state(),
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Stage::Completed { .. } | Stage::Ended(_))
    }

    pub fn transfer(&self) -> Option<&Transfer> {
        match self {
            Stage::Open(open) => open.transfer(),
            Stage::Ending(e) | Stage::Ended(e) => e.from.transfer(),
            Stage::Completed { transfer, .. } => Some(transfer),
        }
    }

    pub fn error(&self) -> Option<&ErrorDetail> {
        match self {
            Stage::Ending(e) | Stage::Ended(e) => Some(&e.error),
            _ => None,
        }
    }
}

/// What only matters while this process runs; a restart starts it afresh.
#[derive(Debug, Clone)]
pub struct Live {
    /// The agent connection that may act on the upload; `None` while the agent is away.
    pub conn: Option<ConnId>,
    /// When a `describe_file` was sent whose `file_info` is still awaited.
    pub awaiting_info: Option<Instant>,
    pub last_progress: Instant,
    /// When the latest plan was sent, and the bytes already stored then; the rate counts from
    /// there.
    pub plan_sent: Option<(Instant, u64)>,
    /// When a plan was asked for (`file_info` or `need_urls` arrived) and not yet sent.
    pub plan_asked: Option<Instant>,
    /// When the agent reported its completion, until verification ends.
    pub completed: Option<Instant>,
    pub finished: Option<Instant>,
    /// Parts already stored when the latest plan was sent.
    pub stored_at_last_plan: usize,
    /// The latest part retry count the agent reported for its current plan.
    pub retries_seen: u32,
    /// `need_urls` in a row after which no new part was stored.
    pub fruitless_refreshes: u32,
    /// A verification that could not read storage is tried again at this time, and fails with
    /// this error if the object turns out to be missing.
    pub verify_again: Option<(Instant, Option<ErrorDetail>)>,
}

impl Live {
    pub fn new(now: Instant) -> Self {
        Self {
            conn: None,
            awaiting_info: None,
            last_progress: now,
            plan_sent: None,
            plan_asked: None,
            completed: None,
            finished: None,
            stored_at_last_plan: 0,
            retries_seen: 0,
            fruitless_refreshes: 0,
            verify_again: None,
        }
    }
}

/// One upload: who asked for what, where it stands, and what it has done so far.
#[derive(Debug, Clone)]
pub struct Upload {
    pub id: UploadId,
    pub client_id: ClientId,
    pub share: FileName,
    pub requested_by: String,
    pub requested_from: String,
    pub created: UnixMs,
    pub updated: UnixMs,
    pub finished: Option<UnixMs>,
    pub stage: Stage,
    pub parts_done: u32,
    pub bytes_done: u64,
    pub resumes: u32,
    pub phases: PhaseTimes,
    /// The collection that asked for it, if any.
    pub collection: Option<CollectionId>,
    /// What the operator asked for; the agent decides within it (`FileFacts::encoding`).
    pub compression: Compression,
    /// The parts storage copied from the share's previous object instead of the agent
    /// sending them.
    pub copied: Copied,
    pub live: Live,
}

/// Parts copied inside storage, and their stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub parts: u32,
    pub bytes: u64,
}

/// The details of a new upload, before its first transition.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub id: UploadId,
    pub client_id: ClientId,
    pub share: FileName,
    pub requested_by: String,
    pub requested_from: String,
    pub collection: Option<CollectionId>,
    pub compression: Compression,
}

impl Upload {
    pub fn state(&self) -> UploadState {
        self.stage.state()
    }

    /// Open and not being ended: the one unfinished upload of its client that may still change.
    pub fn is_open(&self) -> bool {
        matches!(self.stage, Stage::Open(_))
    }

    /// Whether the multipart upload `s3_upload_id` under this upload's key belongs to it: the
    /// orphan sweep leaves such a one alone.
    pub fn owns_multipart(&self, s3_upload_id: &str) -> bool {
        match &self.stage {
            // Being created right now: its id is not recorded yet.
            Stage::Open(Open::Requested) => true,
            Stage::Open(open) => open
                .transfer()
                .is_some_and(|t| t.multipart.upload_id == s3_upload_id),
            // Its own ending aborts it.
            Stage::Ending(e) => e
                .from
                .transfer()
                .is_none_or(|t| t.multipart.upload_id == s3_upload_id),
            Stage::Completed { .. } | Stage::Ended(_) => false,
        }
    }
}
