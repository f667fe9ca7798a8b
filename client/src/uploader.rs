//! Moves one file to storage following an [`UploadPlan`]: parts in parallel, each streamed from
//! disk, each retried a bounded number of times, then the presigned completion.
//!
//! Memory stays bounded whatever the file size: at most `concurrency` parts are in flight and
//! each is read in [`READ_CHUNK`] pieces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use sha2::Sha256;
use shared::protocol::{CompletedPart, PresignedPart, UploadPlan, plan_parts};
use shared::{ErrorCode, FileName};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Size of each read from disk while streaming a part.
pub const READ_CHUNK: usize = 64 * 1024;

/// Why an upload stopped, in the terms the server reports to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UploadError {
    pub code: ErrorCode,
    pub message: String,
}

impl UploadError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
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
}

pub struct UploadSettings {
    pub concurrency: usize,
    pub attempts: u32,
    pub retry_min: Duration,
    /// Shared by every upload of the agent, so the cap holds for all of them together.
    pub limiter: Option<Arc<RateLimiter>>,
    pub request_timeout: Duration,
    pub policy: UploadPolicy,
}

/// The hosts this agent may send bytes to. A compromised or impersonated server can hand out
/// any URL; only these are used.
#[derive(Debug, Clone)]
pub struct UploadPolicy {
    /// `host` (any port) or `host:port`, lowercase.
    allowed: Vec<String>,
}

impl UploadPolicy {
    pub fn new(allowed: Vec<String>) -> Self {
        Self {
            allowed: allowed
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }

    /// `Ok` if `raw` is an http(s) URL to an allowed host. The refusal names the host but never
    /// the URL, which carries a signature.
    pub fn check(&self, raw: &str) -> Result<(), UploadError> {
        let refuse = |what: String| Err(UploadError::new(ErrorCode::UploadHostNotAllowed, what));
        let Ok(url) = url::Url::parse(raw) else {
            return refuse("the server sent an unparseable upload URL".into());
        };
        if !matches!(url.scheme(), "http" | "https") {
            return refuse(format!(
                "upload URLs must be http or https, not {}",
                url.scheme()
            ));
        }
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return refuse("the upload URL has no host".into());
        };
        let port = url.port_or_known_default().unwrap_or(0);
        let with_port = format!("{host}:{port}");
        if self.allowed.iter().any(|a| *a == host || *a == with_port) {
            Ok(())
        } else {
            refuse(format!("{with_port} is not in ALLOWED_UPLOAD_HOSTS"))
        }
    }
}

/// Size and modification time of a file: if either moves between hashing and uploading, the
/// file changed under the agent and the upload stops with `FILE_CHANGED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub size: u64,
    pub modified_ms: u64,
}

impl Snapshot {
    fn of(meta: &std::fs::Metadata) -> Self {
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            size: meta.len(),
            modified_ms,
        }
    }
}

/// A shared file, described and hashed for the server.
#[derive(Debug, Clone)]
pub struct Described {
    pub file_name: FileName,
    pub snapshot: Snapshot,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    pub part_size: u64,
    /// Base64 MD5 of each part.
    pub part_md5: Vec<String>,
}

/// Read size while hashing.
const HASH_CHUNK: usize = 1024 * 1024;

/// Looks at a shared file and hashes it: its name as stored, its size, the SHA-256 of the
/// whole and the MD5 of each part laid out by [`plan_parts`]. Errors carry the agent-side codes.
/// A symbolic link is refused: swapping a shared file for a link must not widen what is shared.
pub async fn describe_file(
    path: &Path,
    max_size: u64,
    min_part_size: u64,
    hash_threads: usize,
) -> Result<Described, UploadError> {
    let link = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    if link.file_type().is_symlink() {
        return Err(UploadError::new(
            ErrorCode::FileNotShared,
            format!(
                "{} is a symbolic link; share the file itself",
                path.display()
            ),
        ));
    }
    if !link.is_file() {
        return Err(UploadError::new(
            ErrorCode::FileReadError,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if link.len() > max_size {
        return Err(UploadError::new(
            ErrorCode::FileTooLarge,
            format!(
                "{} has {} bytes, more than MAX_FILE_SIZE ({max_size})",
                path.display(),
                link.len()
            ),
        ));
    }
    let name = path
        .file_name()
        .map(|n| stored_name(&n.to_string_lossy()))
        .ok_or_else(|| UploadError::new(ErrorCode::InvalidFileName, "the path has no file name"))?;
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || hash_file(&owned, name, min_part_size, hash_threads))
        .await
        .map_err(|e| UploadError::new(ErrorCode::FileReadError, format!("hashing failed: {e}")))?
}

fn hash_file(
    path: &Path,
    file_name: FileName,
    min_part_size: u64,
    threads: usize,
) -> Result<Described, UploadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let before = Snapshot::of(&file.metadata().map_err(|e| io_error(path, &e))?);
    let (part_size, parts) = plan_parts(before.size, min_part_size).ok_or_else(|| {
        UploadError::new(
            ErrorCode::FileTooLarge,
            format!("{} is larger than one S3 object may be", path.display()),
        )
    })?;
    let src = HashSource {
        file: &file,
        path,
        size: before.size,
        part_size,
        parts: parts as usize,
    };
    let (sha256, part_md5) = if threads <= 1 {
        src.hash_in_one_pass()?
    } else {
        src.hash_in_parallel(threads)?
    };
    let after = Snapshot::of(&file.metadata().map_err(|e| io_error(path, &e))?);
    if after != before {
        return Err(changed_while_hashing(path));
    }
    Ok(Described {
        file_name,
        snapshot: before,
        sha256,
        part_size,
        part_md5,
    })
}

fn changed_while_hashing(path: &Path) -> UploadError {
    UploadError::new(
        ErrorCode::FileChanged,
        format!("{} changed while it was being hashed", path.display()),
    )
}

/// The open file being hashed and its part layout. Reads are positioned (`pread`), so threads
/// can share the one descriptor.
struct HashSource<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    size: u64,
    part_size: u64,
    parts: usize,
}

impl HashSource<'_> {
    /// Feeds `[offset, offset + len)` to `f` in [`HASH_CHUNK`] pieces. A file that ends early
    /// changed under the agent.
    fn read_range(
        &self,
        offset: u64,
        len: u64,
        buf: &mut [u8],
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), UploadError> {
        use std::os::unix::fs::FileExt;
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = self
                .file
                .read_at(&mut buf[..want], offset + done)
                .map_err(|e| io_error(self.path, &e))?;
            if n == 0 {
                return Err(changed_while_hashing(self.path));
            }
            f(&buf[..n]);
            done += n as u64;
        }
        Ok(())
    }

    fn part(&self, index: usize) -> (u64, u64) {
        let offset = index as u64 * self.part_size;
        (offset, self.size.saturating_sub(offset).min(self.part_size))
    }

    /// One thread, one read of the file: SHA-256 and the part's MD5 from each chunk.
    fn hash_in_one_pass(&self) -> Result<(String, Vec<String>), UploadError> {
        let mut whole = Sha256::new();
        let mut part_md5 = Vec::with_capacity(self.parts);
        let mut buf = vec![0u8; HASH_CHUNK];
        for i in 0..self.parts {
            let (offset, len) = self.part(i);
            let mut md5 = Md5::new();
            self.read_range(offset, len, &mut buf, |c| {
                whole.update(c);
                md5.update(c);
            })?;
            part_md5.push(BASE64.encode(md5.finalize()));
        }
        Ok((hex::encode(whole.finalize()), part_md5))
    }

    /// `threads` threads: this one reads the file for the SHA-256, which must go in order, while
    /// the others take parts from a shared counter and MD5 them; when the SHA-256 is done, this
    /// thread takes parts too. The file is read twice (from the page cache, usually), and the
    /// work balances itself whatever the two hashes cost on this CPU.
    fn hash_in_parallel(&self, threads: usize) -> Result<(String, Vec<String>), UploadError> {
        use std::sync::OnceLock;
        use std::sync::atomic::AtomicUsize;
        let next = AtomicUsize::new(0);
        let slots: Vec<OnceLock<String>> = (0..self.parts).map(|_| OnceLock::new()).collect();
        let md5_parts = || -> Result<(), UploadError> {
            let mut buf = vec![0u8; HASH_CHUNK];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= self.parts {
                    return Ok(());
                }
                let (offset, len) = self.part(i);
                let mut md5 = Md5::new();
                self.read_range(offset, len, &mut buf, |c| md5.update(c))
                    .inspect_err(|_| next.store(self.parts, Ordering::Relaxed))?;
                let _ = slots[i].set(BASE64.encode(md5.finalize()));
            }
        };
        let sha256 = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(md5_parts)).collect();
            let mut whole = Sha256::new();
            let mut buf = vec![0u8; HASH_CHUNK];
            let own = self
                .read_range(0, self.size, &mut buf, |c| whole.update(c))
                .inspect_err(|_| next.store(self.parts, Ordering::Relaxed))
                .and_then(|()| {
                    drop(buf);
                    md5_parts()
                });
            let mut result = own.map(|()| hex::encode(whole.finalize()));
            for helper in helpers {
                let joined = helper.join().unwrap_or_else(|_| {
                    Err(UploadError::new(
                        ErrorCode::FileReadError,
                        "a hashing thread panicked",
                    ))
                });
                if let (Ok(_), Err(e)) = (&result, joined) {
                    result = Err(e);
                }
            }
            result
        })?;
        let part_md5 = slots
            .into_iter()
            .map(OnceLock::into_inner)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| changed_while_hashing(self.path))?;
        Ok((sha256, part_md5))
    }
}

/// `Err(FILE_CHANGED)` if the file no longer has the size and modification time it was hashed
/// with.
async fn check_unchanged(path: &Path, snapshot: Snapshot) -> Result<(), UploadError> {
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    let now = Snapshot::of(&meta);
    if now == snapshot {
        Ok(())
    } else {
        Err(UploadError::new(
            ErrorCode::FileChanged,
            format!(
                "{} changed after it was hashed (size {} -> {}, modified {} -> {})",
                path.display(),
                snapshot.size,
                now.size,
                snapshot.modified_ms,
                now.modified_ms
            ),
        ))
    }
}

/// Paces bytes so that all uploads together stay under a rate: each chunk is given the next
/// free slot on a shared timeline, so there is no burst beyond one chunk.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next_free: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: std::sync::Mutex::new(None),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Opens for reading without following a symbolic link in the last component.
async fn open_no_follow(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await
}

fn io_error(path: &Path, err: &std::io::Error) -> UploadError {
    let code = match err.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::FileNotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::FileReadError,
    };
    UploadError::new(code, format!("{}: {err}", path.display()))
}

/// The file's name as it will appear in the object key: characters outside the safe set become
/// `_`, so `Z report 1.csv` is stored as `Z_report_1.csv`.
pub fn stored_name(raw: &str) -> FileName {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(shared::ids::MAX_FILE_NAME_LEN)
        .collect();
    if name == "." || name == ".." || name.is_empty() {
        name = "file".into();
    }
    FileName::parse(&name).expect("sanitized names are valid")
}

/// How an upload run ended, when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    /// Every part is stored and the multipart upload is completed with these ETags.
    Completed {
        parts: Vec<CompletedPart>,
        /// How long the completion request took.
        complete_time: Duration,
    },
    /// The URLs ran out first. Parts that were sent are stored; the server presigns the rest.
    NeedUrls,
}

/// Uploads the parts of `plan`, then completes the multipart upload with them and the parts
/// already stored. `snapshot` is the file as it was hashed.
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    http: &reqwest::Client,
    path: PathBuf,
    snapshot: Snapshot,
    plan: &UploadPlan,
    settings: &UploadSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Outcome, UploadError> {
    // The URLs are good for `expires_in_secs` from about now; stop starting requests a margin
    // before that, so none reaches storage expired.
    let ttl = Duration::from_secs(plan.expires_in_secs);
    let deadline = std::time::Instant::now() + ttl - (ttl / 5).min(Duration::from_secs(60));
    // Every URL is checked before the first byte leaves.
    for part in &plan.parts {
        settings.policy.check(&part.url)?;
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
    check_unchanged(&path, snapshot).await?;
    let done_bytes: u64 = plan
        .done
        .iter()
        .map(|p| plan.part_range(p.part_number).1)
        .sum();
    progress.bytes_done.store(done_bytes, Ordering::Relaxed);
    progress
        .parts_done
        .store(plan.done.len() as u32, Ordering::Relaxed);
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let path = Arc::new(path);
    let work = futures::stream::iter(plan.parts.iter().cloned())
        .map(|part| {
            let (offset, len) = plan.part_range(part.part_number);
            let job = PartJob {
                path: path.clone(),
                snapshot,
                part,
                offset,
                len,
                deadline,
            };
            let progress = progress.clone();
            let expired = expired.clone();
            async move {
                if expired.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let etag = upload_part(http, &job, settings, &progress).await?;
                let Some(etag) = etag else {
                    expired.store(true, Ordering::Relaxed);
                    return Ok(None);
                };
                progress.parts_done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, UploadError>(Some(CompletedPart {
                    part_number: job.part.part_number,
                    etag,
                }))
            }
        })
        .buffer_unordered(settings.concurrency)
        .try_collect::<Vec<_>>();
    let sent = tokio::select! {
        r = work => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::Cancelled, "upload cancelled"));
        }
    };
    if expired.load(Ordering::Relaxed) {
        return Ok(Outcome::NeedUrls);
    }
    let mut parts: Vec<CompletedPart> = plan
        .done
        .iter()
        .cloned()
        .chain(sent.into_iter().flatten())
        .collect();
    parts.sort_by_key(|p| p.part_number);
    let expected = plan.size.div_ceil(plan.part_size).max(1) as usize;
    if parts.len() != expected {
        return Err(UploadError::new(
            ErrorCode::CompleteFailed,
            format!("the plan covers {} of {expected} parts", parts.len()),
        ));
    }
    check_unchanged(&path, snapshot).await?;
    if std::time::Instant::now() >= deadline {
        return Ok(Outcome::NeedUrls);
    }
    let complete_started = std::time::Instant::now();
    let completed = tokio::select! {
        r = complete(http, &plan.complete_url, &parts, settings) => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::Cancelled, "upload cancelled"));
        }
    };
    Ok(if completed {
        Outcome::Completed {
            parts,
            complete_time: complete_started.elapsed(),
        }
    } else {
        Outcome::NeedUrls
    })
}

/// One part to send, and what it must be checked against.
struct PartJob {
    path: Arc<PathBuf>,
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
    let mut file = open_no_follow(path)
        .await
        .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
    file.seek(std::io::SeekFrom::Start(job.offset))
        .await
        .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
    let counted = {
        let sent = sent.clone();
        let progress = progress.clone();
        let limiter = settings.limiter.clone();
        ReaderStream::with_capacity(file.take(job.len), READ_CHUNK)
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
    let resp = http
        .put(&job.part.url)
        .header(reqwest::header::CONTENT_LENGTH, job.len)
        .header("content-md5", &job.part.content_md5)
        .timeout(settings.request_timeout)
        .body(reqwest::Body::wrap_stream(counted))
        .send()
        .await
        .map_err(|e| PartError::Retryable(e.without_url().to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let code = xml_tag(&text, "Code").unwrap_or_default();
        let message = format!("storage answered {status} {code}");
        if status.as_u16() == 403 && text.contains("expired") {
            return Err(PartError::Expired);
        }
        if code == "BadDigest" {
            // The bytes that arrived are not the bytes that were hashed: corrupted on the way
            // (retry), or the file changed (stop).
            check_unchanged(path, job.snapshot)
                .await
                .map_err(PartError::Fatal)?;
            return Err(PartError::Retryable(message));
        }
        // 4xx other than throttling or timeouts will not get better by retrying.
        return if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(PartError::Retryable(message))
        } else {
            Err(PartError::Fatal(UploadError::new(
                ErrorCode::PartUploadFailed,
                format!("part {}: {message}", job.part.part_number),
            )))
        };
    }
    let etag = resp
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| PartError::Retryable("storage returned no ETag".into()))?;
    // A change during the send would have been caught by Content-MD5, unless the new bytes
    // happen to be the hashed ones; the snapshot settles it.
    check_unchanged(path, job.snapshot)
        .await
        .map_err(PartError::Fatal)?;
    Ok(etag)
}

/// POSTs the part list to the presigned CompleteMultipartUpload URL, with bounded retries.
/// `Ok(false)` if the URL expired.
async fn complete(
    http: &reqwest::Client,
    url: &str,
    parts: &[CompletedPart],
    settings: &UploadSettings,
) -> Result<bool, UploadError> {
    let mut body = String::from("<CompleteMultipartUpload>");
    for p in parts {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            p.part_number,
            xml_escape(&p.etag)
        ));
    }
    body.push_str("</CompleteMultipartUpload>");

    let mut backoff = Backoff::new(settings.retry_min, Duration::from_secs(10));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = match http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/xml")
            .timeout(settings.request_timeout)
            .body(body.clone())
            .send()
            .await
        {
            Err(e) => Err((true, e.without_url().to_string())),
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                // S3 can answer 200 and still report an error in the body.
                if status.is_success() && !text.contains("<Error>") {
                    Ok(())
                } else if status.as_u16() == 403 && text.contains("expired") {
                    return Ok(false);
                } else {
                    let code = xml_tag(&text, "Code").unwrap_or_default();
                    Err((
                        status.is_server_error() || status.is_success(),
                        format!("storage answered {status} {code}"),
                    ))
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

fn xml_tag(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    let value = &xml[start..end];
    // Error codes are short identifiers; anything else is not worth repeating.
    (value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| value.to_owned())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_are_safe() {
        assert_eq!(stored_name("Z report 1.csv").as_str(), "Z_report_1.csv");
        assert_eq!(stored_name("..").as_str(), "file");
        assert_eq!(stored_name("é.txt").as_str(), "_.txt");
        assert_eq!(stored_name(&"a".repeat(400)).as_str().len(), 255);
    }

    #[test]
    fn xml_tag_extracts_codes_only() {
        let body = "<Error><Code>BadDigest</Code><Message>x</Message></Error>";
        assert_eq!(xml_tag(body, "Code").as_deref(), Some("BadDigest"));
        assert_eq!(xml_tag("<Code>a b</Code>", "Code"), None);
        assert_eq!(xml_tag("nothing", "Code"), None);
    }

    #[test]
    fn upload_policy_allows_only_listed_hosts() {
        let policy = UploadPolicy::new(vec!["s3.example.com".into(), "127.0.0.1:9000".into()]);
        assert!(
            policy
                .check("https://s3.example.com/b/k?partNumber=1")
                .is_ok()
        );
        assert!(policy.check("https://S3.EXAMPLE.COM:8443/b/k").is_ok());
        assert!(policy.check("http://127.0.0.1:9000/b/k").is_ok());
        for bad in [
            "http://127.0.0.1:9001/b/k",
            "https://evil.example.net/b/k",
            "https://s3.example.com.evil.net/b/k",
            "https://s3.example.com@evil.net/b/k",
            "file:///etc/passwd",
            "not a url",
        ] {
            let err = policy.check(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::UploadHostNotAllowed, "{bad}");
            assert!(
                !err.message.contains("/b/k"),
                "the URL must not be echoed: {}",
                err.message
            );
        }
    }

    #[test]
    fn io_errors_map_to_agent_codes() {
        // Tests run as root here, where file modes cannot produce a real EACCES.
        let path = Path::new("/x");
        let kind = |k| io_error(path, &std::io::Error::from(k)).code;
        assert_eq!(kind(std::io::ErrorKind::NotFound), ErrorCode::FileNotFound);
        assert_eq!(
            kind(std::io::ErrorKind::PermissionDenied),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            kind(std::io::ErrorKind::InvalidData),
            ErrorCode::FileReadError
        );
    }

    #[tokio::test]
    async fn describe_reports_agent_side_codes() {
        let dir = std::env::temp_dir().join(format!("backhaul-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let min = MIN_PART;
        let missing = describe_file(&dir.join("missing.txt"), 100, min, 2)
            .await
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::FileNotFound);
        let not_file = describe_file(&dir, 100, min, 2).await.unwrap_err();
        assert_eq!(not_file.code, ErrorCode::FileReadError);
        let file = dir.join("ok.txt");
        std::fs::write(&file, b"hello").unwrap();
        let d = describe_file(&file, 100, min, 2).await.unwrap();
        assert_eq!((d.file_name.as_str(), d.snapshot.size), ("ok.txt", 5));
        let too_big = describe_file(&file, 4, min, 2).await.unwrap_err();
        assert_eq!(too_big.code, ErrorCode::FileTooLarge);
        let link = dir.join("link.txt");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let linked = describe_file(&link, u64::MAX, min, 2).await.unwrap_err();
        assert_eq!(linked.code, ErrorCode::FileNotShared);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const MIN_PART: u64 = 5 * 1024 * 1024;

    #[tokio::test]
    async fn hashes_cover_the_whole_file_and_each_part() {
        let dir = std::env::temp_dir().join(format!("backhaul-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Two full parts and a 3-byte tail; the chunked reader must cut exactly at part edges.
        let data: Vec<u8> = (0..2 * MIN_PART + 3).map(|i| (i % 251) as u8).collect();
        let file = dir.join("data.bin");
        std::fs::write(&file, &data).unwrap();
        let expected: Vec<String> = data
            .chunks(MIN_PART as usize)
            .map(|c| BASE64.encode(Md5::digest(c)))
            .collect();
        assert_eq!(expected.len(), 3);
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        // One pass, and the SHA-256 thread beside one or more MD5 threads, agree exactly.
        for threads in [1, 2, 3, 8] {
            let d = describe_file(&file, u64::MAX, MIN_PART, threads)
                .await
                .unwrap();
            assert_eq!(d.part_size, MIN_PART);
            assert_eq!(d.sha256, hex::encode(Sha256::digest(&data)), "{threads}");
            assert_eq!(d.part_md5, expected, "{threads} threads");

            let e = describe_file(&empty, u64::MAX, MIN_PART, threads)
                .await
                .unwrap();
            assert_eq!(e.part_md5, vec![BASE64.encode(Md5::digest(b""))]);
            assert_eq!(e.sha256, hex::encode(Sha256::digest(b"")));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file shorter than its snapshot said (it shrank mid-hash) is FILE_CHANGED on every
    /// path, and the parallel one stops all its threads.
    #[test]
    fn a_file_that_ends_early_while_hashing_is_changed() {
        let dir = std::env::temp_dir().join(format!("backhaul-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("short.bin");
        std::fs::write(&path, vec![7u8; (MIN_PART + 10) as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let src = HashSource {
            file: &file,
            path: &path,
            size: 3 * MIN_PART,
            part_size: MIN_PART,
            parts: 3,
        };
        assert_eq!(
            src.hash_in_one_pass().unwrap_err().code,
            ErrorCode::FileChanged
        );
        for threads in [2, 4] {
            assert_eq!(
                src.hash_in_parallel(threads).unwrap_err().code,
                ErrorCode::FileChanged
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_that_changes_after_hashing_is_refused() {
        let dir = std::env::temp_dir().join(format!("backhaul-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.txt");
        std::fs::write(&file, b"before").unwrap();
        let d = describe_file(&file, u64::MAX, MIN_PART, 2).await.unwrap();
        assert!(check_unchanged(&file, d.snapshot).await.is_ok());
        std::fs::write(&file, b"after, longer").unwrap();
        let err = check_unchanged(&file, d.snapshot).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::FileChanged);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_paces_all_callers_together() {
        let limiter = Arc::new(RateLimiter::new(1024 * 1024));
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move {
                    for _ in 0..16 {
                        l.acquire(64 * 1024).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 4 MiB at 1 MiB/s: the last chunk may start after 3 s plus all but one chunk.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(3900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4000), "{elapsed:?}");
    }
}
