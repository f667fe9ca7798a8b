//! Collections over several replicas: one replica drives them, behind a lease that moves when
//! it dies or restarts, and any replica creates, reads and cancels them.

use std::time::Duration;

use crate::harness::*;
use crate::replicas::{killable_replica, replica, replica_args};

/// Two replicas on LocalStack and one open collection: A, a process of its own started first
/// so that it takes the leases and drives the collections, and B, through which the collection
/// was created for a store that never connects. A has taken it on.
pub(crate) struct DrivenByA {
    pub a_proc: ChildProcess,
    pub a: TestServer,
    pub b: TestServer,
    pub collection_id: String,
    /// `DELETE /collections/{id}` on B.
    pub cancel_url: String,
    /// A's data and the token keys.
    _dir: tempfile::TempDir,
}

pub(crate) async fn a_collection_driven_by_a() -> DrivenByA {
    let mode = Mode::LocalStack;
    let database = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token-keys.json");
    let (a_proc, a) = killable_replica(
        mode,
        &dir.path().join("a"),
        replica_args(&database, &key_file, "a"),
        &localstack_endpoint(),
        None,
    )
    .await;
    let b_args = replica_args(&database, &key_file, "b");
    let b = TestServer::builder(mode)
        .args(&b_args.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .await;
    let collection = crate::collections::created(
        &b,
        serde_json::json!({"target": {"kind": "ids", "client_ids": [unique_client("absent")]}}),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "A takes the collection on",
        || async { a.metric("backhaul_collection_stores_pending").await == 1 },
    )
    .await;
    assert_eq!(b.metric("backhaul_collection_stores_pending").await, 0);
    let collection_id = collection.collection_id.to_string();
    let cancel_url = format!("{}/collections/{collection_id}", b.http_url());
    DrivenByA {
        a_proc,
        a,
        b,
        collection_id,
        cancel_url,
        _dir: dir,
    }
}

/// A second cancel of a collection that has ended is refused, `COLLECTION_FINISHED` (409).
pub(crate) async fn assert_cancel_refused_as_finished(server: &TestServer, cancel_url: &str) {
    let (status, body) = server
        .as_operator(server.http_client().delete(cancel_url))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("COLLECTION_FINISHED")),
        "{body}"
    );
}

/// kill -9 of the replica that drives the collections, and at once a cancel of an open
/// collection through the other: no replica drives them for a moment, until the other takes the
/// lease at its next tick; the cancel waits for that rather than answer `TIMEOUT`, and the new
/// driver carries it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_just_after_the_driver_died_is_carried_out_by_the_next() {
    let DrivenByA {
        mut a_proc,
        b,
        cancel_url,
        ..
    } = a_collection_driven_by_a().await;

    a_proc.kill9().await;
    let (status, body) = b.as_operator(b.http_client().delete(&cancel_url)).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    assert_eq!(b.metric("backhaul_collection_stores_pending").await, 0);
    assert_cancel_refused_as_finished(&b, &cancel_url).await;
}

/// A collection created on A over stores connected to A, B and C completes, whichever replica
/// drives collections; every replica answers `GET /collections/{id}` the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_over_three_replicas_completes() {
    let database = fresh_database();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("token-keys.json");
    let a = replica(Mode::Embedded, &database, &key_file, "a", None).await;
    let store = Some(a.s3_endpoint.as_str());
    let b = replica(Mode::Embedded, &database, &key_file, "b", store).await;
    let c = replica(Mode::Embedded, &database, &key_file, "c", store).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.csv");
    let sha = write_file(&file, 3 * MIB + 5).await;
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (i, server) in [&a, &b, &c, &a, &b, &c].into_iter().enumerate() {
        let client_id = unique_client(&format!("spread-{i}"));
        agents.push(TestAgent::start(server, &client_id, &file));
        server.wait_connected(&client_id).await;
        ids.push(client_id);
    }
    let resp = a
        .http_client()
        .post(format!("{}/collections", a.http_url()))
        .bearer_auth(operator_token())
        .json(&serde_json::json!({
            "target": {"kind": "ids", "client_ids": ids},
            "max_concurrent": 4,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let created: serde_json::Value = resp.json().await.unwrap();
    let path = format!(
        "/collections/{}",
        created["collection_id"].as_str().unwrap()
    );
    wait_until(
        Duration::from_secs(60),
        "the collection completes",
        || async {
            let (_, s) = a.get_json(&path).await;
            s["counts"]["completed"] == ids.len()
        },
    )
    .await;
    let (_, on_a) = a.get_json(&path).await;
    for other in [&b, &c] {
        let (code, there) = other.get_json(&path).await;
        assert_eq!(code, 200, "{there}");
        assert_eq!(there, on_a, "every replica answers the same");
    }
    let (_, rows) = c.get_json(&format!("{path}/uploads")).await;
    let rows = rows["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), ids.len());
    for row in rows {
        assert_eq!(row["state"], "completed", "{row}");
        assert_eq!(row["sha256"], sha.as_str(), "{row}");
    }
}

/// Every replica restarted in turn, gracefully and at its own address, while a collection over
/// 200 stores runs behind a round-robin balancer: the agents move to the replicas still up,
/// the uploads resume, the collection's driving moves with its lease, and every store completes
/// once, with the right bytes.
///
/// Storage is an embedded store of its own, which stores a part whole or not at all, as S3
/// does. (On LocalStack, a part PUT whose connection a restart cut was sometimes listed at its
/// full size and checksum with no bytes behind it; the completed object then failed its
/// verification, rightly, but the store with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_of_a_collection() {
    const STORES: usize = 200;
    log_to_file_if_asked();
    let mode = Mode::Embedded;
    let storage = TestServer::start(mode).await;
    let database = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token-keys.json");
    // A restarted replica comes back under a new id, as the new pod of a Deployment does.
    let start = |name: &str, addr: std::net::SocketAddr, data: std::path::PathBuf| {
        let args = replica_args(&database, &key_file, name);
        let endpoint = storage.s3_endpoint.clone();
        async move {
            TestServer::builder(mode)
                .args(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .s3_endpoint(&endpoint)
                .at(addr, &data)
                .start()
                .await
        }
    };
    let mut replicas = Vec::new();
    let names = ["a", "b", "c"];
    for name in names {
        let data = dir.path().join(name);
        replicas.push(start(name, "127.0.0.1:0".parse().unwrap(), data).await);
    }
    let balancer = Balancer::round_robin(replicas.iter().map(|r| r.api_addr).collect()).await;
    let front = TestServer::attach(mode, balancer.addr, "", &dir.path().join("a")).await;

    let file = dir.path().join("z-report.bin");
    let sha = write_file(&file, 512 * 1024 + 3).await;
    let prefix = unique_client("rolling");
    let ids: Vec<String> = (0..STORES).map(|i| format!("{prefix}-{i:03}")).collect();
    // Each upload takes about two seconds, so the collection outlasts the restarts.
    let _agents: Vec<TestAgent> = ids
        .iter()
        .map(|id| {
            TestAgent::start_with(&front, id, &file, &["--max-upload-bytes-per-sec", "262144"])
        })
        .collect();
    wait_until(Duration::from_secs(60), "every store connected", || async {
        let mut held = 0;
        for r in &replicas {
            held += r.metric("backhaul_connected_agents").await;
        }
        held == STORES as u64
    })
    .await;

    let (code, created) = {
        let resp = front
            .http_client()
            .post(format!("{}/collections", front.http_url()))
            .bearer_auth(operator_token())
            .json(&serde_json::json!({
                "target": {"kind": "glob", "pattern": format!("{prefix}-*")},
                "max_concurrent": 25,
            }))
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["counts"]["matched"], STORES, "{created}");
    let path = format!(
        "/collections/{}",
        created["collection_id"].as_str().unwrap()
    );
    let completed = || async {
        let (_, s) = front.get_json(&path).await;
        s["counts"]["completed"].as_u64().unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(60),
        "the first store completes",
        || async { completed().await > 0 },
    )
    .await;

    for k in 0..replicas.len() {
        let before = completed().await;
        assert!(
            before < STORES as u64,
            "replica {k} restarts while the collection runs ({before} done)"
        );
        let (addr, data) = (replicas[k].api_addr, replicas[k].data_dir.clone());
        replicas[k].stop().await;
        replicas[k] = start(names[k], addr, data).await;
        // The next replica goes once some uploads have moved on.
        wait_until(
            Duration::from_secs(60),
            "progress after the restart",
            || async { completed().await > before },
        )
        .await;
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while completed().await < STORES as u64 {
        if std::time::Instant::now() > deadline {
            let (_, summary) = front.get_json(&path).await;
            let (_, rows) = front.get_json(&format!("{path}/uploads")).await;
            let unfinished: Vec<_> = rows["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["state"] != "completed")
                .collect();
            panic!("not every store completed: {summary}\nunfinished: {unfinished:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, summary) = front.get_json(&path).await;
    assert_eq!(summary["counts"]["failed"], 0, "{summary}");
    let (_, rows) = front.get_json(&format!("{path}/uploads")).await;
    let rows = rows["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), STORES, "one row per store");
    for row in &rows {
        assert_eq!(row["state"], "completed", "{row}");
        assert_eq!(row["sha256"], sha.as_str(), "{row}");
    }
    for r in &replicas {
        let (_, there) = r.get_json(&path).await;
        assert_eq!(there["counts"], summary["counts"]);
    }
    // One object per store in the bucket: nothing was stored twice.
    let mut objects = 0;
    for id in &ids {
        objects += storage.list_keys(id).await.len();
    }
    assert_eq!(objects, STORES);
}
