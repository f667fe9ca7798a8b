//! JSON bodies of the operator REST API, shared by the server and `cli`.

use serde::{Deserialize, Serialize};

use crate::encoding::{Compression, Encoding};
use crate::error::ErrorCode;
use crate::ids::{ClientId, CollectionId, UploadId};
use crate::labels::Labels;

pub mod collections;
pub mod tokens;

/// `{"error":{"code":"...","message":"..."}}`, the body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The upload's state, when the error is about it (409 `UPLOAD_NOT_COMPLETED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<UploadState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Query of `POST /trigger-download/{client_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerParams {
    /// Share name on the agent; `default` when absent.
    pub file: Option<String>,
    /// `auto` (the default: the share decides, and by default compresses when a sample of the
    /// file shrinks), `zstd` or `none`.
    pub encoding: Option<String>,
}

/// Answer to `POST /trigger-download/{client_id}` (202).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TriggerResponse {
    pub upload_id: UploadId,
    pub client_id: ClientId,
    pub state: UploadState,
    pub status_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    /// Asked the agent for its file.
    Requested,
    /// The multipart upload exists and the agent has its URLs.
    Uploading,
    /// The agent reported completion; the server is checking the object.
    Verifying,
    Completed,
    Failed,
    /// An operator cancelled it (`DELETE /uploads/{id}`); its multipart upload was aborted.
    Cancelled,
}

impl UploadState {
    /// Every state, for tests.
    pub const ALL: [UploadState; 6] = [
        UploadState::Requested,
        UploadState::Uploading,
        UploadState::Verifying,
        UploadState::Completed,
        UploadState::Failed,
        UploadState::Cancelled,
    ];

    /// The wire name, as in the JSON of `GET /uploads/{id}`.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Requested => "requested",
            UploadState::Uploading => "uploading",
            UploadState::Verifying => "verifying",
            UploadState::Completed => "completed",
            UploadState::Failed => "failed",
            UploadState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            UploadState::Completed | UploadState::Failed | UploadState::Cancelled
        )
    }
}

impl std::fmt::Display for UploadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /uploads/{upload_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadStatus {
    pub upload_id: UploadId,
    pub client_id: ClientId,
    pub state: UploadState,
    pub bucket: String,
    pub key: Option<String>,
    /// The share the operator asked for.
    pub share: String,
    pub file_name: Option<String>,
    /// The file's size.
    pub size: Option<u64>,
    /// The compression the operator asked for (`auto` unless a request named one).
    #[serde(default)]
    pub compression: Compression,
    /// How the agent stores the file, once it has described it: `zstd` objects have keys that
    /// end in `.zst`.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// Bytes in storage, and so on the wire: `size` unless the file is compressed.
    #[serde(default)]
    pub stored_size: Option<u64>,
    /// `size / stored_size`: 1 for an uncompressed file.
    #[serde(default)]
    pub compression_ratio: Option<f64>,
    pub part_size: Option<u64>,
    pub parts_total: Option<u32>,
    pub parts_done: u32,
    /// Bytes of `stored_size` sent and stored so far.
    pub bytes_done: u64,
    /// Parts of `parts_done` that storage copied from the share's previous object, unchanged,
    /// instead of the agent sending them.
    #[serde(default)]
    pub parts_copied: u32,
    /// Stored bytes of those parts: bytes the store's uplink did not carry.
    #[serde(default)]
    pub bytes_copied: u64,
    /// Bytes per second since the plan (or, after a resume, the latest plan) was sent.
    pub rate_bytes_per_sec: Option<u64>,
    /// Seconds to go at that rate, while uploading.
    pub eta_secs: Option<u64>,
    /// Seconds since the agent last reported progress, while unfinished.
    pub idle_secs: Option<u64>,
    /// True when an unfinished upload has made no progress for 10 seconds or more.
    pub stalled: bool,
    /// Whether the agent that owns an unfinished upload is connected now.
    pub agent_connected: bool,
    /// How many times the upload was resumed (after a reconnect, a restart or expired URLs).
    pub resumes: u32,
    /// SHA-256 of the file as the agent hashed it. Protocol 3 agents hash it while the parts
    /// upload and report it when they complete; protocol 2 agents, before the upload, and it is
    /// recorded on the object as `x-amz-meta-sha256`.
    pub sha256: Option<String>,
    /// Base64 CRC64NVME of the whole file, S3's full-object checksum, which verification reads
    /// back from storage (protocol 3 agents).
    #[serde(default)]
    pub checksum_crc64nvme: Option<String>,
    pub etag: Option<String>,
    pub error: Option<ErrorDetail>,
    /// Operator who asked for it (the `sub` of their token).
    pub requested_by: String,
    /// Peer address the request came from.
    pub requested_from: String,
    /// RFC 3339 timestamps.
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// Where the time went, in milliseconds, summed over resumes. Each phase is counted when
    /// it ends, so an unfinished upload shows only the phases behind it, and a transfer cut off
    /// by a lost connection is not counted.
    #[serde(default)]
    pub phases: PhaseTimes,
    /// The collection it belongs to, if one asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_id: Option<CollectionId>,
}

/// The phases of an upload, in milliseconds, as the server saw them (see docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// `describe_file` sent until `file_info` arrived: the agent reading and hashing the file,
    /// plus one round trip.
    pub describe_ms: u64,
    /// `file_info` until the plan was sent: CreateMultipartUpload (or ListParts, on a resume)
    /// and presigning.
    pub presign_ms: u64,
    /// The plan sent until `upload_completed` arrived: the agent's part PUTs and its presigned
    /// completion.
    pub transfer_ms: u64,
    /// The share of `transfer_ms` the agent spent on the completion request, as it reported.
    pub complete_ms: u64,
    /// `upload_completed` until the object was verified (HeadObject and the checks).
    pub verify_ms: u64,
}

/// Answer to `GET /uploads/{upload_id}/download` (307, with the URL in `Location` too): where
/// the verified object can be read, and what its bytes must hash to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadLink {
    pub upload_id: UploadId,
    /// A presigned GET of the object. Anyone holding it can read the object until it expires.
    pub url: String,
    /// Seconds the URL lives from when it was signed.
    pub expires_in_secs: u64,
    /// The file's size.
    pub size: u64,
    /// SHA-256 (hex) of the file as the agent hashed it, when known.
    pub sha256: Option<String>,
    /// Base64 CRC64NVME of the object, as storage verified it (protocol 3 agents).
    #[serde(default)]
    pub checksum_crc64nvme: Option<String>,
    /// How the object holds the file: `zstd` objects are decoded by `cli fetch`.
    #[serde(default)]
    pub encoding: Encoding,
    /// The object's size, when it is not the file's (an encoded file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_size: Option<u64>,
}

/// One entry of `GET /clients`: a connected agent, or (with `all=true`) a store the server has
/// seen before and that is offline now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    pub client_id: ClientId,
    #[serde(default)]
    pub connected: bool,
    /// `None` when offline.
    pub connected_since: Option<String>,
    /// The last frame received; for an offline store, when its last connection ended.
    pub last_seen: String,
    /// When the server first saw this store (`all=true` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    pub active_upload: Option<UploadId>,
    /// The protocol the agent speaks, and the version it says it is: which agents are left to
    /// upgrade before the server drops a protocol version.
    #[serde(default)]
    pub protocol_version: u32,
    #[serde(default)]
    pub agent_version: String,
    /// When the token it connected with (or the last one it was sent) expires, RFC 3339.
    #[serde(default)]
    pub token_expires_at: Option<String>,
    /// The labels the agent declared in its `hello`.
    #[serde(default)]
    pub labels: Labels,
}

/// Query of `GET /clients`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientListParams {
    /// Every store ever seen, not only the connected ones.
    #[serde(default)]
    pub all: bool,
    /// Label equalities, all of which must hold: `region=north,brand=burger-co`.
    pub label: Option<String>,
}

/// `GET /status/{client_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientStatus {
    pub client_id: ClientId,
    pub connected: bool,
    pub connected_since: Option<String>,
    pub last_seen: Option<String>,
    /// While connected: when its token expires, RFC 3339.
    #[serde(default)]
    pub token_expires_at: Option<String>,
    pub active_upload: Option<UploadId>,
    pub last_upload: Option<UploadStatus>,
}

/// Answer to `POST /revocations/{client_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevocationResponse {
    pub client_id: ClientId,
    /// Agent tokens of this client with an `iat` before this unix time are refused.
    pub tokens_issued_before: u64,
    /// Whether a live connection was closed.
    pub disconnected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_wire_names() {
        for state in UploadState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
            assert_eq!(serde_json::from_str::<UploadState>(&json).unwrap(), state);
        }
    }
}
