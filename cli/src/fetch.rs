//! Fetching a verified object into the operator's hands: a file (written under a temporary name
//! and renamed into place only once its bytes check out) or stdout. The bytes come straight from
//! storage through the presigned GET the server hands out; the server never carries them.
//!
//! What is checked: the size, and the SHA-256 the agent reported and the CRC64NVME storage
//! verified, whichever the upload recorded. A transfer that breaks off resumes with a `Range`
//! request on a fresh link, so a link that expires mid-way or a cut connection costs only a retry.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shared::UploadId;
use shared::api::DownloadLink;
use shared::hash::{Crc64Nvme, Crc64NvmeHasher, Sha256Hex};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::api::Api;

/// Tries (each with a fresh link) before a fetch gives up.
const MAX_ATTEMPTS: u32 = 6;

/// Where fetched bytes go: `-o FILE`, or `-o -` for stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Output {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "-" => Output::Stdout,
            path => Output::File(PathBuf::from(path)),
        })
    }
}

impl Output {
    pub fn is_stdout(&self) -> bool {
        matches!(self, Output::Stdout)
    }
}

/// A fetch whose bytes matched everything the upload recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub upload_id: UploadId,
    /// `None` for stdout.
    pub path: Option<PathBuf>,
    pub size: u64,
    pub sha256: String,
    /// What the bytes were checked against: `sha256`, `crc64nvme`, or both.
    pub checked: Vec<&'static str>,
    /// Tries that broke off and were resumed.
    pub retries: u32,
}

/// What the fetched bytes must match, from the download link.
struct Expected {
    size: u64,
    sha256: Option<Sha256Hex>,
    crc64nvme: Option<Crc64Nvme>,
}

impl Expected {
    fn of(link: &DownloadLink) -> anyhow::Result<Self> {
        let sha256 = link
            .sha256
            .as_deref()
            .map(Sha256Hex::parse)
            .transpose()
            .context("the server's SHA-256 for this upload is malformed")?;
        let crc64nvme = link
            .checksum_crc64nvme
            .as_deref()
            .map(Crc64Nvme::parse)
            .transpose()
            .context("the server's CRC64NVME for this upload is malformed")?;
        if sha256.is_none() && crc64nvme.is_none() {
            bail!(
                "upload {} has neither a SHA-256 nor a CRC64NVME on record: its bytes cannot be checked",
                link.upload_id
            );
        }
        Ok(Self {
            size: link.size,
            sha256,
            crc64nvme,
        })
    }

    /// Checks the hashes of `size` bytes; the error names each mismatch.
    fn check(&self, size: u64, sha256: &str, crc: Crc64Nvme) -> anyhow::Result<Vec<&'static str>> {
        let mut wrong = Vec::new();
        let mut checked = Vec::new();
        if size != self.size {
            wrong.push(format!("{size} bytes, expected {}", self.size));
        }
        if let Some(want) = &self.sha256 {
            checked.push("sha256");
            if want.as_str() != sha256 {
                wrong.push(format!("SHA-256 {sha256}, expected {want}"));
            }
        }
        if let Some(want) = self.crc64nvme {
            checked.push("crc64nvme");
            if want != crc {
                wrong.push(format!("CRC64NVME {crc}, expected {want}"));
            }
        }
        if wrong.is_empty() {
            Ok(checked)
        } else {
            Err(anyhow!(
                "the fetched bytes do not match the upload: {}",
                wrong.join("; ")
            ))
        }
    }
}

/// Fetches upload `upload_id` (which must be completed) into `output`, checking its bytes.
/// On a mismatch a file output is removed and never appears under its name; stdout has already
/// had the bytes, so only the error (and the exit code) say they are wrong.
pub async fn fetch(
    api: &Api,
    upload_id: UploadId,
    output: &Output,
    quiet: bool,
) -> anyhow::Result<Fetched> {
    let link = api.download_link(upload_id).await?;
    let expected = Expected::of(&link)?;
    let bar = progress_bar(expected.size, quiet);
    let (sink, partial) = match output {
        Output::Stdout => (Sink::Stdout(tokio::io::stdout()), None),
        Output::File(path) => {
            let partial = partial_beside(path)?;
            let file = tokio::fs::File::from_std(partial.reopen()?);
            (Sink::File(tokio::io::BufWriter::new(file)), Some(partial))
        }
    };
    let mut transfer = Transfer {
        sink,
        done: 0,
        sha256: Sha256::new(),
        crc: Crc64NvmeHasher::default(),
        bar: bar.clone(),
    };
    let mut retries = 0;
    let mut url = link.url;
    loop {
        match transfer.get(api.storage(), &url, expected.size).await {
            Ok(()) => break,
            Err(Attempt::Fatal(e)) => {
                bar.abandon();
                return Err(e);
            }
            Err(Attempt::Retry(e)) => {
                retries += 1;
                if retries >= MAX_ATTEMPTS {
                    bar.abandon();
                    return Err(e.context(format!("fetch gave up after {MAX_ATTEMPTS} tries")));
                }
                bar.suspend(|| {
                    eprintln!("fetch broke off at byte {}: {e:#}; resuming", transfer.done)
                });
                tokio::time::sleep(Duration::from_millis(250 << retries.min(5))).await;
                url = api.download_link(upload_id).await?.url;
            }
        }
    }
    transfer.sink.flush().await.context("writing the output")?;
    bar.finish_and_clear();
    let sha256 = hex::encode(transfer.sha256.finalize());
    // On a mismatch `partial` is dropped here, which deletes it.
    let checked = expected.check(transfer.done, &sha256, transfer.crc.finish())?;
    let path = match (output, partial) {
        (Output::File(path), Some(partial)) => {
            partial.as_file().sync_all().context("syncing the output")?;
            partial
                .persist(path)
                .with_context(|| format!("moving the fetched file to {}", path.display()))?;
            Some(path.clone())
        }
        _ => None,
    };
    Ok(Fetched {
        upload_id,
        path,
        size: transfer.done,
        sha256,
        checked,
        retries,
    })
}

/// A temporary file in `path`'s directory, so the final rename stays on one file system.
fn partial_beside(path: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))
}

fn progress_bar(size: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "fetching [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar
}

enum Sink {
    Stdout(tokio::io::Stdout),
    File(tokio::io::BufWriter<tokio::fs::File>),
}

impl Sink {
    fn writer(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match self {
            Sink::Stdout(s) => s,
            Sink::File(f) => f,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush().await
    }
}

/// Why one GET ended early.
enum Attempt {
    /// Worth another try on a fresh link, from where this one stopped.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// The bytes written so far and their running hashes, across tries.
struct Transfer {
    sink: Sink,
    done: u64,
    sha256: Sha256,
    crc: Crc64NvmeHasher,
    bar: ProgressBar,
}

impl Transfer {
    /// One GET of `url` from byte `self.done` on, until the body ends.
    async fn get(&mut self, http: &reqwest::Client, url: &str, size: u64) -> Result<(), Attempt> {
        let mut req = http.get(url);
        if self.done > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={}-", self.done));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Retry(anyhow!(e).context("could not reach storage")))?;
        let status = resp.status();
        // Bytes of the body that were already written (storage ignored the range).
        let mut skip = match status.as_u16() {
            200 => self.done,
            206 => {
                let start = content_range_start(&resp);
                if start != Some(self.done) {
                    return Err(Attempt::Fatal(anyhow!(
                        "storage answered a range from {start:?}, asked from {}",
                        self.done
                    )));
                }
                0
            }
            404 => {
                return Err(Attempt::Fatal(anyhow!(
                    "the object is no longer in storage (HTTP 404)"
                )));
            }
            // An expired link (403), a throttle or a storage hiccup: a fresh link may do.
            403 | 408 | 429 | 500..=599 => {
                return Err(Attempt::Retry(anyhow!("storage answered HTTP {status}")));
            }
            _ => return Err(Attempt::Fatal(anyhow!("storage answered HTTP {status}"))),
        };
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| Attempt::Retry(anyhow!(e).context("reading from storage")))?;
            let mut bytes = &chunk[..];
            let skipped = skip.min(bytes.len() as u64) as usize;
            bytes = &bytes[skipped..];
            skip -= skipped as u64;
            if bytes.is_empty() {
                continue;
            }
            if self.done + bytes.len() as u64 > size {
                return Err(Attempt::Fatal(anyhow!(
                    "storage sent more than the {size} bytes the upload recorded"
                )));
            }
            self.sha256.update(bytes);
            self.crc.update(bytes);
            self.sink
                .writer()
                .write_all(bytes)
                .await
                .map_err(|e| Attempt::Fatal(anyhow!(e).context("writing the output")))?;
            self.done += bytes.len() as u64;
            self.bar.set_position(self.done);
        }
        if self.done < size {
            return Err(Attempt::Retry(anyhow!(
                "storage ended the body at byte {} of {size}",
                self.done
            )));
        }
        Ok(())
    }
}

/// The first byte of a `Content-Range: bytes START-END/SIZE` answer.
fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let value = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split_once('-')?.0.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(data: &[u8], sha: bool, crc: bool) -> Expected {
        Expected {
            size: data.len() as u64,
            sha256: sha.then(|| Sha256Hex::parse(&hex::encode(Sha256::digest(data))).unwrap()),
            crc64nvme: crc.then(|| Crc64Nvme::of(data)),
        }
    }

    #[test]
    fn every_recorded_hash_is_checked() {
        let data = b"z-report of store 17";
        let sha = hex::encode(Sha256::digest(data));
        let crc = Crc64Nvme::of(data);
        assert_eq!(
            expected(data, true, true)
                .check(data.len() as u64, &sha, crc)
                .unwrap(),
            vec!["sha256", "crc64nvme"]
        );
        let other = b"z-report of store 18";
        let other_sha = hex::encode(Sha256::digest(other));
        let err = expected(data, true, false)
            .check(data.len() as u64, &other_sha, Crc64Nvme::of(other))
            .unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        let err = expected(data, false, true)
            .check(data.len() as u64, &other_sha, Crc64Nvme::of(other))
            .unwrap_err();
        assert!(err.to_string().contains("CRC64NVME"), "{err}");
        let err = expected(data, true, true).check(3, &sha, crc).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }

    #[test]
    fn output_dash_is_stdout() {
        assert_eq!("-".parse::<Output>().unwrap(), Output::Stdout);
        assert_eq!(
            "out/z.csv".parse::<Output>().unwrap(),
            Output::File(PathBuf::from("out/z.csv"))
        );
    }
}
