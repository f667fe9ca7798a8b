//! What storage's answers mean. One classifier serves the part PUTs and the completion, so that
//! an answer means the same on both paths.

use reqwest::StatusCode;

/// What to do after one request to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// Storage took the request.
    Stored,
    /// The presigned URL, or the credentials that signed it, expired: the server presigns the
    /// rest again.
    Expired,
    /// The body did not match its signed checksum: corrupted on the way, or the file
    /// changed; the caller tells which.
    BadDigest(String),
    /// Worth another attempt: a server error, throttling, a request timeout, or a 200 that
    /// carries an error.
    Retry(String),
    /// Will not get better by retrying.
    Fatal(String),
}

/// Classifies storage's answer from its status and body. The message names the status and S3's
/// error code, never the URL (which carries a signature).
pub(super) fn judge(status: StatusCode, body: &str) -> Answer {
    // S3 can answer 200 and still report an error in the body (a completion that failed late).
    if status.is_success() && !body.contains("<Error>") {
        return Answer::Stored;
    }
    let code = xml_tag(body, "Code").unwrap_or_default();
    // A URL past its `X-Amz-Expires`, or signed with temporary credentials that have since
    // expired (S3 answers 400 `ExpiredToken`, long before the URL's own expiry).
    if (status == StatusCode::FORBIDDEN && body.contains("expired")) || code == "ExpiredToken" {
        return Answer::Expired;
    }
    let message = format!("storage answered {status} {code}");
    if code == "BadDigest" {
        return Answer::BadDigest(message);
    }
    let transient = status.is_success()
        || status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    if transient {
        Answer::Retry(message)
    } else {
        Answer::Fatal(message)
    }
}

pub(super) fn xml_tag(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    let value = &xml[start..end];
    // Error codes are short identifiers; anything else is not worth repeating.
    (value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| value.to_owned())
}

pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_meaning_for_each_answer() {
        let error = |code: &str| format!("<Error><Code>{code}</Code><Message>m</Message></Error>");
        let expired =
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>";
        let kind =
            |status: u16, body: &str| match judge(StatusCode::from_u16(status).unwrap(), body) {
                Answer::Stored => "stored",
                Answer::Expired => "expired",
                Answer::BadDigest(_) => "bad digest",
                Answer::Retry(_) => "retry",
                Answer::Fatal(_) => "fatal",
            };
        let table = [
            (200, String::new(), "stored"),
            (200, "<CompleteMultipartUploadResult/>".to_owned(), "stored"),
            (200, error("InternalError"), "retry"),
            (403, expired.to_owned(), "expired"),
            (400, error("ExpiredToken"), "expired"),
            (403, error("SignatureDoesNotMatch"), "fatal"),
            (400, error("BadDigest"), "bad digest"),
            (400, error("InvalidPart"), "fatal"),
            (404, error("NoSuchUpload"), "fatal"),
            (408, String::new(), "retry"),
            (429, String::new(), "retry"),
            (500, error("InternalError"), "retry"),
            (503, error("SlowDown"), "retry"),
        ];
        for (status, body, want) in table {
            assert_eq!(kind(status, &body), want, "{status} {body}");
        }
        let Answer::Fatal(message) = judge(StatusCode::BAD_REQUEST, &error("InvalidPart")) else {
            unreachable!()
        };
        assert_eq!(message, "storage answered 400 Bad Request InvalidPart");
    }

    #[test]
    fn xml_tag_extracts_codes_only() {
        let body = "<Error><Code>BadDigest</Code><Message>x</Message></Error>";
        assert_eq!(xml_tag(body, "Code").as_deref(), Some("BadDigest"));
        assert_eq!(xml_tag("<Code>a b</Code>", "Code"), None);
        assert_eq!(xml_tag("nothing", "Code"), None);
    }
}
