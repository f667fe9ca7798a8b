//! Identifiers that are validated once, when they enter the system.
//!
//! A [`ClientId`] becomes a segment of an S3 key, and a [`FileName`] becomes the last segment,
//! so both are restricted to a conservative ASCII alphabet. Anything that reaches the rest of the
//! code as one of these types is known to be safe to embed in a key or a log line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Maximum length of a client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 64;
/// Maximum length of a shared file name, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// S3 allows at most this many parts in one multipart upload.
pub const MAX_PARTS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "client id must be 1 to {MAX_CLIENT_ID_LEN} characters of a-z, A-Z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    InvalidClientId,
    #[error("upload id must be a UUID")]
    InvalidUploadId,
    #[error("collection id must be a UUID")]
    InvalidCollectionId,
    #[error("schedule id must be a UUID")]
    InvalidScheduleId,
    #[error(
        "file name must be 1 to {MAX_FILE_NAME_LEN} characters of a-z, A-Z, 0-9, '-', '_' or '.', and not '.' or '..'"
    )]
    InvalidFileName,
    #[error("part number must be between 1 and {MAX_PARTS}")]
    InvalidPartNumber,
}

fn is_safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// The identity of one agent (one store machine), taken from its token's `sub` claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ClientId(String);

impl ClientId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_CLIENT_ID_LEN
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(is_safe_char)
            && !s.contains("..");
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::InvalidClientId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The server's identifier for one download, a random UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UploadId(uuid::Uuid);

impl UploadId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid(s, IdError::InvalidUploadId).map(Self)
    }
}

/// A random UUID id, in its hyphenated form only (braces and URNs are not ids).
fn parse_uuid(s: &str, err: IdError) -> Result<uuid::Uuid, IdError> {
    if s.len() != 36 {
        return Err(err);
    }
    uuid::Uuid::parse_str(s).map_err(|_| err)
}

/// The server's identifier for one collection (one file asked of many stores), a random UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CollectionId(uuid::Uuid);

impl CollectionId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid(s, IdError::InvalidCollectionId).map(Self)
    }
}

/// The server's identifier for one schedule of collections, a random UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ScheduleId(uuid::Uuid);

impl ScheduleId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        parse_uuid(s, IdError::InvalidScheduleId).map(Self)
    }
}

/// The name under which an agent's file is stored: the last segment of the object key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct FileName(String);

impl FileName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_FILE_NAME_LEN
            && s != "."
            && s != ".."
            && s.chars().all(is_safe_char);
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::InvalidFileName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A 1-based S3 part number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PartNumber(u32);

impl PartNumber {
    pub fn new(n: u32) -> Result<Self, IdError> {
        if (1..=MAX_PARTS).contains(&n) {
            Ok(Self(n))
        } else {
            Err(IdError::InvalidPartNumber)
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

macro_rules! string_id_impls {
    ($ty:ty, $parse:expr) => {
        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id_impls!(ClientId, ClientId::parse);
string_id_impls!(UploadId, UploadId::parse);
string_id_impls!(FileName, FileName::parse);
string_id_impls!(CollectionId, CollectionId::parse);
string_id_impls!(ScheduleId, ScheduleId::parse);

impl<'de> Deserialize<'de> for PartNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PartNumber::new(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Display for CollectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Display for ScheduleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Display for PartNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_accepts_ordinary_ids() {
        for ok in [
            "restaurant-1",
            "a",
            "Store_42.eu",
            &"x".repeat(MAX_CLIENT_ID_LEN),
        ] {
            assert!(ClientId::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn client_id_rejects_hostile_ids() {
        let long = "a".repeat(1024);
        let hostile = [
            "",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "a..b",
            ".hidden",
            "-flag",
            "a\nb",
            "a\0b",
            "a b",
            "rеstaurant-1", // Cyrillic 'е', a look-alike
            "ｒestaurant",  // full-width 'ｒ'
            "%2e%2e",
            long.as_str(),
        ];
        for bad in hostile {
            assert_eq!(
                ClientId::parse(bad),
                Err(IdError::InvalidClientId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn file_name_rejects_paths() {
        for bad in ["", ".", "..", "a/b", "../etc", "a\\b", "x\ty", "é.txt"] {
            assert!(FileName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(FileName::parse("file_to_download.txt").is_ok());
        assert!(FileName::parse(".env").is_ok());
    }

    #[test]
    fn upload_id_round_trips() {
        let id = UploadId::new_random();
        assert_eq!(UploadId::parse(&id.to_string()), Ok(id));
        assert!(UploadId::parse("not-a-uuid").is_err());
        assert!(UploadId::parse("{00000000-0000-0000-0000-000000000000}").is_err());
    }

    #[test]
    fn part_number_bounds() {
        assert!(PartNumber::new(0).is_err());
        assert!(PartNumber::new(1).is_ok());
        assert!(PartNumber::new(MAX_PARTS).is_ok());
        assert!(PartNumber::new(MAX_PARTS + 1).is_err());
    }

    #[test]
    fn ids_validate_when_deserialized() {
        assert!(serde_json::from_str::<ClientId>("\"../x\"").is_err());
        assert!(serde_json::from_str::<PartNumber>("0").is_err());
        let id: ClientId = serde_json::from_str("\"restaurant-1\"").unwrap();
        assert_eq!(id.as_str(), "restaurant-1");
    }
}
