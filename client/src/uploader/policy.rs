//! The hosts, and the buckets, this agent may send bytes to.

use shared::ErrorCode;

use super::UploadError;

/// The hosts (and, where given, the buckets) this agent may send bytes to. A compromised or
/// impersonated server can hand out any URL; only these are used.
#[derive(Debug, Clone)]
pub struct UploadPolicy {
    allowed: Vec<Allowed>,
}

/// One entry: `host`, `host:port`, or either followed by `/bucket`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    /// `host` (any port) or `host:port`, lowercase.
    host: String,
    /// With a bucket, only that bucket: path style (`host/bucket/key`) or virtual-hosted
    /// (`bucket.host/key`). Without, any bucket on the host.
    bucket: Option<String>,
}

impl Allowed {
    fn parse(entry: &str) -> Self {
        let entry = entry.to_ascii_lowercase();
        match entry.split_once('/') {
            Some((host, bucket)) => Self {
                host: host.to_owned(),
                bucket: Some(bucket.to_owned()),
            },
            None => Self {
                host: entry,
                bucket: None,
            },
        }
    }

    fn allows(&self, host: &str, with_port: &str, path: &str) -> bool {
        let same_host = self.host == host || self.host == with_port;
        match &self.bucket {
            None => same_host,
            Some(bucket) => {
                let path_style = same_host && path.starts_with(&format!("/{bucket}/"));
                let vhost = format!("{bucket}.{}", self.host);
                path_style || vhost == host || vhost == with_port
            }
        }
    }
}

/// Checks an `ALLOWED_UPLOAD_HOSTS` entry: `host`, `host:port`, `host/bucket` or
/// `host:port/bucket`, with a bucket named as S3 names them.
pub fn check_entry(entry: &str) -> Result<(), String> {
    let (host, bucket) = match entry.split_once('/') {
        Some((host, bucket)) => (host, Some(bucket)),
        None => (entry, None),
    };
    if host.is_empty() || host.contains('@') {
        return Err(format!("{entry:?} names no host"));
    }
    if let Some(b) = bucket {
        let ok = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
        if !ok {
            return Err(format!("{entry:?}: {b:?} is not a bucket name"));
        }
    }
    Ok(())
}

impl UploadPolicy {
    /// `allowed` holds `ALLOWED_UPLOAD_HOSTS` entries, already checked with [`check_entry`].
    pub fn new(allowed: Vec<String>) -> Self {
        Self {
            allowed: allowed.iter().map(|e| Allowed::parse(e)).collect(),
        }
    }

    /// `Ok` if `raw` is an http(s) URL to an allowed host (and bucket, where one is pinned).
    /// The refusal names the host but never the URL, which carries a signature.
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
        if self
            .allowed
            .iter()
            .any(|a| a.allows(&host, &with_port, url.path()))
        {
            Ok(())
        } else {
            refuse(format!(
                "{with_port} (or its bucket) is not in ALLOWED_UPLOAD_HOSTS"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_pinned_bucket_allows_only_itself() {
        let policy = UploadPolicy::new(vec![
            "127.0.0.1:9000/pos-uploads".into(),
            "s3.eu-west-1.amazonaws.com/pos-uploads".into(),
        ]);
        for good in [
            "http://127.0.0.1:9000/pos-uploads/store/k?partNumber=1",
            "https://s3.eu-west-1.amazonaws.com/pos-uploads/store/k",
            "https://pos-uploads.s3.eu-west-1.amazonaws.com/store/k",
        ] {
            assert!(policy.check(good).is_ok(), "{good}");
        }
        for bad in [
            "http://127.0.0.1:9000/other-bucket/k",
            "http://127.0.0.1:9000/pos-uploads-evil/k",
            "http://127.0.0.1:9000/pos-uploads/../other-bucket/k",
            "http://127.0.0.1:9001/pos-uploads/k",
            "https://evil.s3.eu-west-1.amazonaws.com/k",
            "https://s3.eu-west-1.amazonaws.com/evil/pos-uploads/k",
        ] {
            let err = policy.check(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::UploadHostNotAllowed, "{bad}");
        }
    }

    #[test]
    fn entries_are_hosts_with_an_optional_bucket() {
        for good in ["h", "h:9000", "h/pos-uploads", "h:9000/a.b-c"] {
            assert_eq!(check_entry(good), Ok(()), "{good}");
        }
        for bad in ["", "/b", "u@h", "h/B", "h/ab", "h/a/b", "h/a_b"] {
            assert!(check_entry(bad).is_err(), "{bad}");
        }
    }
}
