//! The state machine of an upload.
//!
//! [`Upload::on`] takes an [`Event`], checks that it is one the upload's [`Stage`] accepts,
//! changes the record, and returns the [`Effect`]s the caller must carry out (S3 calls, messages
//! to the agent, counters). It does no I/O and reads no clock (it is handed a [`Now`]), so every
//! transition is tested without a server (`tests/transitions.rs`). An event the stage does not accept is
//! [`Refused`] and leaves the record untouched: each handler below checks before it changes.

use std::time::{Duration, Instant};

use shared::api::{ErrorDetail, PhaseTimes};
use shared::encoding::Compression;
use shared::hash::Sha256Hex;
use shared::protocol::{CompletedPart, UploadPlan};
use shared::{ClientId, ErrorCode, PartNumber};

use super::events::{AgentRef, Counter, Effect, Event, Refused, Rejection, Resume};
use super::record::{
    Copied, Digests, Ending, FileFacts, Live, Multipart, NewUpload, Now, Open, Outcome, PartDigest,
    Stage, Transfer, Upload,
};
use crate::registry::ConnId;
use crate::storage::StoredPart;

/// After this many `need_urls` in a row with no new part stored, the upload fails instead of
/// looping: the URLs die before a part can get through.
pub const MAX_FRUITLESS_REFRESHES: u32 = 3;

/// How long a verification that could not read storage waits before it tries again. Until the
/// stall timeout, storage trouble never fails an upload, let alone deletes its object.
pub const VERIFY_AGAIN_AFTER: Duration = Duration::from_secs(5);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Upload {
    /// A new upload, with `describe_file` to send on the agent's connection `conn`.
    pub fn requested(new: NewUpload, conn: ConnId, now: Now) -> (Self, Effect) {
        let created = now.wall;
        let mut live = Live::new(now.at);
        live.conn = Some(conn);
        live.awaiting_info = Some(now.at);
        let describe = Effect::Describe {
            conn,
            share: new.share.clone(),
            part_size: None,
            compression: new.compression,
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
            collection: new.collection,
            compression: new.compression,
            copied: Default::default(),
            live,
        };
        (upload, describe)
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
                if_missing: None,
            }),
            _ => None,
        }
    }

    /// Whether a deferred verification is due.
    pub fn verify_due(&self, now: Instant) -> bool {
        matches!(self.stage, Stage::Open(Open::Verifying(_)))
            && self
                .live
                .verify_again
                .as_ref()
                .is_some_and(|(due, _)| *due <= now)
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
    pub fn on(&mut self, event: Event, now: Now) -> Result<Vec<Effect>, Refused> {
        let effects = match event {
            Event::AgentConnected { conn } => self.connected(conn, now.at)?,
            Event::AgentDisconnected { conn } => self.disconnected(conn)?,
            Event::Described { agent, facts } => self.described(&agent, facts, now.at)?,
            Event::MultipartCreated { facts, multipart } => {
                self.multipart_created(facts, multipart)?
            }
            Event::PartsCopied { stored } => self.parts_copied(&stored)?,
            Event::PartsListed { stored, why } => self.parts_listed(&stored, why)?,
            Event::MultipartGone => self.multipart_gone()?,
            Event::PlanReady { plan } => self.plan_ready(plan, now.at)?,
            Event::Progress {
                agent,
                parts_done,
                bytes_done,
                part_retries,
                sha256,
            } => self.progress(
                &agent,
                (parts_done, bytes_done),
                part_retries,
                sha256,
                now.at,
            )?,
            Event::NeedUrls { agent } => self.need_urls(&agent, now.at)?,
            Event::AgentCompleted {
                agent,
                parts,
                complete_ms,
                sha256,
            } => self.agent_completed(&agent, parts, complete_ms, sha256, now.at)?,
            Event::AgentFailed {
                client_id,
                code,
                message,
                sha256,
            } => self.agent_failed(&client_id, code, message, sha256)?,
            Event::Verified { etag } => self.verified(etag, now)?,
            Event::VerifyDeferred { if_missing } => self.verify_deferred(if_missing, now.at)?,
            Event::VerifyAgain => self.verify_again(now.at)?,
            Event::Fail { code, message } => self.end_open(Outcome::Failed, code, message)?,
            Event::Cancel { message } => {
                self.end_open(Outcome::Cancelled, ErrorCode::Cancelled, message)?
            }
            Event::Aborted => self.aborted(now)?,
        };
        self.updated = now.wall;
        Ok(effects)
    }

    fn owned_by(&self, agent: &AgentRef) -> bool {
        self.client_id == agent.client_id && self.live.conn == Some(agent.conn)
    }

    /// The transfer of an upload that is uploading, if `agent` (when given) owns it.
    fn uploading_for(
        &self,
        agent: Option<&AgentRef>,
        what: &'static str,
    ) -> Result<Transfer, Refused> {
        let Stage::Open(Open::Uploading(transfer)) = &self.stage else {
            return Err(Refused(what));
        };
        if agent.is_some_and(|a| !self.owned_by(a)) {
            return Err(Refused("a connection that does not own the upload"));
        }
        Ok(transfer.clone())
    }

    fn connected(&mut self, conn: ConnId, now: Instant) -> Result<Vec<Effect>, Refused> {
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
        let transfer = self.stage.transfer();
        Ok(vec![Effect::Describe {
            conn,
            share: self.share.clone(),
            part_size: transfer.map(|t| t.file.part_size),
            // A resumed upload keeps its encoding, so the agent lays it out as before.
            compression: transfer.map_or(self.compression, |t| {
                if t.file.encoding().compressed() {
                    Compression::Zstd
                } else {
                    Compression::None
                }
            }),
        }])
    }

    fn disconnected(&mut self, conn: ConnId) -> Result<Vec<Effect>, Refused> {
        if !self.is_open() || self.live.conn != Some(conn) {
            return Err(Refused("not this connection's upload"));
        }
        self.live.conn = None;
        self.live.awaiting_info = None;
        Ok(Vec::new())
    }

    /// `file_info`: a first description creates the multipart upload; a description after a
    /// reconnect resumes, if the file is the same.
    fn described(
        &mut self,
        agent: &AgentRef,
        facts: Result<FileFacts, Rejection>,
        now: Instant,
    ) -> Result<Vec<Effect>, Refused> {
        let asked = match self.live.awaiting_info {
            Some(asked) if self.owned_by(agent) && self.is_open() => asked,
            _ => return Err(Refused("file_info that was not asked for")),
        };
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
                return Ok(self.begin_end(Outcome::Failed, rejected.code, rejected.message, true));
            }
        };
        if self.stage.transfer().is_none() && !self.compression.allows(facts.encoding()) {
            let message = format!(
                "the agent described the file as {}, but {} was asked for",
                facts.encoding(),
                self.compression
            );
            return Ok(self.begin_end(Outcome::Failed, ErrorCode::MalformedMessage, message, true));
        }
        Ok(match &self.stage {
            Stage::Open(Open::Uploading(t)) if !t.file.same_content(&facts) => {
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
                let multipart = t.multipart.clone();
                if let Stage::Open(Open::Uploading(t)) = &mut self.stage
                    && let Digests::Crc64Nvme { sha256, .. } = &mut t.file.digests
                    && sha256.is_none()
                {
                    *sha256 = facts.sha256().cloned();
                }
                self.resumes += 1;
                vec![Effect::ListParts {
                    multipart,
                    why: Resume::Reconnect,
                }]
            }
            _ => vec![Effect::CreateMultipart(facts)],
        })
    }

    fn multipart_created(
        &mut self,
        facts: FileFacts,
        multipart: Multipart,
    ) -> Result<Vec<Effect>, Refused> {
        if !matches!(self.stage, Stage::Open(Open::Requested)) {
            return Err(Refused(
                "the upload moved on while its multipart upload was created",
            ));
        }
        let transfer = Transfer {
            file: facts,
            multipart,
        };
        self.stage = Stage::Open(Open::Uploading(transfer.clone()));
        // With a part manifest, the share's previous object may hold some parts already.
        if transfer.file.part_digests.is_some() {
            return Ok(vec![Effect::CopyUnchanged(transfer)]);
        }
        let missing = transfer.file.parts().map(|(n, _)| n).collect();
        Ok(vec![Effect::Presign {
            transfer,
            missing,
            done: Vec::new(),
        }])
    }

    /// The copies are made: what storage holds intact (right size and CRC64NVME, as for a
    /// resume) is done, the rest is presigned for the agent.
    fn parts_copied(&mut self, stored: &[StoredPart]) -> Result<Vec<Effect>, Refused> {
        let transfer =
            self.uploading_for(None, "parts copied for an upload that is not uploading")?;
        let (done, missing) = sort_parts(&transfer.file, stored);
        let bytes = done
            .iter()
            .map(|p| transfer.file.part_len(p.part_number))
            .sum();
        self.copied = Copied {
            parts: done.len() as u32,
            bytes,
        };
        let mut effects = Vec::new();
        if !done.is_empty() {
            effects.push(Effect::Count(Counter::Copied {
                parts: self.copied.parts,
                bytes,
            }));
        }
        effects.push(Effect::Presign {
            transfer,
            missing,
            done,
        });
        Ok(effects)
    }

    /// ListParts answered: presign what is missing, unless refreshes keep bringing nothing.
    fn parts_listed(&mut self, stored: &[StoredPart], why: Resume) -> Result<Vec<Effect>, Refused> {
        let transfer =
            self.uploading_for(None, "parts listed for an upload that is not uploading")?;
        let (done, missing) = sort_parts(&transfer.file, stored);
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
        Ok(vec![
            Effect::Count(Counter::Resumed),
            Effect::Presign {
                transfer,
                missing,
                done,
            },
        ])
    }

    fn multipart_gone(&mut self) -> Result<Vec<Effect>, Refused> {
        let transfer = self.uploading_for(None, "the upload is not uploading")?;
        self.stage = Stage::Open(Open::Verifying(transfer.clone()));
        Ok(vec![Effect::Verify {
            transfer,
            reported: None,
            if_missing: None,
        }])
    }

    fn plan_ready(&mut self, plan: UploadPlan, now: Instant) -> Result<Vec<Effect>, Refused> {
        let transfer = self.uploading_for(None, "the upload is not uploading")?;
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
        Ok(vec![Effect::SendPlan { conn, plan }])
    }

    /// `(parts_done, bytes_done)` as the agent counts them, clamped to the file.
    fn progress(
        &mut self,
        agent: &AgentRef,
        (parts_done, bytes_done): (u32, u64),
        part_retries: u32,
        sha256: Option<Sha256Hex>,
        now: Instant,
    ) -> Result<Vec<Effect>, Refused> {
        let transfer =
            self.uploading_for(Some(agent), "progress for an upload that is not uploading")?;
        // Kept from before the completion: an agent that dies while storage completes the
        // object cannot report it afterwards.
        if let Some(sha) = sha256
            && let Stage::Open(Open::Uploading(t)) = &mut self.stage
            && let Digests::Crc64Nvme { sha256: known, .. } = &mut t.file.digests
        {
            *known = Some(sha);
        }
        self.parts_done = parts_done.min(transfer.file.parts_total());
        self.bytes_done = bytes_done.min(transfer.file.stored_size());
        self.live.last_progress = now;
        // The count restarts with each plan the agent runs.
        let new = part_retries
            .checked_sub(self.live.retries_seen)
            .unwrap_or(part_retries);
        self.live.retries_seen = part_retries;
        Ok(if new > 0 {
            vec![Effect::Count(Counter::PartRetries(new))]
        } else {
            Vec::new()
        })
    }

    fn need_urls(&mut self, agent: &AgentRef, now: Instant) -> Result<Vec<Effect>, Refused> {
        let transfer =
            self.uploading_for(Some(agent), "need_urls for an upload that is not uploading")?;
        self.live.last_progress = now;
        self.live.plan_asked = Some(now);
        self.add_transfer_time(now);
        self.resumes += 1;
        Ok(vec![Effect::ListParts {
            multipart: transfer.multipart,
            why: Resume::Refresh,
        }])
    }

    fn agent_completed(
        &mut self,
        agent: &AgentRef,
        parts: Vec<CompletedPart>,
        complete_ms: u64,
        reported_sha256: Option<Sha256Hex>,
        now: Instant,
    ) -> Result<Vec<Effect>, Refused> {
        let mut transfer = self.uploading_for(
            Some(agent),
            "completion for an upload that is not uploading",
        )?;
        if let Digests::Crc64Nvme { sha256, .. } = &mut transfer.file.digests
            && reported_sha256.is_some()
        {
            *sha256 = reported_sha256;
        }
        self.stage = Stage::Open(Open::Verifying(transfer.clone()));
        self.live.last_progress = now;
        self.live.completed = Some(now);
        self.add_transfer_time(now);
        self.phases.complete_ms = self.phases.complete_ms.saturating_add(complete_ms);
        Ok(vec![Effect::Verify {
            transfer,
            reported: Some(parts),
            if_missing: None,
        }])
    }

    fn agent_failed(
        &mut self,
        client_id: &ClientId,
        code: ErrorCode,
        message: String,
        reported_sha256: Option<Sha256Hex>,
    ) -> Result<Vec<Effect>, Refused> {
        if *client_id != self.client_id {
            return Err(Refused(
                "a failure report for an upload this agent does not own",
            ));
        }
        if !self.is_open() {
            return Err(Refused("the upload is already ending"));
        }
        if code == ErrorCode::CompleteFailed
            && let Stage::Open(Open::Uploading(transfer)) = &self.stage
        {
            // The completion may have reached storage with only its answer lost: look for the
            // object before believing the agent.
            let mut transfer = transfer.clone();
            if let Digests::Crc64Nvme { sha256, .. } = &mut transfer.file.digests {
                *sha256 = reported_sha256;
            }
            self.stage = Stage::Open(Open::Verifying(transfer.clone()));
            return Ok(vec![Effect::Verify {
                transfer,
                reported: None,
                if_missing: Some(ErrorDetail { code, message }),
            }]);
        }
        Ok(self.begin_end(Outcome::Failed, code, message, false))
    }

    /// The verification could not read storage: try again later, remembering what a missing
    /// object would mean.
    fn verify_deferred(
        &mut self,
        if_missing: Option<ErrorDetail>,
        now: Instant,
    ) -> Result<Vec<Effect>, Refused> {
        if !matches!(self.stage, Stage::Open(Open::Verifying(_))) {
            return Err(Refused("the upload is not being verified"));
        }
        self.live.verify_again = Some((now + VERIFY_AGAIN_AFTER, if_missing));
        Ok(Vec::new())
    }

    fn verify_again(&mut self, now: Instant) -> Result<Vec<Effect>, Refused> {
        let Stage::Open(Open::Verifying(transfer)) = &self.stage else {
            return Err(Refused("the upload is not being verified"));
        };
        match &self.live.verify_again {
            Some((due, _)) if *due <= now => {}
            _ => return Err(Refused("no verification is due")),
        }
        let transfer = transfer.clone();
        let if_missing = self.live.verify_again.take().and_then(|(_, e)| e);
        Ok(vec![Effect::Verify {
            transfer,
            reported: None,
            if_missing,
        }])
    }

    fn verified(&mut self, etag: String, now: Now) -> Result<Vec<Effect>, Refused> {
        let Stage::Open(Open::Verifying(transfer)) = &self.stage else {
            return Err(Refused("the upload is not being verified"));
        };
        let transfer = transfer.clone();
        let (bytes, parts) = (transfer.file.stored_size(), transfer.file.parts_total());
        let saved = transfer.file.size.saturating_sub(bytes);
        self.parts_done = parts;
        self.bytes_done = bytes;
        self.finished = Some(now.wall);
        self.live.finished = Some(now.at);
        if let Some(completed) = self.live.completed.take() {
            self.phases.verify_ms = self
                .phases
                .verify_ms
                .saturating_add(millis(now.at.duration_since(completed)));
        }
        self.stage = Stage::Completed { transfer, etag };
        Ok(vec![Effect::Count(Counter::Completed {
            bytes,
            parts,
            saved,
        })])
    }

    /// The server's own failure, or an operator's cancel.
    fn end_open(
        &mut self,
        outcome: Outcome,
        code: ErrorCode,
        message: String,
    ) -> Result<Vec<Effect>, Refused> {
        if !self.is_open() {
            return Err(Refused("the upload is already ending"));
        }
        Ok(self.begin_end(outcome, code, message, true))
    }

    fn aborted(&mut self, now: Now) -> Result<Vec<Effect>, Refused> {
        let Stage::Ending(ending) = &self.stage else {
            return Err(Refused("the upload is not ending"));
        };
        let outcome = ending.outcome;
        self.stage = Stage::Ended(ending.clone());
        self.finished = Some(now.wall);
        self.live.finished = Some(now.at);
        Ok(vec![Effect::Count(Counter::Ended(outcome))])
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
        // Past the agent's completion there may be an object; an upload that does not complete
        // leaves none.
        let object = match &from {
            Open::Verifying(t) => Some(t.multipart.key.clone()),
            Open::Requested | Open::Uploading(_) => None,
        };
        self.stage = Stage::Ending(Ending {
            outcome,
            error: ErrorDetail { code, message },
            from,
        });
        let mut effects = Vec::new();
        if tell_agent && let Some(conn) = self.live.conn {
            effects.push(Effect::TellCancel { conn, code });
        }
        if let Some(key) = object {
            effects.push(Effect::DeleteObject { key });
        }
        // Last: its answer ends the upload.
        effects.push(Effect::Abort(multipart));
        effects
    }
}

/// Splits a file's parts into those storage holds intact and those still to send. A stored part
/// is intact if it has the right size and the right checksum: its CRC64NVME as ListParts reports
/// it (protocol 3; ETags prove nothing on SSE-KMS buckets), or its ETag where it is an MD5
/// (protocol 2).
fn sort_parts(file: &FileFacts, stored: &[StoredPart]) -> (Vec<CompletedPart>, Vec<PartNumber>) {
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for (part_number, digest) in file.parts() {
        let len = file.part_len(part_number);
        let found = stored
            .iter()
            .find(|p| p.part_number == part_number.get() && p.size == len);
        let etag = found.and_then(|p| match &digest {
            PartDigest::Crc64Nvme(crc) => p
                .etag
                .clone()
                .filter(|_| p.checksum_crc64nvme == Some(*crc)),
            PartDigest::Md5(md5) => {
                let etag = md5.part_etag();
                p.etag.as_ref().is_none_or(|e| *e == etag).then_some(etag)
            }
        });
        match etag {
            Some(etag) => done.push(CompletedPart { part_number, etag }),
            None => missing.push(part_number),
        }
    }
    (done, missing)
}
