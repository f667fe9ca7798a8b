//! Presigned URLs: every URL of one plan signed with one snapshot of the credentials.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation,
    SigningSettings, UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use shared::PartNumber;
use shared::hash::Crc64Nvme;
use url::Url;

use super::{PartChecksum, Storage};

impl Storage {
    /// A presigner for one plan: one snapshot of the credentials, and a TTL that ends before
    /// they do. `wanted` is the configured TTL; an instance role, a task role or a web-identity
    /// session expires long before a URL's own `X-Amz-Expires` (and S3 then answers
    /// `ExpiredToken`), so the TTL is capped at the credentials' expiry less a margin, at least
    /// one second. Every URL of the plan is signed with that same snapshot, so none can outlive
    /// the credentials its TTL was computed from.
    pub async fn presigner(&self, wanted: Duration) -> anyhow::Result<Presigner<'_>> {
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .context("loading credentials to presign")?;
        let ttl = cap_at_expiry(wanted, credentials.expiry(), SystemTime::now());
        Ok(Presigner {
            storage: self,
            credentials,
            ttl,
        })
    }
}

/// Presigned URLs of one plan, all signed with one snapshot of the credentials (see
/// [`Storage::presigner`]). Signed with aws-sigv4 directly: the SDK's presigning would sign with
/// its own cached credentials, whose expiry may come before the snapshot's.
pub struct Presigner<'a> {
    storage: &'a Storage,
    credentials: Credentials,
    ttl: Duration,
}

impl Presigner<'_> {
    /// How long the URLs live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `PUT <key>?partNumber=&uploadId=` with the part's checksum signed in, so storage refuses
    /// a body that does not match it (an unsigned checksum header is ignored).
    pub fn part(
        &self,
        key: &str,
        s3_upload_id: &str,
        part: PartNumber,
        checksum: PartChecksum<'_>,
    ) -> anyhow::Result<String> {
        let mut url = self.storage.public_bucket_url.join(key)?;
        url.query_pairs_mut()
            .append_pair("partNumber", &part.get().to_string())
            .append_pair("uploadId", s3_upload_id);
        let crc;
        let header = match checksum {
            PartChecksum::Crc64Nvme(c) => {
                crc = c.to_base64();
                ("x-amz-checksum-crc64nvme", crc.as_str())
            }
            PartChecksum::Md5(md5) => ("content-md5", md5),
        };
        self.sign("PUT", url, &[header])
    }

    /// `POST <key>?uploadId=`, which the agent sends with the part list as its body. With
    /// `whole`, the full-object CRC64NVME is signed in (as `x-amz-checksum-crc64nvme` and
    /// `x-amz-checksum-type: FULL_OBJECT`), so storage refuses to complete an object with other
    /// bytes.
    pub fn complete(
        &self,
        key: &str,
        s3_upload_id: &str,
        whole: Option<Crc64Nvme>,
    ) -> anyhow::Result<String> {
        let mut url = self.storage.public_bucket_url.join(key)?;
        url.query_pairs_mut().append_pair("uploadId", s3_upload_id);
        let whole = whole.map(Crc64Nvme::to_base64);
        let headers: Vec<(&str, &str)> = match &whole {
            Some(whole) => vec![
                ("x-amz-checksum-crc64nvme", whole.as_str()),
                ("x-amz-checksum-type", "FULL_OBJECT"),
            ],
            None => Vec::new(),
        };
        self.sign("POST", url, &headers)
    }

    /// `GET <key>`: the object, for whoever holds the URL until it expires.
    pub fn get(&self, key: &str) -> anyhow::Result<String> {
        let url = self.storage.public_bucket_url.join(key)?;
        self.sign("GET", url, &[])
    }

    /// Signs `method url` with `headers` (and the host) into its query string.
    fn sign(&self, method: &str, mut url: Url, headers: &[(&str, &str)]) -> anyhow::Result<String> {
        let identity = self.credentials.clone().into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(self.ttl);
        settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
        // S3 signs the path as sent: no normalisation, no double encoding.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.storage.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let signable = SignableRequest::new(
            method,
            url.as_str(),
            headers.iter().copied(),
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
}

/// Credentials expiring this soon after a URL would still be signing it are left out of its
/// life: the agent asks for fresh URLs before then.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

fn cap_at_expiry(wanted: Duration, expiry: Option<SystemTime>, now: SystemTime) -> Duration {
    let Some(expiry) = expiry else {
        return wanted;
    };
    let left = expiry
        .duration_since(now)
        .unwrap_or_default()
        .saturating_sub(EXPIRY_MARGIN);
    wanted.min(left).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_outlive_their_credentials() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let wanted = Duration::from_secs(900);
        assert_eq!(cap_at_expiry(wanted, None, now), wanted, "long-term keys");
        let in_an_hour = Some(now + Duration::from_secs(3600));
        assert_eq!(cap_at_expiry(wanted, in_an_hour, now), wanted);
        let in_two_minutes = Some(now + Duration::from_secs(120));
        assert_eq!(
            cap_at_expiry(wanted, in_two_minutes, now),
            Duration::from_secs(90)
        );
        let expired = Some(now - Duration::from_secs(5));
        assert_eq!(cap_at_expiry(wanted, expired, now), Duration::from_secs(1));
    }
}
