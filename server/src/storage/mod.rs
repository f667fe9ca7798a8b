//! All S3 calls the server makes, through one aws-sdk-s3 code path for both storage kinds.
//!
//! The server never moves file bytes: it creates, presigns, inspects and aborts. Presigned URLs
//! are signed for [`Storage::public_endpoint`], the address agents reach, which may differ from
//! the one the server itself uses (a Docker network name, a load balancer).

mod presign;
mod setup;

pub use presign::Presigner;
pub use setup::from_config;

use std::time::Duration;

use anyhow::{Context, anyhow};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use md5::{Digest, Md5};
use url::Url;

use shared::encoding::metadata;
use shared::hash::Crc64Nvme;
use shared::protocol::CompletedPart;

/// The checksum signed into one part's URL.
#[derive(Debug, Clone, Copy)]
pub enum PartChecksum<'a> {
    Crc64Nvme(Crc64Nvme),
    /// Base64 `Content-MD5`.
    Md5(&'a str),
}

/// How the server reaches the S3 API, resolved from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub bucket: String,
    pub region: String,
    /// `None` means AWS itself.
    pub endpoint: Option<Url>,
    pub public_endpoint: Option<Url>,
    pub force_path_style: bool,
    /// `None` means aws-config's default credential chain.
    pub credentials: Option<Credentials>,
    pub encryption: Encryption,
}

/// `S3_SSE`: the server-side encryption requested for each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sse {
    /// SSE-S3.
    #[value(name = "AES256")]
    Aes256,
    /// SSE-KMS.
    #[value(name = "aws:kms")]
    Kms,
}

/// The encryption settings applied at CreateMultipartUpload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encryption {
    pub sse: Option<Sse>,
    /// With [`Sse::Kms`]: the key; `None` means the AWS-managed key.
    pub kms_key_id: Option<String>,
}

/// How a multipart upload's object is checksummed, which follows the agent's protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectChecksum<'a> {
    /// Protocol 3: a FULL_OBJECT CRC64NVME, checked per part and at completion by storage.
    /// `encoded` is set for a compressed file, and recorded as metadata.
    Crc64NvmeFullObject { encoded: Option<EncodedObject<'a>> },
    /// Protocol 2: `Content-MD5` per part, and the file's SHA-256 recorded as metadata.
    Md5 { sha256: &'a str },
}

/// What an encoded object records about the file it holds (see `shared::encoding::metadata`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedObject<'a> {
    pub encoding: shared::encoding::Encoding,
    pub original_size: u64,
    pub sha256: &'a str,
}

#[derive(Clone)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    credentials: SharedCredentialsProvider,
    bucket: String,
    region: String,
    /// Base URL of presigned requests, bucket included for virtual-hosted style.
    public_bucket_url: Url,
    encryption: Encryption,
}

/// What HeadObject (with checksum mode on) says about a stored object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
    /// The `sha256` user metadata set at CreateMultipartUpload (protocol 2 uploads).
    pub sha256: Option<String>,
    /// The object's CRC64NVME, as storage computed it, and the checksum type (`FULL_OBJECT`).
    pub checksum_crc64nvme: Option<String>,
    pub checksum_type: Option<String>,
}

/// A part already stored in an unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    pub part_number: u32,
    pub size: u64,
    /// The ETag storage gave the part: a quoted hex MD5, except on SSE-KMS and SSE-C buckets.
    pub etag: Option<String>,
    /// The part's CRC64NVME, where storage reports one.
    pub checksum_crc64nvme: Option<Crc64Nvme>,
}

/// An unfinished multipart upload found in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMultipart {
    pub key: String,
    pub upload_id: String,
}

/// Name of the user metadata that records the file's SHA-256 on the object.
pub const SHA256_METADATA: &str = metadata::SHA256;

/// The one HTTPS client of every AWS SDK call: hyper 1 and rustls on ring, the stack the rest of
/// Backhaul uses. It trusts the platform's roots, or, where `SSL_CERT_FILE` or `SSL_CERT_DIR` is
/// set, the certificates found there instead (OpenSSL's convention), so an S3 endpoint behind a
/// private CA needs no setting of Backhaul's own.
///
/// The SDK builds no client of its own: its default features, which would bring hyper 0.14 and
/// aws-lc-rs, are off (see the workspace `Cargo.toml`).
pub fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// How long one S3 request may take, and one call with the SDK's retries. None of the server's
/// calls moves file bytes, so a call that takes longer is hung, and must not hold up the
/// upload (or the sweep) waiting on it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

fn timeouts() -> aws_sdk_s3::config::timeout::TimeoutConfig {
    aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(ATTEMPT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

impl Storage {
    pub async fn connect(settings: StorageSettings) -> anyhow::Result<Self> {
        // The loader hands the client to the credential providers (instance metadata, ECS, STS
        // web identity, SSO) and, through the SdkConfig, to the S3 clients below.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(https_client())
            .region(aws_config::Region::new(settings.region.clone()));
        if let Some(creds) = &settings.credentials {
            loader = loader.credentials_provider(creds.clone());
        }
        let sdk_config = loader.load().await;
        let credentials = sdk_config
            .credentials_provider()
            .ok_or_else(|| anyhow!("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or configure a profile"))?;

        let build = |endpoint: Option<&Url>| {
            let mut b = aws_sdk_s3::config::Builder::from(&sdk_config)
                .force_path_style(settings.force_path_style)
                .timeout_config(timeouts());
            if let Some(e) = endpoint {
                b = b.endpoint_url(e.as_str().trim_end_matches('/'));
            }
            aws_sdk_s3::Client::from_conf(b.build())
        };
        let client = build(settings.endpoint.as_ref());
        let public_endpoint = settings
            .public_endpoint
            .as_ref()
            .or(settings.endpoint.as_ref());

        let public_bucket_url = match public_endpoint {
            Some(e) if settings.force_path_style => Url::parse(&format!(
                "{}/{}/",
                e.as_str().trim_end_matches('/'),
                settings.bucket
            ))?,
            Some(e) => {
                let mut u = e.clone();
                let host = u
                    .host_str()
                    .ok_or_else(|| anyhow!("endpoint {e} has no host"))?;
                let vhost = format!("{}.{host}", settings.bucket);
                u.set_host(Some(&vhost))?;
                u.set_path("/");
                u
            }
            None if settings.force_path_style => Url::parse(&format!(
                "https://s3.{}.amazonaws.com/{}/",
                settings.region, settings.bucket
            ))?,
            None => Url::parse(&format!(
                "https://{}.s3.{}.amazonaws.com/",
                settings.bucket, settings.region
            ))?,
        };

        Ok(Self {
            client,
            credentials,
            bucket: settings.bucket,
            region: settings.region,
            public_bucket_url,
            encryption: settings.encryption,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Checks the bucket exists and the credentials work; creates it when `create` is set.
    pub async fn ensure_bucket(&self, create: bool) -> anyhow::Result<()> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(err) if create => {
                tracing::debug!(error = %aws_sdk_s3::error::DisplayErrorContext(&err), "head bucket failed, creating it");
                self.client
                    .create_bucket()
                    .bucket(&self.bucket)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                    .with_context(|| format!("creating bucket {}", self.bucket))
            }
            Err(err) => Err(anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))
                .with_context(|| format!("bucket {} is not reachable", self.bucket)),
        }
    }

    /// Starts a multipart upload checksummed as `checksum` says, with the configured
    /// encryption.
    pub async fn create_multipart(
        &self,
        key: &str,
        checksum: ObjectChecksum<'_>,
    ) -> anyhow::Result<String> {
        use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, ServerSideEncryption};
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
        req = match checksum {
            ObjectChecksum::Crc64NvmeFullObject { encoded } => {
                let req = req
                    .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
                    .checksum_type(ChecksumType::FullObject);
                match encoded {
                    None => req,
                    Some(e) => req
                        .metadata(metadata::ENCODING, e.encoding.as_str())
                        .metadata(metadata::ORIGINAL_SIZE, e.original_size.to_string())
                        .metadata(metadata::SHA256, e.sha256),
                }
            }
            ObjectChecksum::Md5 { sha256 } => req.metadata(SHA256_METADATA, sha256),
        };
        req = match self.encryption.sse {
            None => req,
            Some(Sse::Aes256) => req.server_side_encryption(ServerSideEncryption::Aes256),
            Some(Sse::Kms) => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(self.encryption.kms_key_id.clone()),
        };
        let out = req
            .send()
            .await
            .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
            .context("CreateMultipartUpload")?;
        out.upload_id
            .ok_or_else(|| anyhow!("CreateMultipartUpload returned no upload id"))
    }

    /// `Ok(None)` when there is no such object.
    pub async fn head_object(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                size: out.content_length.unwrap_or(0).max(0) as u64,
                etag: out.e_tag.unwrap_or_default(),
                sha256: out.metadata.and_then(|mut m| m.remove(SHA256_METADATA)),
                checksum_crc64nvme: out.checksum_crc64_nvme,
                checksum_type: out.checksum_type.map(|t| t.as_str().to_owned()),
            })),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(err) => Err(anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))
                .context("HeadObject"),
        }
    }

    pub async fn abort_multipart(&self, key: &str, s3_upload_id: &str) -> anyhow::Result<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(s3_upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already completed or aborted: nothing is left behind either way.
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_no_such_upload()) =>
            {
                Ok(())
            }
            Err(err) => Err(anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))
                .context("AbortMultipartUpload"),
        }
    }

    /// The parts stored so far, or `None` if the multipart upload no longer exists (completed or
    /// aborted).
    pub async fn list_parts(
        &self,
        key: &str,
        s3_upload_id: &str,
    ) -> anyhow::Result<Option<Vec<StoredPart>>> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut req = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(s3_upload_id);
            if let Some(m) = &marker {
                req = req.part_number_marker(m);
            }
            let out = match req.send().await {
                Ok(out) => out,
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|e| e.meta().code() == Some("NoSuchUpload")) =>
                {
                    return Ok(None);
                }
                Err(err) => {
                    return Err(anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(err)))
                        .context("ListParts");
                }
            };
            for p in out.parts() {
                let (Some(n), Some(size)) = (p.part_number, p.size) else {
                    continue;
                };
                parts.push(StoredPart {
                    part_number: u32::try_from(n).unwrap_or(0),
                    size: u64::try_from(size).unwrap_or(0),
                    etag: p.e_tag.clone().filter(|e| !e.is_empty()),
                    checksum_crc64nvme: p
                        .checksum_crc64_nvme
                        .as_deref()
                        .and_then(|c| Crc64Nvme::parse(c).ok()),
                });
            }
            match (out.is_truncated, out.next_part_number_marker) {
                (Some(true), Some(next)) if marker.as_deref() != Some(next.as_str()) => {
                    marker = Some(next);
                }
                _ => break,
            }
        }
        Ok(Some(parts))
    }

    /// UploadPartCopy: the closed byte range `first..=last` of the object at `source_key` (in
    /// this bucket) becomes part `part_number` of the multipart upload. The bytes stay inside
    /// storage. Answers the part as ListParts would show it, with the CRC64NVME storage
    /// computed for it.
    pub async fn copy_part(
        &self,
        key: &str,
        s3_upload_id: &str,
        part_number: shared::PartNumber,
        source_key: &str,
        (first, last): (u64, u64),
    ) -> anyhow::Result<StoredPart> {
        // The copy source is `bucket/key`, URL-encoded but for its slashes.
        const KEY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'/')
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        let source = format!(
            "{}/{}",
            self.bucket,
            percent_encoding::utf8_percent_encode(source_key, KEY)
        );
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(s3_upload_id)
            .part_number(i32::try_from(part_number.get())?)
            .copy_source(source)
            .copy_source_range(format!("bytes={first}-{last}"))
            .send()
            .await
            .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
            .context("UploadPartCopy")?;
        let result = out
            .copy_part_result
            .ok_or_else(|| anyhow!("UploadPartCopy answered without a CopyPartResult"))?;
        Ok(StoredPart {
            part_number: part_number.get(),
            size: last - first + 1,
            etag: result.e_tag.filter(|e| !e.is_empty()),
            checksum_crc64nvme: result
                .checksum_crc64_nvme
                .as_deref()
                .and_then(|c| Crc64Nvme::parse(c).ok()),
        })
    }

    /// Every unfinished multipart upload whose key starts with `prefix`.
    pub async fn list_multipart_uploads(
        &self,
        prefix: &str,
    ) -> anyhow::Result<Vec<PendingMultipart>> {
        let mut found = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(markers.0.clone())
                .set_upload_id_marker(markers.1.clone())
                .send()
                .await
                .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                .context("ListMultipartUploads")?;
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (&u.key, &u.upload_id) {
                    found.push(PendingMultipart {
                        key: key.clone(),
                        upload_id: id.clone(),
                    });
                }
            }
            let next = (out.next_key_marker, out.next_upload_id_marker);
            if out.is_truncated != Some(true) || next.0.is_none() || next == markers {
                break;
            }
            markers = next;
        }
        Ok(found)
    }

    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
            .context("DeleteObject")
    }
}

/// The ETag S3 gives a multipart object: the MD5 of the concatenated binary part MD5s, a dash and
/// the part count, in quotes. `None` if a part ETag is not a hex MD5 (SSE-KMS objects, say).
pub fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    let mut hasher = Md5::new();
    for part in parts {
        let hex_md5 = part.etag.trim_matches('"');
        let raw = hex::decode(hex_md5).ok()?;
        if raw.len() != 16 {
            return None;
        }
        hasher.update(&raw);
    }
    Some(format!(
        "\"{}-{}\"",
        hex::encode(hasher.finalize()),
        parts.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::PartNumber;

    #[test]
    fn multipart_etag_matches_s3s_rule() {
        // Two parts whose MD5s are md5("a") and md5("b").
        let parts = vec![
            CompletedPart {
                part_number: PartNumber::new(1).unwrap(),
                etag: "\"0cc175b9c0f1b6a831c399e269772661\"".into(),
            },
            CompletedPart {
                part_number: PartNumber::new(2).unwrap(),
                etag: "92eb5ffee6ae2fec3ad71c777531578f".into(),
            },
        ];
        let mut h = Md5::new();
        h.update(hex::decode("0cc175b9c0f1b6a831c399e269772661").unwrap());
        h.update(hex::decode("92eb5ffee6ae2fec3ad71c777531578f").unwrap());
        let expected = format!("\"{}-2\"", hex::encode(h.finalize()));
        assert_eq!(multipart_etag(&parts).unwrap(), expected);
    }

    #[test]
    fn multipart_etag_refuses_non_md5() {
        let parts = vec![CompletedPart {
            part_number: PartNumber::new(1).unwrap(),
            etag: "\"not-an-md5\"".into(),
        }];
        assert_eq!(multipart_etag(&parts), None);
    }
}
