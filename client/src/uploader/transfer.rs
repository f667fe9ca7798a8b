//! Moving the bytes: the parts of a plan in parallel, each streamed from disk with bounded,
//! backed-off retries, then the presigned completion.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shared::ErrorCode;
use shared::encoding::Encoding;
use shared::hash::Crc64Nvme;
use shared::protocol::{CompletedPart, PresignedPart, UploadPlan};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::answers::{Answer, judge, xml_escape};
use super::encode::Encoded;
use super::file::{Snapshot, check_unchanged, io_error, open_no_follow};
use super::whole::{Layout, WholeFile};
use super::{Progress, UploadError, UploadSettings};
use crate::backoff::Backoff;

/// Size of each read from disk while streaming a part. Each read is a hop to tokio's blocking
/// pool: 64 KiB reads cost the agent 0.4 CPU-s per GiB more than 256 KiB ones (BENCHMARKS.md),
/// and 512 KiB ones raised its peak RSS by 8 MiB for 0.1 s less.
pub const READ_CHUNK: usize = 256 * 1024;

/// How an upload run ended, when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    /// Every part is stored and the multipart upload is completed with these ETags.
    Completed {
        parts: Vec<CompletedPart>,
        /// How long the completion request took.
        complete_time: Duration,
        /// Lowercase hex SHA-256 of the file, computed during the transfer.
        sha256: String,
    },
    /// The URLs ran out first. Parts that were sent are stored; the server presigns the rest.
    NeedUrls,
    /// Every part is stored but the completion failed, or its answer was lost: the server
    /// looks for the object, and keeps the SHA-256 for it.
    CompleteFailed { error: UploadError, sha256: String },
}

/// Uploads the parts of `plan`, then completes the multipart upload with them and the parts
/// already stored. `layout` is the file as it was described; its SHA-256 is computed on the
/// side meanwhile, unless the file was encoded, when the parts come from `encoded`'s spool and
/// the SHA-256 is already known.
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    http: &reqwest::Client,
    path: PathBuf,
    layout: &Layout,
    encoded: Option<Arc<Encoded>>,
    plan: &UploadPlan,
    settings: &UploadSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Outcome, UploadError> {
    // The URLs are good for `expires_in_secs` from about now; stop starting requests a margin
    // before that, so none reaches storage expired.
    let ttl = Duration::from_secs(plan.expires_in_secs);
    let deadline = std::time::Instant::now() + ttl - (ttl / 5).min(Duration::from_secs(60));
    let snapshot = layout.snapshot;
    check_plan(&path, layout, encoded.as_deref(), plan, settings).await?;
    let whole = match &encoded {
        Some(e) => Sha256Source::Known(e.sha256.clone()),
        None => Sha256Source::Pass(WholeFile::start(
            path.clone(),
            layout.clone(),
            settings.hash_pacer.clone(),
        )),
    };
    let parts_range = PartRanges {
        plan,
        encoded: encoded.as_deref(),
    };
    let done_bytes: u64 = plan
        .done
        .iter()
        .map(|p| parts_range.of(p.part_number).1)
        .sum();
    progress.bytes_done.store(done_bytes, Ordering::Relaxed);
    progress
        .parts_done
        .store(plan.done.len() as u32, Ordering::Relaxed);
    let path = Arc::new(path);
    let job = Run {
        http,
        path: &path,
        encoded: encoded.as_ref(),
        snapshot,
        plan,
        settings,
        progress: &progress,
        deadline,
    };
    let sent = tokio::select! {
        r = job.send_parts() => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::Cancelled, "upload cancelled"));
        }
    };
    let Some(sent) = sent else {
        return Ok(Outcome::NeedUrls);
    };
    let mut parts: Vec<CompletedPart> = plan.done.iter().cloned().chain(sent).collect();
    parts.sort_by_key(|p| p.part_number);
    let expected = match &encoded {
        Some(e) => e.parts.len(),
        None => plan.size.div_ceil(plan.part_size).max(1) as usize,
    };
    if parts.len() != expected {
        return Err(UploadError::new(
            ErrorCode::CompleteFailed,
            format!("the plan covers {} of {expected} parts", parts.len()),
        ));
    }
    let sha256 = tokio::select! {
        r = whole.finish() => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::Cancelled, "upload cancelled"));
        }
    };
    // Reported before the completion, which storage may finish after this agent died.
    let _ = progress.sha256.set(sha256.clone());
    progress.sha256_known.notify_one();
    tokio::task::yield_now().await;
    check_unchanged(&path, snapshot).await?;
    if std::time::Instant::now() >= deadline {
        return Ok(Outcome::NeedUrls);
    }
    let complete_started = std::time::Instant::now();
    let completion = Completion::new(plan, &parts, &layout.part_crc64nvme)?;
    let completed = tokio::select! {
        r = complete(http, &completion, settings) => match r {
            Ok(completed) => completed,
            Err(error) => return Ok(Outcome::CompleteFailed { error, sha256 }),
        },
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::Cancelled, "upload cancelled"));
        }
    };
    Ok(if completed {
        Outcome::Completed {
            parts,
            complete_time: complete_started.elapsed(),
            sha256,
        }
    } else {
        Outcome::NeedUrls
    })
}

/// Where the SHA-256 of the file comes from: the pass beside the transfer, or the encoding.
enum Sha256Source {
    Pass(WholeFile),
    Known(String),
}

impl Sha256Source {
    async fn finish(self) -> Result<String, UploadError> {
        match self {
            Sha256Source::Pass(whole) => whole.finish().await,
            Sha256Source::Known(sha256) => Ok(sha256),
        }
    }
}

/// Where each part's bytes are: a range of the file, or of the encoded file's spool.
#[derive(Clone, Copy)]
struct PartRanges<'a> {
    plan: &'a UploadPlan,
    encoded: Option<&'a Encoded>,
}

impl PartRanges<'_> {
    fn of(&self, part_number: shared::PartNumber) -> (u64, u64) {
        match self.encoded {
            Some(e) => e
                .stored_range(part_number.get() as usize - 1)
                .unwrap_or_default(),
            None => self.plan.part_range(part_number),
        }
    }
}

/// Before the first byte leaves: every URL goes to an allowed host with the checksum this
/// agent declared signed in, and the file is still the one that was described and planned.
async fn check_plan(
    path: &Path,
    layout: &Layout,
    encoded: Option<&Encoded>,
    plan: &UploadPlan,
    settings: &UploadSettings,
) -> Result<(), UploadError> {
    let snapshot = layout.snapshot;
    let described = encoded.map_or(Encoding::None, |e| e.encoding);
    let planned = plan.encoding.unwrap_or_default();
    if described.sealed() && !planned.sealed() {
        // What the server may not do: have an encrypted share stored in the clear.
        return Err(UploadError::new(
            ErrorCode::UnexpectedMessage,
            format!(
                "refused: the plan would store an encrypted share unencrypted ({planned}); this agent sealed it ({described}) and sends it no other way"
            ),
        ));
    }
    if planned != described {
        return Err(UploadError::new(
            ErrorCode::UnexpectedMessage,
            format!(
                "the plan is for encoding {planned}, but this agent described the file as {described}"
            ),
        ));
    }
    check_layout(layout, plan)?;
    for part in &plan.parts {
        settings.policy.check(&part.url)?;
        let declared = (part.part_number.get() as usize)
            .checked_sub(1)
            .and_then(|i| layout.part_crc64nvme.get(i));
        let signed = part
            .checksum_crc64nvme
            .as_deref()
            .and_then(|c| Crc64Nvme::parse(c).ok());
        if declared.is_none() || signed.as_ref() != declared {
            return Err(UploadError::new(
                ErrorCode::UnexpectedMessage,
                format!(
                    "the plan's part {} does not carry the CRC64NVME this agent declared",
                    part.part_number
                ),
            ));
        }
    }
    settings.policy.check(&plan.complete_url)?;
    if snapshot.size != plan.size {
        return Err(UploadError::new(
            ErrorCode::FileChanged,
            format!(
                "the server planned {} bytes but the file was hashed at {}",
                plan.size, snapshot.size
            ),
        ));
    }
    check_unchanged(path, snapshot).await
}

/// The plan lays the file out as this agent described it: the same part size, and each part
/// once, either to send or already stored. Anything else (a part size of 0, a part outside the
/// file, overlapping ranges) is `MALFORMED_MESSAGE`.
fn check_layout(layout: &Layout, plan: &UploadPlan) -> Result<(), UploadError> {
    let malformed = |why: String| UploadError::new(ErrorCode::MalformedMessage, why);
    if plan.part_size != layout.part_size {
        return Err(malformed(format!(
            "the plan's part size {} is not the {} this agent described",
            plan.part_size, layout.part_size
        )));
    }
    let mut planned = vec![false; layout.part_crc64nvme.len()];
    let numbers = plan.parts.iter().map(|p| p.part_number);
    for n in numbers.chain(plan.done.iter().map(|p| p.part_number)) {
        let slot = (n.get() as usize)
            .checked_sub(1)
            .and_then(|i| planned.get_mut(i))
            .ok_or_else(|| malformed(format!("the plan's part {n} is outside the file")))?;
        if std::mem::replace(slot, true) {
            return Err(malformed(format!("the plan names part {n} twice")));
        }
    }
    Ok(())
}

/// One run of a plan's parts.
struct Run<'a> {
    http: &'a reqwest::Client,
    path: &'a Arc<PathBuf>,
    /// The spool the parts come from, when the file was encoded.
    encoded: Option<&'a Arc<Encoded>>,
    snapshot: Snapshot,
    plan: &'a UploadPlan,
    settings: &'a UploadSettings,
    progress: &'a Arc<Progress>,
    /// No part starts after this: its URL would expire on the way.
    deadline: std::time::Instant,
}

impl Run<'_> {
    /// Sends the plan's parts, `concurrency` at a time. `None` once a URL ran out: the parts
    /// sent are stored, and the server presigns the rest.
    async fn send_parts(&self) -> Result<Option<Vec<CompletedPart>>, UploadError> {
        let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = futures::stream::iter(self.plan.parts.iter().cloned())
            .map(|part| {
                let ranges = PartRanges {
                    plan: self.plan,
                    encoded: self.encoded.map(|e| &**e),
                };
                let (offset, len) = ranges.of(part.part_number);
                let job = PartJob {
                    path: self.path.clone(),
                    spool: self.encoded.cloned(),
                    snapshot: self.snapshot,
                    part,
                    offset,
                    len,
                    deadline: self.deadline,
                };
                let expired = expired.clone();
                async move {
                    if expired.load(Ordering::Relaxed) {
                        return Ok(None);
                    }
                    let etag = upload_part(self.http, &job, self.settings, self.progress).await?;
                    let Some(etag) = etag else {
                        expired.store(true, Ordering::Relaxed);
                        return Ok(None);
                    };
                    self.progress.parts_done.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, UploadError>(Some(CompletedPart {
                        part_number: job.part.part_number,
                        etag,
                    }))
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        if expired.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Ok(Some(sent.into_iter().flatten().collect()))
    }
}

/// One part to send, and what it must be checked against.
struct PartJob {
    path: Arc<PathBuf>,
    /// Read from here instead of the file, at `offset`, when the file was encoded.
    spool: Option<Arc<Encoded>>,
    snapshot: Snapshot,
    part: PresignedPart,
    offset: u64,
    len: u64,
    /// No attempt starts after this: the URL would have expired.
    deadline: std::time::Instant,
}

/// Sends one part with bounded, backed-off retries. `Ok(None)` when its URL ran out first.
async fn upload_part(
    http: &reqwest::Client,
    job: &PartJob,
    settings: &UploadSettings,
    progress: &Arc<Progress>,
) -> Result<Option<String>, UploadError> {
    let mut backoff = Backoff::new(settings.retry_min, Duration::from_secs(10));
    let mut attempt = 0;
    loop {
        if std::time::Instant::now() >= job.deadline {
            return Ok(None);
        }
        attempt += 1;
        let sent = Arc::new(AtomicU64::new(0));
        let result = put_part_once(http, job, settings, progress, &sent).await;
        if !matches!(result, Ok(_) | Err(PartError::Fatal(_))) {
            // Bytes of a failed attempt will be sent again; take them back out of progress.
            progress
                .bytes_done
                .fetch_sub(sent.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        match result {
            Ok(etag) => return Ok(Some(etag)),
            Err(PartError::Fatal(e)) => return Err(e),
            Err(PartError::Expired) => return Ok(None),
            Err(PartError::Retryable(message)) => {
                progress.retries.fetch_add(1, Ordering::Relaxed);
                if attempt >= settings.attempts {
                    return Err(UploadError::new(
                        ErrorCode::PartUploadFailed,
                        format!(
                            "part {} failed after {attempt} attempts: {message}",
                            job.part.part_number
                        ),
                    ));
                }
                let delay = backoff.next_delay();
                tracing::warn!(part = job.part.part_number.get(), attempt, ?delay, error = %message, "part upload failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

enum PartError {
    Retryable(String),
    /// Storage said the URL expired.
    Expired,
    Fatal(UploadError),
}

async fn put_part_once(
    http: &reqwest::Client,
    job: &PartJob,
    settings: &UploadSettings,
    progress: &Arc<Progress>,
    sent: &Arc<AtomicU64>,
) -> Result<String, PartError> {
    let path = job.path.as_path();
    check_unchanged(path, job.snapshot)
        .await
        .map_err(PartError::Fatal)?;
    let source: futures::stream::BoxStream<'static, std::io::Result<Bytes>> = match &job.spool {
        Some(encoded) => spool_stream(encoded.clone(), job.offset, job.len).boxed(),
        None => {
            let mut file = open_no_follow(path)
                .await
                .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
            file.seek(std::io::SeekFrom::Start(job.offset))
                .await
                .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
            ReaderStream::with_capacity(file.take(job.len), READ_CHUNK).boxed()
        }
    };
    let counted = {
        let sent = sent.clone();
        let progress = progress.clone();
        let limiter = settings.limiter.clone();
        source
            .and_then(move |chunk: Bytes| {
                let limiter = limiter.clone();
                async move {
                    if let Some(l) = limiter {
                        l.acquire(chunk.len()).await;
                    }
                    Ok(chunk)
                }
            })
            .inspect_ok(move |chunk: &Bytes| {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                progress
                    .bytes_done
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            })
    };
    let checksum = job.part.checksum_crc64nvme.as_deref().unwrap_or_default();
    let resp = http
        .put(&job.part.url)
        .header(reqwest::header::CONTENT_LENGTH, job.len)
        .header("x-amz-checksum-crc64nvme", checksum)
        .timeout(settings.request_timeout)
        .body(reqwest::Body::wrap_stream(counted))
        .send()
        .await
        .map_err(|e| PartError::Retryable(e.without_url().to_string()))?;
    let status = resp.status();
    let etag = resp
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // A stored part's body is empty; only an error's is worth reading.
    let body = if status.is_success() {
        String::new()
    } else {
        resp.text().await.unwrap_or_default()
    };
    let etag = match judge(status, &body) {
        Answer::Stored => {
            etag.ok_or_else(|| PartError::Retryable("storage returned no ETag".into()))?
        }
        Answer::Expired => return Err(PartError::Expired),
        Answer::BadDigest(message) => {
            // The bytes that arrived are not the bytes that were hashed: corrupted on the way
            // (retry), or the file changed (stop).
            check_unchanged(path, job.snapshot)
                .await
                .map_err(PartError::Fatal)?;
            return Err(PartError::Retryable(message));
        }
        Answer::Retry(message) => return Err(PartError::Retryable(message)),
        Answer::Fatal(message) => {
            return Err(PartError::Fatal(UploadError::new(
                ErrorCode::PartUploadFailed,
                format!("part {}: {message}", job.part.part_number),
            )));
        }
    };
    // A change during the send would have been caught by the signed checksum, unless the new
    // bytes happen to have the declared CRC; the snapshot and the whole-file pass settle it.
    check_unchanged(path, job.snapshot)
        .await
        .map_err(PartError::Fatal)?;
    Ok(etag)
}

/// `len` bytes of an encoded file's spool from `offset`, in [`READ_CHUNK`] pieces read on the
/// blocking pool (positioned reads, so parts in flight share the one spool).
fn spool_stream(
    encoded: Arc<Encoded>,
    offset: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::try_unfold(
        (encoded, offset, len),
        |(encoded, offset, left)| async move {
            if left == 0 {
                return Ok(None);
            }
            let want = left.min(READ_CHUNK as u64) as usize;
            let (encoded, chunk) = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; want];
                let read = encoded.spool.read_exact_at(&mut buf, offset);
                (encoded, read.map(|()| Bytes::from(buf)))
            })
            .await
            .map_err(std::io::Error::other)?;
            let chunk = chunk?;
            Ok(Some((
                chunk,
                (encoded, offset + want as u64, left - want as u64),
            )))
        },
    )
}

/// The completion request: the part list as XML, each part with its ETag and CRC64NVME, and
/// the whole-object checksum signed into the URL.
struct Completion<'a> {
    url: &'a str,
    checksum: &'a str,
    body: String,
}

impl<'a> Completion<'a> {
    fn new(
        plan: &'a UploadPlan,
        parts: &[CompletedPart],
        crcs: &[Crc64Nvme],
    ) -> Result<Self, UploadError> {
        let checksum = plan.checksum_crc64nvme.as_deref().ok_or_else(|| {
            UploadError::new(
                ErrorCode::UnexpectedMessage,
                "the plan carries no whole-object CRC64NVME",
            )
        })?;
        let mut body = String::from("<CompleteMultipartUpload>");
        for p in parts {
            let crc = crcs
                .get(p.part_number.get() as usize - 1)
                .map(|c| c.to_base64())
                .unwrap_or_default();
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumCRC64NVME>{crc}</ChecksumCRC64NVME></Part>",
                p.part_number,
                xml_escape(&p.etag)
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        Ok(Self {
            url: &plan.complete_url,
            checksum,
            body,
        })
    }
}

/// POSTs the part list to the presigned CompleteMultipartUpload URL, with bounded retries.
/// `Ok(false)` if the URL expired.
async fn complete(
    http: &reqwest::Client,
    completion: &Completion<'_>,
    settings: &UploadSettings,
) -> Result<bool, UploadError> {
    let mut backoff = Backoff::new(settings.retry_min, Duration::from_secs(10));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = match http
            .post(completion.url)
            .header(reqwest::header::CONTENT_TYPE, "application/xml")
            .header("x-amz-checksum-crc64nvme", completion.checksum)
            .header("x-amz-checksum-type", "FULL_OBJECT")
            .timeout(settings.request_timeout)
            .body(completion.body.clone())
            .send()
            .await
        {
            Err(e) => Err((true, e.without_url().to_string())),
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                match judge(status, &text) {
                    Answer::Stored => Ok(()),
                    Answer::Expired => return Ok(false),
                    Answer::Retry(message) => Err((true, message)),
                    // A completion carries no body of the file, so a digest error is final.
                    Answer::BadDigest(message) | Answer::Fatal(message) => Err((false, message)),
                }
            }
        };
        match outcome {
            Ok(()) => return Ok(true),
            Err((retryable, message)) if retryable && attempt < settings.attempts => {
                let delay = backoff.next_delay();
                tracing::warn!(attempt, ?delay, error = %message, "completion failed, retrying");
                tokio::time::sleep(delay).await;
            }
            Err((_, message)) => {
                return Err(UploadError::new(
                    ErrorCode::CompleteFailed,
                    format!("completing the upload failed: {message}"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::PartNumber;
    use shared::protocol::PresignedPart;

    const PART: u64 = 5 * 1024 * 1024;

    fn layout(parts: usize) -> Layout {
        Layout {
            snapshot: Snapshot {
                size: PART * parts as u64,
                modified_ms: 1,
            },
            part_size: PART,
            part_crc64nvme: (0..parts).map(|i| Crc64Nvme::of(&[i as u8])).collect(),
        }
    }

    fn plan(part_size: u64, send: &[u32], done: &[u32]) -> UploadPlan {
        let n = |i: u32| PartNumber::new(i).unwrap();
        UploadPlan {
            upload_id: shared::UploadId::new_random(),
            size: PART * 3,
            part_size,
            encoding: None,
            parts: send
                .iter()
                .map(|&i| PresignedPart {
                    part_number: n(i),
                    url: "http://127.0.0.1/b/k".into(),
                    checksum_crc64nvme: None,
                    content_md5: None,
                })
                .collect(),
            done: done
                .iter()
                .map(|&i| CompletedPart {
                    part_number: n(i),
                    etag: "\"e\"".into(),
                })
                .collect(),
            complete_url: "http://127.0.0.1/b/k".into(),
            checksum_crc64nvme: None,
            expires_at: 0,
            expires_in_secs: 60,
        }
    }

    #[test]
    fn malformed_plans_are_refused_before_any_byte() {
        let layout = layout(3);
        assert!(check_layout(&layout, &plan(PART, &[1, 3], &[2])).is_ok());
        for (bad, why) in [
            (plan(0, &[1, 2, 3], &[]), "part size"),
            (plan(PART * 2, &[1, 2], &[]), "part size"),
            (plan(PART, &[1, 2, 4], &[]), "outside"),
            (plan(PART, &[1, 2], &[2]), "twice"),
            (plan(PART, &[1, 1, 2, 3], &[]), "twice"),
        ] {
            let err = check_layout(&layout, &bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::MalformedMessage);
            assert!(err.message.contains(why), "{why}: {}", err.message);
        }
    }
}
