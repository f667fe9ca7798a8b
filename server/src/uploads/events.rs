//! What can happen to an upload ([`Event`]) and what the state machine asks for in return
//! ([`Effect`]): the vocabulary of [`super::machine`], and the rule of what is saved
//! ([`Event::is_saved`]).

use shared::ErrorCode;
use shared::api::ErrorDetail;
use shared::encoding::Compression;
use shared::hash::Sha256Hex;
use shared::protocol::{CompletedPart, UploadPlan};
use shared::{ClientId, FileName, PartNumber};

use super::record::{FileFacts, Multipart, Outcome, Transfer};
use crate::registry::ConnId;
use crate::storage::StoredPart;

/// The agent connection a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRef {
    pub client_id: ClientId,
    pub conn: ConnId,
}

/// Why a plan is being made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The agent (re)described the file after connecting.
    Reconnect,
    /// The agent's URLs ran out.
    Refresh,
}

/// A description the server cannot accept, with the code the upload fails with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

/// Something that happened to an upload.
#[derive(Debug, Clone)]
pub enum Event {
    /// The upload's agent connected (again).
    AgentConnected {
        conn: ConnId,
    },
    /// A connection ended; it may or may not be the upload's.
    AgentDisconnected {
        conn: ConnId,
    },
    /// `file_info`, already checked against the server's part layout.
    Described {
        agent: AgentRef,
        facts: Result<FileFacts, Rejection>,
    },
    /// CreateMultipartUpload answered for the facts the upload was described with.
    MultipartCreated {
        facts: FileFacts,
        multipart: Multipart,
    },
    /// The unchanged parts were copied from the share's previous object: these are the copies
    /// storage made (those that failed are missing, and get sent).
    PartsCopied {
        stored: Vec<StoredPart>,
    },
    /// ListParts answered: these parts are in storage.
    PartsListed {
        stored: Vec<StoredPart>,
        why: Resume,
    },
    /// ListParts says the multipart upload no longer exists: the agent may have completed it.
    MultipartGone,
    /// The missing parts and the completion are presigned.
    PlanReady {
        plan: UploadPlan,
    },
    Progress {
        agent: AgentRef,
        parts_done: u32,
        bytes_done: u64,
        part_retries: u32,
        /// The file's SHA-256, once the agent knows it (protocol 3).
        sha256: Option<Sha256Hex>,
    },
    NeedUrls {
        agent: AgentRef,
    },
    AgentCompleted {
        agent: AgentRef,
        parts: Vec<CompletedPart>,
        complete_ms: u64,
        /// Protocol 3: the file's SHA-256, computed while the parts uploaded.
        sha256: Option<Sha256Hex>,
    },
    /// The agent gave up; it needs no word back.
    AgentFailed {
        client_id: ClientId,
        code: ErrorCode,
        message: String,
        /// Protocol 3, with `COMPLETE_FAILED`: the file's SHA-256.
        sha256: Option<Sha256Hex>,
    },
    /// HeadObject agreed with the hashes.
    Verified {
        etag: String,
    },
    /// Storage could not be read (after retries): nothing is proven either way. `if_missing` is
    /// that of the verification, kept for the next try.
    VerifyDeferred {
        if_missing: Option<ErrorDetail>,
    },
    /// The time to try a deferred verification again has come.
    VerifyAgain,
    /// The server gave up (storage, timeouts, a failed verification).
    Fail {
        code: ErrorCode,
        message: String,
    },
    /// An operator cancelled it.
    Cancel {
        message: String,
    },
    /// The multipart upload of an ending upload is aborted (or the abort gave up).
    Aborted,
}

impl Event {
    /// The rule of what is saved: every accepted event is written through to the store before
    /// its effects are carried out, except those that change only what lives in memory:
    /// connections, when to try a verification again, and an agent's progress counters, which
    /// the next save carries (after a restart the resume recomputes them from ListParts anyway).
    pub fn is_saved(&self) -> bool {
        !matches!(
            self,
            Event::AgentConnected { .. }
                | Event::AgentDisconnected { .. }
                // A progress that brings the file's SHA-256 is saved: the agent sends it just
                // before it completes the upload, and a server killed during the completion
                // would otherwise come back without it.
                | Event::Progress { sha256: None, .. }
                | Event::VerifyDeferred { .. }
                | Event::VerifyAgain
        )
    }
}

/// What the caller must carry out after a transition, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send `describe_file` on this connection. `part_size` is the layout a resumed upload was
    /// planned with (`None` for a new upload: the server's own `PART_SIZE`).
    Describe {
        conn: ConnId,
        share: FileName,
        part_size: Option<u64>,
        /// What to ask of an agent that compresses: the operator's choice for a new upload,
        /// the recorded encoding for a resumed one.
        compression: Compression,
    },
    /// Tell the agent on this connection to stop.
    TellCancel {
        conn: ConnId,
        code: ErrorCode,
    },
    CreateMultipart(FileFacts),
    /// Copy the parts the share's previous object holds unchanged into the new multipart
    /// upload (`UploadPartCopy`), then feed back [`Event::PartsCopied`].
    CopyUnchanged(Transfer),
    ListParts {
        multipart: Multipart,
        why: Resume,
    },
    /// Presign `missing` and the completion; `done` are already stored.
    Presign {
        transfer: Transfer,
        missing: Vec<PartNumber>,
        done: Vec<CompletedPart>,
    },
    SendPlan {
        conn: ConnId,
        plan: UploadPlan,
    },
    /// HeadObject and compare; `reported` is the agent's part list, when it completed.
    /// `if_missing` is the error to fail with if there is no object (by default
    /// `VERIFICATION_FAILED`).
    Verify {
        transfer: Transfer,
        reported: Option<Vec<CompletedPart>>,
        if_missing: Option<ErrorDetail>,
    },
    /// Delete the object at this key: an upload that ends without completing leaves none.
    DeleteObject {
        key: String,
    },
    /// Abort the multipart upload, if there is one, then feed back [`Event::Aborted`].
    Abort(Option<Multipart>),
    Count(Counter),
}

/// Counters an effect moves in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    PartRetries(u32),
    Resumed,
    /// Parts storage copied instead of the agent sending them, and their stored bytes.
    Copied {
        parts: u32,
        bytes: u64,
    },
    /// `bytes` were stored; `saved` fewer than the file has, by compression.
    Completed {
        bytes: u64,
        parts: u32,
        saved: u64,
    },
    Ended(Outcome),
}

/// An event the upload's stage does not accept; the record is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);
