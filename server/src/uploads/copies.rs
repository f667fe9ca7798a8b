//! Copying the unchanged parts of a new upload from the share's previous object, inside
//! storage (`UploadPartCopy` with closed byte ranges), before the agent is handed URLs for the
//! rest. The previous object is only read. A copy that fails, or an object that is gone or no
//! longer the one its manifest describes, costs only the copy: those parts are sent.

use futures::StreamExt;
use shared::UploadId;

use super::Uploads;
use super::events::Event;
use super::manifest::PartCopy;
use super::record::Transfer;
use crate::storage::StoredPart;

/// Part copies in flight at once, per upload.
const COPIES_AT_ONCE: usize = 8;

impl Uploads {
    /// Copies what the previous object of the upload's share holds unchanged; answers with
    /// the copies storage made.
    pub(super) async fn copy_unchanged(&self, id: UploadId, transfer: &Transfer) -> Event {
        let none = Event::PartsCopied { stored: Vec::new() };
        let Some((client_id, share)) = self
            .table()
            .read(id, |u| (u.client_id.clone(), u.share.clone()))
        else {
            return none;
        };
        let Some(previous) = self.table().manifest(&client_id, &share) else {
            return none;
        };
        let copies = previous.unchanged(&transfer.file);
        if copies.is_empty() {
            tracing::info!(upload_id = %id, previous = %previous.upload_id, "no part is unchanged since the previous object");
            return none;
        }
        // The object must still be the one the manifest describes: deleted or expired, it
        // cannot be copied from; another object under its key, it must not be.
        match self.storage().head_object(&previous.key).await {
            Ok(Some(obj))
                if obj.size == previous.stored_size()
                    && obj.checksum_crc64nvme.as_deref()
                        == Some(previous.whole_crc64nvme().to_base64().as_str()) => {}
            Ok(found) => {
                tracing::info!(upload_id = %id, previous = %previous.upload_id, key = previous.key, found = found.is_some(), "the previous object is gone or changed; every part is sent");
                return none;
            }
            Err(err) => {
                tracing::warn!(upload_id = %id, error = format!("{err:#}"), "the previous object cannot be read; every part is sent");
                return none;
            }
        }
        let wanted = copies.len();
        let stored: Vec<StoredPart> = futures::stream::iter(copies)
            .map(|copy| self.copy_one(id, transfer, &previous.key, copy))
            .buffer_unordered(COPIES_AT_ONCE)
            .filter_map(|p| async move { p })
            .collect()
            .await;
        tracing::info!(upload_id = %id, previous = %previous.upload_id, copied = stored.len(), wanted, "unchanged parts copied from the previous object");
        Event::PartsCopied { stored }
    }

    async fn copy_one(
        &self,
        id: UploadId,
        transfer: &Transfer,
        source_key: &str,
        copy: PartCopy,
    ) -> Option<StoredPart> {
        let multipart = &transfer.multipart;
        self.storage()
            .copy_part(
                &multipart.key,
                &multipart.upload_id,
                copy.part_number,
                source_key,
                (copy.first, copy.last),
            )
            .await
            .inspect_err(|err| {
                tracing::warn!(upload_id = %id, part = %copy.part_number, error = format!("{err:#}"), "UploadPartCopy failed; the part is sent instead");
            })
            .ok()
    }
}
