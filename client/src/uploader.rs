//! Moves one file to storage following an [`UploadPlan`]: parts in parallel, each streamed from
//! disk, each retried a bounded number of times, then the presigned completion.
//!
//! Memory stays bounded whatever the file size: at most `concurrency` parts are in flight and
//! each is read in [`READ_CHUNK`] pieces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shared::protocol::{CompletedPart, PresignedPart, UploadPlan};
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
}

pub struct UploadSettings {
    pub concurrency: usize,
    pub attempts: u32,
    pub request_timeout: Duration,
    pub max_file_size: u64,
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

/// Looks at a shared file: its name as stored, and its size. Errors carry the agent-side codes.
/// A symbolic link is refused: swapping a shared file for a link must not widen what is shared.
pub async fn describe_file(path: &Path, max_size: u64) -> Result<(FileName, u64), UploadError> {
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
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    if !meta.is_file() {
        return Err(UploadError::new(
            ErrorCode::FileReadError,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > max_size {
        return Err(UploadError::new(
            ErrorCode::FileTooLarge,
            format!(
                "{} has {} bytes, more than MAX_FILE_SIZE ({max_size})",
                path.display(),
                meta.len()
            ),
        ));
    }
    // Opening proves we can read it, so a permission problem shows up now, not mid-upload.
    open_no_follow(path).await.map_err(|e| io_error(path, &e))?;
    let name = path
        .file_name()
        .map(|n| stored_name(&n.to_string_lossy()))
        .ok_or_else(|| UploadError::new(ErrorCode::InvalidFileName, "the path has no file name"))?;
    Ok((name, meta.len()))
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

/// Uploads every part of `plan`, completes the multipart upload and returns the part ETags.
pub async fn upload(
    http: &reqwest::Client,
    path: PathBuf,
    plan: &UploadPlan,
    settings: &UploadSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Vec<CompletedPart>, UploadError> {
    // Every URL is checked before the first byte leaves.
    for part in &plan.parts {
        settings.policy.check(&part.url)?;
    }
    settings.policy.check(&plan.complete_url)?;
    let (_, size) = describe_file(&path, settings.max_file_size).await?;
    if size != plan.size {
        return Err(UploadError::new(
            ErrorCode::FileChanged,
            format!(
                "the file is now {size} bytes, it was {} when described",
                plan.size
            ),
        ));
    }
    let path = Arc::new(path);
    let work = futures::stream::iter(plan.parts.iter().cloned())
        .map(|part| {
            let (offset, len) = plan.part_range(part.part_number);
            let path = path.clone();
            let progress = progress.clone();
            async move {
                let etag =
                    upload_part(http, &path, &part, offset, len, settings, &progress).await?;
                progress.parts_done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, UploadError>(CompletedPart {
                    part_number: part.part_number,
                    etag,
                })
            }
        })
        .buffer_unordered(settings.concurrency)
        .try_collect::<Vec<_>>();
    let mut parts = tokio::select! {
        r = work => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::ShuttingDown, "upload cancelled"));
        }
    };
    parts.sort_by_key(|p| p.part_number);

    tokio::select! {
        r = complete(http, &plan.complete_url, &parts, settings) => r?,
        () = cancel.cancelled() => {
            return Err(UploadError::new(ErrorCode::ShuttingDown, "upload cancelled"));
        }
    }
    Ok(parts)
}

async fn upload_part(
    http: &reqwest::Client,
    path: &Path,
    part: &PresignedPart,
    offset: u64,
    len: u64,
    settings: &UploadSettings,
    progress: &Arc<Progress>,
) -> Result<String, UploadError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = Arc::new(AtomicU64::new(0));
        let result = put_part_once(http, path, part, offset, len, settings, progress, &sent).await;
        match result {
            Ok(etag) => return Ok(etag),
            Err(PartError::Fatal(e)) => return Err(e),
            Err(PartError::Retryable(message)) => {
                // Bytes of a failed attempt will be sent again; take them back out of progress.
                progress
                    .bytes_done
                    .fetch_sub(sent.load(Ordering::Relaxed), Ordering::Relaxed);
                if attempt >= settings.attempts {
                    return Err(UploadError::new(
                        ErrorCode::PartUploadFailed,
                        format!(
                            "part {} failed after {attempt} attempts: {message}",
                            part.part_number
                        ),
                    ));
                }
                let delay = backoff.next_delay();
                tracing::warn!(part = part.part_number.get(), attempt, ?delay, error = %message, "part upload failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

enum PartError {
    Retryable(String),
    Fatal(UploadError),
}

#[allow(clippy::too_many_arguments)]
async fn put_part_once(
    http: &reqwest::Client,
    path: &Path,
    part: &PresignedPart,
    offset: u64,
    len: u64,
    settings: &UploadSettings,
    progress: &Arc<Progress>,
    sent: &Arc<AtomicU64>,
) -> Result<String, PartError> {
    let mut file = open_no_follow(path)
        .await
        .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| PartError::Fatal(io_error(path, &e)))?;
    let counted = {
        let sent = sent.clone();
        let progress = progress.clone();
        ReaderStream::with_capacity(file.take(len), READ_CHUNK).inspect_ok(move |chunk: &Bytes| {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            progress
                .bytes_done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        })
    };
    let resp = http
        .put(&part.url)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .timeout(settings.request_timeout)
        .body(reqwest::Body::wrap_stream(counted))
        .send()
        .await
        .map_err(|e| PartError::Retryable(e.without_url().to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let code = s3_error_code(resp).await;
        let message = format!("storage answered {status} {code}");
        // 4xx other than throttling or timeouts will not get better by retrying.
        return if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(PartError::Retryable(message))
        } else {
            Err(PartError::Fatal(UploadError::new(
                ErrorCode::PartUploadFailed,
                format!("part {}: {message}", part.part_number),
            )))
        };
    }
    resp.headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| PartError::Retryable("storage returned no ETag".into()))
}

/// POSTs the part list to the presigned CompleteMultipartUpload URL, with bounded retries.
async fn complete(
    http: &reqwest::Client,
    url: &str,
    parts: &[CompletedPart],
    settings: &UploadSettings,
) -> Result<(), UploadError> {
    let mut body = String::from("<CompleteMultipartUpload>");
    for p in parts {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            p.part_number,
            xml_escape(&p.etag)
        ));
    }
    body.push_str("</CompleteMultipartUpload>");

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
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
            Ok(()) => return Ok(()),
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

/// The S3 error code of a failed response, without echoing anything else from it.
async fn s3_error_code(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    xml_tag(&text, "Code").unwrap_or_default()
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
        let missing = describe_file(&dir.join("missing.txt"), 100)
            .await
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::FileNotFound);
        let not_file = describe_file(&dir, 100).await.unwrap_err();
        assert_eq!(not_file.code, ErrorCode::FileReadError);
        let file = dir.join("ok.txt");
        std::fs::write(&file, b"hello").unwrap();
        let (name, size) = describe_file(&file, 100).await.unwrap();
        assert_eq!((name.as_str(), size), ("ok.txt", 5));
        let too_big = describe_file(&file, 4).await.unwrap_err();
        assert_eq!(too_big.code, ErrorCode::FileTooLarge);
        let link = dir.join("link.txt");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let linked = describe_file(&link, u64::MAX).await.unwrap_err();
        assert_eq!(linked.code, ErrorCode::FileNotShared);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
