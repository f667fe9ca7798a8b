//! The stored forms, a database written by the first release, and the table's save rule.

use super::*;

#[test]
fn every_stage_survives_the_stored_form() {
    for u in [requested(), uploading(), verifying(), ending(), completed()] {
        let (row, back) = round_trip(&u);
        assert_eq!(back.stage, u.stage);
        assert_eq!(stored::to_row(&back).unwrap(), row);
    }
}

/// `u` written as a row and read back.
fn round_trip(u: &Upload) -> (crate::db::StoredRow, Upload) {
    let row = stored::to_row(u).unwrap();
    let back = stored::from_row(&loaded(&row, row.record.clone()), Instant::now()).unwrap();
    (row, back)
}

/// The row as the database hands it back, with `record` as its text.
fn loaded(row: &crate::db::StoredRow, record: String) -> crate::db::LoadedRow {
    crate::db::LoadedRow {
        id: row.id.to_string(),
        format: row.format,
        record,
    }
}

/// A compressed upload keeps its encoded layout and what the operator asked for.
#[test]
fn a_compressed_upload_survives_the_stored_form() {
    let mut u = uploading();
    u.compression = Compression::Zstd;
    if let Stage::Open(Open::Uploading(t)) = &mut u.stage {
        t.file.part_size = 5 * MIB;
        t.file.digests = Digests::Crc64Nvme {
            parts: vec![Crc64Nvme::of(b"a"), Crc64Nvme::of(b"b")],
            sha256: Some(Sha256Hex::parse(&"c".repeat(64)).unwrap()),
        };
        t.file.stored = Stored::Encoded(
            Encoding::Zstd,
            vec![
                EncodedPart {
                    plain_len: 10 * MIB,
                    stored_len: 5 * MIB,
                },
                EncodedPart {
                    plain_len: 2 * MIB,
                    stored_len: 1000,
                },
            ],
        );
    }
    let (row, back) = round_trip(&u);
    assert!(
        row.record.contains(r#""encoding":"zstd""#),
        "{}",
        row.record
    );
    assert_eq!(back.stage, u.stage);
    assert_eq!(back.compression, Compression::Zstd);
    // A layout that does not fit its checksums is reported, not read.
    let broken = row.record.replace(
        r#""stored_len":1000"#,
        r#""stored_len":1000},{"plain_len":0,"stored_len":0"#,
    );
    assert!(stored::from_row(&loaded(&row, broken), Instant::now()).is_err());
}

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("backhaul-uploads-{}", UploadId::new_random()))
}

/// The table of the database at `path`, showing uploads as the server does.
fn open_table(path: &std::path::Path) -> Table {
    let render: crate::uploads::table::Render =
        Box::new(|u| crate::uploads::status::of(u, "pos-uploads", Duration::from_secs(60)));
    Table::open(
        Box::new(sqlite_store(path).unwrap()),
        render,
        None,
        crate::uploads::Holding::Everything,
    )
    .unwrap()
}

/// The database the first release's code wrote (`tests/fixtures/uploads-v1.sql`, dumped from
/// it): every record is read, in the stage it was in, and time sorts as time.
#[test]
fn a_database_written_by_the_first_release_is_read_whole() {
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    std::fs::create_dir_all(&dir).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(include_str!("../../../tests/fixtures/uploads-v1.sql"))
        .unwrap();
    drop(conn);
    let table = open_table(&path);
    let store = sqlite_store(&path).unwrap();
    let id = |n: u32| UploadId::parse(&format!("00000000-0000-4000-8000-00000000000{n}")).unwrap();
    // Each record whole from the store, and as the table shows it.
    let read = |n| {
        let row = store.get(id(n)).unwrap().unwrap();
        let u = stored::from_row(&row, Instant::now()).unwrap();
        let shown = table.status(id(n)).unwrap().unwrap();
        assert_eq!(shown.state, u.state(), "upload {n}");
        assert_eq!(
            shown.sha256.as_deref(),
            u.stage
                .transfer()
                .and_then(|t| t.file.sha256())
                .map(|s| s.as_str())
        );
        (stage_name(&u), u)
    };

    let (stage, u) = read(1);
    assert_eq!(stage, "requested");
    assert_eq!(u.client_id.as_str(), "store-requested");

    let (stage, u) = read(2);
    assert_eq!(stage, "uploading");
    let t = u.stage.transfer().unwrap();
    assert_eq!(t.multipart.upload_id, format!("mpu-{}", id(2)));
    assert_eq!(t.file.size, 12 * MIB);
    assert_eq!(t.file.parts_total(), 3);
    assert_eq!(
        t.file.sha256().unwrap().as_str(),
        "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    );
    assert_eq!((u.parts_done, u.bytes_done, u.resumes), (1, 5 * MIB, 2));
    assert_eq!((u.phases.describe_ms, u.phases.presign_ms), (120, 3));
    assert_eq!(u.created.0, 1_796_083_202_250);

    assert_eq!(read(3).0, "verifying");

    let (stage, u) = read(4);
    assert_eq!(stage, "ending failed");
    assert_eq!(u.state(), UploadState::Uploading);
    assert_eq!(u.stage.error().unwrap().code, ErrorCode::Stalled);
    assert!(u.recovery().is_some(), "a restart finishes the ending");

    let (stage, u) = read(5);
    assert_eq!(stage, "completed");
    assert!(
        matches!(&u.stage, Stage::Completed { etag, .. } if etag == "\"0123456789abcdef0123456789abcdef-3\"")
    );
    assert_eq!(u.finished.unwrap().0, 1_796_083_265_500);

    let (stage, u) = read(6);
    assert_eq!(stage, "failed");
    assert_eq!(u.stage.error().unwrap().code, ErrorCode::FileChanged);
    assert!(u.stage.transfer().is_some());

    let (stage, u) = read(7);
    assert_eq!(stage, "cancelled");
    assert_eq!(u.stage.error().unwrap().code, ErrorCode::Cancelled);

    // Of store-done's two uploads, the one created half a second later is the latest.
    let latest = table
        .latest_status(&ClientId::parse("store-done").unwrap())
        .unwrap();
    assert_eq!(latest.upload_id, id(6));
    // The store answers the same, by integer milliseconds.
    let row = store
        .recent_for(&ClientId::parse("store-done").unwrap(), 1)
        .unwrap()
        .remove(0);
    assert_eq!(row.id, id(6).to_string());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreadable_record_is_set_aside_not_dropped() {
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    let good = uploading();
    let bad = UploadId::new_random();
    {
        let store = sqlite_store(&path).unwrap();
        store.save(&stored::to_row(&good).unwrap(), 0).unwrap();
        let mut row = stored::to_row(&uploading()).unwrap();
        row.id = bad;
        row.record = row.record.replace("\"stage\"", "\"renamed_stage\"");
        store.save(&row, 0).unwrap();
    }
    let table = open_table(&path);
    assert!(table.read(good.id, |_| ()).is_some());
    assert!(table.read(bad, |_| ()).is_none());
    assert!(
        table.is_unreadable(bad),
        "the orphan sweep must leave its key alone"
    );
    assert!(!table.is_unreadable(good.id));
    // Reported as unreadable, not as absent.
    assert!(table.status(bad).is_err());
    assert!(table.status(UploadId::new_random()).unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_table_saves_by_its_rule() {
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    let table = open_table(&path);
    let u = uploading();
    let id = u.id;
    table.create(u, |_| Ok::<(), ()>(())).unwrap();
    let stored_parts = || {
        let row = sqlite_store(&path).unwrap().get(id).unwrap().unwrap();
        let u = stored::from_row(&row, Instant::now()).unwrap();
        (stage_name(&u), u.parts_done)
    };
    // Progress is not saved on its own...
    table.apply(id, progress(agent())).unwrap();
    assert_eq!(stored_parts(), ("uploading".into(), 0));
    // ...but carried by the next saved change.
    table.apply(id, completed_by(agent())).unwrap();
    assert_eq!(stored_parts(), ("verifying".into(), 3));
    // A second upload for the client is refused while this one is open.
    assert!(table.create(uploading(), |_| Ok::<(), ()>(())).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The progress that brings a protocol 3 file's SHA-256 is saved at once: a server killed while
/// the agent completes the upload comes back knowing it.
#[test]
fn the_progress_that_brings_the_sha256_is_saved() {
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    let table = open_table(&path);
    let mut u = uploading();
    u.stage = Stage::Open(Open::Uploading(Transfer {
        file: crc_facts(),
        ..transfer()
    }));
    let id = u.id;
    table.create(u, |_| Ok::<(), ()>(())).unwrap();
    let sha = Sha256Hex::parse(&"b".repeat(64)).unwrap();
    table
        .apply(
            id,
            Event::Progress {
                agent: agent(),
                parts_done: 3,
                bytes_done: 12,
                part_retries: 0,
                sha256: Some(sha.clone()),
            },
        )
        .unwrap();
    let row = sqlite_store(&path).unwrap().get(id).unwrap().unwrap();
    let stored = stored::from_row(&row, Instant::now()).unwrap();
    let file = &stored.stage.transfer().unwrap().file;
    assert_eq!(file.sha256(), Some(&sha));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn retention_forgets_old_finished_records_and_keeps_open_ones() {
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    let table = open_table(&path);
    let with = |mut u: Upload, client: &str, created: i64| {
        u.client_id = ClientId::parse(client).unwrap();
        u.created = UnixMs(created);
        u
    };
    let old_done = with(completed(), "store-a", 1_000);
    let old_open = with(uploading(), "store-b", 1_000);
    let new_done = with(completed(), "store-c", 5_000_000);
    let ids = [old_done.id, old_open.id, new_done.id];
    for u in [old_done, old_open, new_done] {
        table.create(u, |_| Ok::<(), ()>(())).unwrap();
    }
    assert_eq!(table.forget_finished_before(UnixMs(1_000_000)).unwrap(), 1);
    let present = |t: &Table| ids.map(|id| t.status(id).unwrap().is_some());
    assert_eq!(present(&table), [false, true, true]);
    // Gone from the store too: a restarted server does not bring it back.
    let reopened = open_table(&path);
    assert_eq!(present(&reopened), [false, true, true]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A finished upload leaves the unfinished ones and is kept as its status alone (no part list),
/// the same status it had when it finished, and its events are refused from then on. Of the
/// finished ones, at most `MAX_FINISHED_UPLOADS` stay in memory; older ones come from the store.
#[test]
fn finished_uploads_are_kept_as_their_status_only() {
    use crate::uploads::table::MAX_FINISHED_UPLOADS;
    let dir = temp_dir();
    let path = dir.join("backhaul.db");
    let table = open_table(&path);
    let u = verifying();
    let id = u.id;
    table.create(u, |_| Ok::<(), ()>(())).unwrap();
    let verified = || Event::Verified {
        etag: "\"e-3\"".into(),
    };
    table.apply(id, verified()).unwrap();
    assert!(table.read(id, |_| ()).is_none(), "no longer held whole");
    assert_eq!(
        table.client_of(id),
        Some(client()),
        "still known to the steps"
    );
    let shown = table.status(id).unwrap().unwrap();
    assert_eq!(shown.state, UploadState::Completed);
    assert_eq!(shown.etag.as_deref(), Some("\"e-3\""));
    assert_eq!(shown.parts_total, Some(3));
    assert!(
        table.apply(id, verified()).is_err(),
        "a finished upload takes no event"
    );
    assert_eq!(table.latest_status(&client()).unwrap().upload_id, id);

    // The bound: the first finished upload goes from memory first, and is read from the store.
    for _ in 0..MAX_FINISHED_UPLOADS {
        let mut other = completed();
        other.client_id = ClientId::parse("store-other").unwrap();
        table.create(other, |_| Ok::<(), ()>(())).unwrap();
    }
    assert_eq!(table.client_of(id), None, "forgotten in memory");
    let again = table.status(id).unwrap().unwrap();
    let facts = |s: &shared::api::UploadStatus| {
        (
            s.state,
            s.etag.clone(),
            s.key.clone(),
            s.size,
            s.parts_total,
            s.sha256.clone(),
        )
    };
    assert_eq!(facts(&again), facts(&shown), "the same from the store");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A replica holds a store under the latest claim it made: a take-on that made its claim
/// before the agent's connection did, and adopts after it, does not lower it, so a claim
/// elsewhere between the two does not take the store from this replica.
#[test]
fn a_late_take_on_never_lowers_the_claim_a_store_is_held_under() {
    let dir = temp_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let render: crate::uploads::table::Render =
        Box::new(|u| crate::uploads::status::of(u, "pos-uploads", Duration::from_secs(60)));
    let table = Table::open(
        Box::new(sqlite_store(&dir.join("backhaul.db")).unwrap()),
        render,
        None,
        crate::uploads::Holding::ConnectedStores,
    )
    .unwrap();
    let upload = new_upload();
    let id = upload.id;
    table.adopt(&upload.client_id, 7).unwrap();
    table.create(upload, |_| Ok::<(), ()>(())).ok().unwrap();
    table.adopt(&client(), 5).unwrap();
    assert!(table.release(&client(), 6).is_empty(), "held under 7");
    assert_eq!(table.release(&client(), 8), vec![id]);
    std::fs::remove_dir_all(dir).unwrap();
}
