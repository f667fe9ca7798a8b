//! All S3 calls the server makes, through one aws-sdk-s3 code path for both storage kinds.
//!
//! The server never moves file bytes: it creates, presigns, inspects and aborts. Presigned URLs
//! are signed for [`Storage::public_endpoint`], the address agents reach, which may differ from
//! the one the server itself uses (a Docker network name, a load balancer).

use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation,
    SigningSettings, UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use md5::{Digest, Md5};
use url::Url;

use shared::PartNumber;
use shared::protocol::CompletedPart;

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
}

#[derive(Clone)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    presign_client: aws_sdk_s3::Client,
    credentials: SharedCredentialsProvider,
    bucket: String,
    region: String,
    /// Base URL of presigned requests, bucket included for virtual-hosted style.
    public_bucket_url: Url,
}

/// What HeadObject says about a stored object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
}

impl Storage {
    pub async fn connect(settings: StorageSettings) -> anyhow::Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
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
                .force_path_style(settings.force_path_style);
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
        let presign_client = build(public_endpoint);

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
            presign_client,
            credentials,
            bucket: settings.bucket,
            region: settings.region,
            public_bucket_url,
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

    pub async fn create_multipart(&self, key: &str) -> anyhow::Result<String> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
            .context("CreateMultipartUpload")?;
        out.upload_id
            .ok_or_else(|| anyhow!("CreateMultipartUpload returned no upload id"))
    }

    pub async fn presign_part(
        &self,
        key: &str,
        s3_upload_id: &str,
        part: PartNumber,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let req = self
            .presign_client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(s3_upload_id)
            .part_number(part.get() as i32)
            .presigned(PresigningConfig::expires_in(ttl)?)
            .await
            .context("presigning UploadPart")?;
        Ok(req.uri().to_owned())
    }

    /// Presigns `POST <key>?uploadId=...` with aws-sigv4, since the SDK cannot presign
    /// CompleteMultipartUpload. The agent sends the part list as the XML body.
    pub async fn presign_complete(
        &self,
        key: &str,
        s3_upload_id: &str,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .context("loading credentials to presign CompleteMultipartUpload")?;
        let identity = credentials.into();
        let mut url = self.public_bucket_url.join(key)?;
        url.query_pairs_mut().append_pair("uploadId", s3_upload_id);

        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(ttl);
        settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
        // S3 signs the path as sent: no normalisation, no double encoding.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            std::iter::empty(),
            SignableBody::UnsignedPayload,
        )?;
        let (instructions, _signature) = sign(signable, &params)?.into_parts();
        {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in instructions.params() {
                pairs.append_pair(name, value);
            }
        }
        Ok(url.into())
    }

    /// `Ok(None)` when there is no such object.
    pub async fn head_object(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                size: out.content_length.unwrap_or(0).max(0) as u64,
                etag: out.e_tag.unwrap_or_default(),
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
