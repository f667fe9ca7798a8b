//! JSON bodies of the operator REST API, shared by the server and `cli`.

use serde::{Deserialize, Serialize};

use crate::encoding::{Compression, Encoding};
use crate::error::ErrorCode;
use crate::ids::{ClientId, CollectionId, UploadId};
use crate::labels::Labels;

pub mod collections;
#[cfg(feature = "openapi")]
mod schemas;
pub mod tokens;

/// `{"error":{"code":"...","message":"..."}}`, the body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The upload's state, when the error is about it (409 `UPLOAD_NOT_COMPLETED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<UploadState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Query of `POST /trigger-download/{client_id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct TriggerParams {
    /// Share name on the agent; `default` when absent.
    #[cfg_attr(feature = "openapi", param(pattern = r"^[A-Za-z0-9._-]{1,255}$"))]
    pub file: Option<String>,
    /// `auto` (the default: the share decides, and by default compresses when a sample of the
    /// file shrinks), `zstd` or `none`.
    #[cfg_attr(feature = "openapi", param(value_type = Option<crate::encoding::Compression>))]
    pub encoding: Option<String>,
}

/// Answer to `POST /trigger-download/{client_id}` (202).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TriggerResponse {
    pub upload_id: UploadId,
    pub client_id: ClientId,
    pub state: UploadState,
    pub status_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct ClientListParams {
    /// Every store ever seen, not only the connected ones.
    #[serde(default)]
    pub all: bool,
    /// Label equalities, all of which must hold: `region=north,brand=burger-co`.
    #[cfg_attr(
        feature = "openapi",
        param(
            pattern = r"^\s*([a-z][a-z0-9._-]{0,62}\s*=\s*[A-Za-z0-9._/-]{0,128}\s*)?(,\s*([a-z][a-z0-9._-]{0,62}\s*=\s*[A-Za-z0-9._/-]{0,128}\s*)?)*$"
        )
    )]
    pub label: Option<String>,
}

/// Stores per page of `GET /stores` at most, and by default.
pub const MAX_STORES_PAGE: usize = 500;
pub const DEFAULT_STORES_PAGE: usize = 50;

/// Query of `GET /stores`: one page of every store ever seen, by id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct StoreListParams {
    /// The page after this client id (the previous page's `next_after`).
    #[cfg_attr(
        feature = "openapi",
        param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub after: Option<String>,
    /// Stores per page: 1 to 500, default 50.
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<usize>,
    /// Label equalities, all of which must hold: `region=north,brand=burger-co`.
    #[cfg_attr(
        feature = "openapi",
        param(
            pattern = r"^\s*([a-z][a-z0-9._-]{0,62}\s*=\s*[A-Za-z0-9._/-]{0,128}\s*)?(,\s*([a-z][a-z0-9._-]{0,62}\s*=\s*[A-Za-z0-9._/-]{0,128}\s*)?)*$"
        )
    )]
    pub label: Option<String>,
    /// A shell glob over client ids: `restaurant-*`.
    pub glob: Option<String>,
    /// Text the client id, a label or the agent version contains (case-insensitive).
    pub q: Option<String>,
    /// Only the connected (`true`) or only the offline (`false`) stores.
    pub connected: Option<bool>,
}

/// Answer to `GET /stores`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoreList {
    pub stores: Vec<ClientInfo>,
    /// Stores that match the filters, over all pages.
    pub total: usize,
    /// Of those, how many are connected.
    pub connected: usize,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<ClientId>,
}

/// Query of `GET /stores/{client_id}/uploads`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct StoreUploadsParams {
    /// At most this many: 1 to 200, default 20.
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 200))]
    pub limit: Option<usize>,
}

/// Answer to `GET /stores/{client_id}/uploads`: the newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadList {
    pub uploads: Vec<UploadStatus>,
}

/// `GET /status/{client_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Body of `POST /ui/session`: the operator page's sign-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignIn {
    /// An operator or admin token. It stays on the server; the browser gets a session cookie.
    pub token: String,
}

/// The operator page's session (`POST` and `GET /ui/session`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionInfo {
    /// The token's subject.
    pub operator: String,
    /// When the session ends (the token's expiry), RFC 3339.
    pub expires_at: String,
    /// Sent back in `x-csrf-token` with every request that changes state.
    pub csrf_token: String,
}

/// `GET /healthz`: the server is up. Needs no token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// Agents connected to this server.
    pub connected_agents: usize,
}

/// Answer to `POST /revocations/{client_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
