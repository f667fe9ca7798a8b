//! Collections: one file asked of many stores (`POST /collections` and the routes under it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ErrorDetail;
use crate::encoding::Compression;
use crate::ids::{ClientId, CollectionId, ScheduleId, UploadId};

/// The most stores a collection may name by id.
pub const MAX_TARGET_IDS: usize = 10_000;
/// Rows per page of `GET /collections/{id}/uploads` at most (and by default).
pub const MAX_ROWS_PAGE: usize = 1_000;

/// Which stores a collection asks. Matching is live: a store that connects later, before the
/// expiry, and matches is asked too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Target {
    /// Every store.
    All,
    /// These stores, whether the server has seen them yet or not.
    Ids { client_ids: Vec<ClientId> },
    /// Stores whose id matches a shell glob: `*`, `?` and `[...]`, such as `restaurant-*`.
    Glob { pattern: String },
    /// Stores whose labels include every one of these `key=value` pairs.
    Labels { labels: Vec<String> },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Ids { client_ids } => write!(f, "{} ids", client_ids.len()),
            Target::Glob { pattern } => write!(f, "id {pattern}"),
            Target::Labels { labels } => write!(f, "labels {}", labels.join(",")),
        }
    }
}

/// Body of `POST /collections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateCollection {
    pub target: Target,
    /// Share name on the agents; `default` when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,255}$"))]
    pub file: Option<String>,
    /// RFC 3339; stores not reached by then are `not_reached`. Default: 24 hours from now.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The expiry as seconds from now, instead of `expires_at`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 7_776_000))]
    pub expires_in_secs: Option<u64>,
    /// How many stores upload at once; default 50.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10_000))]
    pub max_concurrent: Option<u32>,
    /// The compression asked of every store: `auto` (the default), `zstd` or `none`.
    #[serde(default)]
    pub encoding: Option<Compression>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CollectionState {
    /// Before its expiry: matching stores are asked as they connect.
    Open,
    /// Past its expiry: nobody new is asked; uploads already running go on.
    Expired,
    /// An operator cancelled it; its unfinished uploads were cancelled.
    Cancelled,
}

impl CollectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            CollectionState::Open => "open",
            CollectionState::Expired => "expired",
            CollectionState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for CollectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one store stands in a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RowState {
    /// Matched but offline: asked when it connects.
    PendingOffline,
    /// Connected, waiting for a slot (or for its current upload to end).
    Queued,
    /// Its upload is under way.
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Never asked before the expiry.
    NotReached,
}

impl RowState {
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::PendingOffline => "pending_offline",
            RowState::Queued => "queued",
            RowState::Running => "running",
            RowState::Completed => "completed",
            RowState::Failed => "failed",
            RowState::Cancelled => "cancelled",
            RowState::NotReached => "not_reached",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RowState::Completed | RowState::Failed | RowState::Cancelled | RowState::NotReached
        )
    }
}

impl std::fmt::Display for RowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many stores are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionCounts {
    /// Every store matched so far.
    pub matched: u64,
    pub pending_offline: u64,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub not_reached: u64,
}

impl CollectionCounts {
    /// Stores still to be asked or still uploading.
    pub fn unfinished(&self) -> u64 {
        self.pending_offline + self.queued + self.running
    }

    /// Adds one store in `state`.
    pub fn add(&mut self, state: RowState) {
        self.matched += 1;
        *match state {
            RowState::PendingOffline => &mut self.pending_offline,
            RowState::Queued => &mut self.queued,
            RowState::Running => &mut self.running,
            RowState::Completed => &mut self.completed,
            RowState::Failed => &mut self.failed,
            RowState::Cancelled => &mut self.cancelled,
            RowState::NotReached => &mut self.not_reached,
        } += 1;
    }
}

/// `POST /collections/preview`: the stores a collection with this body would match now,
/// without creating it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionPreview {
    pub matched: u64,
    /// Of those, connected now (asked at once, a slot permitting) and offline (asked when they
    /// connect, before the expiry).
    pub connected: u64,
    pub offline: u64,
}

/// `GET /collections/{id}` (and the answer to `POST /collections`, 201).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionSummary {
    pub collection_id: CollectionId,
    pub target: Target,
    /// The share asked of every store.
    pub file: String,
    pub state: CollectionState,
    pub max_concurrent: u32,
    /// The compression asked of every store.
    #[serde(default)]
    pub encoding: Compression,
    pub created_by: String,
    /// RFC 3339.
    pub created_at: String,
    pub expires_at: String,
    pub counts: CollectionCounts,
    /// Failed stores by error code.
    pub failed_by_code: BTreeMap<String, u64>,
    /// Bytes stored so far, and the size of every file known so far (a store's size is known
    /// once it has described its file). A running store counts its bytes on the wire (its
    /// stored size), a completed one its file's size.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Nothing is left to run: no store is pending, queued or running. An open collection can
    /// still gain a store that connects later.
    pub settled: bool,
    /// The schedule that created it, if one did, and the moment that firing was due (RFC 3339;
    /// a firing missed while the server was down runs later than it was due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<ScheduleId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<String>,
}

/// One store of a collection, in `GET /collections/{id}/uploads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionRow {
    pub client_id: ClientId,
    pub state: RowState,
    /// Its upload, once asked (`GET /uploads/{upload_id}` has the details).
    pub upload_id: Option<UploadId>,
    pub size: Option<u64>,
    pub bytes_done: u64,
    pub sha256: Option<String>,
    pub key: Option<String>,
    pub error: Option<ErrorDetail>,
    /// RFC 3339: when the store was matched, and when its upload ended.
    pub matched_at: String,
    pub finished_at: Option<String>,
}

/// Query of `GET /collections/{id}/uploads`: rows by client id, after `after`, optionally only
/// those in one state or failed with one code.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct RowsParams {
    #[cfg_attr(
        feature = "openapi",
        param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub after: Option<String>,
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<usize>,
    /// Only stores in this state.
    pub state: Option<RowState>,
    /// Only failed stores with this error code.
    #[cfg_attr(feature = "openapi", param(value_type = Option<crate::error::ErrorCode>))]
    pub code: Option<String>,
}

/// `GET /collections/{id}/uploads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionRows {
    pub rows: Vec<CollectionRow>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<ClientId>,
}

/// `GET /collections`: the newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionList {
    pub collections: Vec<CollectionSummary>,
}

/// Query of `GET /collections`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct CollectionListParams {
    /// At most this many (default 50, at most 1,000).
    #[cfg_attr(feature = "openapi", param(maximum = 1000))]
    pub limit: Option<usize>,
}

/// One completed store in `GET /collections/{id}/manifest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManifestEntry {
    pub client_id: ClientId,
    pub upload_id: UploadId,
    pub key: String,
    pub size: u64,
    pub sha256: Option<String>,
    /// A presigned GET of the object.
    pub url: String,
}

/// `GET /collections/{id}/manifest` as JSON (`text/csv` gives the same entries as CSV).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    pub collection_id: CollectionId,
    /// Seconds each URL lives from when it was signed.
    pub expires_in_secs: u64,
    pub entries: Vec<ManifestEntry>,
}

/// What each firing of a schedule creates: a collection's settings, its expiry counted from the
/// firing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionTemplate {
    pub target: Target,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,255}$"))]
    pub file: Option<String>,
    /// Seconds from the firing to the collection's expiry; default 24 hours.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 7_776_000))]
    pub expires_in_secs: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10_000))]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Compression>,
}

/// Body of `POST /schedules`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateSchedule {
    /// A cron pattern: five fields (minute to weekday), or six with seconds first; `@daily`
    /// and the other nicknames.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub cron: String,
    /// An IANA time zone the pattern is read in, such as `Europe/Berlin`; default `UTC`.
    #[serde(default)]
    pub time_zone: Option<String>,
    pub template: CollectionTemplate,
}

/// One schedule (`GET /schedules/{id}`, and the answer to `POST /schedules`, 201).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleInfo {
    pub schedule_id: ScheduleId,
    pub cron: String,
    pub time_zone: String,
    pub template: CollectionTemplate,
    pub created_by: String,
    /// RFC 3339.
    pub created_at: String,
    /// The next firing, in UTC.
    pub next_fire_at: Option<String>,
    /// The latest firing that created a collection (or was skipped as past its expiry).
    pub last_fired_at: Option<String>,
}

/// `GET /schedules`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleInfo>,
}
