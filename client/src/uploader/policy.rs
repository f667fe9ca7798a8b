//! The hosts this agent may send bytes to.

use shared::ErrorCode;

use super::UploadError;

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
}
