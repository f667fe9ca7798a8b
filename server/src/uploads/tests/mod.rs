//! Unit tests of the upload core: every transition of the state machine, table-driven
//! (`transitions`), and the stored forms and the table (`stored_forms`). The fixtures below build
//! uploads in each stage without a server.

use std::time::{Duration, Instant};

use shared::api::UploadState;
use shared::encoding::{Compression, EncodedPart, Encoding};
use shared::hash::{ContentMd5, Crc64Nvme, Sha256Hex};
use shared::protocol::{CompletedPart, UploadPlan};
use shared::{ClientId, ErrorCode, FileName, PartNumber, UploadId};

use super::dispatch::{FileInfo, check_facts};
use super::events::*;
use super::machine::*;
use super::record::*;
use super::steps::{object_key, object_matches, upload_id_of_key};
use super::stored;
use super::table::Table;
use crate::db::{Location, SqlStore, UploadStore};
use crate::registry::ConnId;

/// The upload store in a SQLite file at `path`.
fn sqlite_store(path: &std::path::Path) -> anyhow::Result<SqlStore> {
    Ok(SqlStore::new(Location::Sqlite(path.to_owned()).connect()?))
}
use crate::storage::StoredPart;

const MIB: u64 = 1024 * 1024;
const EMPTY_MD5: &str = "1B2M2Y8AsgTpgAmY7PhCfg==";

fn client() -> ClientId {
    ClientId::parse("store-1").unwrap()
}

fn conn() -> ConnId {
    ConnId::for_test(7)
}

fn agent() -> AgentRef {
    AgentRef {
        client_id: client(),
        conn: conn(),
    }
}

fn stranger() -> AgentRef {
    AgentRef {
        client_id: client(),
        conn: ConnId::for_test(8),
    }
}

/// A 12 MiB file in three 5 MiB parts (the last one 2 MiB).
fn facts() -> FileFacts {
    FileFacts {
        file_name: FileName::parse("export.csv").unwrap(),
        size: 12 * MIB,
        modified_ms: 1,
        part_size: 5 * MIB,
        digests: Digests::Md5 {
            parts: vec![ContentMd5::parse(EMPTY_MD5).unwrap(); 3],
            sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
        },
        stored: Stored::Plain,
        part_digests: None,
    }
}

/// The same file as a protocol 3 agent describes it: a CRC64NVME per part.
fn crc_facts() -> FileFacts {
    FileFacts {
        digests: Digests::Crc64Nvme {
            parts: part_crcs().to_vec(),
            sha256: None,
        },
        ..facts()
    }
}

fn part_crcs() -> [Crc64Nvme; 3] {
    [
        Crc64Nvme::of(b"one"),
        Crc64Nvme::of(b"two"),
        Crc64Nvme::of(b"three"),
    ]
}

fn transfer() -> Transfer {
    Transfer {
        file: facts(),
        multipart: Multipart {
            key: "uploads/store-1/x/export.csv".into(),
            upload_id: "mpu-1".into(),
        },
    }
}

fn new_upload() -> Upload {
    let (upload, _) = Upload::requested(
        NewUpload {
            id: UploadId::new_random(),
            client_id: client(),
            share: FileName::parse("default").unwrap(),
            requested_by: "ops".into(),
            requested_from: "127.0.0.1:1".into(),
            collection: None,
            compression: Compression::Auto,
        },
        conn(),
        Now::read(),
    );
    upload
}

/// An upload in `stage`, its agent connected on [`conn`] and not asked to describe.
fn at(stage: Stage) -> Upload {
    let mut u = new_upload();
    u.stage = stage;
    u.live.awaiting_info = None;
    u
}

fn requested() -> Upload {
    new_upload()
}
fn requested_idle() -> Upload {
    at(Stage::Open(Open::Requested))
}
fn uploading() -> Upload {
    at(Stage::Open(Open::Uploading(transfer())))
}
fn uploading_described_again() -> Upload {
    let mut u = uploading();
    u.live.awaiting_info = Some(Instant::now());
    u
}
fn uploading_away() -> Upload {
    let mut u = uploading();
    u.live.conn = None;
    u
}
fn verifying() -> Upload {
    at(Stage::Open(Open::Verifying(transfer())))
}
fn verifying_deferred() -> Upload {
    let mut u = verifying();
    u.live.verify_again = Some((Instant::now(), None));
    u
}
fn verifying_deferred_later() -> Upload {
    let mut u = verifying();
    u.live.verify_again = Some((Instant::now() + Duration::from_secs(60), None));
    u
}
fn ending() -> Upload {
    at(Stage::Ending(Ending {
        outcome: Outcome::Failed,
        error: shared::api::ErrorDetail {
            code: ErrorCode::Stalled,
            message: "no progress".into(),
        },
        from: Open::Uploading(transfer()),
    }))
}
fn completed() -> Upload {
    at(Stage::Completed {
        transfer: transfer(),
        etag: "\"e-3\"".into(),
    })
}

fn all_parts_stored() -> Vec<StoredPart> {
    [5 * MIB, 5 * MIB, 2 * MIB]
        .iter()
        .enumerate()
        .map(|(i, &size)| StoredPart {
            part_number: i as u32 + 1,
            size,
            etag: Some("\"d41d8cd98f00b204e9800998ecf8427e\"".into()),
            checksum_crc64nvme: None,
        })
        .collect()
}

fn plan(done: usize) -> UploadPlan {
    UploadPlan {
        upload_id: UploadId::new_random(),
        size: 12 * MIB,
        part_size: 5 * MIB,
        parts: Vec::new(),
        done: transfer().file.md5_completed_parts().unwrap()[..done].to_vec(),
        complete_url: "http://s3/complete".into(),
        checksum_crc64nvme: None,
        encoding: None,
        expires_at: 0,
        expires_in_secs: 60,
    }
}

fn kind(e: &Effect) -> &'static str {
    match e {
        Effect::Describe { .. } => "describe",
        Effect::TellCancel { .. } => "tell_cancel",
        Effect::CreateMultipart(_) => "create",
        Effect::ListParts { .. } => "list_parts",
        Effect::CopyUnchanged(_) => "copy_unchanged",
        Effect::Presign { .. } => "presign",
        Effect::SendPlan { .. } => "send_plan",
        Effect::Verify { .. } => "verify",
        Effect::DeleteObject { .. } => "delete_object",
        Effect::Abort(_) => "abort",
        Effect::Count(_) => "count",
    }
}

/// The stage names used by the table: the REST state, with endings told apart.
fn stage_name(u: &Upload) -> String {
    match &u.stage {
        Stage::Ending(e) => format!("ending {}", e.outcome.state()),
        other => other.state().to_string(),
    }
}

fn described() -> Event {
    Event::Described {
        agent: agent(),
        facts: Ok(facts()),
    }
}
fn fail() -> Event {
    Event::Fail {
        code: ErrorCode::Stalled,
        message: "no progress".into(),
    }
}
fn agent_failed() -> Event {
    Event::AgentFailed {
        client_id: client(),
        code: ErrorCode::FileNotFound,
        message: "gone".into(),
        sha256: None,
    }
}
fn progress(agent: AgentRef) -> Event {
    Event::Progress {
        agent,
        parts_done: 99,
        bytes_done: u64::MAX,
        part_retries: 2,
        sha256: None,
    }
}
fn completed_by(agent: AgentRef) -> Event {
    Event::AgentCompleted {
        agent,
        parts: transfer().file.md5_completed_parts().unwrap(),
        complete_ms: 5,
        sha256: None,
    }
}

mod digests;
mod stored_forms;
mod transitions;
