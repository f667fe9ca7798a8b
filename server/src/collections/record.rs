//! A collection and its stores as plain data.

use std::collections::BTreeMap;

use shared::api::ErrorDetail;
use shared::api::collections::{CollectionState, RowState};
use shared::encoding::Compression;
use shared::{ClientId, CollectionId, FileName, ScheduleId, UploadId};

use super::target::Matcher;
use crate::uploads::UnixMs;

/// What a collection asks, of whom, until when. Fixed when it is created.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: CollectionId,
    pub matcher: Matcher,
    pub share: FileName,
    pub max_concurrent: u32,
    /// Asked of every store.
    pub compression: Compression,
    pub created_by: String,
    pub created_from: String,
    pub created: UnixMs,
    pub expires: UnixMs,
    /// The schedule firing that created it, if one did.
    pub firing: Option<Firing>,
}

/// One firing of a schedule: which, and the moment it was due (not when it ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    pub schedule: ScheduleId,
    pub at: UnixMs,
}

/// Where one store stands. A store's upload is named before the store is asked (`Running`
/// is saved first), so that a restart in between finds it and does not ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Not asked yet: offline, waiting for a slot, or busy with another upload.
    Waiting,
    Running {
        upload: UploadId,
    },
    Completed {
        upload: UploadId,
        key: String,
        size: u64,
        sha256: Option<String>,
    },
    Failed {
        upload: UploadId,
        error: ErrorDetail,
    },
    /// Cancelled with the collection, before or after it was asked.
    Cancelled {
        upload: Option<UploadId>,
    },
    /// Never asked before the expiry.
    NotReached,
}

impl Stage {
    pub fn is_final(&self) -> bool {
        !matches!(self, Stage::Waiting | Stage::Running { .. })
    }

    pub fn upload(&self) -> Option<UploadId> {
        match self {
            Stage::Running { upload }
            | Stage::Completed { upload, .. }
            | Stage::Failed { upload, .. } => Some(*upload),
            Stage::Cancelled { upload } => *upload,
            Stage::Waiting | Stage::NotReached => None,
        }
    }

    /// The state an operator sees; a waiting store is queued or pending by whether it is
    /// connected.
    pub fn shown(&self, connected: bool) -> RowState {
        match self {
            Stage::Waiting if connected => RowState::Queued,
            Stage::Waiting => RowState::PendingOffline,
            Stage::Running { .. } => RowState::Running,
            Stage::Completed { .. } => RowState::Completed,
            Stage::Failed { .. } => RowState::Failed,
            Stage::Cancelled { .. } => RowState::Cancelled,
            Stage::NotReached => RowState::NotReached,
        }
    }
}

/// One store of a collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub stage: Stage,
    pub matched: UnixMs,
    pub finished: Option<UnixMs>,
}

/// A collection with its stores.
#[derive(Debug, Clone)]
pub struct Collection {
    pub spec: Spec,
    pub state: CollectionState,
    pub rows: BTreeMap<ClientId, Row>,
}

impl Collection {
    /// Whether it can still change: open, or with a store still waiting or running.
    pub fn is_live(&self) -> bool {
        self.state == CollectionState::Open || self.rows.values().any(|r| !r.stage.is_final())
    }

    pub fn running(&self) -> usize {
        self.rows
            .values()
            .filter(|r| matches!(r.stage, Stage::Running { .. }))
            .count()
    }
}
