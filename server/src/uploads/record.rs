//! One upload as plain data, and every way it may change.
//!
//! [`Upload::on`] is the state machine: it takes an [`Event`], checks that the event is one the
//! upload's [`Stage`] accepts, changes the record, and returns the [`Effect`]s the caller must
//! carry out (S3 calls, messages to the agent, counters). It does no I/O and reads no clock but
//! the `now` it is given, so every transition is tested without a server (see the tests below).
//! An event the stage does not accept is [`Refused`] and leaves the record untouched.

use std::time::{Duration, Instant};

use shared::api::{ErrorDetail, PhaseTimes, UploadState};
use shared::hash::{ContentMd5, Sha256Hex};
use shared::protocol::{CompletedPart, UploadPlan, part_range};
use shared::{ClientId, ErrorCode, FileName, PartNumber, UploadId};
use time::OffsetDateTime;

use crate::registry::ConnId;
use crate::storage::StoredPart;

/// After this many `need_urls` in a row with no new part stored, the upload fails instead of
/// looping: the URLs die before a part can get through.
pub const MAX_FRUITLESS_REFRESHES: u32 = 3;

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
    pub size: u64,
    pub modified_ms: u64,
    pub sha256: Sha256Hex,
    pub part_size: u64,
    /// One per part, in part order.
    pub part_md5: Vec<ContentMd5>,
}

impl FileFacts {
    pub fn parts_total(&self) -> u32 {
        self.part_md5.len() as u32
    }

    /// Every part with its number and the `Content-MD5` signed into its URL.
    pub fn parts(&self) -> impl Iterator<Item = (PartNumber, &ContentMd5)> {
        self.part_md5
            .iter()
            .enumerate()
            .filter_map(|(i, md5)| Some((PartNumber::new(i as u32 + 1).ok()?, md5)))
    }

    pub fn part_len(&self, part_number: PartNumber) -> u64 {
        part_range(self.size, self.part_size, part_number).1
    }

    /// The part list of the completion: every part with the ETag its MD5 gives.
    pub fn completed_parts(&self) -> Vec<CompletedPart> {
        self.parts()
            .map(|(part_number, md5)| CompletedPart {
                part_number,
                etag: md5.part_etag(),
            })
            .collect()
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
    pub live: Live,
}

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
    },
    NeedUrls {
        agent: AgentRef,
    },
    AgentCompleted {
        agent: AgentRef,
        parts: Vec<CompletedPart>,
        complete_ms: u64,
    },
    /// The agent gave up; it needs no word back.
    AgentFailed {
        client_id: ClientId,
        code: ErrorCode,
        message: String,
    },
    /// HeadObject agreed with the hashes.
    Verified {
        etag: String,
    },
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
    /// its effects are carried out, except these three. Connections and liveness live in memory
    /// only, and an agent's progress counters are carried by the next save (after a restart the
    /// resume recomputes them from ListParts anyway).
    pub fn is_saved(&self) -> bool {
        !matches!(
            self,
            Event::AgentConnected { .. } | Event::AgentDisconnected { .. } | Event::Progress { .. }
        )
    }
}

/// What the caller must carry out after a transition, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send `describe_file` on this connection.
    Describe {
        conn: ConnId,
        share: FileName,
    },
    /// Tell the agent on this connection to stop.
    TellCancel {
        conn: ConnId,
        code: ErrorCode,
    },
    CreateMultipart(FileFacts),
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
    Verify {
        transfer: Transfer,
        reported: Option<Vec<CompletedPart>>,
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
    Completed { bytes: u64, parts: u32 },
    Ended(Outcome),
}

/// An event the upload's stage does not accept; the record is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The details of a new upload, before its first transition.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub id: UploadId,
    pub client_id: ClientId,
    pub share: FileName,
    pub requested_by: String,
    pub requested_from: String,
}

impl Upload {
    /// A new upload, with `describe_file` to send on the agent's connection `conn`.
    pub fn requested(new: NewUpload, conn: ConnId, now: Instant) -> (Self, Effect) {
        let created = UnixMs::now();
        let mut live = Live::new(now);
        live.conn = Some(conn);
        live.awaiting_info = Some(now);
        let describe = Effect::Describe {
            conn,
            share: new.share.clone(),
        };
        let upload = Self {
            id: new.id,
            client_id: new.client_id,
            share: new.share,
            requested_by: new.requested_by,
            requested_from: new.requested_from,
            created,
            updated: created,
            finished: None,
            stage: Stage::Open(Open::Requested),
            parts_done: 0,
            bytes_done: 0,
            resumes: 0,
            phases: PhaseTimes::default(),
            live,
        };
        (upload, describe)
    }

    pub fn state(&self) -> UploadState {
        self.stage.state()
    }

    /// Open and not being ended: the one unfinished upload of its client that may still change.
    pub fn is_open(&self) -> bool {
        matches!(self.stage, Stage::Open(_))
    }

    fn owned_by(&self, agent: &AgentRef) -> bool {
        self.client_id == agent.client_id && self.live.conn == Some(agent.conn)
    }

    fn uploading(&self) -> Option<&Transfer> {
        match &self.stage {
            Stage::Open(Open::Uploading(t)) => Some(t),
            _ => None,
        }
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

    /// What a server that stopped in the middle must finish: an ending's abort, or a
    /// verification. Uploads that were requested or uploading wait for their agents.
    pub fn recovery(&self) -> Option<Effect> {
        match &self.stage {
            Stage::Ending(e) => Some(Effect::Abort(
                e.from.transfer().map(|t| t.multipart.clone()),
            )),
            Stage::Open(Open::Verifying(t)) => Some(Effect::Verify {
                transfer: t.clone(),
                reported: None,
            }),
            _ => None,
        }
    }

    /// Why the upload should fail now, if it should: its agent never described the file, or it
    /// made no progress for too long (agent away included).
    pub fn overdue(
        &self,
        now: Instant,
        response_timeout: Duration,
        stall_timeout: Duration,
    ) -> Option<(ErrorCode, String)> {
        if !self.is_open() {
            return None;
        }
        if let Some(asked) = self.live.awaiting_info
            && self.live.conn.is_some()
            && now.duration_since(asked) > response_timeout
        {
            return Some((
                ErrorCode::AgentTimeout,
                format!(
                    "the agent did not describe the file within {}s",
                    response_timeout.as_secs()
                ),
            ));
        }
        if now.duration_since(self.live.last_progress) > stall_timeout {
            let why = if self.live.conn.is_none() {
                "the agent has been away"
            } else {
                "no progress"
            };
            return Some((
                ErrorCode::Stalled,
                format!("{why} for {}s", stall_timeout.as_secs()),
            ));
        }
        None
    }

    /// The state machine. On `Ok` the record has changed and the effects are to be carried out
    /// in order; on `Err` nothing changed.
    pub fn on(&mut self, event: Event, now: Instant) -> Result<Vec<Effect>, Refused> {
        let effects = match event {
            Event::AgentConnected { conn } => {
                if !matches!(
                    self.stage,
                    Stage::Open(Open::Requested | Open::Uploading(_))
                ) {
                    return Err(Refused(
                        "only a requested or uploading upload is described again",
                    ));
                }
                self.live.conn = Some(conn);
                self.live.awaiting_info = Some(now);
                vec![Effect::Describe {
                    conn,
                    share: self.share.clone(),
                }]
            }
            Event::AgentDisconnected { conn } => {
                if !self.is_open() || self.live.conn != Some(conn) {
                    return Err(Refused("not this connection's upload"));
                }
                self.live.conn = None;
                self.live.awaiting_info = None;
                Vec::new()
            }
            Event::Described { agent, facts } => {
                let Some(asked) = self.live.awaiting_info else {
                    return Err(Refused("file_info that was not asked for"));
                };
                if !self.owned_by(&agent) || !self.is_open() {
                    return Err(Refused("file_info that was not asked for"));
                }
                self.live.awaiting_info = None;
                self.live.last_progress = now;
                self.live.plan_asked = Some(now);
                self.phases.describe_ms = self
                    .phases
                    .describe_ms
                    .saturating_add(millis(now.duration_since(asked)));
                let facts = match facts {
                    Ok(facts) => facts,
                    Err(rejected) => {
                        return Ok(self.begin_end(
                            Outcome::Failed,
                            rejected.code,
                            rejected.message,
                            true,
                        ));
                    }
                };
                match &self.stage {
                    Stage::Open(Open::Uploading(t)) if t.file != facts => {
                        let what = if t.file.size != facts.size {
                            format!("size {} is now {}", t.file.size, facts.size)
                        } else {
                            "its content hash differs".to_owned()
                        };
                        self.begin_end(
                            Outcome::Failed,
                            ErrorCode::FileChanged,
                            format!("the file changed while the upload was interrupted: {what}"),
                            true,
                        )
                    }
                    Stage::Open(Open::Uploading(t)) => {
                        self.resumes += 1;
                        vec![Effect::ListParts {
                            multipart: t.multipart.clone(),
                            why: Resume::Reconnect,
                        }]
                    }
                    _ => vec![Effect::CreateMultipart(facts)],
                }
            }
            Event::MultipartCreated { facts, multipart } => {
                if !matches!(self.stage, Stage::Open(Open::Requested)) {
                    return Err(Refused(
                        "the upload moved on while its multipart upload was created",
                    ));
                }
                let transfer = Transfer {
                    file: facts,
                    multipart,
                };
                let missing = transfer.file.parts().map(|(n, _)| n).collect();
                self.stage = Stage::Open(Open::Uploading(transfer.clone()));
                vec![Effect::Presign {
                    transfer,
                    missing,
                    done: Vec::new(),
                }]
            }
            Event::PartsListed { stored, why } => {
                let Some(transfer) = self.uploading().cloned() else {
                    return Err(Refused("parts listed for an upload that is not uploading"));
                };
                let (done, missing) = sort_parts(&transfer.file, &stored);
                if why == Resume::Refresh && done.len() <= self.live.stored_at_last_plan {
                    self.live.fruitless_refreshes += 1;
                } else {
                    self.live.fruitless_refreshes = 0;
                }
                if self.live.fruitless_refreshes >= MAX_FRUITLESS_REFRESHES {
                    return Ok(self.begin_end(
                        Outcome::Failed,
                        ErrorCode::Stalled,
                        format!(
                            "the presigned URLs expired {MAX_FRUITLESS_REFRESHES} times in a row before a part got through; \
                             raise PRESIGN_TTL_SECS above the time one part takes on this store's uplink"
                        ),
                        true,
                    ));
                }
                vec![
                    Effect::Count(Counter::Resumed),
                    Effect::Presign {
                        transfer,
                        missing,
                        done,
                    },
                ]
            }
            Event::MultipartGone => {
                let Some(transfer) = self.uploading().cloned() else {
                    return Err(Refused("the upload is not uploading"));
                };
                self.stage = Stage::Open(Open::Verifying(transfer.clone()));
                vec![Effect::Verify {
                    transfer,
                    reported: None,
                }]
            }
            Event::PlanReady { plan } => {
                let Some(transfer) = self.uploading() else {
                    return Err(Refused("the upload is not uploading"));
                };
                let Some(conn) = self.live.conn else {
                    return Err(Refused("agent went away before the plan was sent"));
                };
                let done_bytes = plan
                    .done
                    .iter()
                    .map(|p| transfer.file.part_len(p.part_number))
                    .sum();
                self.parts_done = plan.done.len() as u32;
                self.bytes_done = done_bytes;
                self.live.plan_sent = Some((now, done_bytes));
                if let Some(asked) = self.live.plan_asked.take() {
                    self.phases.presign_ms = self
                        .phases
                        .presign_ms
                        .saturating_add(millis(now.duration_since(asked)));
                }
                self.live.stored_at_last_plan = plan.done.len();
                self.live.retries_seen = 0;
                self.live.last_progress = now;
                vec![Effect::SendPlan { conn, plan }]
            }
            Event::Progress {
                agent,
                parts_done,
                bytes_done,
                part_retries,
            } => {
                let Some(transfer) = self.uploading() else {
                    return Err(Refused("progress for an upload that is not uploading"));
                };
                if !self.owned_by(&agent) {
                    return Err(Refused(
                        "progress from a connection that does not own the upload",
                    ));
                }
                let (parts_total, size) = (transfer.file.parts_total(), transfer.file.size);
                self.parts_done = parts_done.min(parts_total);
                self.bytes_done = bytes_done.min(size);
                self.live.last_progress = now;
                // The count restarts with each plan the agent runs.
                let new = part_retries
                    .checked_sub(self.live.retries_seen)
                    .unwrap_or(part_retries);
                self.live.retries_seen = part_retries;
                if new > 0 {
                    vec![Effect::Count(Counter::PartRetries(new))]
                } else {
                    Vec::new()
                }
            }
            Event::NeedUrls { agent } => {
                let Some(transfer) = self.uploading().cloned() else {
                    return Err(Refused("need_urls for an upload that is not uploading"));
                };
                if !self.owned_by(&agent) {
                    return Err(Refused(
                        "need_urls from a connection that does not own the upload",
                    ));
                }
                self.live.last_progress = now;
                self.live.plan_asked = Some(now);
                self.add_transfer_time(now);
                self.resumes += 1;
                vec![Effect::ListParts {
                    multipart: transfer.multipart,
                    why: Resume::Refresh,
                }]
            }
            Event::AgentCompleted {
                agent,
                parts,
                complete_ms,
            } => {
                let Some(transfer) = self.uploading().cloned() else {
                    return Err(Refused("completion for an upload that is not uploading"));
                };
                if !self.owned_by(&agent) {
                    return Err(Refused(
                        "completion from a connection that does not own the upload",
                    ));
                }
                self.stage = Stage::Open(Open::Verifying(transfer.clone()));
                self.live.last_progress = now;
                self.live.completed = Some(now);
                self.add_transfer_time(now);
                self.phases.complete_ms = self.phases.complete_ms.saturating_add(complete_ms);
                vec![Effect::Verify {
                    transfer,
                    reported: Some(parts),
                }]
            }
            Event::AgentFailed {
                client_id,
                code,
                message,
            } => {
                if client_id != self.client_id {
                    return Err(Refused(
                        "a failure report for an upload this agent does not own",
                    ));
                }
                if !self.is_open() {
                    return Err(Refused("the upload is already ending"));
                }
                self.begin_end(Outcome::Failed, code, message, false)
            }
            Event::Verified { etag } => {
                let Stage::Open(Open::Verifying(transfer)) = &self.stage else {
                    return Err(Refused("the upload is not being verified"));
                };
                let transfer = transfer.clone();
                let (bytes, parts) = (transfer.file.size, transfer.file.parts_total());
                self.parts_done = parts;
                self.bytes_done = bytes;
                self.finished = Some(UnixMs::now());
                self.live.finished = Some(now);
                if let Some(completed) = self.live.completed.take() {
                    self.phases.verify_ms = self
                        .phases
                        .verify_ms
                        .saturating_add(millis(now.duration_since(completed)));
                }
                self.stage = Stage::Completed { transfer, etag };
                vec![Effect::Count(Counter::Completed { bytes, parts })]
            }
            Event::Fail { code, message } => {
                if !self.is_open() {
                    return Err(Refused("the upload is already ending"));
                }
                self.begin_end(Outcome::Failed, code, message, true)
            }
            Event::Cancel { message } => {
                if !self.is_open() {
                    return Err(Refused("the upload is already ending"));
                }
                self.begin_end(Outcome::Cancelled, ErrorCode::Cancelled, message, true)
            }
            Event::Aborted => {
                let Stage::Ending(ending) = &self.stage else {
                    return Err(Refused("the upload is not ending"));
                };
                let outcome = ending.outcome;
                self.stage = Stage::Ended(ending.clone());
                self.finished = Some(UnixMs::now());
                self.live.finished = Some(now);
                vec![Effect::Count(Counter::Ended(outcome))]
            }
        };
        self.updated = UnixMs::now();
        Ok(effects)
    }

    fn add_transfer_time(&mut self, now: Instant) {
        if let Some((sent, _)) = self.live.plan_sent {
            self.phases.transfer_ms = self
                .phases
                .transfer_ms
                .saturating_add(millis(now.duration_since(sent)));
        }
    }

    /// Claims an open upload for ending: from here only the abort and [`Event::Aborted`] move
    /// it. `tell_agent` is false when the agent itself reported the failure.
    fn begin_end(
        &mut self,
        outcome: Outcome,
        code: ErrorCode,
        message: String,
        tell_agent: bool,
    ) -> Vec<Effect> {
        let Stage::Open(from) = std::mem::replace(&mut self.stage, Stage::Open(Open::Requested))
        else {
            unreachable!("begin_end is only called on an open upload");
        };
        let multipart = from.transfer().map(|t| t.multipart.clone());
        self.stage = Stage::Ending(Ending {
            outcome,
            error: ErrorDetail { code, message },
            from,
        });
        let mut effects = Vec::new();
        if tell_agent && let Some(conn) = self.live.conn {
            effects.push(Effect::TellCancel { conn, code });
        }
        effects.push(Effect::Abort(multipart));
        effects
    }
}

/// Splits a file's parts into those storage holds intact (right size and, where storage says,
/// right ETag) and those still to send.
fn sort_parts(file: &FileFacts, stored: &[StoredPart]) -> (Vec<CompletedPart>, Vec<PartNumber>) {
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for (part_number, md5) in file.parts() {
        let etag = md5.part_etag();
        let len = file.part_len(part_number);
        let good = stored.iter().any(|p| {
            p.part_number == part_number.get()
                && p.size == len
                && p.etag.as_ref().is_none_or(|e| *e == etag)
        });
        if good {
            done.push(CompletedPart { part_number, etag });
        } else {
            missing.push(part_number);
        }
    }
    (done, missing)
}
