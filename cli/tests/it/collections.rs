//! Collections: one file from many stores, including stores offline when it is created, targets
//! by label and glob, a manifest, a restart in the middle, and bad requests. The helpers here
//! serve `collection_slots.rs` too (the limit on uploads at once, and a cancel halfway).

use std::collections::BTreeMap;
use std::time::Duration;

use shared::api::collections::{CollectionRows, CollectionSummary, Manifest, RowState};

use crate::harness::*;

/// `POST /collections` with `body`, as the test operator.
async fn create(server: &TestServer, body: serde_json::Value) -> (u16, serde_json::Value) {
    let url = format!("{}/collections", server.http_url());
    server
        .as_operator(server.http_client().post(url).json(&body))
        .await
}

pub(crate) async fn created(server: &TestServer, body: serde_json::Value) -> CollectionSummary {
    let (status, body) = create(server, body).await;
    assert_eq!(status, 201, "{body}");
    serde_json::from_value(body).unwrap()
}

pub(crate) async fn summary(server: &TestServer, id: &str) -> CollectionSummary {
    let (status, body) = server.get_json(&format!("/collections/{id}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Every row, by client id.
pub(crate) async fn rows(
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

pub(crate) async fn wait_summary(
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

pub(crate) fn id_of(s: &CollectionSummary) -> String {
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

storage_modes!(label_and_glob_targets_match_exactly_their_stores, |mode| {
    label_and_glob_targets_match_exactly_their_stores(mode)
});

storage_modes!(a_collection_survives_a_restart, |mode| {
    a_collection_survives_a_restart(mode)
});
