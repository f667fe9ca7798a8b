//! The stored form of an upload, which is not the domain type.
//!
//! Each format is a set of row structs of its own, frozen once released: renaming a field of
//! [`Upload`] changes nothing here. Format 2 ([`UploadV2`]) is what this release writes. Format 1
//! ([`legacy::RecordV1`]) is what the first release wrote, the serde form of its in-memory record;
//! it is read and converted, never written. Reading checks what the domain type holds as an
//! invariant (hashes, ids, stages), so a record that does not convert is an error to report, not
//! an absent upload.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use shared::api::{ErrorDetail, PhaseTimes};
use shared::encoding::{Compression, EncodedPart, Encoding};
use shared::hash::{ContentMd5, Crc64Nvme, Sha256Hex};
use shared::{ClientId, CollectionId, ErrorCode, FileName, UploadId};

use super::record::{
    Copied, Digests, Ending, FileFacts, Live, Multipart, Open, Outcome, Stage, Stored, Transfer,
    UnixMs, Upload,
};
use crate::db::{LoadedRow, StoredRow};

/// The format this release writes.
pub const FORMAT: u32 = 2;

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("record format {0} is unknown to this release")]
    UnknownFormat(u32),
    #[error("malformed record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("inconsistent record: {0}")]
    Invalid(String),
}

/// The row for `upload`, in this release's format.
pub fn to_row(upload: &Upload) -> Result<StoredRow, serde_json::Error> {
    Ok(StoredRow {
        id: upload.id,
        client_id: upload.client_id.clone(),
        created_ms: upload.created.0,
        terminal: upload.stage.is_terminal(),
        format: FORMAT,
        record: serde_json::to_string(&UploadV2::from(upload))?,
    })
}

/// The upload a stored row holds, whatever format it was written in.
pub fn from_row(row: &LoadedRow, now: Instant) -> Result<Upload, ReadError> {
    match row.format {
        1 => serde_json::from_str::<legacy::RecordV1>(&row.record)?.into_upload(now),
        2 => serde_json::from_str::<UploadV2>(&row.record)?.into_upload(now),
        other => Err(ReadError::UnknownFormat(other)),
    }
}

/// Format 2.
#[derive(Debug, Serialize, Deserialize)]
pub struct UploadV2 {
    id: UploadId,
    client_id: ClientId,
    share: FileName,
    requested_by: String,
    requested_from: String,
    created_ms: i64,
    updated_ms: i64,
    finished_ms: Option<i64>,
    stage: StageV2,
    parts_done: u32,
    bytes_done: u64,
    resumes: u32,
    phases: PhasesV2,
    /// Added to format 2 as an optional field: a record without it (from a release before
    /// collections) has none, and a release before collections ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collection_id: Option<CollectionId>,
    /// Added to format 2 as an optional field, like `collection_id`: absent is `auto`.
    #[serde(default, skip_serializing_if = "is_auto")]
    compression: Compression,
    /// Added with part copies, optional like `collection_id`: absent is none copied.
    #[serde(default, skip_serializing_if = "is_zero")]
    parts_copied: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    bytes_copied: u64,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

fn is_auto(c: &Compression) -> bool {
    *c == Compression::Auto
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
enum StageV2 {
    Requested,
    Uploading { transfer: TransferV2 },
    Verifying { transfer: TransferV2 },
    Ending { ending: EndingV2 },
    Completed { transfer: TransferV2, etag: String },
    Ended { ending: EndingV2 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
enum OpenV2 {
    Requested,
    Uploading { transfer: TransferV2 },
    Verifying { transfer: TransferV2 },
}

#[derive(Debug, Serialize, Deserialize)]
struct EndingV2 {
    outcome: OutcomeV2,
    code: ErrorCode,
    message: String,
    from: OpenV2,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeV2 {
    Failed,
    Cancelled,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransferV2 {
    key: String,
    s3_upload_id: String,
    file: FileV1,
}

/// The file facts, in the same form in formats 1 and 2. Uploads of protocol 3 agents fill
/// `part_crc64nvme` and leave `part_md5` empty (and `sha256` absent until the agent completes);
/// the fields are optional so that records of either kind read alike.
#[derive(Debug, Serialize, Deserialize)]
struct FileV1 {
    file_name: FileName,
    size: u64,
    modified_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    part_size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    part_md5: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    part_crc64nvme: Vec<String>,
    /// Added for compressed files (protocol 5): absent is `none`, with no encoded parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<Encoding>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    encoded_parts: Vec<EncodedPart>,
    /// Added with part manifests: absent is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    part_digests: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PhasesV2 {
    describe_ms: u64,
    presign_ms: u64,
    transfer_ms: u64,
    complete_ms: u64,
    verify_ms: u64,
}

impl From<&Upload> for UploadV2 {
    fn from(u: &Upload) -> Self {
        let p = u.phases;
        Self {
            id: u.id,
            client_id: u.client_id.clone(),
            share: u.share.clone(),
            requested_by: u.requested_by.clone(),
            requested_from: u.requested_from.clone(),
            created_ms: u.created.0,
            updated_ms: u.updated.0,
            finished_ms: u.finished.map(|t| t.0),
            stage: match &u.stage {
                Stage::Open(Open::Requested) => StageV2::Requested,
                Stage::Open(Open::Uploading(t)) => StageV2::Uploading { transfer: t.into() },
                Stage::Open(Open::Verifying(t)) => StageV2::Verifying { transfer: t.into() },
                Stage::Ending(e) => StageV2::Ending { ending: e.into() },
                Stage::Completed { transfer, etag } => StageV2::Completed {
                    transfer: transfer.into(),
                    etag: etag.clone(),
                },
                Stage::Ended(e) => StageV2::Ended { ending: e.into() },
            },
            parts_done: u.parts_done,
            bytes_done: u.bytes_done,
            resumes: u.resumes,
            phases: PhasesV2 {
                describe_ms: p.describe_ms,
                presign_ms: p.presign_ms,
                transfer_ms: p.transfer_ms,
                complete_ms: p.complete_ms,
                verify_ms: p.verify_ms,
            },
            collection_id: u.collection,
            compression: u.compression,
            parts_copied: u.copied.parts,
            bytes_copied: u.copied.bytes,
        }
    }
}

impl From<&Transfer> for TransferV2 {
    fn from(t: &Transfer) -> Self {
        Self {
            key: t.multipart.key.clone(),
            s3_upload_id: t.multipart.upload_id.clone(),
            file: (&t.file).into(),
        }
    }
}

impl From<&Ending> for EndingV2 {
    fn from(e: &Ending) -> Self {
        Self {
            outcome: match e.outcome {
                Outcome::Failed => OutcomeV2::Failed,
                Outcome::Cancelled => OutcomeV2::Cancelled,
            },
            code: e.error.code,
            message: e.error.message.clone(),
            from: match &e.from {
                Open::Requested => OpenV2::Requested,
                Open::Uploading(t) => OpenV2::Uploading { transfer: t.into() },
                Open::Verifying(t) => OpenV2::Verifying { transfer: t.into() },
            },
        }
    }
}

impl TryFrom<TransferV2> for Transfer {
    type Error = ReadError;
    fn try_from(t: TransferV2) -> Result<Self, ReadError> {
        Ok(Transfer {
            file: t.file.try_into()?,
            multipart: Multipart {
                key: t.key,
                upload_id: t.s3_upload_id,
            },
        })
    }
}

impl TryFrom<OpenV2> for Open {
    type Error = ReadError;
    fn try_from(o: OpenV2) -> Result<Self, ReadError> {
        Ok(match o {
            OpenV2::Requested => Open::Requested,
            OpenV2::Uploading { transfer } => Open::Uploading(transfer.try_into()?),
            OpenV2::Verifying { transfer } => Open::Verifying(transfer.try_into()?),
        })
    }
}

impl TryFrom<EndingV2> for Ending {
    type Error = ReadError;
    fn try_from(e: EndingV2) -> Result<Self, ReadError> {
        Ok(Ending {
            outcome: match e.outcome {
                OutcomeV2::Failed => Outcome::Failed,
                OutcomeV2::Cancelled => Outcome::Cancelled,
            },
            error: ErrorDetail {
                code: e.code,
                message: e.message,
            },
            from: e.from.try_into()?,
        })
    }
}

impl UploadV2 {
    fn into_upload(self, now: Instant) -> Result<Upload, ReadError> {
        let stage = match self.stage {
            StageV2::Requested => Stage::Open(Open::Requested),
            StageV2::Uploading { transfer } => Stage::Open(Open::Uploading(transfer.try_into()?)),
            StageV2::Verifying { transfer } => Stage::Open(Open::Verifying(transfer.try_into()?)),
            StageV2::Ending { ending } => Stage::Ending(ending.try_into()?),
            StageV2::Completed { transfer, etag } => Stage::Completed {
                transfer: transfer.try_into()?,
                etag,
            },
            StageV2::Ended { ending } => Stage::Ended(ending.try_into()?),
        };
        let p = self.phases;
        Ok(Upload {
            id: self.id,
            client_id: self.client_id,
            share: self.share,
            requested_by: self.requested_by,
            requested_from: self.requested_from,
            created: UnixMs(self.created_ms),
            updated: UnixMs(self.updated_ms),
            finished: self.finished_ms.map(UnixMs),
            stage,
            parts_done: self.parts_done,
            bytes_done: self.bytes_done,
            resumes: self.resumes,
            phases: PhaseTimes {
                describe_ms: p.describe_ms,
                presign_ms: p.presign_ms,
                transfer_ms: p.transfer_ms,
                complete_ms: p.complete_ms,
                verify_ms: p.verify_ms,
            },
            collection: self.collection_id,
            compression: self.compression,
            copied: Copied {
                parts: self.parts_copied,
                bytes: self.bytes_copied,
            },
            live: Live::new(now),
        })
    }
}

impl From<&FileFacts> for FileV1 {
    fn from(f: &FileFacts) -> Self {
        let (sha256, part_md5, part_crc64nvme) = match &f.digests {
            Digests::Crc64Nvme { parts, sha256 } => (
                sha256.as_ref().map(|s| s.as_str().to_owned()),
                Vec::new(),
                parts.iter().map(|c| c.to_base64()).collect(),
            ),
            Digests::Md5 { parts, sha256 } => (
                Some(sha256.as_str().to_owned()),
                parts.iter().map(|m| m.as_base64().to_owned()).collect(),
                Vec::new(),
            ),
        };
        Self {
            file_name: f.file_name.clone(),
            size: f.size,
            modified_ms: f.modified_ms,
            sha256,
            part_size: f.part_size,
            part_md5,
            part_crc64nvme,
            encoding: match &f.stored {
                Stored::Plain => None,
                Stored::Encoded(encoding, _) => Some(*encoding),
            },
            encoded_parts: match &f.stored {
                Stored::Plain => Vec::new(),
                Stored::Encoded(_, parts) => parts.clone(),
            },
            part_digests: f
                .part_digests
                .iter()
                .flatten()
                .map(|d| d.as_str().to_owned())
                .collect(),
        }
    }
}

impl TryFrom<FileV1> for FileFacts {
    type Error = ReadError;
    /// The hashes are checked here, as where they first entered.
    fn try_from(f: FileV1) -> Result<Self, ReadError> {
        let invalid = |e: shared::hash::HashError| ReadError::Invalid(e.to_string());
        let sha256 = f
            .sha256
            .as_deref()
            .map(Sha256Hex::parse)
            .transpose()
            .map_err(invalid)?;
        let digests = match (f.part_crc64nvme.is_empty(), f.part_md5.is_empty()) {
            (false, true) => Digests::Crc64Nvme {
                parts: f
                    .part_crc64nvme
                    .iter()
                    .map(|c| Crc64Nvme::parse(c))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?,
                sha256,
            },
            (true, false) => Digests::Md5 {
                parts: f
                    .part_md5
                    .iter()
                    .map(|m| ContentMd5::parse(m))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?,
                sha256: sha256
                    .ok_or_else(|| ReadError::Invalid("an MD5 record has no SHA-256".to_owned()))?,
            },
            _ => {
                return Err(ReadError::Invalid(
                    "a record must have either part MD5s or part CRC64NVMEs".to_owned(),
                ));
            }
        };
        let stored = match (f.encoding.unwrap_or_default(), f.encoded_parts) {
            (Encoding::None, parts) if parts.is_empty() => Stored::Plain,
            (encoding, parts) if parts.len() == digests.count() => Stored::encoded(encoding, parts)
                .ok_or_else(|| {
                    ReadError::Invalid("a plain record with encoded parts".to_owned())
                })?,
            _ => {
                return Err(ReadError::Invalid(
                    "encoded parts that do not fit the encoding or the part checksums".to_owned(),
                ));
            }
        };
        let part_digests = match f.part_digests.len() {
            0 => None,
            n if n == digests.count() => Some(
                f.part_digests
                    .iter()
                    .map(|d| Sha256Hex::parse(d))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?,
            ),
            _ => {
                return Err(ReadError::Invalid(
                    "a part manifest that does not fit the part checksums".to_owned(),
                ));
            }
        };
        Ok(FileFacts {
            file_name: f.file_name,
            size: f.size,
            modified_ms: f.modified_ms,
            part_size: f.part_size,
            digests,
            stored,
            part_digests,
        })
    }
}

/// Format 1: the first release's record, field for field as it serialized it.
pub mod legacy {
    use shared::api::UploadState;
    use time::OffsetDateTime;

    use super::*;

    #[derive(Debug, Deserialize)]
    pub struct RecordV1 {
        id: UploadId,
        client_id: ClientId,
        state: UploadState,
        ending: Option<UploadState>,
        requested_by: String,
        requested_from: String,
        share: FileName,
        created_at: OffsetDateTime,
        updated_at: OffsetDateTime,
        finished_at: Option<OffsetDateTime>,
        file: Option<FileV1>,
        parts_done: u32,
        bytes_done: u64,
        key: Option<String>,
        s3_upload_id: Option<String>,
        etag: Option<String>,
        error: Option<ErrorDetail>,
        resumes: u32,
        #[serde(default)]
        phases: PhaseTimes,
    }

    impl RecordV1 {
        pub fn into_upload(self, now: Instant) -> Result<Upload, ReadError> {
            let invalid =
                |what: &str| ReadError::Invalid(format!("{what} in a {} record", self.state));
            let transfer = match (self.file, self.key, self.s3_upload_id) {
                (Some(file), Some(key), Some(upload_id)) => Some(Transfer {
                    file: file.try_into()?,
                    multipart: Multipart { key, upload_id },
                }),
                (None, None, None) => None,
                _ => return Err(invalid("a partial multipart upload")),
            };
            // The stage the upload was in, or left, as release 1 kept it in `state`.
            let open = |state: UploadState, transfer: Option<Transfer>| match (state, transfer) {
                (UploadState::Requested, None) => Ok(Open::Requested),
                (UploadState::Uploading, Some(t)) => Ok(Open::Uploading(t)),
                (UploadState::Verifying, Some(t)) => Ok(Open::Verifying(t)),
                (state, Some(t)) if state.is_terminal() => Ok(Open::Uploading(t)),
                (state, None) if state.is_terminal() => Ok(Open::Requested),
                _ => Err(invalid("a state without its multipart upload")),
            };
            let error = |error: Option<ErrorDetail>| {
                error.ok_or_else(|| invalid("an ending without an error"))
            };
            let outcome = |state: UploadState| match state {
                UploadState::Failed => Ok(Outcome::Failed),
                UploadState::Cancelled => Ok(Outcome::Cancelled),
                _ => Err(invalid("an ending that is not failed or cancelled")),
            };
            let stage = match (self.state, self.ending) {
                (state, Some(to)) if !state.is_terminal() => Stage::Ending(Ending {
                    outcome: outcome(to)?,
                    error: error(self.error)?,
                    from: open(state, transfer)?,
                }),
                (UploadState::Completed, _) => Stage::Completed {
                    transfer: transfer.ok_or_else(|| invalid("no multipart upload"))?,
                    etag: self.etag.ok_or_else(|| invalid("no ETag"))?,
                },
                (state @ (UploadState::Failed | UploadState::Cancelled), _) => {
                    Stage::Ended(Ending {
                        outcome: outcome(state)?,
                        error: error(self.error)?,
                        from: open(state, transfer)?,
                    })
                }
                (state, _) => Stage::Open(open(state, transfer)?),
            };
            Ok(Upload {
                id: self.id,
                client_id: self.client_id,
                share: self.share,
                requested_by: self.requested_by,
                requested_from: self.requested_from,
                created: self.created_at.into(),
                updated: self.updated_at.into(),
                finished: self.finished_at.map(UnixMs::from),
                stage,
                parts_done: self.parts_done,
                bytes_done: self.bytes_done,
                resumes: self.resumes,
                phases: self.phases,
                collection: None,
                compression: Compression::Auto,
                copied: Copied::default(),
                live: Live::new(now),
            })
        }
    }
}
