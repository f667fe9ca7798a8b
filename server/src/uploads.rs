//! Upload records and the steps that move an upload from `requested` to `completed` or `failed`.
//!
//! Every step is triggered by an operator (trigger, cancel), an agent message, an agent
//! connecting, the watchdog or server start-up. The table lock is a std `Mutex` held only for
//! bookkeeping and the write-through to the [`UploadStore`]; S3 calls happen outside it.
//!
//! An upload belongs to a client, not to a connection. When the agent drops, the upload waits;
//! when the agent comes back (or the server restarts and the agent reconnects), the server asks it
//! to describe the file again, checks the file is the same one (size, SHA-256, part MD5s), lists
//! the parts already in storage and hands out URLs for the missing ones only. An upload that
//! makes no progress for `UPLOAD_STALL_TIMEOUT_SECS` fails with `STALLED`.
//!
//! A record reaches a terminal state only after its multipart upload has been aborted, so a caller
//! who sees `failed` can rely on nothing being left behind.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::api::{ErrorDetail, PhaseTimes, UploadState, UploadStatus};
use shared::protocol::{CompletedPart, PresignedPart, ServerMessage, UploadPlan, plan_parts};
use shared::{ClientId, ErrorCode, FileName, PartNumber, UploadId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::db::{StoredRecord, UploadStore};
use crate::error::ApiError;
use crate::storage::{multipart_etag, part_etag_from_md5};

/// Finished uploads kept in memory for the status API; older ones are read from the store.
pub const MAX_FINISHED_UPLOADS: usize = 10_000;

/// An unfinished upload with no progress for this long shows as stalled (or for half the stall
/// timeout, if that is shorter).
pub const STALLED_AFTER: Duration = Duration::from_secs(10);

/// What the agent said about its file. Kept so a resumed upload can prove it is the same file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFacts {
    pub file_name: FileName,
    pub size: u64,
    pub modified_ms: u64,
    pub sha256: String,
    pub part_size: u64,
    /// Base64 MD5 of each part.
    pub part_md5: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct UploadRecord {
    id: UploadId,
    client_id: ClientId,
    state: UploadState,
    /// Set while the upload is being ended (`failed` or `cancelled`) and its multipart upload
    /// aborted, so only one path does it. Persisted: a restart finishes the job.
    ending: Option<UploadState>,
    requested_by: String,
    requested_from: String,
    share: FileName,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
    file: Option<FileFacts>,
    parts_done: u32,
    bytes_done: u64,
    key: Option<String>,
    s3_upload_id: Option<String>,
    etag: Option<String>,
    error: Option<ErrorDetail>,
    resumes: u32,
    #[serde(default)]
    phases: PhaseTimes,
    #[serde(skip)]
    live: Live,
}

/// What only matters while this process runs.
#[derive(Debug)]
struct Live {
    /// The agent connection that may act on the upload; 0 while the agent is away.
    conn_id: u64,
    /// A `describe_file` was sent and its `file_info` is awaited.
    awaiting_info: bool,
    asked_at: Instant,
    last_progress: Instant,
    /// When the latest plan was sent, and the bytes already stored then; the rate counts from
    /// there.
    plan_sent: Option<(Instant, u64)>,
    /// When a plan was asked for (`file_info` or `need_urls` arrived) and not yet sent.
    plan_asked: Option<Instant>,
    /// When the agent reported its completion, until verification ends.
    completed: Option<Instant>,
    finished: Option<Instant>,
    /// Parts already stored when the latest plan was sent.
    stored_at_last_plan: usize,
    /// The latest part retry count the agent reported for its current run.
    retries_seen: u32,
    /// `need_urls` in a row after which no new part was stored: the URLs die before a part
    /// can get through.
    fruitless_refreshes: u32,
}

/// After this many fruitless refreshes in a row the upload fails instead of looping.
const MAX_FRUITLESS_REFRESHES: u32 = 3;

/// Why a plan is being made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The agent (re)described the file after connecting.
    Reconnect,
    /// The agent's URLs ran out.
    Refresh,
}

impl Default for Live {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            conn_id: 0,
            awaiting_info: false,
            asked_at: now,
            last_progress: now,
            plan_sent: None,
            plan_asked: None,
            completed: None,
            finished: None,
            stored_at_last_plan: 0,
            fruitless_refreshes: 0,
            retries_seen: 0,
        }
    }
}

impl UploadRecord {
    fn touch(&mut self) {
        self.updated_at = OffsetDateTime::now_utc();
    }

    fn parts_total(&self) -> Option<u32> {
        self.file.as_ref().map(|f| f.part_md5.len() as u32)
    }

    fn is_open(&self) -> bool {
        !self.state.is_terminal() && self.ending.is_none()
    }

    fn status(&self, bucket: &str, stalled_after: Duration) -> UploadStatus {
        let open = !self.state.is_terminal();
        let rate = self.live.plan_sent.and_then(|(start, base)| {
            let end = self.live.finished.unwrap_or_else(Instant::now);
            let secs = end.duration_since(start).as_secs_f64();
            (secs > 0.0).then(|| (self.bytes_done.saturating_sub(base) as f64 / secs) as u64)
        });
        let size = self.file.as_ref().map(|f| f.size);
        let eta = match (self.state, rate, size) {
            (UploadState::Uploading, Some(r), Some(size)) if r > 0 => {
                Some(size.saturating_sub(self.bytes_done) / r)
            }
            _ => None,
        };
        let idle = open.then(|| self.live.last_progress.elapsed());
        UploadStatus {
            upload_id: self.id,
            client_id: self.client_id.clone(),
            state: self.state,
            bucket: bucket.to_owned(),
            key: self.key.clone(),
            share: self.share.as_str().to_owned(),
            file_name: self.file.as_ref().map(|f| f.file_name.as_str().to_owned()),
            size,
            part_size: self.file.as_ref().map(|f| f.part_size),
            parts_total: self.parts_total(),
            parts_done: self.parts_done,
            bytes_done: self.bytes_done,
            rate_bytes_per_sec: rate,
            eta_secs: eta,
            idle_secs: idle.map(|d| d.as_secs()),
            stalled: idle.is_some_and(|d| d >= stalled_after),
            agent_connected: open && self.live.conn_id != 0,
            resumes: self.resumes,
            sha256: self.file.as_ref().map(|f| f.sha256.clone()),
            etag: self.etag.clone(),
            error: self.error.clone(),
            requested_by: self.requested_by.clone(),
            requested_from: self.requested_from.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            finished_at: self.finished_at.map(rfc3339),
            phases: self.phases,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// RFC 3339 with millisecond precision.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let millis = t.nanosecond() / 1_000_000 * 1_000_000;
    t.replace_nanosecond(millis)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<UploadId, UploadRecord>,
    /// At most one unfinished upload per client.
    active_by_client: HashMap<ClientId, UploadId>,
    latest_by_client: HashMap<ClientId, UploadId>,
    /// Terminal uploads in memory, oldest first.
    finished: VecDeque<UploadId>,
}

impl Table {
    fn insert(&mut self, r: UploadRecord) {
        let (id, client) = (r.id, r.client_id.clone());
        if !r.state.is_terminal() {
            self.active_by_client.insert(client.clone(), id);
        } else {
            self.finished.push_back(id);
        }
        self.latest_by_client.insert(client, id);
        self.by_id.insert(id, r);
    }

    /// Bookkeeping for an upload that just reached a terminal state.
    fn retire(&mut self, id: UploadId, client_id: &ClientId) {
        if self.active_by_client.get(client_id) == Some(&id) {
            self.active_by_client.remove(client_id);
        }
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_UPLOADS {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if let Some(r) = self.by_id.remove(&old)
                && self.latest_by_client.get(&r.client_id) == Some(&old)
            {
                self.latest_by_client.remove(&r.client_id);
            }
        }
    }
}

pub struct Uploads {
    table: Mutex<Table>,
    store: Box<dyn UploadStore>,
    stalled_after: Duration,
}

impl Uploads {
    /// Loads every unfinished upload and the most recent finished ones from `store`.
    pub fn open(store: Box<dyn UploadStore>, stall_timeout: Duration) -> anyhow::Result<Self> {
        let mut table = Table::default();
        for json in store.load_working_set(MAX_FINISHED_UPLOADS)? {
            match serde_json::from_str::<UploadRecord>(&json) {
                Ok(r) => table.insert(r),
                Err(err) => tracing::error!(error = %err, "skipping an unreadable upload record"),
            }
        }
        Ok(Self {
            table: Mutex::new(table),
            store,
            stalled_after: STALLED_AFTER.min(stall_timeout / 2),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Each critical section leaves the table consistent before anything can panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a record through to the store. A failed write is logged: the upload goes on, and
    /// only a restart at that moment would lose the change.
    fn persist(&self, r: &UploadRecord) {
        let json = match serde_json::to_string(r) {
            Ok(json) => json,
            Err(err) => {
                tracing::error!(upload_id = %r.id, error = %err, "serializing an upload failed");
                return;
            }
        };
        let stored = StoredRecord {
            id: r.id,
            client_id: r.client_id.clone(),
            created_at: rfc3339(r.created_at),
            terminal: r.state.is_terminal(),
            json,
        };
        if let Err(err) = self.store.save(&stored) {
            tracing::error!(upload_id = %r.id, error = format!("{err:#}"), "saving an upload failed");
        }
    }

    fn read_stored(
        &self,
        json: anyhow::Result<Option<String>>,
        bucket: &str,
    ) -> Option<UploadStatus> {
        let json = json
            .map_err(|err| tracing::error!(error = format!("{err:#}"), "reading an upload failed"))
            .ok()??;
        serde_json::from_str::<UploadRecord>(&json)
            .ok()
            .map(|r| r.status(bucket, self.stalled_after))
    }

    pub fn status(&self, id: UploadId, bucket: &str) -> Option<UploadStatus> {
        if let Some(s) = self
            .lock()
            .by_id
            .get(&id)
            .map(|r| r.status(bucket, self.stalled_after))
        {
            return Some(s);
        }
        self.read_stored(self.store.get(id), bucket)
    }

    /// The object key, S3 upload id and file description of an upload past `start_upload`.
    fn multipart(&self, id: UploadId) -> Option<(String, String, FileFacts)> {
        let table = self.lock();
        let r = table.by_id.get(&id)?;
        Some((r.key.clone()?, r.s3_upload_id.clone()?, r.file.clone()?))
    }

    /// Unfinished uploads per state, for `/metrics`.
    pub fn open_counts(&self) -> Vec<(&'static str, usize)> {
        let table = self.lock();
        let mut counts = [("requested", 0), ("uploading", 0), ("verifying", 0)];
        for id in table.active_by_client.values() {
            let i = match table.by_id.get(id).map(|r| r.state) {
                Some(UploadState::Requested) => 0,
                Some(UploadState::Uploading) => 1,
                Some(UploadState::Verifying) => 2,
                _ => continue,
            };
            counts[i].1 += 1;
        }
        counts.to_vec()
    }

    pub fn active_for(&self, client_id: &ClientId) -> Option<UploadId> {
        self.lock().active_by_client.get(client_id).copied()
    }

    pub fn latest_for(&self, client_id: &ClientId, bucket: &str) -> Option<UploadStatus> {
        {
            let table = self.lock();
            if let Some(r) = table
                .latest_by_client
                .get(client_id)
                .and_then(|id| table.by_id.get(id))
            {
                return Some(r.status(bucket, self.stalled_after));
            }
        }
        self.read_stored(self.store.latest_for(client_id), bucket)
    }

    /// Changes a record and writes it through, if it exists and `pred` holds.
    fn update<T>(
        &self,
        id: UploadId,
        pred: impl FnOnce(&UploadRecord) -> bool,
        change: impl FnOnce(&mut UploadRecord) -> T,
    ) -> Option<T> {
        let mut table = self.lock();
        let r = table.by_id.get_mut(&id)?;
        if !pred(r) {
            return None;
        }
        let out = change(r);
        r.touch();
        self.persist(r);
        Some(out)
    }
}

/// Who asked for an upload, for the audit trail.
#[derive(Debug, Clone)]
pub struct Requester {
    /// The `sub` of the operator's token.
    pub operator: String,
    /// The peer address of the request (a reverse proxy's, behind one).
    pub from: std::net::SocketAddr,
}

/// `POST /trigger-download/{client_id}`: records the upload and asks the agent for its file.
pub fn trigger(
    state: &AppState,
    client_id: ClientId,
    share: FileName,
    requester: &Requester,
) -> Result<UploadId, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            ErrorCode::ShuttingDown,
            "server is shutting down",
        ));
    }
    let agent = state.registry.get(&client_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ClientNotConnected,
            format!("client {client_id} is not connected"),
        )
    })?;
    let id = UploadId::new_random();
    {
        let mut table = state.uploads.lock();
        if let Some(active) = table.active_by_client.get(&client_id) {
            return Err(ApiError::new(
                ErrorCode::DownloadInProgress,
                format!("client {client_id} already has upload {active} in progress"),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let record = UploadRecord {
            id,
            client_id: client_id.clone(),
            state: UploadState::Requested,
            ending: None,
            requested_by: requester.operator.clone(),
            requested_from: requester.from.to_string(),
            share: share.clone(),
            created_at: now,
            updated_at: now,
            finished_at: None,
            file: None,
            parts_done: 0,
            bytes_done: 0,
            key: None,
            s3_upload_id: None,
            etag: None,
            error: None,
            resumes: 0,
            phases: PhaseTimes::default(),
            live: Live {
                conn_id: agent.conn_id,
                awaiting_info: true,
                ..Live::default()
            },
        };
        if agent.outbox.try_send(describe(&record, state)).is_err() {
            // The connection closed or stopped reading between the lookup and now. Nothing
            // was created anywhere yet.
            return Err(ApiError::new(
                ErrorCode::ClientNotConnected,
                format!("client {client_id} is not reachable"),
            ));
        }
        state.uploads.persist(&record);
        table.insert(record);
    }
    state
        .metrics
        .triggers
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        audit = true,
        %client_id,
        upload_id = %id,
        %share,
        operator = requester.operator,
        from = %requester.from,
        "download triggered"
    );
    Ok(id)
}

fn describe(r: &UploadRecord, state: &AppState) -> ServerMessage {
    ServerMessage::DescribeFile {
        upload_id: r.id,
        share: r.share.clone(),
        min_part_size: state.config.part_size,
    }
}

fn object_key(prefix: &str, client_id: &ClientId, id: UploadId, file_name: &FileName) -> String {
    let stamp = OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    format!("{prefix}/{client_id}/{stamp}-{id}/{file_name}")
}

/// The upload id inside an object key made by [`object_key`].
fn upload_id_of_key(prefix: &str, key: &str) -> Option<UploadId> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let dir = rest.split('/').nth(1)?;
    let (_, id) = dir.split_once('-')?;
    UploadId::parse(id).ok()
}

/// An agent (re)connected: an upload it left unfinished picks up where it stopped, starting
/// with a fresh description of the file.
pub fn on_agent_connected(state: &AppState, client_id: &ClientId, conn_id: u64) {
    let Some(handle) = state
        .registry
        .get(client_id)
        .filter(|h| h.conn_id == conn_id)
    else {
        return;
    };
    let mut table = state.uploads.lock();
    let Some(id) = table.active_by_client.get(client_id).copied() else {
        return;
    };
    let Some(r) = table.by_id.get_mut(&id) else {
        return;
    };
    if !r.is_open() || r.state == UploadState::Verifying {
        return;
    }
    r.live.conn_id = conn_id;
    r.live.awaiting_info = true;
    r.live.asked_at = Instant::now();
    if handle.outbox.try_send(describe(r, state)).is_ok() {
        tracing::info!(%client_id, upload_id = %id, "agent is back; asking it to describe the file again");
    }
}

/// Dispatches one message from the agent `client_id` on connection `conn_id`.
pub fn on_agent_message(
    state: &AppState,
    client_id: &ClientId,
    conn_id: u64,
    msg: shared::protocol::AgentMessage,
) {
    use shared::protocol::AgentMessage::*;
    let owned = |r: &UploadRecord| r.client_id == *client_id && r.live.conn_id == conn_id;
    match msg {
        Hello { .. } => {
            tracing::warn!(%client_id, "ignoring a second hello");
        }
        FileInfo {
            upload_id,
            file_name,
            size,
            modified_ms,
            sha256,
            part_size,
            part_md5,
        } => {
            let accepted = state.uploads.update(
                upload_id,
                |r| owned(r) && r.is_open() && r.live.awaiting_info,
                |r| {
                    let now = Instant::now();
                    r.live.awaiting_info = false;
                    r.live.last_progress = now;
                    r.live.plan_asked = Some(now);
                    r.phases.describe_ms = r
                        .phases
                        .describe_ms
                        .saturating_add(millis(now - r.live.asked_at));
                },
            );
            if accepted.is_none() {
                tracing::warn!(%client_id, %upload_id, "file_info that was not asked for");
                return;
            }
            let facts = FileFacts {
                file_name,
                size,
                modified_ms,
                sha256,
                part_size,
                part_md5,
            };
            let state = state.clone();
            state.clone().tracker.spawn(async move {
                on_file_info(&state, upload_id, facts).await;
            });
        }
        Progress {
            upload_id,
            parts_done,
            bytes_done,
            part_retries,
        } => {
            let mut table = state.uploads.lock();
            if let Some(r) = table.by_id.get_mut(&upload_id)
                && owned(r)
                && r.state == UploadState::Uploading
            {
                let size = r.file.as_ref().map_or(0, |f| f.size);
                r.parts_done = parts_done.min(r.parts_total().unwrap_or(0));
                r.bytes_done = bytes_done.min(size);
                r.live.last_progress = Instant::now();
                // The count restarts with each plan the agent runs.
                let new = part_retries
                    .checked_sub(r.live.retries_seen)
                    .unwrap_or(part_retries);
                r.live.retries_seen = part_retries;
                state
                    .metrics
                    .part_retries
                    .fetch_add(u64::from(new), std::sync::atomic::Ordering::Relaxed);
                r.touch();
            }
        }
        NeedUrls { upload_id } => {
            let ok = state.uploads.update(
                upload_id,
                |r| owned(r) && r.is_open() && r.state == UploadState::Uploading,
                |r| {
                    let now = Instant::now();
                    r.live.last_progress = now;
                    r.live.plan_asked = Some(now);
                    if let Some((sent, _)) = r.live.plan_sent {
                        r.phases.transfer_ms =
                            r.phases.transfer_ms.saturating_add(millis(now - sent));
                    }
                    r.resumes += 1;
                },
            );
            if ok.is_none() {
                tracing::warn!(%client_id, %upload_id, "need_urls for an upload that is not uploading");
                return;
            }
            tracing::info!(%client_id, %upload_id, "agent's URLs expired; presigning the missing parts again");
            let state = state.clone();
            state
                .clone()
                .tracker
                .spawn(async move { resume(&state, upload_id, Resume::Refresh).await });
        }
        UploadCompleted {
            upload_id,
            parts,
            complete_ms,
        } => {
            let ok = state.uploads.update(
                upload_id,
                |r| owned(r) && r.is_open() && r.state == UploadState::Uploading,
                |r| {
                    let now = Instant::now();
                    r.state = UploadState::Verifying;
                    r.live.last_progress = now;
                    r.live.completed = Some(now);
                    if let Some((sent, _)) = r.live.plan_sent {
                        r.phases.transfer_ms =
                            r.phases.transfer_ms.saturating_add(millis(now - sent));
                    }
                    r.phases.complete_ms = r.phases.complete_ms.saturating_add(complete_ms);
                },
            );
            if ok.is_none() {
                tracing::warn!(%client_id, %upload_id, "completion for an upload that is not uploading");
                return;
            }
            let state = state.clone();
            state.clone().tracker.spawn(async move {
                verify(&state, upload_id, Some(parts)).await;
            });
        }
        UploadFailed {
            upload_id,
            code,
            message,
        } => {
            let mine = state
                .uploads
                .lock()
                .by_id
                .get(&upload_id)
                .is_some_and(|r| r.client_id == *client_id);
            if !mine {
                tracing::warn!(%client_id, %upload_id, "failure report for an upload this agent does not own");
                return;
            }
            // The agent's message is shown to operators; keep it to a sane length. The record is
            // claimed now, in message order; only the S3 clean-up runs in the background.
            let message: String = message.chars().take(1024).collect();
            if let Some(cleanup) = begin_fail(state, upload_id, code, message) {
                let state = state.clone();
                state
                    .clone()
                    .tracker
                    .spawn(async move { cleanup.run(&state).await });
            }
        }
    }
}

/// Checks a description against the server's own part layout. The message names what is wrong.
fn check_facts(facts: &FileFacts, min_part_size: u64) -> Result<(), String> {
    let Some((part_size, parts)) = plan_parts(facts.size, min_part_size) else {
        return Err(format!(
            "file of {} bytes is larger than one S3 object may be",
            facts.size
        ));
    };
    if facts.part_size != part_size || facts.part_md5.len() != parts as usize {
        return Err(format!(
            "the agent hashed {} parts of {} bytes; expected {parts} parts of {part_size}",
            facts.part_md5.len(),
            facts.part_size
        ));
    }
    if facts.sha256.len() != 64
        || !facts
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("the SHA-256 is not 64 lowercase hex digits".into());
    }
    if facts
        .part_md5
        .iter()
        .any(|m| part_etag_from_md5(m).is_none())
    {
        return Err("a part MD5 is not base64 of 16 bytes".into());
    }
    Ok(())
}

async fn on_file_info(state: &AppState, upload_id: UploadId, facts: FileFacts) {
    if let Err(message) = check_facts(&facts, state.config.part_size) {
        let code = if facts.size > shared::protocol::MAX_OBJECT_SIZE {
            ErrorCode::FileTooLarge
        } else {
            ErrorCode::MalformedMessage
        };
        fail(state, upload_id, code, message).await;
        return;
    }
    let known = state
        .uploads
        .lock()
        .by_id
        .get(&upload_id)
        .map(|r| (r.state, r.file.clone()));
    match known {
        Some((UploadState::Requested, _)) => start_upload(state, upload_id, facts).await,
        Some((UploadState::Uploading, Some(before))) => {
            if before != facts {
                let what = if before.size != facts.size {
                    format!("size {} is now {}", before.size, facts.size)
                } else {
                    "its content hash differs".to_owned()
                };
                fail(
                    state,
                    upload_id,
                    ErrorCode::FileChanged,
                    format!("the file changed while the upload was interrupted: {what}"),
                )
                .await;
                return;
            }
            state
                .uploads
                .update(upload_id, |_| true, |r| r.resumes += 1);
            resume(state, upload_id, Resume::Reconnect).await;
        }
        _ => {}
    }
}

/// The agent described its file: create the multipart upload, presign it, send the plan.
async fn start_upload(state: &AppState, upload_id: UploadId, facts: FileFacts) {
    let Some(client_id) = state
        .uploads
        .lock()
        .by_id
        .get(&upload_id)
        .map(|r| r.client_id.clone())
    else {
        return;
    };
    let key = object_key(
        &state.config.key_prefix,
        &client_id,
        upload_id,
        &facts.file_name,
    );
    let s3_upload_id = match state.storage.create_multipart(&key, &facts.sha256).await {
        Ok(id) => id,
        Err(err) => {
            tracing::error!(%upload_id, error = format!("{err:#}"), "CreateMultipartUpload failed");
            fail(
                state,
                upload_id,
                ErrorCode::StorageError,
                "could not start the multipart upload".into(),
            )
            .await;
            return;
        }
    };
    // Record the multipart upload before anything else can fail, so it is aborted on failure.
    let recorded = state.uploads.update(
        upload_id,
        |r| r.is_open() && r.state == UploadState::Requested,
        |r| {
            r.state = UploadState::Uploading;
            r.key = Some(key.clone());
            r.s3_upload_id = Some(s3_upload_id.clone());
            r.file = Some(facts.clone());
        },
    );
    if recorded.is_none() {
        // Cancelled or failed meanwhile: the new multipart upload has no owner.
        if let Err(err) = state.storage.abort_multipart(&key, &s3_upload_id).await {
            tracing::error!(%upload_id, error = format!("{err:#}"), "aborting an unowned multipart upload failed; the orphan sweep will retry");
        }
        return;
    }
    let all = (1..=facts.part_md5.len() as u32)
        .filter_map(|n| PartNumber::new(n).ok())
        .collect();
    send_plan(state, upload_id, all, Vec::new()).await;
}

/// Lists what storage already holds and sends a plan for the rest. With every part stored, the
/// plan has no parts and the agent only completes. If the multipart upload is gone, the agent may
/// have completed it before losing its connection: the object is verified.
async fn resume(state: &AppState, upload_id: UploadId, why: Resume) {
    let Some((key, s3_upload_id, facts)) = state.uploads.multipart(upload_id) else {
        return;
    };
    let stored = match state.storage.list_parts(&key, &s3_upload_id).await {
        Ok(Some(parts)) => parts,
        Ok(None) => {
            tracing::info!(%upload_id, "multipart upload no longer open; checking for the object");
            let moved = state.uploads.update(
                upload_id,
                |r| r.is_open() && r.state == UploadState::Uploading,
                |r| r.state = UploadState::Verifying,
            );
            if moved.is_some() {
                verify(state, upload_id, None).await;
            }
            return;
        }
        Err(err) => {
            // Storage trouble: leave the upload as it is; the next reconnect or the stall
            // timeout decides.
            tracing::error!(%upload_id, error = format!("{err:#}"), "ListParts failed");
            return;
        }
    };
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for (i, md5) in facts.part_md5.iter().enumerate() {
        let n = i as u32 + 1;
        let Ok(part_number) = PartNumber::new(n) else {
            continue;
        };
        let expected_etag = part_etag_from_md5(md5).unwrap_or_default();
        let (_, len) = shared::protocol::part_range(facts.size, facts.part_size, part_number);
        let good = stored.iter().any(|p| {
            p.part_number == n
                && p.size == len
                && p.etag.as_ref().is_none_or(|e| *e == expected_etag)
        });
        if good {
            done.push(CompletedPart {
                part_number,
                etag: expected_etag,
            });
        } else {
            missing.push(part_number);
        }
    }
    let fruitless = state.uploads.update(
        upload_id,
        |_| true,
        |r| {
            if why == Resume::Refresh && done.len() <= r.live.stored_at_last_plan {
                r.live.fruitless_refreshes += 1;
            } else {
                r.live.fruitless_refreshes = 0;
            }
            r.live.fruitless_refreshes
        },
    );
    if fruitless.is_some_and(|n| n >= MAX_FRUITLESS_REFRESHES) {
        fail(
            state,
            upload_id,
            ErrorCode::Stalled,
            format!(
                "the presigned URLs expired {MAX_FRUITLESS_REFRESHES} times in a row before a part got through; \
                 raise PRESIGN_TTL_SECS above the time one part takes on this store's uplink"
            ),
        )
        .await;
        return;
    }
    tracing::info!(%upload_id, stored = done.len(), missing = missing.len(), ?why, "resuming");
    state
        .metrics
        .resumes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    send_plan(state, upload_id, missing, done).await;
}

/// Presigns `missing` and the completion, and sends the plan to the agent if it is connected.
async fn send_plan(
    state: &AppState,
    upload_id: UploadId,
    missing: Vec<PartNumber>,
    done: Vec<CompletedPart>,
) {
    let Some((key, s3_upload_id, facts)) = state.uploads.multipart(upload_id) else {
        return;
    };
    let ttl = state.config.presign_ttl();
    let mut parts = Vec::with_capacity(missing.len());
    for part_number in missing {
        let content_md5 = facts.part_md5[part_number.get() as usize - 1].clone();
        match state
            .storage
            .presign_part(&key, &s3_upload_id, part_number, &content_md5, ttl)
            .await
        {
            Ok(url) => parts.push(PresignedPart {
                part_number,
                url,
                content_md5,
            }),
            Err(err) => {
                tracing::error!(%upload_id, error = format!("{err:#}"), "presigning failed");
                fail(
                    state,
                    upload_id,
                    ErrorCode::StorageError,
                    "could not presign the upload".into(),
                )
                .await;
                return;
            }
        }
    }
    let complete_url = match state
        .storage
        .presign_complete(&key, &s3_upload_id, ttl)
        .await
    {
        Ok(url) => url,
        Err(err) => {
            tracing::error!(%upload_id, error = format!("{err:#}"), "presigning completion failed");
            fail(
                state,
                upload_id,
                ErrorCode::StorageError,
                "could not presign the upload".into(),
            )
            .await;
            return;
        }
    };
    let done_bytes: u64 = done
        .iter()
        .map(|p| shared::protocol::part_range(facts.size, facts.part_size, p.part_number).1)
        .sum();
    let to_send = parts.len();
    let plan = UploadPlan {
        upload_id,
        size: facts.size,
        part_size: facts.part_size,
        parts,
        done,
        complete_url,
        expires_at: shared::auth::unix_now() + ttl.as_secs(),
        expires_in_secs: ttl.as_secs(),
    };
    let outbox = {
        let mut table = state.uploads.lock();
        let Some(r) = table.by_id.get_mut(&upload_id) else {
            return;
        };
        if !r.is_open() || r.state != UploadState::Uploading {
            return;
        }
        let handle = state
            .registry
            .get(&r.client_id)
            .filter(|h| h.conn_id == r.live.conn_id && r.live.conn_id != 0);
        if handle.is_some() {
            let now = Instant::now();
            r.parts_done = plan.done.len() as u32;
            r.bytes_done = done_bytes;
            r.live.plan_sent = Some((now, done_bytes));
            if let Some(asked) = r.live.plan_asked.take() {
                r.phases.presign_ms = r.phases.presign_ms.saturating_add(millis(now - asked));
            }
            r.live.stored_at_last_plan = plan.done.len();
            r.live.retries_seen = 0;
            r.live.last_progress = now;
            r.touch();
        }
        handle.map(|h| h.outbox)
    };
    let sent = match outbox {
        Some(outbox) => outbox.send(ServerMessage::StartUpload(plan)).await.is_ok(),
        None => false,
    };
    if sent {
        tracing::info!(%upload_id, %key, size = facts.size, part_size = facts.part_size, parts = to_send, "upload plan sent");
    } else {
        tracing::info!(%upload_id, "agent went away before the plan was sent; waiting for it to return");
    }
}

/// Checks the stored object before believing the upload: its size, its multipart ETag (from the
/// part MD5s the agent hashed before uploading) and the SHA-256 recorded on it. `reported` is
/// the agent's part list, when it says it completed; it must agree with the hashes too.
async fn verify(state: &AppState, upload_id: UploadId, reported: Option<Vec<CompletedPart>>) {
    let Some((key, facts)) = state
        .uploads
        .lock()
        .by_id
        .get(&upload_id)
        .and_then(|r| Some((r.key.clone()?, r.file.clone()?)))
    else {
        return;
    };
    let expected_parts: Vec<CompletedPart> = facts
        .part_md5
        .iter()
        .enumerate()
        .filter_map(|(i, md5)| {
            Some(CompletedPart {
                part_number: PartNumber::new(i as u32 + 1).ok()?,
                etag: part_etag_from_md5(md5)?,
            })
        })
        .collect();
    let agrees = |parts: &[CompletedPart]| {
        parts.len() == expected_parts.len()
            && parts.iter().zip(&expected_parts).all(|(a, b)| {
                a.part_number == b.part_number
                    && a.etag
                        .trim_matches('"')
                        .eq_ignore_ascii_case(b.etag.trim_matches('"'))
            })
    };
    let outcome = match (reported.as_deref(), multipart_etag(&expected_parts)) {
        (Some(parts), _) if !agrees(parts) => Err(format!(
            "the agent reported {} part ETags that do not match the {} parts it hashed",
            parts.len(),
            expected_parts.len()
        )),
        (_, None) => Err("a part MD5 is malformed".to_owned()),
        (_, Some(expected)) => match state.storage.head_object(&key).await {
            Ok(Some(obj)) if obj.size != facts.size => Err(format!(
                "stored object has {} bytes, expected {}",
                obj.size, facts.size
            )),
            Ok(Some(obj)) if obj.etag != expected => Err(format!(
                "stored object ETag {} does not match the hashed parts' ETag {expected}",
                obj.etag
            )),
            Ok(Some(obj)) if obj.sha256.as_deref() != Some(facts.sha256.as_str()) => Err(format!(
                "stored object records SHA-256 {:?}, expected {}",
                obj.sha256, facts.sha256
            )),
            Ok(Some(obj)) => Ok(obj.etag),
            Ok(None) => Err("the object is not in storage".to_owned()),
            Err(err) => {
                tracing::error!(%upload_id, error = format!("{err:#}"), "HeadObject failed");
                Err("could not read the stored object".to_owned())
            }
        },
    };
    match outcome {
        Ok(etag) => {
            let mut table = state.uploads.lock();
            let table = &mut *table;
            if let Some(r) = table.by_id.get_mut(&upload_id)
                && r.is_open()
            {
                r.state = UploadState::Completed;
                use std::sync::atomic::Ordering::Relaxed;
                state.metrics.completed.fetch_add(1, Relaxed);
                state.metrics.bytes_uploaded.fetch_add(facts.size, Relaxed);
                state
                    .metrics
                    .parts_uploaded
                    .fetch_add(expected_parts.len() as u64, Relaxed);
                r.etag = Some(etag.clone());
                r.parts_done = expected_parts.len() as u32;
                r.bytes_done = facts.size;
                r.finished_at = Some(OffsetDateTime::now_utc());
                let now = Instant::now();
                r.live.finished = Some(now);
                if let Some(completed) = r.live.completed.take() {
                    r.phases.verify_ms = r.phases.verify_ms.saturating_add(millis(now - completed));
                }
                r.touch();
                state.uploads.persist(r);
                let client_id = r.client_id.clone();
                table.retire(upload_id, &client_id);
            }
            tracing::info!(%upload_id, %key, size = facts.size, %etag, sha256 = facts.sha256, "upload verified");
        }
        Err(message) => {
            // An object that failed verification must not be mistaken for a good one.
            if let Err(err) = state.storage.delete_object(&key).await {
                tracing::error!(%upload_id, error = format!("{err:#}"), "deleting an unverified object failed");
            }
            fail(state, upload_id, ErrorCode::VerificationFailed, message).await;
        }
    }
}

/// Ends an upload as `failed`: aborts its multipart upload first, then records the error.
pub async fn fail(state: &AppState, upload_id: UploadId, code: ErrorCode, message: String) {
    if let Some(cleanup) = begin_fail(state, upload_id, code, message) {
        cleanup.run(state).await;
    }
}

/// `DELETE /uploads/{upload_id}`: stops the agent, aborts the multipart upload and ends the
/// upload as `cancelled`. Returns once the abort is done.
pub async fn cancel(
    state: &AppState,
    upload_id: UploadId,
    requester: &Requester,
) -> Result<UploadStatus, ApiError> {
    let message = format!(
        "cancelled by {} from {}",
        requester.operator, requester.from
    );
    let cleanup = {
        let table = state.uploads.lock();
        let Some(r) = table.by_id.get(&upload_id) else {
            drop(table);
            return Err(
                match state.uploads.status(upload_id, state.storage.bucket()) {
                    Some(s) => ApiError::new(
                        ErrorCode::UploadFinished,
                        format!("upload {upload_id} is already {}", s.state),
                    ),
                    None => {
                        ApiError::new(ErrorCode::UploadNotFound, format!("no upload {upload_id}"))
                    }
                },
            );
        };
        if !r.is_open() {
            return Err(ApiError::new(
                ErrorCode::UploadFinished,
                format!("upload {upload_id} is already {}", r.state),
            ));
        }
        drop(table);
        begin_end(
            state,
            upload_id,
            ErrorCode::Cancelled,
            message,
            UploadState::Cancelled,
        )
    };
    let Some(cleanup) = cleanup else {
        return Err(ApiError::new(
            ErrorCode::UploadFinished,
            format!("upload {upload_id} finished meanwhile"),
        ));
    };
    tracing::info!(
        audit = true,
        %upload_id,
        operator = requester.operator,
        from = %requester.from,
        "upload cancelled"
    );
    cleanup.run(state).await;
    state
        .uploads
        .status(upload_id, state.storage.bucket())
        .ok_or_else(|| ApiError::new(ErrorCode::UploadNotFound, format!("no upload {upload_id}")))
}

fn begin_fail(
    state: &AppState,
    upload_id: UploadId,
    code: ErrorCode,
    message: String,
) -> Option<FailCleanup> {
    begin_end(state, upload_id, code, message, UploadState::Failed)
}

/// The part of ending an upload that must happen before the caller moves on: claim the record
/// so no other path ends it, and remember why (durably). `None` if it is already ending.
fn begin_end(
    state: &AppState,
    upload_id: UploadId,
    code: ErrorCode,
    message: String,
    final_state: UploadState,
) -> Option<FailCleanup> {
    state.uploads.update(
        upload_id,
        |r| r.is_open(),
        |r| {
            r.ending = Some(final_state);
            r.error = Some(ErrorDetail {
                code,
                message: message.clone(),
            });
            FailCleanup {
                upload_id,
                code,
                message,
                multipart: r.key.clone().zip(r.s3_upload_id.clone()),
                conn_id: r.live.conn_id,
                client_id: r.client_id.clone(),
                final_state,
            }
        },
    )
}

/// What is left to do once [`begin_end`] claimed an upload.
struct FailCleanup {
    upload_id: UploadId,
    code: ErrorCode,
    message: String,
    multipart: Option<(String, String)>,
    conn_id: u64,
    client_id: ClientId,
    /// `failed`, or `cancelled` when an operator asked for it.
    final_state: UploadState,
}

impl FailCleanup {
    /// Rebuilds the clean-up of a record that was ending when the server stopped.
    fn resume_from(r: &UploadRecord) -> Option<Self> {
        let final_state = r.ending?;
        let error = r.error.clone().unwrap_or(ErrorDetail {
            code: ErrorCode::Internal,
            message: "ended during a restart".into(),
        });
        Some(Self {
            upload_id: r.id,
            code: error.code,
            message: error.message,
            multipart: r.key.clone().zip(r.s3_upload_id.clone()),
            conn_id: 0,
            client_id: r.client_id.clone(),
            final_state,
        })
    }

    async fn run(self, state: &AppState) {
        let FailCleanup {
            upload_id,
            code,
            message,
            multipart,
            conn_id,
            client_id,
            final_state,
        } = self;
        // Tell the agent to stop, unless it is the one that reported the failure or is gone.
        let reported_by_agent = matches!(
            code,
            ErrorCode::FileNotFound
                | ErrorCode::PermissionDenied
                | ErrorCode::FileReadError
                | ErrorCode::PartUploadFailed
                | ErrorCode::CompleteFailed
                | ErrorCode::FileNotShared
                | ErrorCode::FileTooLarge
                | ErrorCode::UploadHostNotAllowed
        );
        if !reported_by_agent
            && let Some(h) = state
                .registry
                .get(&client_id)
                .filter(|h| h.conn_id == conn_id)
        {
            let _ = h
                .outbox
                .try_send(ServerMessage::CancelUpload { upload_id, code });
        }
        if let Some((key, s3_upload_id)) = multipart {
            // Bounded retries: an abort that never succeeds is logged, and the orphan sweep
            // tries again later.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match state.storage.abort_multipart(&key, &s3_upload_id).await {
                    Ok(()) => break,
                    Err(err) if attempt < 3 => {
                        tracing::warn!(%upload_id, attempt, error = format!("{err:#}"), "abort failed, retrying");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(err) => {
                        tracing::error!(%upload_id, %key, error = format!("{err:#}"), "abort failed; the orphan sweep will retry");
                        break;
                    }
                }
            }
        }
        let mut table = state.uploads.lock();
        let table = &mut *table;
        if let Some(r) = table.by_id.get_mut(&upload_id) {
            r.state = final_state;
            r.ending = None;
            let counter = if final_state == UploadState::Cancelled {
                &state.metrics.cancelled
            } else {
                &state.metrics.failed
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            r.finished_at = Some(OffsetDateTime::now_utc());
            r.live.finished = Some(Instant::now());
            r.touch();
            state.uploads.persist(r);
            let client_id = r.client_id.clone();
            table.retire(upload_id, &client_id);
        }
        tracing::warn!(%upload_id, %client_id, state = ?final_state, %code, message, "upload ended");
    }
}

/// A connection ended. Its uploads wait for the agent to come back; the stall timeout bounds
/// the wait.
pub fn on_agent_disconnected(state: &AppState, conn_id: u64) {
    let mut table = state.uploads.lock();
    for r in table.by_id.values_mut() {
        if r.live.conn_id == conn_id && r.is_open() {
            r.live.conn_id = 0;
            r.live.awaiting_info = false;
            tracing::info!(upload_id = %r.id, client_id = %r.client_id, "agent disconnected; the upload waits for it");
        }
    }
}

/// Fails uploads whose agent never answered or that stopped making progress.
pub async fn sweep(state: &AppState) {
    let response_timeout = Duration::from_secs(state.config.agent_response_timeout_secs);
    let stall_timeout = Duration::from_secs(state.config.upload_stall_timeout_secs);
    let now = Instant::now();
    let expired: Vec<(UploadId, ErrorCode, String)> = state
        .uploads
        .lock()
        .by_id
        .values()
        .filter(|r| r.is_open())
        .filter_map(|r| {
            if r.live.awaiting_info
                && r.live.conn_id != 0
                && now.duration_since(r.live.asked_at) > response_timeout
            {
                Some((
                    r.id,
                    ErrorCode::AgentTimeout,
                    format!(
                        "the agent did not describe the file within {}s",
                        response_timeout.as_secs()
                    ),
                ))
            } else if now.duration_since(r.live.last_progress) > stall_timeout {
                let why = if r.live.conn_id == 0 {
                    "the agent has been away"
                } else {
                    "no progress"
                };
                Some((
                    r.id,
                    ErrorCode::Stalled,
                    format!("{why} for {}s", stall_timeout.as_secs()),
                ))
            } else {
                None
            }
        })
        .collect();
    for (id, code, message) in expired {
        fail(state, id, code, message).await;
    }
}

/// At start-up: finishes what a stopped server left half-done. Endings are completed (their
/// multipart uploads aborted) and verifications run again. Uploads that were requested or
/// uploading wait for their agents, under the stall timeout.
pub async fn recover(state: &AppState) {
    let (endings, verifying): (Vec<FailCleanup>, Vec<UploadId>) = {
        let table = state.uploads.lock();
        let open = table.by_id.values().filter(|r| !r.state.is_terminal());
        let mut endings = Vec::new();
        let mut verifying = Vec::new();
        for r in open {
            if let Some(c) = FailCleanup::resume_from(r) {
                endings.push(c);
            } else if r.state == UploadState::Verifying {
                verifying.push(r.id);
            }
        }
        (endings, verifying)
    };
    let unfinished = state.uploads.lock().active_by_client.len();
    tracing::info!(unfinished, "recovered upload state");
    for c in endings {
        c.run(state).await;
    }
    for id in verifying {
        verify(state, id, None).await;
    }
}

/// Aborts multipart uploads under the key prefix that no open upload owns: left by a crash
/// between CreateMultipartUpload and recording it, by an abort that failed, or by a database
/// that was reset. Returns how many were aborted.
pub async fn sweep_orphans(state: &AppState) -> usize {
    let prefix = state.config.key_prefix.trim_end_matches('/');
    let pending = match state
        .storage
        .list_multipart_uploads(&format!("{prefix}/"))
        .await
    {
        Ok(p) => p,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "listing multipart uploads failed"
            );
            return 0;
        }
    };
    let mut aborted = 0;
    for p in pending {
        let owned = upload_id_of_key(prefix, &p.key).is_some_and(|id| {
            let table = state.uploads.lock();
            table.by_id.get(&id).is_some_and(|r| {
                r.is_open()
                    && match &r.s3_upload_id {
                        Some(mine) => *mine == p.upload_id,
                        // Being created right now: its id is not recorded yet.
                        None => r.state == UploadState::Requested,
                    }
            })
        });
        if owned {
            continue;
        }
        match state.storage.abort_multipart(&p.key, &p.upload_id).await {
            Ok(()) => {
                aborted += 1;
                state
                    .metrics
                    .orphans_aborted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(key = p.key, "aborted an orphaned multipart upload");
            }
            Err(err) => {
                tracing::error!(
                    key = p.key,
                    error = format!("{err:#}"),
                    "aborting an orphaned multipart upload failed"
                )
            }
        }
    }
    aborted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_under_the_client_prefix() {
        let client = ClientId::parse("restaurant-1").unwrap();
        let file = FileName::parse("export.csv").unwrap();
        let id = UploadId::new_random();
        let a = object_key("uploads", &client, id, &file);
        let b = object_key("uploads", &client, UploadId::new_random(), &file);
        assert_ne!(a, b);
        assert!(a.starts_with("uploads/restaurant-1/"), "{a}");
        assert!(a.ends_with("/export.csv"), "{a}");
        assert_eq!(upload_id_of_key("uploads", &a), Some(id));
        assert_eq!(upload_id_of_key("other", &a), None);
        assert_eq!(upload_id_of_key("uploads", "uploads/x/nodash/f"), None);
    }

    fn facts() -> FileFacts {
        FileFacts {
            file_name: FileName::parse("f.csv").unwrap(),
            size: 6 * 1024 * 1024,
            modified_ms: 1,
            sha256: "a".repeat(64),
            part_size: 5 * 1024 * 1024,
            part_md5: vec!["1B2M2Y8AsgTpgAmY7PhCfg==".into(); 2],
        }
    }

    #[test]
    fn descriptions_must_match_the_servers_layout() {
        let min = 5 * 1024 * 1024;
        assert_eq!(check_facts(&facts(), min), Ok(()));
        let mut f = facts();
        f.part_md5.pop();
        assert!(check_facts(&f, min).is_err(), "too few part hashes");
        let mut f = facts();
        f.part_size = 6 * 1024 * 1024;
        assert!(check_facts(&f, min).is_err(), "another part size");
        let mut f = facts();
        f.sha256 = "A".repeat(64);
        assert!(check_facts(&f, min).is_err(), "uppercase hex");
        let mut f = facts();
        f.part_md5[0] = "not base64".into();
        assert!(check_facts(&f, min).is_err(), "bad md5");
    }
}
