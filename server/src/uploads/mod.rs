//! Uploads: the steps that move a store's file from `requested` to `completed`, or to `failed` or
//! `cancelled`, and the record of each.
//!
//! An upload belongs to a client, not to a connection. When the agent drops, the upload waits;
//! when the agent comes back (or the server restarts and the agent reconnects), the server asks it
//! to describe the file again, checks that the file is the same one (size, SHA-256, part MD5s),
//! lists the parts already in storage and hands out URLs for the missing ones only. An upload that
//! makes no progress for `UPLOAD_STALL_TIMEOUT_SECS` fails with `STALLED`.
//!
//! ```text
//!                trigger
//!                   │ describe_file   file_info: CreateMultipartUpload, copies of
//!                   ▼
//!              ┌─────────┐ unchanged parts (UploadPartCopy), presign, start_upload
//!              │Requested├──────────────────────────────────┐
//!              └────┬────┘                                  ▼
//!                   │                               ┌─────────────┐ reconnect + file_info,
//!                   │                               │  Uploading  │◄─ need_urls: ListParts,
//!                   │                               └──────┬──────┘   presign the missing parts
//!                   │   upload_completed, COMPLETE_FAILED, │or ListParts finds it gone
//!                   │                                      ▼
//!                   │                               ┌─────────────┐ HeadObject agrees
//!                   │     storage unreadable: again │  Verifying  ├──────────────► Completed
//!                   │     in 5 s (VerifyAgain) ────►└──────┬──────┘
//!                   │ fail, cancel, upload_failed,         │ (from any open stage)
//!                   │ stall, a changed file, a bad object  │
//!                   ▼                                      ▼
//!              ┌──────────────────────────────────────────────┐ DeleteObject (from Verifying),
//!              │ Ending (failed or cancelled; saved, so a     │ AbortMultipartUpload
//!              │ restart finishes the abort)                  ├──────────► Failed / Cancelled
//!              └──────────────────────────────────────────────┘
//! ```
//!
//! Where to look:
//! - a state change: [`machine`], `Upload::on`, a pure function from event to effects, on the
//!   record of [`record`];
//! - when it is saved: [`table`], `Table::apply` and the rule in `Event::is_saved` ([`events`]);
//! - the stored form and its versions: [`stored`] (and `crate::db` for the schema);
//! - an S3 call or a message to an agent: [`steps`], which carries out the effects; copying the
//!   parts the share's previous object holds unchanged: [`copies`], by the rule of [`manifest`];
//! - agent messages: [`dispatch`]; endings (fail, cancel, abort): [`ending`]; the timers and
//!   start-up recovery: [`housekeeping`]; what the REST API shows: [`status`].
//!
//! **Invariant:** a record reaches `failed` or `cancelled` only after its multipart upload has
//! been aborted (and an object past the agent's completion deleted), and `completed` only after
//! HeadObject agreed, so a caller who sees a terminal state can rely on it.

mod copies;
mod dispatch;
mod ending;
mod events;
mod housekeeping;
mod machine;
mod manifest;
mod record;
mod status;
mod steps;
mod stored;
mod table;

use std::sync::Arc;
use std::time::Duration;

use shared::api::UploadStatus;
use shared::encoding::Compression;
use shared::{ClientId, CollectionId, ErrorCode, FileName, UploadId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::UploadStore;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::AgentLink;
use crate::storage::Storage;

pub use record::UnixMs;
pub use status::{STALLED_AFTER, rfc3339};
pub use table::{Ended, Holding, MAX_FINISHED_UPLOADS};

use record::{NewUpload, Upload};
use table::{CreateError, Table};

/// The settings the upload steps follow, from the server's [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The smallest part size agents hash and upload with.
    pub part_size: u64,
    pub presign_ttl: Duration,
    /// Object keys start with this, then the client id.
    pub key_prefix: String,
    /// How long an agent may take to describe its file.
    pub agent_response_timeout: Duration,
    /// How long an upload may go without progress.
    pub stall_timeout: Duration,
    /// Every unfinished upload (one server), or those of the stores connected here (replicas).
    pub holding: Holding,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            part_size: config.part_size,
            presign_ttl: config.presign_ttl(),
            key_prefix: config.key_prefix.trim_end_matches('/').to_owned(),
            agent_response_timeout: Duration::from_secs(config.agent_response_timeout_secs),
            stall_timeout: Duration::from_secs(config.upload_stall_timeout_secs),
            holding: match config.bus {
                crate::config::BusKind::Local => Holding::Everything,
                crate::config::BusKind::Nats => Holding::ConnectedStores,
            },
        }
    }
}

/// What the upload steps use of the rest of the server.
pub struct Services {
    pub storage: Storage,
    pub agents: Arc<dyn AgentLink>,
    pub metrics: Arc<Metrics>,
    /// Background steps run on it, so that shutdown waits for them.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Told of every upload that finishes.
    pub ended: Option<table::Ended>,
}

/// The upload service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Uploads(Arc<Core>);

struct Core {
    table: Table,
    settings: Settings,
    services: Services,
}

/// One store asked for one file.
#[derive(Debug, Clone)]
pub struct Ask {
    pub id: UploadId,
    pub client_id: ClientId,
    pub share: FileName,
    pub collection: Option<CollectionId>,
    pub compression: Compression,
}

/// Who asked for an upload, for the audit trail.
#[derive(Debug, Clone)]
pub struct Requester {
    /// The `sub` of the operator's token.
    pub operator: String,
    /// The peer address of the request (a reverse proxy's, behind one).
    pub from: std::net::SocketAddr,
}

impl Requester {
    /// The requester a record kept (a collection's or a schedule's creator), asking again; an
    /// address that no longer parses reads as 0.0.0.0:0.
    pub fn recorded(operator: String, from: &str) -> Self {
        Self {
            operator,
            from: from
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

impl Uploads {
    /// Loads every unfinished upload and the most recent finished ones from `store`.
    pub fn open(
        store: Box<dyn UploadStore>,
        settings: Settings,
        services: Services,
    ) -> anyhow::Result<Self> {
        let stalled_after = STALLED_AFTER.min(settings.stall_timeout / 2);
        let bucket = services.storage.bucket().to_owned();
        let render: table::Render = Box::new(move |u| status::of(u, &bucket, stalled_after));
        Ok(Self(Arc::new(Core {
            table: Table::open(store, render, services.ended.clone(), settings.holding)?,
            settings,
            services,
        })))
    }

    fn table(&self) -> &Table {
        &self.0.table
    }

    fn settings(&self) -> &Settings {
        &self.0.settings
    }

    fn storage(&self) -> &Storage {
        &self.0.services.storage
    }

    fn agents(&self) -> &dyn AgentLink {
        self.0.services.agents.as_ref()
    }

    fn metrics(&self) -> &Metrics {
        &self.0.services.metrics
    }

    /// `POST /trigger-download/{client_id}`: records the upload and asks the agent for its file.
    pub fn trigger(
        &self,
        client_id: ClientId,
        share: FileName,
        compression: Compression,
        requester: &Requester,
    ) -> Result<UploadId, ApiError> {
        self.ask(
            Ask {
                id: UploadId::new_random(),
                client_id,
                share,
                collection: None,
                compression,
            },
            requester,
        )
    }

    /// Records an upload under the id `ask` names and asks the agent for its file. A
    /// collection chooses the id itself, and records it before asking, so that a restart in
    /// between cannot ask the store twice.
    pub fn ask(&self, ask: Ask, requester: &Requester) -> Result<UploadId, ApiError> {
        let Ask {
            id,
            client_id,
            share,
            collection,
            compression,
        } = ask;
        if self.0.services.shutdown.is_cancelled() {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "server is shutting down",
            ));
        }
        let not_connected = || {
            ApiError::new(
                ErrorCode::ClientNotConnected,
                format!("client {client_id} is not connected"),
            )
        };
        let conn = self
            .agents()
            .connection(&client_id)
            .ok_or_else(not_connected)?;
        let (upload, describe) = Upload::requested(
            NewUpload {
                id,
                client_id: client_id.clone(),
                share: share.clone(),
                requested_by: requester.operator.clone(),
                requested_from: requester.from.to_string(),
                collection,
                compression,
            },
            conn,
            record::Now::read(),
        );
        let created = self.table().create(upload, |upload| {
            // The connection closed or stopped reading since the lookup: nothing is created.
            self.send_now(upload.id, &upload.client_id, describe)
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::ClientNotConnected,
                        format!("client {client_id} is not reachable"),
                    )
                })
        });
        match created {
            Ok(()) => {}
            Err(CreateError::Busy(active)) => {
                return Err(ApiError::new(
                    ErrorCode::DownloadInProgress,
                    format!("client {client_id} already has upload {active} in progress"),
                ));
            }
            Err(CreateError::Refused(err)) => return Err(err),
        }
        self.metrics()
            .triggers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            audit = true,
            %client_id,
            upload_id = %id,
            %share,
            collection_id = collection.map(|c| c.to_string()),
            operator = requester.operator,
            from = %requester.from,
            "download triggered"
        );
        Ok(id)
    }

    /// `GET /uploads/{id}`: `UPLOAD_NOT_FOUND` for an upload there never was, `INTERNAL` for one
    /// whose record this release cannot read.
    pub fn status(&self, id: UploadId) -> Result<UploadStatus, ApiError> {
        match self.table().status(id) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(ApiError::new(
                ErrorCode::UploadNotFound,
                format!("no upload {id}"),
            )),
            Err(table::Unreadable) => Err(ApiError::new(
                ErrorCode::Internal,
                format!("the record of upload {id} cannot be read; see the server log"),
            )),
        }
    }

    pub fn latest_for(&self, client_id: &ClientId) -> Option<UploadStatus> {
        self.table().latest_status(client_id)
    }

    /// The newest `limit` uploads of `client_id`, newest first.
    pub fn recent_for(&self, client_id: &ClientId, limit: usize) -> Vec<UploadStatus> {
        self.table().recent_statuses(client_id, limit)
    }

    pub fn active_for(&self, client_id: &ClientId) -> Option<UploadId> {
        self.table().active_for(client_id)
    }

    /// Unfinished uploads per state, for `/metrics`.
    pub fn open_counts(&self) -> Vec<(&'static str, usize)> {
        status::open_counts(self.table())
    }
}

#[cfg(test)]
mod tests;
