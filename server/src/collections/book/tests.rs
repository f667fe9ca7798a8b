//! The book's own tests: a collection's life, a store never asked, and the driver's role
//! moving between books.

use shared::api::collections::Target;
use shared::api::{ErrorDetail, UploadState};
use shared::{ErrorCode, FileName};

use super::*;
use crate::collections::record::Spec;
use crate::collections::target::Matcher;

fn id(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

fn book(path: &std::path::Path) -> Book {
    let db = crate::db::Location::Sqlite(path.to_owned())
        .connect()
        .unwrap();
    let book = Book::open(Store::new(db));
    assert!(book.drive().unwrap());
    book
}

fn collection(target: Target, max: u32, waiting: &[&str]) -> Collection {
    Collection {
        spec: Spec {
            id: CollectionId::new_random(),
            matcher: Matcher::new(target).unwrap(),
            share: FileName::parse("z").unwrap(),
            compression: Compression::Auto,
            max_concurrent: max,
            created_by: "op".into(),
            created_from: "127.0.0.1:1".into(),
            created: UnixMs(1_000),
            expires: UnixMs(10_000),
            firing: None,
        },
        state: CollectionState::Open,
        rows: waiting
            .iter()
            .map(|c| {
                let row = Row {
                    stage: Stage::Waiting,
                    matched: UnixMs(1_000),
                    finished: None,
                };
                (id(c), row)
            })
            .collect(),
    }
}

fn ended(p: &Planned, state: UploadState) -> UploadStatus {
    let mut s: UploadStatus = serde_json::from_value(serde_json::json!({
        "upload_id": p.upload, "client_id": p.client_id, "state": state, "bucket": "b",
        "key": "k", "share": "z", "file_name": null, "size": 7, "part_size": null,
        "parts_total": null, "parts_done": 1, "bytes_done": 7, "rate_bytes_per_sec": null,
        "eta_secs": null, "idle_secs": null, "stalled": false, "agent_connected": true,
        "resumes": 0, "sha256": "ab", "etag": null, "error": null, "requested_by": "op",
        "requested_from": "x", "created_at": "", "updated_at": "", "finished_at": null,
    }))
    .unwrap();
    s.collection_id = Some(p.collection);
    if state == UploadState::Failed {
        s.error = Some(ErrorDetail {
            code: ErrorCode::FileNotFound,
            message: "gone".into(),
        });
    }
    s
}

fn stages(book: &Book, c: CollectionId) -> Vec<(String, Stage)> {
    book.read(c, |c| {
        c.rows
            .iter()
            .map(|(k, r)| (k.to_string(), r.stage.clone()))
            .collect()
    })
    .unwrap()
    .unwrap()
}

/// The life of a collection in the book: stores planned up to the limit and only when they
/// may be asked, endings recorded, a store that connects later joining, the expiry, and
/// every step read back the same from the database.
#[test]
fn a_collection_runs_its_stores_and_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let b = book(&path);
    let c = collection(Target::All, 2, &["a", "b", "c", "off"]);
    let cid = c.spec.id;
    b.create(c, || vec![(id("d"), Labels::default())]).unwrap();
    assert_eq!(b.waiting(), 5, "the connected store d joined at creation");

    // Two slots; `off` may not be asked (offline).
    let first = b.plan(|c| c.as_str() != "off");
    assert_eq!(first.len(), 2);
    assert!(b.plan(|_| true).is_empty(), "no free slot");
    b.unask(&first[1]);
    let again = b.plan(|c| c.as_str() != "off");
    assert_eq!(again.len(), 1, "the slot given back is used");
    assert_ne!(again[0].client_id, first[0].client_id);

    b.upload_ended(&ended(&first[0], UploadState::Completed), UnixMs(2_000));
    b.upload_ended(&ended(&again[0], UploadState::Failed), UnixMs(2_000));
    // An ending of an upload the collection did not ask for changes nothing.
    let mut stray = ended(&first[0], UploadState::Failed);
    stray.upload_id = UploadId::new_random();
    b.upload_ended(&stray, UnixMs(2_000));

    // A store that says hello later joins; the same store twice does not.
    assert!(b.store_connected(&id("late"), &Labels::default(), UnixMs(3_000)));
    assert!(b.store_connected(&id("late"), &Labels::default(), UnixMs(3_000)));
    let before = stages(&b, cid);
    assert_eq!(before.len(), 6);
    assert_eq!(
        stages(&book(&path), cid),
        before,
        "the database says the same"
    );

    b.expire(UnixMs(10_000));
    let after = stages(&b, cid);
    let not_reached = after
        .iter()
        .filter(|(_, s)| *s == Stage::NotReached)
        .count();
    assert_eq!(not_reached, 4, "{after:?}");
    assert!(
        matches!(after[0].1, Stage::Completed { size: 7, .. }),
        "{after:?}"
    );
    assert!(
        matches!(&after[1].1, Stage::Failed { error, .. } if error.code == ErrorCode::FileNotFound),
        "{after:?}"
    );
    // Expired, nothing waiting or running: no longer live, read from the database.
    assert!(matches!(&*b.lock(), Role::Driving(live) if live.is_empty()));
    assert_eq!(stages(&b, cid), after);
    assert!(!b.store_connected(&id("later"), &Labels::default(), UnixMs(11_000)));
    assert!(matches!(
        b.cancel(cid, UnixMs(11_000)),
        Err(CancelError::Finished(CollectionState::Expired))
    ));
}

/// A following book (a replica that does not drive collections) writes new collections
/// to the store and plans, ends and expires nothing; the driving book adopts what others
/// created, and a book that drives again takes up exactly what the store has.
#[test]
fn a_following_book_stores_and_the_driver_adopts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let driver = book(&path);
    let follower = Book::open(Store::new(
        crate::db::Location::Sqlite(path.clone()).connect().unwrap(),
    ));
    assert!(!follower.driving());

    let c = collection(Target::All, 5, &["a", "b"]);
    let cid = c.spec.id;
    follower.create(c, Vec::new).unwrap();
    assert!(follower.plan(|_| true).is_empty(), "a follower asks nobody");
    assert!(!follower.store_connected(&id("late"), &Labels::default(), UnixMs(2_000)));
    follower.expire(UnixMs(i64::MAX));
    assert_eq!(follower.waiting(), 0);
    assert_eq!(stages(&follower, cid).len(), 2, "read from the store");

    assert_eq!(driver.waiting(), 0, "not adopted yet");
    assert_eq!(driver.adopt_new().unwrap(), 1);
    assert_eq!(driver.adopt_new().unwrap(), 0, "adopted once");
    let planned = driver.plan(|_| true);
    assert_eq!(planned.len(), 2);
    assert_eq!(
        stages(&follower, cid),
        stages(&driver, cid),
        "the follower reads what the driver wrote through"
    );

    // The driver's role moves: the new driver takes the running stores from the store.
    driver.follow();
    assert!(driver.plan(|_| true).is_empty());
    assert!(follower.drive().unwrap());
    assert!(!follower.drive().unwrap(), "already driving");
    assert_eq!(follower.running().len(), 2);
    follower.upload_ended(&ended(&planned[0], UploadState::Completed), UnixMs(3_000));
    assert!(matches!(stages(&driver, cid)[0].1, Stage::Completed { .. }));
}

/// A store recorded as asked whose upload was never created waits again; cancelling
/// returns the running uploads and ends the waiting stores.
#[test]
fn a_store_never_asked_waits_again_and_a_cancel_ends_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let b = book(&dir.path().join("b.db"));
    let c = collection(
        Target::Ids {
            client_ids: vec![id("a"), id("b"), id("c")],
        },
        2,
        &["a", "b", "c"],
    );
    let cid = c.spec.id;
    b.create(c, Vec::new).unwrap();
    let planned = b.plan(|_| true);
    assert_eq!(b.running().len(), 2);
    b.never_asked(cid, &planned[0].client_id, planned[0].upload);
    assert_eq!(b.running().len(), 1);
    let running = b.cancel(cid, UnixMs(5_000)).unwrap();
    assert_eq!(running, vec![planned[1].upload]);
    let after = stages(&b, cid);
    let cancelled = after
        .iter()
        .filter(|(_, s)| *s == Stage::Cancelled { upload: None })
        .count();
    assert_eq!(cancelled, 2, "{after:?}");
    assert!(
        b.plan(|_| true).is_empty(),
        "a cancelled collection asks nobody"
    );
    // Live until its running upload ends.
    b.upload_ended(&ended(&planned[1], UploadState::Cancelled), UnixMs(6_000));
    assert!(matches!(&*b.lock(), Role::Driving(live) if live.is_empty()));
    assert!(matches!(
        b.cancel(cid, UnixMs(7_000)),
        Err(CancelError::Finished(_))
    ));
    assert!(matches!(
        b.cancel(CollectionId::new_random(), UnixMs(7_000)),
        Err(CancelError::NotFound)
    ));
}

#[test]
fn the_role_is_watched_as_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::db::Location::Sqlite(dir.path().join("b.db"))
        .connect()
        .unwrap();
    let book = Book::open(Store::new(db));
    let mut watch = book.watch_driving();
    assert!(!*watch.borrow_and_update());

    assert!(book.drive().unwrap());
    assert!(watch.has_changed().unwrap());
    assert!(*watch.borrow_and_update());
    // Driving again changes nothing, and says nothing.
    assert!(!book.drive().unwrap());
    assert!(!watch.has_changed().unwrap());

    book.follow();
    assert!(watch.has_changed().unwrap());
    assert!(!*watch.borrow_and_update());
    book.follow();
    assert!(!watch.has_changed().unwrap());
}
