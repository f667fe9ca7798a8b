//! The transfer floor for `scripts/bench-transfer.sh`: one multipart upload of a file through
//! presigned part URLs, with no orchestration around it. No hashing, no checksums, no WebSocket,
//! no progress reports, no retries: it creates the multipart upload, presigns every part, then
//! PUTs the parts with a fixed number in flight (each part read whole into memory first) and
//! completes. The part layout is the one Backhaul uses (`shared::protocol::plan_parts`).
//!
//! With `--checksums` it asks storage for what Backhaul asks of it, and nothing more of itself:
//! the multipart upload is created with a full-object CRC64NVME, each part carries its CRC64NVME
//! and the completion the whole object's. The CRCs are computed before the clock starts, so
//! this floor is the storage's cost of a checksummed object without any client-side hashing.
//!
//! Prints one JSON line: `{"bytes":…,"parts":…,"presign_ms":…,"put_ms":…,"complete_ms":…,
//! "total_ms":…}`, where `total_ms` runs from before CreateMultipartUpload to after the
//! completion. The object is deleted afterwards unless `--keep`.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use shared::hash::Crc64Nvme;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Debug, Parser)]
struct Args {
    /// S3 endpoint, path-style (LocalStack, the embedded store).
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    bucket: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    access_key: String,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value = "bench/bareput")]
    key: String,
    /// Smallest part size; the layout grows it like Backhaul does for very large files.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    min_part_size: u64,
    /// Parts in flight, like the agent's UPLOAD_CONCURRENCY.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Leave the object in the bucket.
    #[arg(long)]
    keep: bool,
    /// Create the upload with a full-object CRC64NVME and send the part and object CRCs.
    #[arg(long)]
    checksums: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = tokio::fs::metadata(&args.file)
        .await
        .with_context(|| format!("reading {}", args.file.display()))?
        .len();
    let Some((part_size, parts)) = shared::protocol::plan_parts(size, args.min_part_size) else {
        bail!("{size} bytes do not fit in one multipart upload");
    };
    let creds =
        aws_credential_types::Credentials::from_keys(&args.access_key, &args.secret_key, None);
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        // The SDK's own default client is off in this workspace (one TLS stack, on ring).
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .region(aws_sdk_s3::config::Region::new(args.region.clone()))
        .endpoint_url(&args.endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(conf);
    let http = reqwest::Client::new();
    let crcs = if args.checksums {
        part_crcs(&args.file, size, part_size)?
    } else {
        Vec::new()
    };

    let started = Instant::now();
    let mut create = s3
        .create_multipart_upload()
        .bucket(&args.bucket)
        .key(&args.key);
    if args.checksums {
        create = create
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_type(ChecksumType::FullObject);
    }
    let upload_id = create
        .send()
        .await
        .context("CreateMultipartUpload")?
        .upload_id
        .context("no upload id")?;
    let mut urls = Vec::with_capacity(parts as usize);
    for n in 1..=parts {
        let mut part = s3
            .upload_part()
            .bucket(&args.bucket)
            .key(&args.key)
            .upload_id(&upload_id)
            .part_number(n as i32);
        if let Some(crc) = crcs.get(n as usize - 1) {
            part = part.checksum_crc64_nvme(crc.to_base64());
        }
        let presigned = part
            .presigned(PresigningConfig::expires_in(Duration::from_secs(3600))?)
            .await
            .context("presigning")?;
        let headers: Vec<(String, String)> = presigned
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        urls.push((presigned.uri().to_owned(), headers));
    }
    let presigned_at = Instant::now();

    let file = &args.file;
    let http = &http;
    let mut etags: Vec<(u32, String)> = futures::stream::iter(urls.into_iter().enumerate())
        .map(|(i, (url, headers))| async move {
            let offset = i as u64 * part_size;
            let len = part_size.min(size - offset);
            let mut f = tokio::fs::File::open(file).await?;
            f.seek(SeekFrom::Start(offset)).await?;
            let mut body = vec![0; len as usize];
            f.read_exact(&mut body).await?;
            let mut put = http.put(url).body(body);
            for (k, v) in headers {
                put = put.header(k, v);
            }
            let resp = put.send().await?;
            if !resp.status().is_success() {
                bail!("part {} answered {}", i + 1, resp.status());
            }
            let etag = resp
                .headers()
                .get(reqwest::header::ETAG)
                .context("no ETag")?
                .to_str()?
                .to_owned();
            Ok((i as u32 + 1, etag))
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let put_at = Instant::now();

    etags.sort();
    let completed = CompletedMultipartUpload::builder()
        .set_parts(Some(
            etags
                .into_iter()
                .map(|(n, etag)| {
                    let part = CompletedPart::builder().part_number(n as i32).e_tag(etag);
                    match crcs.get(n as usize - 1) {
                        Some(crc) => part.checksum_crc64_nvme(crc.to_base64()),
                        None => part,
                    }
                    .build()
                })
                .collect(),
        ))
        .build();
    let mut complete = s3
        .complete_multipart_upload()
        .bucket(&args.bucket)
        .key(&args.key)
        .upload_id(&upload_id)
        .multipart_upload(completed);
    if args.checksums {
        let whole = Crc64Nvme::of_pieces(
            crcs.iter()
                .enumerate()
                .map(|(i, crc)| (*crc, part_size.min(size - i as u64 * part_size))),
        );
        complete = complete
            .checksum_crc64_nvme(whole.to_base64())
            .checksum_type(ChecksumType::FullObject);
    }
    complete.send().await.context("CompleteMultipartUpload")?;
    let done = Instant::now();

    if !args.keep {
        s3.delete_object()
            .bucket(&args.bucket)
            .key(&args.key)
            .send()
            .await
            .context("DeleteObject")?;
    }
    let ms = |d: Duration| d.as_millis();
    println!(
        "{{\"bytes\":{size},\"parts\":{parts},\"presign_ms\":{},\"put_ms\":{},\"complete_ms\":{},\"total_ms\":{}}}",
        ms(presigned_at - started),
        ms(put_at - presigned_at),
        ms(done - put_at),
        ms(done - started)
    );
    Ok(())
}

/// The CRC64NVME of each part of the layout, read before the clock starts.
fn part_crcs(file: &std::path::Path, size: u64, part_size: u64) -> anyhow::Result<Vec<Crc64Nvme>> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    let mut crcs = Vec::new();
    let mut buf = vec![0; part_size as usize];
    let mut left = size;
    loop {
        let len = part_size.min(left) as usize;
        f.read_exact(&mut buf[..len])?;
        crcs.push(Crc64Nvme::of(&buf[..len]));
        left -= len as u64;
        if left == 0 {
            return Ok(crcs);
        }
    }
}
