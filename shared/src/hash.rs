//! Hashes as validated values. A hash enters as text (a protocol message, a stored record) and is
//! checked there once; past that point its form is a fact of its type, not a re-check by hand.

use std::fmt;

use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("the SHA-256 is not 64 lowercase hex digits")]
    Sha256,
    #[error("a part MD5 is not base64 of 16 bytes")]
    Md5,
}

/// The SHA-256 of a whole file, as 64 lowercase hex digits (the form recorded on the object).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let ok = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(HashError::Sha256)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The MD5 of one part, in the base64 form of a `Content-MD5` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentMd5 {
    base64: String,
    raw: [u8; 16],
}

impl ContentMd5 {
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| HashError::Md5)?;
        let raw: [u8; 16] = raw.try_into().map_err(|_| HashError::Md5)?;
        Ok(Self {
            // Re-encoded, so that two spellings of one digest compare equal.
            base64: base64::engine::general_purpose::STANDARD.encode(raw),
            raw,
        })
    }

    /// The `Content-MD5` header value.
    pub fn as_base64(&self) -> &str {
        &self.base64
    }

    pub fn digest(&self) -> &[u8; 16] {
        &self.raw
    }

    /// The ETag S3 gives a part stored with this `Content-MD5`: quoted lowercase hex.
    pub fn part_etag(&self) -> String {
        format!("\"{}\"", hex::encode(self.raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_must_be_lowercase_hex_of_32_bytes() {
        assert!(Sha256Hex::parse(&"a".repeat(64)).is_ok());
        assert_eq!(Sha256Hex::parse(&"A".repeat(64)), Err(HashError::Sha256));
        assert_eq!(Sha256Hex::parse(&"a".repeat(63)), Err(HashError::Sha256));
        assert_eq!(Sha256Hex::parse(&"g".repeat(64)), Err(HashError::Sha256));
    }

    #[test]
    fn md5_must_be_base64_of_16_bytes() {
        // MD5 of the empty string.
        let md5 = ContentMd5::parse("1B2M2Y8AsgTpgAmY7PhCfg==").unwrap();
        assert_eq!(md5.part_etag(), "\"d41d8cd98f00b204e9800998ecf8427e\"");
        assert_eq!(md5.as_base64(), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(ContentMd5::parse("not base64"), Err(HashError::Md5));
        assert_eq!(ContentMd5::parse("AAAA"), Err(HashError::Md5));
    }
}
