//! The jobs no request starts: the sweep of overdue uploads (every second), the recovery of what
//! a stopped server left half-done (at start), the orphan sweep of multipart uploads nobody
//! owns (every `ORPHAN_SWEEP_INTERVAL_SECS`), and the deletion of old finished records (hourly).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use futures::StreamExt;

use super::Uploads;
use super::events::Event;
use super::record::UnixMs;
use super::steps::upload_id_of_key;

/// Uploads the sweep and the start-up recovery work on at once.
const SWEEP_CONCURRENCY: usize = 16;

impl Uploads {
    /// Deletes the records of uploads that finished and were created more than `retention` ago
    /// (`UPLOAD_RETENTION_DAYS`); unfinished ones are kept whatever their age.
    pub fn forget_old(&self, retention: std::time::Duration) {
        let cutoff = UnixMs(UnixMs::now().0 - retention.as_millis() as i64);
        match self.table().forget_finished_before(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "old upload records deleted"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "deleting old upload records failed"
            ),
        }
    }

    /// Fails uploads whose agent never answered or that stopped making progress, and tries
    /// deferred verifications again. Each upload's work runs concurrently, so one slow storage
    /// call does not hold up the rest.
    pub async fn sweep(&self) {
        let (response, stall) = (
            self.settings().agent_response_timeout,
            self.settings().stall_timeout,
        );
        let now = Instant::now();
        let due = self.table().each_unfinished(|u| {
            if let Some((code, message)) = u.overdue(now, response, stall) {
                Some((u.id, Event::Fail { code, message }))
            } else {
                u.verify_due(now).then_some((u.id, Event::VerifyAgain))
            }
        });
        futures::stream::iter(due)
            .for_each_concurrent(SWEEP_CONCURRENCY, |(id, event)| async move {
                if let Ok(effects) = self.table().apply(id, event) {
                    self.carry_out(id, effects).await;
                }
            })
            .await;
    }

    /// At start-up: finishes what a stopped server left half-done. Endings are completed (their
    /// multipart uploads aborted) and verifications run again. Uploads that were requested or
    /// uploading wait for their agents, under the stall timeout.
    pub async fn recover(&self) {
        let work = self
            .table()
            .each_unfinished(|u| u.recovery().map(|effect| (u.id, effect)));
        tracing::info!(
            unfinished = self.table().unfinished_count(),
            to_finish = work.len(),
            "recovered upload state"
        );
        futures::stream::iter(work)
            .for_each_concurrent(SWEEP_CONCURRENCY, |(id, effect)| {
                self.carry_out(id, vec![effect])
            })
            .await;
    }

    /// Takes on the unfinished uploads of `client_id` that no live replica holds, under the claim
    /// `epoch`, and finishes what their replica left half-done, as at start-up; the sweep then
    /// fails them if their agent stays away past the stall timeout.
    pub async fn take_on(&self, client_id: &shared::ClientId, epoch: u64) {
        for (id, effect) in self.adopt(client_id, epoch) {
            self.carry_out(id, vec![effect]).await;
        }
    }

    /// The stores with unfinished uploads in the database, whoever holds them.
    pub fn unfinished_clients(&self) -> Vec<shared::ClientId> {
        self.table().unfinished_clients()
    }

    /// Aborts multipart uploads under the key prefix that no open upload owns: left by a crash
    /// between CreateMultipartUpload and recording it, by an abort that failed, or by a database
    /// that was reset. A key whose upload record exists but cannot be read is left alone. Returns
    /// how many were aborted.
    pub async fn sweep_orphans(&self) -> usize {
        let prefix = self.settings().key_prefix.as_str();
        let pending = match self
            .storage()
            .list_multipart_uploads(&format!("{prefix}/"))
            .await
        {
            Ok(p) => p,
            Err(err) => {
                tracing::error!(
                    error = format!("{err:#}"),
                    "listing multipart uploads failed"
                );
                return 0;
            }
        };
        let mut aborted = 0;
        for p in pending {
            let owner = upload_id_of_key(prefix, &p.key);
            if let Some(id) = owner
                && self.table().is_unreadable(id)
            {
                tracing::warn!(key = p.key, upload_id = %id, "leaving the multipart upload of an unreadable record alone");
                continue;
            }
            let owned = owner.is_some_and(|id| self.table().owns_multipart(id, &p.upload_id));
            if owned {
                continue;
            }
            match self.storage().abort_multipart(&p.key, &p.upload_id).await {
                Ok(()) => {
                    aborted += 1;
                    self.metrics().orphans_aborted.fetch_add(1, Relaxed);
                    tracing::warn!(key = p.key, "aborted an orphaned multipart upload");
                }
                Err(err) => {
                    tracing::error!(
                        key = p.key,
                        error = format!("{err:#}"),
                        "aborting an orphaned multipart upload failed"
                    )
                }
            }
        }
        aborted
    }
}
