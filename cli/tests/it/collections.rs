//! Collections: one file from many stores, including stores offline when it is created, with
//! a limit on how many upload at once, cancellation, a manifest, and a restart in the middle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shared::api::UploadState;
use shared::api::collections::{CollectionRows, CollectionSummary, Manifest, RowState};

use crate::harness::*;

/// `POST /collections` with `body`, as the test operator.
async fn create(server: &TestServer, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = server
        .http_client()
        .post(format!("{}/collections", server.http_url()))
        .bearer_auth(operator_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

async fn created(server: &TestServer, body: serde_json::Value) -> CollectionSummary {
    let (status, body) = create(server, body).await;
    assert_eq!(status, 201, "{body}");
    serde_json::from_value(body).unwrap()
}

async fn summary(server: &TestServer, id: &str) -> CollectionSummary {
    let (status, body) = server.get_json(&format!("/collections/{id}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Every row, by client id.
async fn rows(
    server: &TestServer,
    id: &str,
) -> BTreeMap<String, shared::api::collections::CollectionRow> {
    let (status, body) = server.get_json(&format!("/collections/{id}/uploads")).await;
    assert_eq!(status, 200, "{body}");
    let page: CollectionRows = serde_json::from_value(body).unwrap();
    assert!(page.next_after.is_none());
    page.rows
        .into_iter()
        .map(|r| (r.client_id.as_str().to_owned(), r))
        .collect()
}

async fn wait_summary(
    server: &TestServer,
    id: &str,
    what: &str,
    cond: impl Fn(&CollectionSummary) -> bool,
) -> CollectionSummary {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = summary(server, id).await;
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {:?}",
            s.counts
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Six stores named by id: three connected, two seen before but offline, and one never seen.
/// `cli collect --wait --output-dir` runs while the two offline stores come back: their files
/// arrive too, byte-identical. The store that never showed up is `not_reached` at the expiry and
/// is not asked when it connects afterwards. The manifest lists the five, as JSON and CSV, with
/// URLs that serve the stores' bytes.
async fn offline_stores_are_asked_when_they_connect(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..6).map(|i| unique_client(&format!("coll{i}"))).collect();
    let mut shas = BTreeMap::new();
    let mut files = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let file = dir.path().join(format!("z-{i}.csv"));
        // Different sizes, so that every store's bytes differ; one spans two parts.
        let len = if i == 1 {
            9 * MIB
        } else {
            1000 + i as u64 * 777
        };
        shas.insert(id.clone(), write_file(&file, len).await);
        files.push(file);
    }
    let agent = |i: usize| TestAgent::start(&server, &ids[i], &files[i]);
    let online: Vec<TestAgent> = (0..3).map(agent).collect();
    for id in &ids[..3] {
        server.wait_connected(id).await;
    }
    // Stores 3 and 4 are known, and offline; store 5 was never seen.
    for i in [3, 4] {
        let a = agent(i);
        server.wait_connected(&ids[i]).await;
        drop(a);
        server.wait_disconnected(&ids[i]).await;
    }

    let out_dir = dir.path().join("out");
    let mut args = vec![
        "collect".to_owned(),
        "--output-dir".into(),
        out_dir.display().to_string(),
        "--expires-in-secs".into(),
        "12".into(),
        "--json".into(),
    ];
    for id in &ids {
        args.extend(["--client-id".into(), id.clone()]);
    }
    let cli = {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let token = operator_token();
        let server_url = server.http_url();
        let bin = env!("CARGO_BIN_EXE_cli");
        let mut cmd = tokio::process::Command::new(bin);
        cmd.env("SERVER_URL", server_url)
            .env("API_TOKEN", token)
            .args(args);
        cmd.kill_on_drop(true).output()
    };
    let cli = tokio::spawn(cli);

    // The collection exists, its three connected stores are asked; then 3 and 4 come back.
    let mut id = String::new();
    wait_until(
        Duration::from_secs(30),
        "the collection is created",
        || async {
            let (_, body) = server.get_json("/collections").await;
            body["collections"].as_array().is_some_and(|l| l.len() == 1)
        },
    )
    .await;
    let (_, list) = server.get_json("/collections").await;
    id.push_str(list["collections"][0]["collection_id"].as_str().unwrap());
    let first = summary(&server, &id).await;
    assert_eq!(first.counts.matched, 6, "{:?}", first.counts);
    wait_summary(&server, &id, "the connected stores complete", |s| {
        s.counts.completed == 3
    })
    .await;
    let s = summary(&server, &id).await;
    assert_eq!(s.counts.pending_offline, 3, "{:?}", s.counts);
    let _back: Vec<TestAgent> = [3, 4].into_iter().map(agent).collect();

    let out = cli.await.unwrap().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let last: CollectionSummary = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        last.state,
        shared::api::collections::CollectionState::Expired
    );
    assert_eq!(
        (
            last.counts.completed,
            last.counts.not_reached,
            last.counts.failed
        ),
        (5, 1, 0),
        "{:?}",
        last.counts
    );
    for (i, id) in ids.iter().enumerate().take(5) {
        let path = out_dir.join(id).join("default");
        let bytes = tokio::fs::read(&path).await.unwrap();
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            shas[id],
            "store {i}'s file"
        );
    }
    assert!(!out_dir.join(&ids[5]).exists(), "the store not reached");

    let by_store = rows(&server, &id).await;
    assert_eq!(by_store[&ids[5]].state, RowState::NotReached);
    assert!(by_store[&ids[5]].upload_id.is_none());
    for id in &ids[..5] {
        let row = &by_store[id];
        assert_eq!(row.state, RowState::Completed, "{row:?}");
        assert_eq!(row.sha256.as_deref(), Some(shas[id].as_str()));
        let upload = server.upload(&row.upload_id.unwrap().to_string()).await;
        assert_eq!(
            upload.collection_id.map(|c| c.to_string()),
            Some(id_of(&last))
        );
    }

    // The store that never showed up connects after the expiry: it is not asked.
    let late = agent(5);
    server.wait_connected(&ids[5]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.client(&ids[5]).await.last_upload.is_none());
    drop(late);

    // The manifest: JSON and CSV, each URL serving that store's bytes.
    let (status, body) = server
        .get_json(&format!("/collections/{id}/manifest"))
        .await;
    assert_eq!(status, 200, "{body}");
    let manifest: Manifest = serde_json::from_value(body).unwrap();
    assert_eq!(manifest.entries.len(), 5);
    for e in &manifest.entries {
        let bytes = reqwest::get(&e.url).await.unwrap().bytes().await.unwrap();
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            shas[e.client_id.as_str()]
        );
        assert_eq!(
            e.sha256.as_deref(),
            Some(shas[e.client_id.as_str()].as_str())
        );
    }
    let csv = run_cli(&server, &["collection", "manifest", &id, "--csv"]).await;
    assert!(csv.status.success(), "{}", stderr(&csv));
    let text = stdout(&csv);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("client_id,upload_id,key,size,sha256,url")
    );
    assert_eq!(lines.count(), 5, "{text}");
    drop(online);
}

fn id_of(s: &CollectionSummary) -> String {
    s.collection_id.to_string()
}

storage_modes!(offline_stores_are_asked_when_they_connect, |mode| {
    offline_stores_are_asked_when_they_connect(mode)
});

/// A label target and a glob target match exactly their stores, offline ones included, and a
/// store that connects later and matches joins; one that does not match stays out.
async fn label_and_glob_targets_match_exactly_their_stores(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.csv");
    write_file(&file, 500).await;
    let agent = |id: &str, region: &str| {
        TestAgent::start_with(
            &server,
            id,
            &file,
            &["--label", &format!("region={region}")],
        )
    };
    let _a = agent("match-rest-1", "north");
    let _b = agent("match-rest-2", "south");
    let _c = agent("match-shop-1", "north");
    for id in ["match-rest-1", "match-rest-2", "match-shop-1"] {
        server.wait_connected(id).await;
    }
    let d = agent("match-rest-3", "north");
    server.wait_connected("match-rest-3").await;
    drop(d);
    server.wait_disconnected("match-rest-3").await;

    // A dry run counts the stores a target would ask, connected or not, and creates nothing.
    let out = run_cli(
        &server,
        &["collect", "--label", "region=north", "--dry-run", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let preview: shared::api::collections::CollectionPreview =
        serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (preview.matched, preview.connected, preview.offline),
        (3, 2, 1)
    );
    let (_, list) = server.get_json("/collections").await;
    assert_eq!(list["collections"].as_array().unwrap().len(), 0);

    let by_glob = created(
        &server,
        serde_json::json!({"target": {"kind": "glob", "pattern": "match-rest-*"}}),
    )
    .await;
    let by_label = created(
        &server,
        serde_json::json!({"target": {"kind": "labels", "labels": ["region=north"]}}),
    )
    .await;
    let names = |rows: BTreeMap<String, _>| rows.into_keys().collect::<Vec<_>>();
    assert_eq!(
        names(rows(&server, &id_of(&by_glob)).await),
        ["match-rest-1", "match-rest-2", "match-rest-3"]
    );
    assert_eq!(
        names(rows(&server, &id_of(&by_label)).await),
        ["match-rest-1", "match-rest-3", "match-shop-1"]
    );
    // Live matching: a new store that matches the glob joins; one that matches neither does not.
    let _e = agent("match-rest-9", "east");
    let _f = agent("other-1", "east");
    server.wait_connected("match-rest-9").await;
    server.wait_connected("other-1").await;
    wait_summary(&server, &id_of(&by_glob), "the new store joins", |s| {
        s.counts.matched == 4
    })
    .await;
    let glob_rows = rows(&server, &id_of(&by_glob)).await;
    assert!(glob_rows.contains_key("match-rest-9"));
    assert!(!glob_rows.contains_key("other-1"));
    assert_eq!(summary(&server, &id_of(&by_label)).await.counts.matched, 3);
    // The connected stores of both complete; the offline one is pending in both.
    let s = wait_summary(
        &server,
        &id_of(&by_label),
        "the label collection runs",
        |s| s.counts.completed == 2,
    )
    .await;
    assert_eq!(s.counts.pending_offline, 1, "{:?}", s.counts);
    let s = wait_summary(&server, &id_of(&by_glob), "the glob collection runs", |s| {
        s.counts.completed == 3
    })
    .await;
    assert!(!s.settled, "match-rest-3 is still to come");

    // Rows filtered by state, and by the code a store failed with.
    let (_, body) = server
        .get_json(&format!(
            "/collections/{}/uploads?state=pending_offline",
            id_of(&by_glob)
        ))
        .await;
    let offline: CollectionRows = serde_json::from_value(body).unwrap();
    let names: Vec<&str> = offline.rows.iter().map(|r| r.client_id.as_str()).collect();
    assert_eq!(names, ["match-rest-3"]);
    let missing = created(
        &server,
        serde_json::json!({"target": {"kind": "ids", "client_ids": ["match-shop-1", "match-rest-1"]},
                           "file": "no-such-share"}),
    )
    .await;
    let s = wait_summary(&server, &id_of(&missing), "both fail", |s| {
        s.counts.failed == 2
    })
    .await;
    let (code, n) = s.failed_by_code.iter().next().unwrap();
    assert_eq!(
        (code.as_str(), *n),
        ("FILE_NOT_SHARED", 2),
        "{:?}",
        s.failed_by_code
    );
    for (query, expected) in [
        ("code=FILE_NOT_SHARED", 2),
        ("code=STALLED", 0),
        ("state=failed&limit=1", 1),
    ] {
        let (status, body) = server
            .get_json(&format!("/collections/{}/uploads?{query}", id_of(&missing)))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["rows"].as_array().unwrap().len(),
            expected,
            "{query}: {body}"
        );
    }
    let (status, body) = server
        .get_json(&format!(
            "/collections/{}/uploads?code=NOPE",
            id_of(&missing)
        ))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );
    let out = run_cli(
        &server,
        &["collection", &id_of(&missing), "--code", "FILE_NOT_SHARED"],
    )
    .await;
    assert!(stdout(&out).contains("match-shop-1"), "{}", stdout(&out));

    // Rows page by client id.
    let glob_id = id_of(&by_glob);
    let page = |q: String| {
        let (server, glob_id) = (&server, &glob_id);
        async move {
            let (status, body) = server
                .get_json(&format!("/collections/{glob_id}/uploads?{q}"))
                .await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_value::<CollectionRows>(body).unwrap()
        }
    };
    let first = page("limit=3".into()).await;
    assert_eq!(first.rows.len(), 3);
    let next = first.next_after.clone().unwrap();
    assert_eq!(next.as_str(), "match-rest-3");
    let second = page(format!("limit=3&after={next}")).await;
    let rest: Vec<&str> = second.rows.iter().map(|r| r.client_id.as_str()).collect();
    assert_eq!(rest, ["match-rest-9"]);
    assert!(second.next_after.is_none());
}

/// Drives one raw agent (protocol 2, as agents in the field still speak): it uploads every file
/// it is asked for, holding each for `hold`, and counts the uploads in flight at once across
/// agents.
fn busy_agent(
    mut agent: RawAgent,
    data: Vec<u8>,
    hold: Duration,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(msg) = agent.recv_json().await {
            if msg["type"] != "describe_file" {
                continue;
            }
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let (upload_id, plan) = describe(&mut agent, &msg, &data).await;
            tokio::time::sleep(hold).await;
            let etag = store(&plan, &data).await;
            // Over once stored, before the server hears of it and frees the slot.
            in_flight.fetch_sub(1, Ordering::SeqCst);
            report_completed(&mut agent, &upload_id, &etag).await;
        }
    })
}

/// Answers a `describe_file` with `data` (one part, protocol 2); returns the upload id and the
/// plan that follows.
async fn describe(
    agent: &mut RawAgent,
    describe_file: &serde_json::Value,
    data: &[u8],
) -> (String, serde_json::Value) {
    let upload_id = describe_file["upload_id"].as_str().unwrap().to_owned();
    let min_part_size = describe_file["min_part_size"].as_u64().unwrap();
    agent
        .send_json(file_info(&upload_id, "z.csv", data, min_part_size))
        .await;
    let plan = loop {
        let m = agent.recv_json().await.unwrap();
        if m["type"] == "start_upload" {
            break m;
        }
    };
    (upload_id, plan)
}

/// Stores the one part of `plan` and completes the multipart upload; returns the part's ETag.
async fn store(plan: &serde_json::Value, data: &[u8]) -> String {
    let etag = raw_s3::put_planned_part(plan, 0, data.to_vec()).await;
    let resp = raw_s3::complete(plan, std::slice::from_ref(&etag)).await;
    assert!(resp.status().is_success(), "{}", resp.status());
    etag
}

/// Tells the server the one-part upload is complete.
async fn report_completed(agent: &mut RawAgent, upload_id: &str, etag: &str) {
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id,
            "parts": [{"part_number": 1, "etag": etag}]
        }))
        .await;
}

/// `max_concurrent = 2` over six stores: never more than two upload at once, as the stores
/// count it, and all six complete. A store busy with an operator's own download when the
/// collection starts gets the collection's upload after that one ends.
async fn max_concurrent_is_never_exceeded(mode: Mode) {
    let server = TestServer::start(mode).await;
    let ids: Vec<String> = (0..6).map(|i| unique_client(&format!("conc{i}"))).collect();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // The busy store is asked for its own download first; it is not counted.
    let mut first = RawAgent::connect(&server, &ids[0]).await;
    let (status, manual) = server.trigger(&ids[0]).await;
    assert_eq!(status, 202, "{manual}");
    let manual_id = manual["upload_id"].as_str().unwrap().to_owned();
    let asked = first.recv_json().await.unwrap();
    assert_eq!(asked["upload_id"], manual_id.as_str());
    for id in &ids[1..] {
        let agent = RawAgent::connect(&server, id).await;
        tasks.push(busy_agent(
            agent,
            vec![3u8; 2000],
            Duration::from_millis(300),
            in_flight.clone(),
            most.clone(),
        ));
    }
    let c = created(
        &server,
        serde_json::json!({
            "target": {"kind": "ids", "client_ids": ids},
            "max_concurrent": 2
        }),
    )
    .await;
    let cid = id_of(&c);
    assert_eq!(c.counts.matched, 6);
    // While the busy store's download runs, its row waits (queued).
    let s = summary(&server, &cid).await;
    assert!(s.counts.queued >= 1, "{:?}", s.counts);
    assert_eq!(rows(&server, &cid).await[&ids[0]].state, RowState::Queued);
    // Now it finishes its own download; the agent task takes over for the collection's.
    let data = vec![5u8; 1500];
    let (upload_id, plan) = describe(&mut first, &asked, &data).await;
    assert_eq!(upload_id, manual_id);
    let etag = store(&plan, &data).await;
    report_completed(&mut first, &manual_id, &etag).await;
    tasks.push(busy_agent(
        first,
        vec![4u8; 1200],
        Duration::from_millis(300),
        in_flight.clone(),
        most.clone(),
    ));
    let manual = server.wait_finished(&manual_id).await;
    assert_eq!(manual.state, UploadState::Completed);
    let s = wait_summary(&server, &cid, "all six complete", |s| {
        s.counts.completed == 6
    })
    .await;
    assert!(s.settled);
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "two at once, and never more"
    );
    let busy_row = &rows(&server, &cid).await[&ids[0]];
    let collection_upload = server
        .upload(&busy_row.upload_id.unwrap().to_string())
        .await;
    assert_ne!(collection_upload.upload_id.to_string(), manual_id);
    assert!(collection_upload.created_at >= manual.finished_at.unwrap());
    for t in tasks {
        t.abort();
    }
}

storage_modes!(max_concurrent_is_never_exceeded, |mode| {
    max_concurrent_is_never_exceeded(mode)
});

/// A collection cancelled halfway: two stores hold their multipart uploads open, two more wait
/// for a slot. The cancel aborts both multipart uploads, and every store ends `cancelled`.
async fn a_cancelled_collection_aborts_every_unfinished_upload(mode: Mode) {
    let server = TestServer::start(mode).await;
    let ids: Vec<String> = (0..4)
        .map(|i| unique_client(&format!("cancel{i}")))
        .collect();
    let mut agents = Vec::new();
    for id in &ids {
        agents.push(RawAgent::connect(&server, id).await);
    }
    let c = created(
        &server,
        serde_json::json!({
            "target": {"kind": "ids", "client_ids": ids},
            "max_concurrent": 2
        }),
    )
    .await;
    let cid = id_of(&c);
    // The two stores asked describe their files and get their plans; they hold them.
    let mut holding = Vec::new();
    let data = vec![9u8; 6 * MIB as usize];
    wait_summary(&server, &cid, "two run", |s| s.counts.running == 2).await;
    let by_store = rows(&server, &cid).await;
    for (i, id) in ids.iter().enumerate() {
        if by_store[id].state != RowState::Running {
            continue;
        }
        let agent = &mut agents[i];
        let asked = agent.recv_json().await.unwrap();
        assert_eq!(asked["type"], "describe_file", "{asked}");
        // The plan means the multipart upload exists; the store holds it open.
        describe(agent, &asked, &data).await;
        holding.push(id.clone());
    }
    assert_eq!(holding.len(), 2);
    for id in &holding {
        assert_eq!(server.in_progress_multiparts(id).await, 1);
    }
    let out = run_cli(&server, &["collection", "cancel", &cid, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = wait_summary(&server, &cid, "every store cancelled", |s| {
        s.counts.cancelled == 4
    })
    .await;
    assert_eq!(
        s.state,
        shared::api::collections::CollectionState::Cancelled
    );
    assert!(s.settled);
    for id in &holding {
        assert_eq!(
            server.in_progress_multiparts(id).await,
            0,
            "{id}'s upload aborted"
        );
    }
    // A second cancel has nothing to cancel.
    let again = run_cli(&server, &["collection", "cancel", &cid]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("COLLECTION_FINISHED"),
        "{}",
        stderr(&again)
    );
}

storage_modes!(
    a_cancelled_collection_aborts_every_unfinished_upload,
    |mode| { a_cancelled_collection_aborts_every_unfinished_upload(mode) }
);

/// A server restart in the middle: the collection and its rows are back, a completed store
/// stays completed, and the store that was offline is asked when it connects to the new server.
async fn a_collection_survives_a_restart(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(mode)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let file = dir.path().join("f.csv");
    let sha = write_file(&file, 4321).await;
    let (here, later) = ("restart-here", "restart-later");
    let a = TestAgent::start(&server, here, &file);
    server.wait_connected(here).await;
    let c = created(
        &server,
        serde_json::json!({"target": {"kind": "ids", "client_ids": [here, later]}}),
    )
    .await;
    let cid = id_of(&c);
    wait_summary(&server, &cid, "the connected store completes", |s| {
        s.counts.completed == 1
    })
    .await;
    drop(a);
    let addr = server.api_addr;
    server.stop().await;

    let server = TestServer::builder(mode).at(addr, &data_dir).start().await;
    let s = summary(&server, &cid).await;
    assert_eq!(
        (
            s.counts.completed,
            s.counts.pending_offline,
            s.state.as_str()
        ),
        (1, 1, "open"),
        "{:?}",
        s.counts
    );
    let out = run_cli(&server, &["collections", "--json"]).await;
    assert!(stdout(&out).contains(&cid), "{}", stdout(&out));
    assert_eq!(server.metric("backhaul_collection_stores_pending").await, 1);
    assert_eq!(
        server.metric("backhaul_collections{state=\"open\"}").await,
        1
    );
    // A hostile page cursor is refused with its code.
    let (status, body) = server
        .get_json(&format!("/collections/{cid}/uploads?after=..%2Fetc"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_CLIENT_ID"))
    );
    let _b = TestAgent::start(&server, later, &file);
    let s = wait_summary(&server, &cid, "the late store completes", |s| s.settled).await;
    assert_eq!(s.counts.completed, 2, "{:?}", s.counts);
    assert_eq!(
        rows(&server, &cid).await[later].sha256.as_deref(),
        Some(sha.as_str())
    );
}

/// Bad input gets a clear code and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_collection_requests_get_clear_codes() {
    let server = TestServer::start(Mode::Embedded).await;
    for (body, code) in [
        (
            serde_json::json!({"target": {"kind": "glob", "pattern": "a-["}}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "labels", "labels": ["Nope"]}}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "ids", "client_ids": ["../etc"]}}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "everyone"}}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "all"}, "max_concurrent": 0}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "all"}, "file": "../x"}),
            "INVALID_FILE_NAME",
        ),
        (
            serde_json::json!({"target": {"kind": "all"}, "expires_at": "2001-01-01T00:00:00Z"}),
            "BAD_REQUEST",
        ),
        (
            serde_json::json!({"target": {"kind": "all"}, "colour": "red"}),
            "BAD_REQUEST",
        ),
    ] {
        let (status, answer) = create(&server, body.clone()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{body} -> {answer}"
        );
    }
    let (_, list) = server.get_json("/collections").await;
    assert_eq!(list["collections"].as_array().unwrap().len(), 0);
    for (path, status, code) in [
        ("/collections/not-a-uuid", 400, "INVALID_COLLECTION_ID"),
        (
            "/collections/00000000-0000-4000-8000-000000000000",
            404,
            "COLLECTION_NOT_FOUND",
        ),
        (
            "/collections/00000000-0000-4000-8000-000000000000/manifest",
            404,
            "COLLECTION_NOT_FOUND",
        ),
    ] {
        let (got, body) = server.get_json(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    let out = run_cli(&server, &["collect", "--file", "z"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--all"), "{}", stderr(&out));
}

fn parse_time(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

/// The collections a schedule created, by firing.
async fn fired(server: &TestServer, schedule: &str) -> Vec<CollectionSummary> {
    let (status, body) = server.get_json("/collections?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let list: shared::api::collections::CollectionList = serde_json::from_value(body).unwrap();
    let mut mine: Vec<CollectionSummary> = list
        .collections
        .into_iter()
        .filter(|c| c.schedule_id.map(|s| s.to_string()).as_deref() == Some(schedule))
        .collect();
    mine.sort_by(|a, b| a.fired_at.cmp(&b.fired_at));
    mine
}

/// A schedule that fires every two seconds creates collections, each of which reaches the
/// store. The server stops over several firings: when it is back, the latest missed firing runs
/// once (not once per missed firing), and the schedule goes on. Deleted, it fires no more.
async fn a_schedule_fires_and_a_missed_firing_runs_once_after_a_restart(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(mode)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let file = dir.path().join("f.csv");
    write_file(&file, 2222).await;
    let store = "scheduled-store";
    let agent = TestAgent::start(&server, store, &file);
    server.wait_connected(store).await;
    let out = run_cli(
        &server,
        &[
            "schedule",
            "create",
            "--cron",
            "*/2 * * * * *",
            "--time-zone",
            "Europe/Berlin",
            "--client-id",
            store,
            "--expires-in-secs",
            "600",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let schedule: shared::api::collections::ScheduleInfo =
        serde_json::from_str(&stdout(&out)).unwrap();
    let sid = schedule.schedule_id.to_string();
    assert!(schedule.next_fire_at.is_some());

    wait_until(Duration::from_secs(30), "two firings completed", || async {
        fired(&server, &sid)
            .await
            .iter()
            .filter(|c| c.counts.completed == 1)
            .count()
            >= 2
    })
    .await;
    drop(agent);
    server.wait_disconnected(store).await;
    let addr = server.api_addr;
    server.stop().await;
    let stopped = time::OffsetDateTime::now_utc();
    // Down over at least three firings. The server comes back 100 ms after a firing was due
    // (firings fall on even seconds), so that the one firing it missed last is the one just
    // before it started, and no regular firing falls due while it starts.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let now = time::OffsetDateTime::now_utc();
    let past_even = i64::from(now.second() % 2) * 1_000_000_000 + i64::from(now.nanosecond());
    let due = now - time::Duration::nanoseconds(past_even) + time::Duration::seconds(2);
    tokio::time::sleep((due - now + time::Duration::milliseconds(100)).unsigned_abs()).await;
    let starting = time::OffsetDateTime::now_utc();
    let server = TestServer::builder(mode).at(addr, &data_dir).start().await;
    let restarted = time::OffsetDateTime::now_utc();
    assert!(
        restarted - due < time::Duration::milliseconds(1900),
        "the server took until {restarted} to start, past the next firing after {due}"
    );
    let _agent = TestAgent::start(&server, store, &file);
    // The next regular firing after the restart, then look at what the downtime left.
    wait_until(
        Duration::from_secs(30),
        "a firing after the restart",
        || async {
            fired(&server, &sid)
                .await
                .iter()
                .any(|c| parse_time(c.fired_at.as_deref().unwrap()) > restarted)
        },
    )
    .await;
    let all = fired(&server, &sid).await;
    let in_downtime: Vec<_> = all
        .iter()
        .filter(|c| {
            let at = parse_time(c.fired_at.as_deref().unwrap());
            at > stopped && at < restarted
        })
        .collect();
    assert_eq!(
        in_downtime.len(),
        1,
        "one missed firing runs: {in_downtime:?}"
    );
    // The latest missed firing: the schedule fires every 2 s, so an earlier one would be more
    // than 2 s before the restart.
    let missed = parse_time(in_downtime[0].fired_at.as_deref().unwrap());
    assert!(
        restarted - missed <= time::Duration::seconds(2),
        "{missed} vs {restarted}"
    );
    assert!(
        parse_time(&in_downtime[0].created_at) > starting,
        "run after the restart"
    );
    // Every collection of the schedule reaches the store.
    wait_until(
        Duration::from_secs(60),
        "every firing completes",
        || async { fired(&server, &sid).await.iter().all(|c| c.settled) },
    )
    .await;
    assert!(
        fired(&server, &sid)
            .await
            .iter()
            .all(|c| c.counts.completed == 1)
    );

    let out = run_cli(&server, &["schedule", "delete", &sid]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let count = fired(&server, &sid).await.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fired(&server, &sid).await.len(),
        count,
        "no firing once deleted"
    );
    let (status, body) = server.get_json(&format!("/schedules/{sid}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("SCHEDULE_NOT_FOUND"))
    );
    let (status, body) = server.get_json("/schedules/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_SCHEDULE_ID"))
    );
    for bad in [
        serde_json::json!({"cron": "61 * * * *", "template": {"target": {"kind": "all"}}}),
        serde_json::json!({"cron": "@daily", "time_zone": "Mars/Base", "template": {"target": {"kind": "all"}}}),
        serde_json::json!({"cron": "@daily", "template": {"target": {"kind": "glob", "pattern": "["}}}),
        serde_json::json!({"cron": "@daily", "template": {"target": {"kind": "all"}, "expires_in_secs": 0}}),
    ] {
        let resp = server
            .http_client()
            .post(format!("{}/schedules", server.http_url()))
            .bearer_auth(operator_token())
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
    }
}

storage_modes!(label_and_glob_targets_match_exactly_their_stores, |mode| {
    label_and_glob_targets_match_exactly_their_stores(mode)
});

storage_modes!(a_collection_survives_a_restart, |mode| {
    a_collection_survives_a_restart(mode)
});

storage_modes!(schedule_fires_and_runs_a_missed_firing_once, |mode| {
    a_schedule_fires_and_a_missed_firing_runs_once_after_a_restart(mode)
});
