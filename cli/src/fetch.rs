//! Fetching a verified object into the operator's hands: a file (written under a temporary name
//! and renamed into place only once its bytes check out) or stdout. The bytes come straight from
//! storage through the presigned GET the server hands out; the server never carries them.
//!
//! What is checked: the size, and the SHA-256 the agent reported and the CRC64NVME storage
//! verified, whichever the upload recorded. A transfer that breaks off resumes with a `Range`
//! request on a fresh link, so a link that expires mid-way or a cut connection costs only a retry.
//!
//! A compressed object (`zstd`) is decoded on the way, in bounded pieces whatever its ratio: the
//! stored bytes are checked against the object's CRC64NVME and size, the decoded ones against the
//! file's SHA-256 and size. `--raw` keeps the stored form, which only the CRC64NVME can check.
//!
//! A sealed (encrypted) object is opened with the operator's identity file (`--identity`), frame
//! by frame ([`shared::sealed::Unsealer`]), then decompressed if it was compressed; the file is
//! checked against the keyed digest the agent recorded in place of its SHA-256. Without an
//! identity that opens it, the fetch fails before anything is written.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shared::UploadId;
use shared::api::DownloadLink;
use shared::encoding::Encoding;
use shared::hash::{Crc64Nvme, Crc64NvmeHasher, Sha256Hex};
use shared::sealed::{FileDigest, SealError, Unsealer};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::api::Api;
pub use crate::decode::Decode;
use crate::decode::Unzstd;

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
    /// Bytes written.
    pub size: u64,
    /// Bytes fetched from storage (fewer than `size` for a compressed object).
    pub stored_size: u64,
    /// How the object was stored, and whether it was written as stored (`--raw`).
    pub encoding: Encoding,
    pub raw: bool,
    /// SHA-256 of the bytes written.
    pub sha256: String,
    /// What the bytes were checked against: `sha256`, `crc64nvme`, or both.
    pub checked: Vec<&'static str>,
    /// Tries that broke off and were resumed.
    pub retries: u32,
}

/// What the fetched bytes must match, from the download link.
struct Expected {
    /// Of the file.
    size: u64,
    sha256: Option<Sha256Hex>,
    /// Of the object.
    stored_size: u64,
    crc64nvme: Option<Crc64Nvme>,
    encoding: Encoding,
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
        if link.encoding != Encoding::None && crc64nvme.is_none() {
            bail!(
                "upload {} is {}-encoded but has no CRC64NVME on record",
                link.upload_id,
                link.encoding
            );
        }
        Ok(Self {
            size: link.size,
            sha256,
            stored_size: link.stored_size.unwrap_or(link.size),
            crc64nvme,
            encoding: link.encoding,
        })
    }

    /// Checks what was fetched: the stored bytes (their count and CRC64NVME) and, unless they
    /// were kept raw, the file's (count and SHA-256). The error names each mismatch.
    fn check(&self, got: &Got, raw: bool) -> anyhow::Result<Vec<&'static str>> {
        let mut wrong = Vec::new();
        let mut checked = Vec::new();
        if got.stored != self.stored_size {
            wrong.push(format!(
                "{} bytes from storage, expected {}",
                got.stored, self.stored_size
            ));
        }
        let decoded = !raw || self.encoding == Encoding::None;
        if decoded && got.written != self.size {
            wrong.push(format!("{} bytes, expected {}", got.written, self.size));
        }
        if let Some(want) = self.sha256.as_ref().filter(|_| decoded) {
            // A sealed file was recorded with its keyed digest, which only the key opens.
            let (name, label, digest) = match &got.keyed {
                Some(keyed) => ("keyed digest", "keyed digest", keyed),
                None => ("sha256", "SHA-256", &got.sha256),
            };
            checked.push(name);
            if want.as_str() != digest {
                wrong.push(format!("{label} {digest}, expected {want}"));
            }
        }
        let crc = got.crc;
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

/// What one fetch got: bytes from storage and their CRC64NVME, bytes written and their SHA-256.
struct Got {
    stored: u64,
    crc: Crc64Nvme,
    written: u64,
    sha256: String,
    /// For a sealed object: the keyed digest of the bytes written.
    keyed: Option<String>,
}

/// Fetches upload `upload_id` (which must be completed) into `output`, checking its bytes, and
/// decoding a compressed object unless `raw`. On a mismatch a file output is removed and never
/// appears under its name; stdout has already had the bytes, so only the error (and the exit
/// code) say they are wrong.
pub async fn fetch(
    api: &Api,
    upload_id: UploadId,
    output: &Output,
    how: &Decode,
    quiet: bool,
) -> anyhow::Result<Fetched> {
    let raw = how.raw();
    let link = api.download_link(upload_id).await?;
    let expected = Expected::of(&link)?;
    let unsealer = if expected.encoding.sealed() && !raw {
        Some(how.unsealer(&link)?)
    } else {
        None
    };
    let bar = progress_bar(expected.stored_size, quiet);
    let decoder = if expected.encoding.compressed() && !raw {
        Some(Unzstd::new()?)
    } else {
        None
    };
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
        unsealer,
        keyed: None,
        decoder,
        done: 0,
        written: 0,
        sha256: Sha256::new(),
        crc: Crc64NvmeHasher::default(),
        bar: bar.clone(),
    };
    let mut retries = 0;
    let mut url = link.url;
    loop {
        match transfer
            .get(api.storage(), &url, expected.stored_size)
            .await
        {
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
    if let Some(decoder) = &transfer.decoder
        && !decoder.at_frame_end
    {
        bail!("the compressed object ends inside a zstd frame");
    }
    if let Some(unsealer) = &transfer.unsealer
        && !unsealer.at_frame_end()
    {
        bail!("the sealed object ends inside a frame");
    }
    transfer.sink.flush().await.context("writing the output")?;
    bar.finish_and_clear();
    let got = Got {
        stored: transfer.done,
        crc: transfer.crc.finish(),
        written: transfer.written,
        sha256: hex::encode(transfer.sha256.finalize()),
        keyed: match (&transfer.unsealer, transfer.keyed) {
            (Some(_), Some(keyed)) => Some(keyed.finish()),
            // An object with no frame at all holds no key to check with.
            (Some(_), None) => Some(String::new()),
            (None, _) => None,
        },
    };
    // On a mismatch `partial` is dropped here, which deletes it.
    let checked = expected.check(&got, raw)?;
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
        size: got.written,
        stored_size: got.stored,
        encoding: expected.encoding,
        raw,
        sha256: got.sha256,
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

/// The bytes fetched and written so far and their running hashes, across tries.
struct Transfer {
    sink: Sink,
    /// Set when a sealed object is opened on the way.
    unsealer: Option<Unsealer>,
    /// The keyed digest of the bytes written, once the first sealed frame gave the key.
    keyed: Option<FileDigest>,
    /// Set when a compressed object is decoded on the way.
    decoder: Option<Unzstd>,
    /// Bytes from storage.
    done: u64,
    written: u64,
    /// Of the bytes written; the CRC is of the bytes from storage.
    sha256: Sha256,
    crc: Crc64NvmeHasher,
    bar: ProgressBar,
}

impl Transfer {
    /// Writes `bytes` from storage to the output, opened if the object is sealed.
    async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(unsealer) = &mut self.unsealer else {
            return self.decode(bytes).await;
        };
        // Whole frames only, so at most what one piece from storage completes.
        let mut inners = Vec::new();
        unsealer.push(bytes, |_, inner| {
            inners.push(inner.to_vec());
            Ok::<(), SealError>(())
        })?;
        if self.keyed.is_none() {
            self.keyed = unsealer.file_digest();
        }
        for inner in inners {
            self.decode(&inner).await?;
        }
        Ok(())
    }

    /// Writes `bytes` (as stored, or opened) to the output, decompressed if the object is.
    async fn decode(&mut self, mut bytes: &[u8]) -> anyhow::Result<()> {
        if self.decoder.is_none() {
            return self.emit_plain(bytes).await;
        }
        loop {
            let decoder = self.decoder.as_mut().expect("checked above");
            let (used, produced) = decoder.step(bytes)?;
            bytes = &bytes[used..];
            let plain = std::mem::take(&mut decoder.out);
            let result = self.emit_plain(&plain[..produced]).await;
            if let Some(decoder) = self.decoder.as_mut() {
                decoder.out = plain;
            }
            result?;
            // A full output buffer may leave more to flush even with the input used up.
            if bytes.is_empty() && produced < Unzstd::OUT {
                return Ok(());
            }
        }
    }

    async fn emit_plain(&mut self, plain: &[u8]) -> anyhow::Result<()> {
        self.sha256.update(plain);
        if let Some(keyed) = &mut self.keyed {
            keyed.update(plain);
        }
        self.written += plain.len() as u64;
        Ok(self.sink.writer().write_all(plain).await?)
    }

    /// One GET of `url` from byte `self.done` on, until the body ends. `size` is the object's.
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
            self.crc.update(bytes);
            self.write(bytes)
                .await
                .map_err(|e| Attempt::Fatal(e.context("writing the output")))?;
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
            stored_size: data.len() as u64,
            crc64nvme: crc.then(|| Crc64Nvme::of(data)),
            encoding: Encoding::None,
        }
    }

    fn got(data: &[u8]) -> Got {
        Got {
            stored: data.len() as u64,
            crc: Crc64Nvme::of(data),
            written: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
            keyed: None,
        }
    }

    #[test]
    fn every_recorded_hash_is_checked() {
        let data = b"z-report of store 17";
        assert_eq!(
            expected(data, true, true).check(&got(data), false).unwrap(),
            vec!["sha256", "crc64nvme"]
        );
        let other = got(b"z-report of store 18");
        let err = expected(data, true, false)
            .check(&other, false)
            .unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        let err = expected(data, false, true)
            .check(&other, false)
            .unwrap_err();
        assert!(err.to_string().contains("CRC64NVME"), "{err}");
        let short = Got {
            stored: 3,
            written: 3,
            ..got(data)
        };
        let err = expected(data, true, true).check(&short, false).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
        // A sealed file is checked by its keyed digest, never by the plain SHA-256.
        let want = expected(data, true, false);
        let keyed = |digest: &str| Got {
            keyed: Some(digest.to_owned()),
            ..got(data)
        };
        let recorded = want.sha256.as_ref().unwrap().as_str().to_owned();
        assert_eq!(
            want.check(&keyed(&recorded), false).unwrap(),
            vec!["keyed digest"]
        );
        let err = want.check(&keyed(&"0".repeat(64)), false).unwrap_err();
        assert!(err.to_string().contains("keyed digest"), "{err}");
    }

    /// A compressed object: the stored bytes are checked by their CRC64NVME, the decoded ones by
    /// the file's SHA-256, and a raw fetch by the CRC alone.
    #[test]
    fn encoded_objects_are_checked_on_both_sides() {
        let plain = b"z-report of store 17, z-report of store 17, z-report of store 17".repeat(50);
        let stored = zstd::bulk::compress(&plain, 3).unwrap();
        let want = Expected {
            stored_size: stored.len() as u64,
            crc64nvme: Some(Crc64Nvme::of(&stored)),
            encoding: Encoding::Zstd,
            ..expected(&plain, true, false)
        };
        let decoded = Got {
            stored: stored.len() as u64,
            crc: Crc64Nvme::of(&stored),
            ..got(&plain)
        };
        assert_eq!(
            want.check(&decoded, false).unwrap(),
            vec!["sha256", "crc64nvme"]
        );
        let raw = got(&stored);
        assert_eq!(want.check(&raw, true).unwrap(), vec!["crc64nvme"]);
        let wrong = Got {
            sha256: hex::encode(Sha256::digest(b"other")),
            ..decoded
        };
        assert!(want.check(&wrong, false).is_err());
    }

    /// However far a few compressed bytes expand, they are decoded a bounded piece at a time.
    #[test]
    fn decoding_is_bounded() {
        let zeros = vec![0u8; 50 * 1024 * 1024];
        let packed = zstd::bulk::compress(&zeros, 3).unwrap();
        assert!(packed.len() < 10_000, "{}", packed.len());
        let mut unzstd = Unzstd::new().unwrap();
        let (mut input, mut total, mut steps) = (&packed[..], 0usize, 0);
        loop {
            let (used, produced) = unzstd.step(input).unwrap();
            assert!(produced <= Unzstd::OUT);
            assert!(unzstd.out[..produced].iter().all(|b| *b == 0));
            input = &input[used..];
            total += produced;
            steps += 1;
            if input.is_empty() && produced < Unzstd::OUT {
                break;
            }
        }
        assert_eq!(total, zeros.len(), "{steps} steps");
        assert!(steps >= zeros.len() / Unzstd::OUT);
        assert!(unzstd.at_frame_end);
        assert!(Unzstd::new().unwrap().step(b"not zstd at all").is_err());
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
