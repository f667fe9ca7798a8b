//! Everything the agent does with a shared file, in seven rooms:
//! - [`policy`]: the hosts the agent may send bytes to;
//! - [`hashing`] (with [`file`]): describing the file, the CRC64NVME of each part;
//! - [`encode`]: compressing it instead, into parts sent from a spool;
//! - [`whole`]: the SHA-256 of the whole file, computed while the parts upload;
//! - [`pacing`]: one byte rate for all uploads together, and one for hashing's disk reads;
//! - [`transfer`]: the parts of a plan in parallel, each streamed from disk and retried a bounded
//!   number of times, then the presigned completion;
//! - [`answers`]: what storage's answers mean, for the parts and the completion alike.
//!
//! Memory stays bounded whatever the file size: at most `concurrency` parts are in flight and
//! each is read in [`READ_CHUNK`] pieces.

mod answers;
mod digest;
mod encode;
mod file;
mod hashing;
mod pacing;
mod policy;
mod transfer;
mod whole;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use shared::ErrorCode;

pub use encode::Encoded;
pub use file::{Snapshot, stored_name};
pub use hashing::{DescribeSettings, Described, describe_file};
pub use pacing::{DiskPacer, RateLimiter};
pub use policy::{UploadPolicy, check_entry};
pub use transfer::{Outcome, READ_CHUNK, upload};
pub use whole::{KnownHashes, Layout};

/// Why an upload stopped, in the terms the server reports to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UploadError {
    pub code: ErrorCode,
    pub message: String,
}

impl UploadError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Bytes and parts done so far, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_done: AtomicU64,
    pub parts_done: AtomicU32,
    /// Part attempts that failed and were retried.
    pub retries: AtomicU32,
    /// The file's SHA-256 once the whole-file pass is done, and a wake-up for whoever reports it.
    pub sha256: std::sync::OnceLock<String>,
    pub sha256_known: tokio::sync::Notify,
}

pub struct UploadSettings {
    pub concurrency: usize,
    pub attempts: u32,
    pub retry_min: Duration,
    /// Shared by every upload of the agent, so the cap holds for all of them together.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Caps the whole-file pass's reads, with the describe pass's (`HASH_READ_BYTES_PER_SEC`).
    pub hash_pacer: Option<Arc<DiskPacer>>,
    pub request_timeout: Duration,
    pub policy: UploadPolicy,
}
