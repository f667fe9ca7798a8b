//! What operators see of a collection: its summary and its rows, with the live parts (whether
//! a waiting store is connected, how far a running upload is) read at the moment of asking.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use shared::api::UploadStatus;
use shared::api::collections::{CollectionCounts, CollectionRow, CollectionSummary};
use shared::{ClientId, CollectionId, UploadId};

use super::Collections;
use super::record::{Collection, Row, Stage};
use crate::error::ApiError;
use crate::registry::AgentLink;
use crate::uploads::rfc3339;

/// How far running uploads are, as the replicas driving them see it: bytes done and the file's
/// size, once known. An upload missing from it is shown as this replica knows it.
#[derive(Debug, Default)]
pub struct Progress(HashMap<UploadId, (u64, Option<u64>)>);

fn progress_of(s: &UploadStatus) -> (u64, Option<u64>) {
    (s.bytes_done, s.stored_size.or(s.size))
}

/// How many holders are asked at once for a view's progress.
const ASKED_AT_ONCE: usize = 16;

impl Collections {
    /// Whether `client`'s agent is connected to this replica or another one.
    pub(super) fn connected(&self, client: &ClientId) -> bool {
        self.0.registry.connection(client).is_some() || self.0.bus.connected_elsewhere(client)
    }

    /// The progress of `id`'s running uploads, each from the replica that drives it.
    pub(super) async fn progress(&self, id: CollectionId) -> Result<Progress, ApiError> {
        let running: Vec<UploadId> = self.read(id, |c| {
            c.rows
                .values()
                .filter_map(|r| match r.stage {
                    Stage::Running { upload } => Some(upload),
                    _ => None,
                })
                .collect()
        })?;
        let (bus, uploads) = (&self.0.bus, &self.0.uploads);
        let known = futures::stream::iter(running)
            .map(|upload| async move {
                let status = crate::bus::command::status_via(bus, uploads, upload).await;
                status.ok().map(|s| (upload, progress_of(&s)))
            })
            .buffer_unordered(ASKED_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        Ok(Progress(known))
    }

    /// How far `upload` is: from `known`, or as this replica knows it.
    fn progress_here(&self, upload: UploadId, known: &Progress) -> (u64, Option<u64>) {
        if let Some(p) = known.0.get(&upload) {
            return *p;
        }
        match self.0.uploads.status(upload) {
            Ok(s) => progress_of(&s),
            Err(_) => (0, None),
        }
    }

    pub(super) fn summarize(&self, c: &Collection, known: &Progress) -> CollectionSummary {
        let mut counts = CollectionCounts::default();
        let mut failed_by_code = BTreeMap::new();
        let (mut bytes_done, mut bytes_total) = (0u64, 0u64);
        for (client, row) in &c.rows {
            let connected = matches!(row.stage, Stage::Waiting) && self.connected(client);
            counts.add(row.stage.shown(connected));
            match &row.stage {
                Stage::Completed { size, .. } => {
                    bytes_done += size;
                    bytes_total += size;
                }
                Stage::Running { upload } => {
                    let (done, size) = self.progress_here(*upload, known);
                    bytes_done += done;
                    bytes_total += size.unwrap_or(0);
                }
                Stage::Failed { error, .. } => {
                    *failed_by_code
                        .entry(error.code.as_str().to_owned())
                        .or_insert(0) += 1;
                }
                _ => {}
            }
        }
        let s = &c.spec;
        CollectionSummary {
            collection_id: s.id,
            target: s.matcher.target().clone(),
            file: s.share.to_string(),
            state: c.state,
            max_concurrent: s.max_concurrent,
            encoding: s.compression,
            created_by: s.created_by.clone(),
            created_at: rfc3339(s.created.to_datetime()),
            expires_at: rfc3339(s.expires.to_datetime()),
            settled: counts.unfinished() == 0,
            counts,
            failed_by_code,
            bytes_done,
            bytes_total,
            schedule_id: s.firing.map(|f| f.schedule),
            fired_at: s.firing.map(|f| rfc3339(f.at.to_datetime())),
        }
    }

    pub(super) fn show_row(&self, client: &ClientId, row: &Row, known: &Progress) -> CollectionRow {
        let connected = matches!(row.stage, Stage::Waiting) && self.connected(client);
        let (bytes_done, size, sha256, key, error) = match &row.stage {
            Stage::Running { upload } => {
                let (done, size) = self.progress_here(*upload, known);
                (done, size, None, None, None)
            }
            Stage::Completed {
                key, size, sha256, ..
            } => (*size, Some(*size), sha256.clone(), Some(key.clone()), None),
            Stage::Failed { error, .. } => (0, None, None, None, Some(error.clone())),
            _ => (0, None, None, None, None),
        };
        CollectionRow {
            client_id: client.clone(),
            state: row.stage.shown(connected),
            upload_id: row.stage.upload(),
            size,
            bytes_done,
            sha256,
            key,
            error,
            matched_at: rfc3339(row.matched.to_datetime()),
            finished_at: row.finished.map(|t| rfc3339(t.to_datetime())),
        }
    }
}
