//! Carrying out effects: every S3 call and every message to an agent that the upload steps make.
//!
//! A transition ([`super::machine`]) says what to do; this module does it and feeds the answer
//! back as the next event: CreateMultipartUpload answers `MultipartCreated`, ListParts
//! `PartsListed` or `MultipartGone`, presigning `PlanReady`, HeadObject `Verified`, `Fail` (a
//! proven mismatch) or `VerifyDeferred` (storage could not be read), and the abort `Aborted`. Messages and counters are carried out at once, in the caller's order;
//! the first S3 call and everything after it run in a task of their own, unless the caller waits.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shared::api::ErrorDetail;
use shared::encoding::{Compression, Encoding};
use shared::hash::Crc64Nvme;
use shared::protocol::{
    COMPRESSION_SINCE, CompletedPart, PresignedPart, ServerMessage, UploadPlan,
};
use shared::{ClientId, ErrorCode, FileName, UploadId};
use time::OffsetDateTime;

use super::Uploads;
use super::events::{Counter, Effect, Event, Refused};
use super::record::{Digests, Outcome, PartDigest, Transfer};
use crate::registry::{ConnId, SendError};
use crate::storage::{ObjectChecksum, ObjectInfo, PartChecksum, multipart_etag};

impl Uploads {
    /// Applies `event` and carries out its effects: messages and counters now, S3 calls in the
    /// background. Returns whether the upload accepted the event.
    pub(super) fn handle(&self, id: UploadId, event: Event) -> Result<(), Refused> {
        let effects = self.table().apply(id, event)?;
        self.start(id, effects);
        Ok(())
    }

    /// Carries out the effects that need no waiting, then hands the rest to a task.
    pub(super) fn start(&self, id: UploadId, effects: Vec<Effect>) {
        let mut effects = VecDeque::from(effects);
        while let Some(effect) = effects.pop_front() {
            if !self.carry_out_now(id, &effect) {
                effects.push_front(effect);
                let this = self.clone();
                self.0
                    .services
                    .tracker
                    .spawn(async move { this.carry_out(id, effects.into()).await });
                return;
            }
        }
    }

    /// Carries out `effects` and those of every event they lead to, until none is left.
    pub(super) async fn carry_out(&self, id: UploadId, effects: Vec<Effect>) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            if self.carry_out_now(id, &effect) {
                continue;
            }
            let Some(event) = self.call(id, effect).await else {
                continue;
            };
            let created = match &event {
                Event::MultipartCreated { multipart, .. } => Some(multipart.clone()),
                _ => None,
            };
            match self.table().apply(id, event) {
                // Depth first: what the answer leads to comes before the rest of the list.
                Ok(next) => next.into_iter().rev().for_each(|e| queue.push_front(e)),
                Err(refused) => {
                    tracing::debug!(upload_id = %id, reason = refused.0, "answer not applied");
                    if let Some(multipart) = created {
                        // Cancelled or failed meanwhile: the new multipart upload has no owner.
                        tracing::info!(upload_id = %id, "the upload ended while its multipart upload was created; aborting it");
                        self.abort(id, &multipart).await;
                    }
                }
            }
        }
    }

    /// Carries out an effect that needs no waiting; false for those that do.
    fn carry_out_now(&self, id: UploadId, effect: &Effect) -> bool {
        match effect {
            Effect::Describe {
                conn,
                share,
                part_size,
                compression,
            } => {
                if let Some(client_id) = self.client_of(id) {
                    let describe =
                        self.describe(id, &client_id, *conn, share, *part_size, *compression);
                    match self.agents().try_send(&client_id, *conn, describe) {
                        Ok(()) => {
                            tracing::info!(%client_id, upload_id = %id, "asked the agent to describe the file")
                        }
                        Err(err) => {
                            tracing::info!(%client_id, upload_id = %id, error = %err, "could not ask the agent to describe the file")
                        }
                    }
                }
            }
            Effect::TellCancel { conn, code } => {
                if let Some(client_id) = self.client_of(id) {
                    let cancel = ServerMessage::CancelUpload {
                        upload_id: id,
                        code: *code,
                    };
                    let _ = self.agents().try_send(&client_id, *conn, cancel);
                }
            }
            Effect::Count(counter) => self.count(*counter),
            Effect::CreateMultipart(_)
            | Effect::CopyUnchanged(_)
            | Effect::ListParts { .. }
            | Effect::Presign { .. }
            | Effect::SendPlan { .. }
            | Effect::Verify { .. }
            | Effect::DeleteObject { .. }
            | Effect::Abort(_) => return false,
        }
        true
    }

    /// Sends the first message of a new upload, before it is recorded.
    pub(super) fn send_now(
        &self,
        id: UploadId,
        client_id: &ClientId,
        effect: Effect,
    ) -> Result<(), SendError> {
        let Effect::Describe {
            conn,
            share,
            part_size,
            compression,
        } = effect
        else {
            unreachable!("a new upload starts with describe_file");
        };
        let describe = self.describe(id, client_id, conn, &share, part_size, compression);
        self.agents().try_send(client_id, conn, describe)
    }

    /// `describe_file` for the agent on `conn`. Only agents that compress are asked about
    /// compression: released protocol 2 agents refuse fields they do not know.
    fn describe(
        &self,
        upload_id: UploadId,
        client_id: &ClientId,
        conn: ConnId,
        share: &FileName,
        part_size: Option<u64>,
        compression: Compression,
    ) -> ServerMessage {
        let compresses = self
            .agents()
            .protocol(client_id, conn)
            .is_some_and(|v| v >= COMPRESSION_SINCE);
        // The same answer for every describe of one upload: the manifest changes only when an
        // upload of this share completes, and this one is the client's only open upload.
        let layout_hint = match compression {
            Compression::None => Vec::new(),
            Compression::Auto | Compression::Zstd if compresses => self
                .table()
                .manifest(client_id, share)
                .map(|m| m.layout_hint())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        ServerMessage::DescribeFile {
            upload_id,
            share: share.clone(),
            min_part_size: part_size.unwrap_or(self.settings().part_size),
            compression: compresses.then_some(compression),
            layout_hint,
        }
    }

    fn client_of(&self, id: UploadId) -> Option<ClientId> {
        self.table().client_of(id)
    }

    fn count(&self, counter: Counter) {
        let m = self.metrics();
        match counter {
            Counter::PartRetries(n) => {
                m.part_retries.fetch_add(u64::from(n), Relaxed);
            }
            Counter::Resumed => {
                m.resumes.fetch_add(1, Relaxed);
            }
            Counter::Copied { parts, bytes } => {
                m.parts_copied.fetch_add(u64::from(parts), Relaxed);
                m.bytes_copied.fetch_add(bytes, Relaxed);
            }
            Counter::Completed {
                bytes,
                parts,
                saved,
            } => {
                m.completed.fetch_add(1, Relaxed);
                m.bytes_uploaded.fetch_add(bytes, Relaxed);
                m.bytes_saved.fetch_add(saved, Relaxed);
                m.parts_uploaded.fetch_add(u64::from(parts), Relaxed);
            }
            Counter::Ended(Outcome::Failed) => {
                m.failed.fetch_add(1, Relaxed);
            }
            Counter::Ended(Outcome::Cancelled) => {
                m.cancelled.fetch_add(1, Relaxed);
            }
        }
    }

    /// Makes the S3 call (or the waiting send) of `effect`; the event is its answer.
    async fn call(&self, id: UploadId, effect: Effect) -> Option<Event> {
        match effect {
            Effect::CreateMultipart(facts) => self.create(id, facts).await,
            Effect::CopyUnchanged(transfer) => Some(self.copy_unchanged(id, &transfer).await),
            Effect::ListParts { multipart, why } => {
                match self
                    .storage()
                    .list_parts(&multipart.key, &multipart.upload_id)
                    .await
                {
                    Ok(Some(stored)) => Some(Event::PartsListed { stored, why }),
                    Ok(None) => {
                        tracing::info!(upload_id = %id, "multipart upload no longer open; checking for the object");
                        Some(Event::MultipartGone)
                    }
                    Err(err) => {
                        // Storage trouble: leave the upload as it is; the next reconnect or the
                        // stall timeout decides.
                        tracing::error!(upload_id = %id, error = format!("{err:#}"), "ListParts failed");
                        None
                    }
                }
            }
            Effect::Presign {
                transfer,
                missing,
                done,
            } => Some(self.presign(id, &transfer, &missing, done).await),
            Effect::SendPlan { conn, plan } => {
                self.send_plan(id, conn, plan).await;
                None
            }
            Effect::Verify {
                transfer,
                reported,
                if_missing,
            } => Some(
                self.verify(id, &transfer, reported.as_deref(), if_missing)
                    .await,
            ),
            Effect::DeleteObject { key } => {
                // Deleting a key that holds nothing succeeds; a failure is logged, and the key
                // (unique to this upload) holds an object nobody was told about.
                if let Err(err) = self.storage().delete_object(&key).await {
                    tracing::error!(upload_id = %id, %key, error = format!("{err:#}"), "deleting the object of an upload that did not complete failed");
                }
                None
            }
            Effect::Abort(multipart) => {
                if let Some(multipart) = multipart {
                    self.abort(id, &multipart).await;
                }
                self.log_ending(id);
                Some(Event::Aborted)
            }
            Effect::Describe { .. } | Effect::TellCancel { .. } | Effect::Count(_) => None,
        }
    }

    /// CreateMultipartUpload, checksummed as the agent's digests say.
    async fn create(&self, id: UploadId, facts: super::record::FileFacts) -> Option<Event> {
        let client_id = self.client_of(id)?;
        let key = object_key(
            &self.settings().key_prefix,
            &client_id,
            id,
            &facts.file_name,
            facts.encoding(),
        );
        let checksum = match &facts.digests {
            Digests::Crc64Nvme { sha256, .. } => ObjectChecksum::Crc64NvmeFullObject {
                encoded: match (facts.encoding(), sha256) {
                    (Encoding::None, _) | (_, None) => None,
                    (encoding, Some(sha256)) => Some(crate::storage::EncodedObject {
                        encoding,
                        original_size: facts.size,
                        sha256: sha256.as_str(),
                    }),
                },
            },
            Digests::Md5 { sha256, .. } => ObjectChecksum::Md5 {
                sha256: sha256.as_str(),
            },
        };
        let s3_upload_id = match self.storage().create_multipart(&key, checksum).await {
            Ok(s3_upload_id) => s3_upload_id,
            Err(err) => {
                tracing::error!(upload_id = %id, error = format!("{err:#}"), "CreateMultipartUpload failed");
                return Some(Event::Fail {
                    code: ErrorCode::StorageError,
                    message: "could not start the multipart upload".into(),
                });
            }
        };
        // Recorded (by the caller, applying this answer) before anything else can fail, so
        // that a failure aborts it.
        Some(Event::MultipartCreated {
            facts,
            multipart: super::record::Multipart {
                key,
                upload_id: s3_upload_id,
            },
        })
    }

    /// Presigns `missing` (each with its checksum) and the completion (with the object's).
    async fn presign(
        &self,
        id: UploadId,
        transfer: &Transfer,
        missing: &[shared::PartNumber],
        done: Vec<CompletedPart>,
    ) -> Event {
        let presigner = match self.storage().presigner(self.settings().presign_ttl).await {
            Ok(presigner) => presigner,
            Err(err) => {
                tracing::error!(upload_id = %id, error = format!("{err:#}"), "loading credentials failed");
                return Event::Fail {
                    code: ErrorCode::StorageError,
                    message: "could not presign the upload".into(),
                };
            }
        };
        let (key, s3_upload_id) = (&transfer.multipart.key, &transfer.multipart.upload_id);
        let failed = |what: &str, err: anyhow::Error| {
            tracing::error!(upload_id = %id, error = format!("{err:#}"), "presigning {what} failed");
            Event::Fail {
                code: ErrorCode::StorageError,
                message: "could not presign the upload".into(),
            }
        };
        let mut parts = Vec::with_capacity(missing.len());
        for &part_number in missing {
            let Some(digest) = transfer.file.part_digest(part_number) else {
                return failed(
                    "a part",
                    anyhow::anyhow!("part {part_number} is past the file's last part"),
                );
            };
            let (checksum, crc, md5) = match &digest {
                PartDigest::Crc64Nvme(crc) => {
                    (PartChecksum::Crc64Nvme(*crc), Some(crc.to_base64()), None)
                }
                PartDigest::Md5(md5) => (
                    PartChecksum::Md5(md5.as_base64()),
                    None,
                    Some(md5.as_base64().to_owned()),
                ),
            };
            match presigner.part(key, s3_upload_id, part_number, checksum) {
                Ok(url) => parts.push(PresignedPart {
                    part_number,
                    url,
                    checksum_crc64nvme: crc,
                    content_md5: md5,
                }),
                Err(err) => return failed("a part", err),
            }
        }
        let whole = transfer.file.whole_crc64nvme();
        let complete_url = match presigner.complete(key, s3_upload_id, whole) {
            Ok(url) => url,
            Err(err) => return failed("the completion", err),
        };
        Event::PlanReady {
            plan: UploadPlan {
                upload_id: id,
                size: transfer.file.size,
                part_size: transfer.file.part_size,
                encoding: match transfer.file.encoding() {
                    Encoding::None => None,
                    encoding => Some(encoding),
                },
                parts,
                done,
                complete_url,
                checksum_crc64nvme: whole.map(Crc64Nvme::to_base64),
                expires_at: shared::auth::unix_now() + presigner.ttl().as_secs(),
                expires_in_secs: presigner.ttl().as_secs(),
            },
        }
    }

    async fn send_plan(&self, id: UploadId, conn: ConnId, plan: UploadPlan) {
        let Some(client_id) = self.client_of(id) else {
            return;
        };
        let (size, part_size, parts) = (plan.size, plan.part_size, plan.parts.len());
        match self
            .agents()
            .send(&client_id, conn, ServerMessage::StartUpload(plan))
            .await
        {
            Ok(()) => {
                tracing::info!(upload_id = %id, size, part_size, parts, "upload plan sent");
            }
            Err(_) => {
                tracing::info!(upload_id = %id, "agent went away before the plan was sent; waiting for it to return");
            }
        }
    }

    /// Checks the stored object before believing the upload: its size, and its full-object
    /// CRC64NVME as storage computed it (protocol 3) or its multipart ETag and recorded SHA-256
    /// (protocol 2). `reported` is the agent's part list, when it says it completed; it must
    /// agree too. Only a proven mismatch or a missing object fails the upload (whose ending
    /// deletes the object); storage that cannot be read defers the verification.
    async fn verify(
        &self,
        id: UploadId,
        transfer: &Transfer,
        reported: Option<&[CompletedPart]>,
        if_missing: Option<ErrorDetail>,
    ) -> Event {
        let file = &transfer.file;
        let key = &transfer.multipart.key;
        let mismatch = |message: String| Event::Fail {
            code: ErrorCode::VerificationFailed,
            message,
        };
        if let Some(parts) = reported
            && let Err(message) = agrees_with_hashes(file, parts)
        {
            return mismatch(message);
        }
        let obj = match self.head_with_retries(id, key).await {
            Ok(Some(obj)) => obj,
            Ok(None) => {
                return match if_missing {
                    Some(error) => Event::Fail {
                        code: error.code,
                        message: error.message,
                    },
                    None => mismatch("the object is not in storage".to_owned()),
                };
            }
            Err(err) => {
                tracing::warn!(upload_id = %id, error = format!("{err:#}"), "storage could not be read; verifying again later");
                return Event::VerifyDeferred { if_missing };
            }
        };
        if let Err(message) = object_matches(file, &obj) {
            return mismatch(message);
        }
        tracing::info!(upload_id = %id, %key, size = file.size, etag = obj.etag, crc64nvme = ?obj.checksum_crc64nvme, sha256 = ?file.sha256(), "upload verified");
        Event::Verified { etag: obj.etag }
    }

    /// HeadObject, tried [`HEAD_ATTEMPTS`] times with backoff (each attempt is itself retried
    /// by the SDK): a passing storage error must not decide an upload.
    async fn head_with_retries(
        &self,
        id: UploadId,
        key: &str,
    ) -> anyhow::Result<Option<crate::storage::ObjectInfo>> {
        let mut attempt = 1;
        loop {
            match self.storage().head_object(key).await {
                Err(err) if attempt < HEAD_ATTEMPTS => {
                    tracing::warn!(upload_id = %id, attempt, error = format!("{err:#}"), "HeadObject failed, retrying");
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Whether the part list an agent completed with fits what it hashed: every part, in order,
/// and for protocol 2 the ETags its MD5s give. (Protocol 3 ETags are whatever storage gave,
/// MD5s or not; the object's checksum decides.)
pub(super) fn agrees_with_hashes(
    file: &super::record::FileFacts,
    parts: &[CompletedPart],
) -> Result<(), String> {
    let numbered = parts.len() == file.parts_total() as usize
        && parts
            .iter()
            .enumerate()
            .all(|(i, p)| p.part_number.get() as usize == i + 1);
    let etags_agree = match file.md5_completed_parts() {
        Some(expected) => parts.iter().zip(&expected).all(|(a, b)| {
            a.etag
                .trim_matches('"')
                .eq_ignore_ascii_case(b.etag.trim_matches('"'))
        }),
        None => true,
    };
    if numbered && etags_agree {
        Ok(())
    } else {
        Err(format!(
            "the agent reported {} parts that do not match the {} parts it hashed",
            parts.len(),
            file.parts_total()
        ))
    }
}

/// Whether a stored object is the file: its size, and its checksums.
pub(super) fn object_matches(
    file: &super::record::FileFacts,
    obj: &ObjectInfo,
) -> Result<(), String> {
    if obj.size != file.stored_size() {
        return Err(format!(
            "stored object has {} bytes, expected {}",
            obj.size,
            file.stored_size()
        ));
    }
    match &file.digests {
        Digests::Crc64Nvme { .. } => {
            let expected = file.whole_crc64nvme().map(Crc64Nvme::to_base64);
            if obj.checksum_crc64nvme != expected {
                return Err(format!(
                    "stored object has CRC64NVME {:?}, the file's parts combine to {:?}",
                    obj.checksum_crc64nvme, expected
                ));
            }
            if obj
                .checksum_type
                .as_deref()
                .is_some_and(|t| t != "FULL_OBJECT")
            {
                return Err(format!(
                    "stored object's checksum is {:?}, not FULL_OBJECT",
                    obj.checksum_type
                ));
            }
            Ok(())
        }
        Digests::Md5 { sha256, .. } => {
            let expected = file
                .md5_completed_parts()
                .and_then(|parts| multipart_etag(&parts))
                .ok_or_else(|| "a part MD5 is malformed".to_owned())?;
            if obj.etag != expected {
                return Err(format!(
                    "stored object ETag {} does not match the hashed parts' ETag {expected}",
                    obj.etag
                ));
            }
            if obj.sha256.as_deref() != Some(sha256.as_str()) {
                return Err(format!(
                    "stored object records SHA-256 {:?}, expected {sha256}",
                    obj.sha256
                ));
            }
            Ok(())
        }
    }
}

/// Attempts at HeadObject within one verification.
const HEAD_ATTEMPTS: u32 = 3;

/// The object key of an upload: under the prefix and the client, with a time stamp and the
/// upload id, so that keys never collide and the orphan sweep can tell whose a key is.
pub(super) fn object_key(
    prefix: &str,
    client_id: &ClientId,
    id: UploadId,
    file_name: &FileName,
    encoding: Encoding,
) -> String {
    let stamp = OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let suffix = encoding.key_suffix();
    format!("{prefix}/{client_id}/{stamp}-{id}/{file_name}{suffix}")
}

/// The upload id inside an object key made by [`object_key`].
pub(super) fn upload_id_of_key(prefix: &str, key: &str) -> Option<UploadId> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let dir = rest.split('/').nth(1)?;
    let (_, id) = dir.split_once('-')?;
    UploadId::parse(id).ok()
}
