//! What the REST API shows of an upload.

use std::time::{Duration, Instant};

use shared::api::{UploadState, UploadStatus};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::record::{Stage, UnixMs, Upload};
use super::table::Table;

/// An unfinished upload with no progress for this long shows as stalled (or for half the stall
/// timeout, if that is shorter).
pub const STALLED_AFTER: Duration = Duration::from_secs(10);

/// RFC 3339 with millisecond precision.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let millis = t.nanosecond() / 1_000_000 * 1_000_000;
    t.replace_nanosecond(millis)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn time(t: UnixMs) -> String {
    rfc3339(t.to_datetime())
}

/// The status of `u`, as `GET /uploads/{id}` shows it.
pub fn of(u: &Upload, bucket: &str, stalled_after: Duration) -> UploadStatus {
    let open = !u.stage.is_terminal();
    let transfer = u.stage.transfer();
    let file = transfer.map(|t| &t.file);
    let rate = u.live.plan_sent.and_then(|(start, base)| {
        let end = u.live.finished.unwrap_or_else(Instant::now);
        let secs = end.duration_since(start).as_secs_f64();
        (secs > 0.0).then(|| (u.bytes_done.saturating_sub(base) as f64 / secs) as u64)
    });
    let size = file.map(|f| f.size);
    let stored_size = file.map(|f| f.stored_size());
    let eta = match (u.state(), rate, stored_size) {
        (UploadState::Uploading, Some(r), Some(size)) if r > 0 => {
            Some(size.saturating_sub(u.bytes_done) / r)
        }
        _ => None,
    };
    let idle = open.then(|| u.live.last_progress.elapsed());
    UploadStatus {
        upload_id: u.id,
        client_id: u.client_id.clone(),
        state: u.state(),
        bucket: bucket.to_owned(),
        key: transfer.map(|t| t.multipart.key.clone()),
        share: u.share.as_str().to_owned(),
        file_name: file.map(|f| f.file_name.as_str().to_owned()),
        size,
        compression: u.compression,
        encoding: file.map(|f| f.encoding()),
        stored_size,
        compression_ratio: file
            .filter(|f| f.stored_size() > 0)
            .map(|f| f.size as f64 / f.stored_size() as f64),
        part_size: file.map(|f| f.part_size),
        parts_total: file.map(|f| f.parts_total()),
        parts_done: u.parts_done,
        bytes_done: u.bytes_done,
        parts_copied: u.copied.parts,
        bytes_copied: u.copied.bytes,
        rate_bytes_per_sec: rate,
        eta_secs: eta,
        idle_secs: idle.map(|d| d.as_secs()),
        stalled: idle.is_some_and(|d| d >= stalled_after),
        agent_connected: open && u.live.conn.is_some(),
        resumes: u.resumes,
        sha256: file.and_then(|f| f.sha256()).map(|s| s.as_str().to_owned()),
        checksum_crc64nvme: file
            .and_then(|f| f.whole_crc64nvme())
            .map(|c| c.to_base64()),
        etag: match &u.stage {
            Stage::Completed { etag, .. } => Some(etag.clone()),
            _ => None,
        },
        error: u.stage.error().cloned(),
        requested_by: u.requested_by.clone(),
        requested_from: u.requested_from.clone(),
        created_at: time(u.created),
        updated_at: time(u.updated),
        finished_at: u.finished.map(time),
        phases: u.phases,
        collection_id: u.collection,
    }
}

/// Unfinished uploads per state, for `/metrics`.
pub fn open_counts(table: &Table) -> Vec<(&'static str, usize)> {
    let mut counts = [
        (UploadState::Requested, 0),
        (UploadState::Uploading, 0),
        (UploadState::Verifying, 0),
    ];
    for state in table.each_unfinished(|u| Some(u.state())) {
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == state) {
            c.1 += 1;
        }
    }
    counts.iter().map(|(s, n)| (s.as_str(), *n)).collect()
}
