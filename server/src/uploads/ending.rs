//! Endings: an upload that will not complete is claimed (the record says `Ending`, durably), its
//! agent is told to stop, its multipart upload is aborted, and only then does it read `failed` or
//! `cancelled`.

use std::time::Duration;

use shared::api::UploadStatus;
use shared::{ErrorCode, UploadId};

use super::events::Event;
use super::record::Multipart;
use super::{Requester, Uploads};
use crate::error::ApiError;

/// Attempts at AbortMultipartUpload before the orphan sweep is left to retry.
const ABORT_ATTEMPTS: u32 = 3;
/// How long a cancel's answer waits for the clean-up before it reports the upload as it is
/// (still ending; it reaches `cancelled` once the clean-up is done).
const CANCEL_ANSWER_WAIT: Duration = Duration::from_secs(5);

impl Uploads {
    /// `DELETE /uploads/{upload_id}`: stops the agent, aborts the multipart upload and ends the
    /// upload as `cancelled`. Returns once the abort is done.
    pub async fn cancel(
        &self,
        id: UploadId,
        requester: &Requester,
    ) -> Result<UploadStatus, ApiError> {
        let message = format!(
            "cancelled by {} from {}",
            requester.operator, requester.from
        );
        let effects = match self.table().apply(id, Event::Cancel { message }) {
            Ok(effects) => effects,
            Err(_) => {
                let s = self.status(id)?;
                return Err(ApiError::new(
                    ErrorCode::UploadFinished,
                    format!("upload {id} is already {}", s.state),
                ));
            }
        };
        tracing::info!(
            audit = true,
            upload_id = %id,
            operator = requester.operator,
            from = %requester.from,
            "upload cancelled"
        );
        // The clean-up (telling the agent, aborting the multipart upload, deleting an object)
        // runs on its own task, so that a slow storage cannot hold the REST call past its
        // timeout, nor leave the upload half-ended when the call gives up. The answer waits a
        // little for it, so that it usually says `cancelled`.
        let this = self.clone();
        let job = self
            .0
            .services
            .tracker
            .spawn(async move { this.carry_out(id, effects).await });
        let _ = tokio::time::timeout(CANCEL_ANSWER_WAIT, job).await;
        self.status(id)
    }

    /// AbortMultipartUpload with bounded retries. One that never succeeds is logged, and the
    /// orphan sweep tries again later.
    pub(super) async fn abort(&self, id: UploadId, multipart: &Multipart) {
        for attempt in 1..=ABORT_ATTEMPTS {
            match self
                .storage()
                .abort_multipart(&multipart.key, &multipart.upload_id)
                .await
            {
                Ok(()) => return,
                Err(err) if attempt < ABORT_ATTEMPTS => {
                    tracing::warn!(upload_id = %id, attempt, error = format!("{err:#}"), "abort failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(err) => {
                    tracing::error!(upload_id = %id, key = multipart.key, error = format!("{err:#}"), "abort failed; the orphan sweep will retry");
                }
            }
        }
    }

    pub(super) fn log_ending(&self, id: UploadId) {
        let ending = self.table().read(id, |u| match &u.stage {
            super::record::Stage::Ending(e) => Some((u.client_id.clone(), e.clone())),
            _ => None,
        });
        if let Some(Some((client_id, e))) = ending {
            tracing::warn!(
                upload_id = %id,
                %client_id,
                state = %e.outcome.state(),
                code = %e.error.code,
                // Debug-quoted: the message may be an agent's, and must not forge log lines.
                message = ?e.error.message,
                "upload ended"
            );
        }
    }
}
