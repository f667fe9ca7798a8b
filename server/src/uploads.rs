//! Upload records and the steps that move an upload from `requested` to `completed` or `failed`.
//!
//! Every step is triggered by an operator (trigger), an agent message, the watchdog or a dropped
//! connection. The table lock is a std `Mutex` held only for bookkeeping; S3 calls happen outside
//! it. A record reaches a terminal state only after its multipart upload has been aborted, so a
//! caller who sees `failed` can rely on nothing being left behind.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shared::api::{ErrorDetail, UploadState, UploadStatus};
use shared::protocol::{CompletedPart, PresignedPart, ServerMessage, UploadPlan};
use shared::{ClientId, ErrorCode, FileName, PartNumber, UploadId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::config::{MAX_PART_SIZE, MIN_PART_SIZE};
use crate::error::ApiError;
use crate::storage::multipart_etag;

/// Finished uploads kept for the status API; older ones are forgotten first, so memory stays
/// bounded however long the server runs.
pub const MAX_FINISHED_UPLOADS: usize = 10_000;

/// S3's largest object: 5 TiB.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;

#[derive(Debug)]
struct UploadRecord {
    id: UploadId,
    client_id: ClientId,
    /// The agent connection the upload is bound to; losing it fails the upload.
    conn_id: u64,
    state: UploadState,
    /// Set while a failure is being cleaned up, so only one path does it.
    finishing: bool,
    requested_by: String,
    requested_from: String,
    share: FileName,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
    requested_instant: Instant,
    last_progress: Instant,
    uploading_since: Option<Instant>,
    finished_instant: Option<Instant>,
    file_name: Option<FileName>,
    size: Option<u64>,
    part_size: Option<u64>,
    parts_total: Option<u32>,
    parts_done: u32,
    bytes_done: u64,
    key: Option<String>,
    s3_upload_id: Option<String>,
    etag: Option<String>,
    error: Option<ErrorDetail>,
}

impl UploadRecord {
    fn touch(&mut self) {
        self.updated_at = OffsetDateTime::now_utc();
    }

    fn status(&self, bucket: &str) -> UploadStatus {
        let rate = self.uploading_since.and_then(|start| {
            let end = self.finished_instant.unwrap_or_else(Instant::now);
            let secs = end.duration_since(start).as_secs_f64();
            (secs > 0.0).then(|| (self.bytes_done as f64 / secs) as u64)
        });
        UploadStatus {
            upload_id: self.id,
            client_id: self.client_id.clone(),
            state: self.state,
            bucket: bucket.to_owned(),
            key: self.key.clone(),
            share: self.share.as_str().to_owned(),
            file_name: self.file_name.as_ref().map(|f| f.as_str().to_owned()),
            size: self.size,
            part_size: self.part_size,
            parts_total: self.parts_total,
            parts_done: self.parts_done,
            bytes_done: self.bytes_done,
            rate_bytes_per_sec: rate,
            etag: self.etag.clone(),
            error: self.error.clone(),
            requested_by: self.requested_by.clone(),
            requested_from: self.requested_from.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            finished_at: self.finished_at.map(rfc3339),
        }
    }
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
    /// Terminal uploads, oldest first.
    finished: VecDeque<UploadId>,
}

impl Table {
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

#[derive(Debug, Default)]
pub struct Uploads {
    table: Mutex<Table>,
}

impl Uploads {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Each critical section leaves the table consistent before anything can panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self, id: UploadId, bucket: &str) -> Option<UploadStatus> {
        self.lock().by_id.get(&id).map(|r| r.status(bucket))
    }

    pub fn active_for(&self, client_id: &ClientId) -> Option<UploadId> {
        self.lock().active_by_client.get(client_id).copied()
    }

    pub fn latest_for(&self, client_id: &ClientId, bucket: &str) -> Option<UploadStatus> {
        let table = self.lock();
        let id = table.latest_by_client.get(client_id)?;
        table.by_id.get(id).map(|r| r.status(bucket))
    }

    fn unfinished(&self) -> Vec<UploadId> {
        self.lock()
            .by_id
            .values()
            .filter(|r| !r.state.is_terminal() && !r.finishing)
            .map(|r| r.id)
            .collect()
    }
}

/// `POST /trigger-download/{client_id}`: records the upload and asks the agent for its file.
/// Who asked for an upload, for the audit trail.
#[derive(Debug, Clone)]
pub struct Requester {
    /// The `sub` of the operator's token.
    pub operator: String,
    /// The peer address of the request (a reverse proxy's, behind one).
    pub from: std::net::SocketAddr,
}

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
        let instant = Instant::now();
        table.by_id.insert(
            id,
            UploadRecord {
                id,
                client_id: client_id.clone(),
                conn_id: agent.conn_id,
                state: UploadState::Requested,
                finishing: false,
                requested_by: requester.operator.clone(),
                requested_from: requester.from.to_string(),
                share: share.clone(),
                created_at: now,
                updated_at: now,
                finished_at: None,
                requested_instant: instant,
                last_progress: instant,
                uploading_since: None,
                finished_instant: None,
                file_name: None,
                size: None,
                part_size: None,
                parts_total: None,
                parts_done: 0,
                bytes_done: 0,
                key: None,
                s3_upload_id: None,
                etag: None,
                error: None,
            },
        );
        table.active_by_client.insert(client_id.clone(), id);
        table.latest_by_client.insert(client_id.clone(), id);
    }
    if agent
        .outbox
        .try_send(ServerMessage::DescribeFile {
            upload_id: id,
            share: share.clone(),
        })
        .is_err()
    {
        // The connection closed or stopped reading between the lookup and now. Nothing was
        // created in S3, so the record can simply go.
        let mut table = state.uploads.lock();
        table.by_id.remove(&id);
        table.active_by_client.remove(&client_id);
        table.latest_by_client.remove(&client_id);
        return Err(ApiError::new(
            ErrorCode::ClientNotConnected,
            format!("client {client_id} is not reachable"),
        ));
    }
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

/// Picks a part size: at least `min_part_size`, grown in whole MiB so that `size` fits in
/// 10,000 parts. `None` if the file is too large for one S3 object.
pub fn plan_parts(size: u64, min_part_size: u64) -> Option<(u64, u32)> {
    const MIB: u64 = 1024 * 1024;
    if size > MAX_OBJECT_SIZE {
        return None;
    }
    let max_parts = u64::from(shared::ids::MAX_PARTS);
    let needed = size.div_ceil(max_parts).div_ceil(MIB) * MIB;
    let part_size = min_part_size.max(needed).max(MIN_PART_SIZE);
    if part_size > MAX_PART_SIZE {
        return None;
    }
    let parts = size.div_ceil(part_size).max(1);
    Some((part_size, u32::try_from(parts).ok()?))
}

fn object_key(prefix: &str, client_id: &ClientId, id: UploadId, file_name: &FileName) -> String {
    let stamp = OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    format!("{prefix}/{client_id}/{stamp}-{id}/{file_name}")
}

/// Dispatches one message from the agent `client_id` on connection `conn_id`.
pub fn on_agent_message(
    state: &AppState,
    client_id: &ClientId,
    conn_id: u64,
    msg: shared::protocol::AgentMessage,
) {
    use shared::protocol::AgentMessage::*;
    match msg {
        Hello { .. } => {
            tracing::warn!(%client_id, "ignoring a second hello");
        }
        FileInfo {
            upload_id,
            file_name,
            size,
        } => {
            if !owned_in_state(state, upload_id, client_id, conn_id, UploadState::Requested) {
                return;
            }
            let state = state.clone();
            state.clone().tracker.spawn(async move {
                start_upload(&state, upload_id, file_name, size).await;
            });
        }
        Progress {
            upload_id,
            parts_done,
            bytes_done,
        } => {
            let mut table = state.uploads.lock();
            if let Some(r) = table.by_id.get_mut(&upload_id)
                && r.client_id == *client_id
                && r.state == UploadState::Uploading
            {
                r.parts_done = parts_done.min(r.parts_total.unwrap_or(0));
                r.bytes_done = bytes_done.min(r.size.unwrap_or(0));
                r.last_progress = Instant::now();
                r.touch();
            }
        }
        UploadCompleted { upload_id, parts } => {
            let record = {
                let mut table = state.uploads.lock();
                match table.by_id.get_mut(&upload_id) {
                    Some(r)
                        if r.client_id == *client_id
                            && r.state == UploadState::Uploading
                            && !r.finishing =>
                    {
                        r.state = UploadState::Verifying;
                        r.last_progress = Instant::now();
                        r.touch();
                        Some(())
                    }
                    _ => None,
                }
            };
            if record.is_none() {
                tracing::warn!(%client_id, %upload_id, "completion for an upload that is not uploading");
                return;
            }
            let state = state.clone();
            state.clone().tracker.spawn(async move {
                verify(&state, upload_id, parts).await;
            });
        }
        UploadFailed {
            upload_id,
            code,
            message,
        } => {
            let owned = state
                .uploads
                .lock()
                .by_id
                .get(&upload_id)
                .is_some_and(|r| r.client_id == *client_id);
            if !owned {
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

fn owned_in_state(
    state: &AppState,
    upload_id: UploadId,
    client_id: &ClientId,
    conn_id: u64,
    expected: UploadState,
) -> bool {
    let table = state.uploads.lock();
    let ok = table.by_id.get(&upload_id).is_some_and(|r| {
        r.client_id == *client_id && r.conn_id == conn_id && r.state == expected && !r.finishing
    });
    if !ok {
        tracing::warn!(%client_id, %upload_id, ?expected, "message for an unknown upload or in the wrong state");
    }
    ok
}

/// The agent described its file: create the multipart upload, presign it, send the plan.
async fn start_upload(state: &AppState, upload_id: UploadId, file_name: FileName, size: u64) {
    let Some((part_size, parts_total)) = plan_parts(size, state.config.part_size) else {
        fail(
            state,
            upload_id,
            ErrorCode::FileTooLarge,
            format!("file of {size} bytes is larger than one S3 object may be"),
        )
        .await;
        return;
    };
    let Some(client_id) = state
        .uploads
        .lock()
        .by_id
        .get(&upload_id)
        .map(|r| r.client_id.clone())
    else {
        return;
    };
    let key = object_key(&state.config.key_prefix, &client_id, upload_id, &file_name);
    let s3_upload_id = match state.storage.create_multipart(&key).await {
        Ok(id) => id,
        Err(err) => {
            tracing::error!(%upload_id, error = format!("{err:#}"), "could not start multipart upload");
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

    // Record the multipart upload at once, so any failure from here on aborts it.
    let still_wanted = {
        let mut table = state.uploads.lock();
        match table.by_id.get_mut(&upload_id) {
            Some(r) if r.state == UploadState::Requested && !r.finishing => {
                r.key = Some(key.clone());
                r.s3_upload_id = Some(s3_upload_id.clone());
                r.file_name = Some(file_name);
                r.size = Some(size);
                r.part_size = Some(part_size);
                r.parts_total = Some(parts_total);
                r.touch();
                true
            }
            _ => false,
        }
    };
    if !still_wanted {
        // Failed or timed out while we were talking to S3.
        if let Err(err) = state.storage.abort_multipart(&key, &s3_upload_id).await {
            tracing::error!(%upload_id, error = format!("{err:#}"), "abort of an orphaned multipart upload failed");
        }
        return;
    }

    let ttl = state.config.presign_ttl();
    let mut parts = Vec::with_capacity(parts_total as usize);
    for n in 1..=parts_total {
        let part_number = PartNumber::new(n).expect("plan_parts keeps the count in range");
        match state
            .storage
            .presign_part(&key, &s3_upload_id, part_number, ttl)
            .await
        {
            Ok(url) => parts.push(PresignedPart { part_number, url }),
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
    let plan = UploadPlan {
        upload_id,
        size,
        part_size,
        parts,
        complete_url,
        expires_at: shared::auth::unix_now() + ttl.as_secs(),
    };

    let outbox = {
        let mut table = state.uploads.lock();
        let Some(r) = table.by_id.get_mut(&upload_id) else {
            return;
        };
        if r.state != UploadState::Requested || r.finishing {
            return;
        }
        let conn_id = r.conn_id;
        let handle = state
            .registry
            .get(&r.client_id)
            .filter(|h| h.conn_id == conn_id);
        if handle.is_some() {
            r.state = UploadState::Uploading;
            let now = Instant::now();
            r.uploading_since = Some(now);
            r.last_progress = now;
            r.touch();
        }
        handle.map(|h| h.outbox)
    };
    let sent = match outbox {
        Some(outbox) => outbox.send(ServerMessage::StartUpload(plan)).await.is_ok(),
        None => false,
    };
    if !sent {
        fail(
            state,
            upload_id,
            ErrorCode::AgentDisconnected,
            "agent disconnected before the upload started".into(),
        )
        .await;
        return;
    }
    tracing::info!(%upload_id, %key, size, part_size, parts_total, "upload plan sent");
}

/// The agent says it completed the multipart upload: check the object before believing it.
async fn verify(state: &AppState, upload_id: UploadId, parts: Vec<CompletedPart>) {
    let (key, size, parts_total) = {
        let table = state.uploads.lock();
        let Some(r) = table.by_id.get(&upload_id) else {
            return;
        };
        match (&r.key, r.size, r.parts_total) {
            (Some(k), Some(s), Some(p)) => (k.clone(), s, p),
            _ => return,
        }
    };
    let in_order = parts.len() == parts_total as usize
        && parts
            .iter()
            .enumerate()
            .all(|(i, p)| p.part_number.get() as usize == i + 1);
    let expected_etag = multipart_etag(&parts);
    let outcome = match (in_order, expected_etag) {
        (false, _) => Err(format!(
            "agent reported {} parts, expected parts 1..={parts_total}",
            parts.len()
        )),
        (true, None) => Err("agent reported a part ETag that is not an MD5".to_owned()),
        (true, Some(expected)) => match state.storage.head_object(&key).await {
            Ok(Some(obj)) if obj.size != size => Err(format!(
                "stored object has {} bytes, expected {size}",
                obj.size
            )),
            Ok(Some(obj)) if obj.etag != expected => Err(format!(
                "stored object ETag {} does not match the parts' ETag {expected}",
                obj.etag
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
            if let Some(r) = table.by_id.get_mut(&upload_id) {
                r.state = UploadState::Completed;
                r.etag = Some(etag.clone());
                r.parts_done = parts_total;
                r.bytes_done = size;
                r.finished_at = Some(OffsetDateTime::now_utc());
                r.finished_instant = Some(Instant::now());
                r.touch();
                let client_id = r.client_id.clone();
                table.retire(upload_id, &client_id);
            }
            tracing::info!(%upload_id, %key, size, %etag, "upload verified");
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
            return Err(ApiError::new(
                ErrorCode::UploadNotFound,
                format!("no upload {upload_id}"),
            ));
        };
        if r.state.is_terminal() || r.finishing {
            return Err(ApiError::new(
                ErrorCode::UploadFinished,
                format!("upload {upload_id} is already {:?}", r.state).to_lowercase(),
            ));
        }
        drop(table);
        begin_fail(state, upload_id, ErrorCode::Cancelled, message)
    };
    let Some(mut cleanup) = cleanup else {
        return Err(ApiError::new(
            ErrorCode::UploadFinished,
            format!("upload {upload_id} finished meanwhile"),
        ));
    };
    cleanup.final_state = UploadState::Cancelled;
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

/// The part of a failure that must happen before the caller moves on: claim the record so no
/// other path finishes it, and remember why. `None` if it is already finished or finishing.
fn begin_fail(
    state: &AppState,
    upload_id: UploadId,
    code: ErrorCode,
    message: String,
) -> Option<FailCleanup> {
    let mut table = state.uploads.lock();
    let r = table.by_id.get_mut(&upload_id)?;
    if r.state.is_terminal() || r.finishing {
        return None;
    }
    r.finishing = true;
    r.error = Some(ErrorDetail {
        code,
        message: message.clone(),
    });
    Some(FailCleanup {
        upload_id,
        code,
        message,
        multipart: r.key.clone().zip(r.s3_upload_id.clone()),
        conn_id: r.conn_id,
        client_id: r.client_id.clone(),
        final_state: UploadState::Failed,
    })
}

/// What is left to do for a failure once [`begin_fail`] claimed it.
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
                | ErrorCode::FileChanged
                | ErrorCode::PartUploadFailed
                | ErrorCode::CompleteFailed
                | ErrorCode::FileNotShared
                | ErrorCode::FileTooLarge
                | ErrorCode::UploadHostNotAllowed
                | ErrorCode::AgentDisconnected
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
            // Bounded retries: an abort that never succeeds is logged, not retried forever.
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
                        tracing::error!(%upload_id, %key, error = format!("{err:#}"), "abort failed; the multipart upload may be left behind");
                        break;
                    }
                }
            }
        }
        let mut table = state.uploads.lock();
        let table = &mut *table;
        if let Some(r) = table.by_id.get_mut(&upload_id) {
            r.state = final_state;
            r.finishing = false;
            r.finished_at = Some(OffsetDateTime::now_utc());
            r.finished_instant = Some(Instant::now());
            r.touch();
            let client_id = r.client_id.clone();
            table.retire(upload_id, &client_id);
        }
        tracing::warn!(%upload_id, %client_id, state = ?final_state, %code, message, "upload ended");
    }
}

/// A connection ended: uploads that depended on it cannot go on.
pub async fn on_agent_disconnected(state: &AppState, conn_id: u64) {
    let affected: Vec<UploadId> = state
        .uploads
        .lock()
        .by_id
        .values()
        .filter(|r| {
            r.conn_id == conn_id
                && matches!(r.state, UploadState::Requested | UploadState::Uploading)
        })
        .map(|r| r.id)
        .collect();
    for id in affected {
        fail(
            state,
            id,
            ErrorCode::AgentDisconnected,
            "the agent disconnected during the upload".into(),
        )
        .await;
    }
}

/// Fails uploads whose agent never answered or stopped making progress.
pub async fn sweep(state: &AppState) {
    let response_timeout = Duration::from_secs(state.config.agent_response_timeout_secs);
    let stall_timeout = Duration::from_secs(state.config.upload_stall_timeout_secs);
    let now = Instant::now();
    let expired: Vec<(UploadId, ErrorCode, String)> = state
        .uploads
        .lock()
        .by_id
        .values()
        .filter(|r| !r.finishing)
        .filter_map(|r| match r.state {
            UploadState::Requested
                if now.duration_since(r.requested_instant) > response_timeout =>
            {
                Some((
                    r.id,
                    ErrorCode::AgentTimeout,
                    format!(
                        "the agent did not answer within {}s",
                        response_timeout.as_secs()
                    ),
                ))
            }
            UploadState::Uploading | UploadState::Verifying
                if now.duration_since(r.last_progress) > stall_timeout =>
            {
                Some((
                    r.id,
                    ErrorCode::Stalled,
                    format!("no progress for {}s", stall_timeout.as_secs()),
                ))
            }
            _ => None,
        })
        .collect();
    for (id, code, message) in expired {
        fail(state, id, code, message).await;
    }
}

/// On shutdown: every unfinished upload is failed and aborted, so none is left half-done.
pub async fn fail_all_unfinished(state: &AppState) {
    for id in state.uploads.unfinished() {
        fail(
            state,
            id,
            ErrorCode::ShuttingDown,
            "the server shut down during the upload".into(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn small_and_empty_files_are_one_part() {
        assert_eq!(plan_parts(0, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(1, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(8 * MIB, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(8 * MIB + 1, 8 * MIB), Some((8 * MIB, 2)));
    }

    #[test]
    fn part_size_grows_to_stay_within_ten_thousand_parts() {
        let size = 100 * 1024 * MIB; // 100 GiB
        let (part_size, parts) = plan_parts(size, 5 * MIB).unwrap();
        assert!(parts <= 10_000);
        assert!(part_size >= 5 * MIB);
        assert_eq!(part_size % MIB, 0);
        assert!(part_size * u64::from(parts) >= size);
        assert_eq!(
            plan_parts(MAX_OBJECT_SIZE, 5 * MIB).map(|p| p.1 <= 10_000),
            Some(true)
        );
        assert_eq!(plan_parts(MAX_OBJECT_SIZE + 1, 5 * MIB), None);
    }

    #[test]
    fn keys_are_unique_and_under_the_client_prefix() {
        let client = ClientId::parse("restaurant-1").unwrap();
        let file = FileName::parse("export.csv").unwrap();
        let a = object_key("uploads", &client, UploadId::new_random(), &file);
        let b = object_key("uploads", &client, UploadId::new_random(), &file);
        assert_ne!(a, b);
        assert!(a.starts_with("uploads/restaurant-1/"), "{a}");
        assert!(a.ends_with("/export.csv"), "{a}");
    }
}
