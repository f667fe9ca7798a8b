//! kill -9 of the server while a collection asks its stores: after each restart every store
//! completes, and none was asked twice (one recorded upload per store in the collection).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use shared::api::collections::{CollectionRows, CollectionSummary, RowState};

use crate::harness::*;

const TRIALS: u32 = 6;
const STORES: usize = 4;

/// How many uploads the server recorded per store for `collection`, read from its database.
fn recorded_uploads(data_dir: &std::path::Path, collection: &str) -> BTreeMap<String, u32> {
    let db = rusqlite::Connection::open(data_dir.join("backhaul.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT client_id, COUNT(*) FROM uploads WHERE record LIKE ?1 GROUP BY client_id")
        .unwrap();
    stmt.query_map([format!("%\"collection_id\":\"{collection}\"%")], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The server dies at a random moment while a collection over four stores runs two at a time
/// (asking, recording, uploading and verifying all happen in that window). After the restart the
/// collection finishes: every store completed with its own bytes, each with exactly one upload
/// recorded for the collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_while_a_collection_runs() {
    let mut rng = seeded_rng("server_killed_while_a_collection_runs");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (api, s3) = (free_addr(), free_addr());
    let public = format!("http://{s3}");
    let args = child_server_args(Mode::Embedded, &data_dir, api, s3, &public);
    let mut server_proc = ChildProcess::spawn("server", &args);
    let mut server = TestServer::attach(Mode::Embedded, api, &public, &data_dir).await;
    let mut shas = BTreeMap::new();
    let mut agents = Vec::new();
    let ids: Vec<String> = (0..STORES).map(|i| format!("crash-store-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let file = dir.path().join(format!("{i}.csv"));
        let sha = write_file(&file, 600_000 + i as u64 * 4096).await;
        shas.insert(id.clone(), sha);
        // Three 256 KiB chunks at 300 kB/s: each upload takes about 1.8 s, and the collection,
        // two at a time, about 3.6 s.
        agents.push(TestAgent::start_with(
            &server,
            id,
            &file,
            &["--max-upload-bytes-per-sec", "300000"],
        ));
    }
    // Trials whose kill came before the collection finished.
    let mut interrupted = 0;
    for trial in 0..TRIALS {
        for id in &ids {
            server.wait_connected(id).await;
        }
        let out = run_cli(
            &server,
            &[
                "collect",
                "--client-id",
                "crash-store-*",
                "--max-concurrent",
                "2",
                "--json",
            ],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        let created: CollectionSummary = serde_json::from_str(&stdout(&out)).unwrap();
        let cid = created.collection_id.to_string();
        let delay = rng.gen_range(0..3000);
        eprintln!("collection kill trial {trial}: killing the server {delay} ms in");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let (_, body) = server.get_json(&format!("/collections/{cid}")).await;
        server_proc.kill9().await;
        let done_at_kill = body["counts"]["completed"].as_u64().unwrap();
        eprintln!("trial {trial}: {done_at_kill} of {STORES} stores had completed at the kill");
        if done_at_kill < STORES as u64 {
            interrupted += 1;
        }
        server_proc = ChildProcess::spawn("server", &args);
        server = TestServer::attach(Mode::Embedded, api, &public, &data_dir).await;

        wait_until(
            Duration::from_secs(90),
            "the collection completes",
            || async {
                let (_, body) = server.get_json(&format!("/collections/{cid}")).await;
                body["counts"]["completed"] == STORES
            },
        )
        .await;
        let (_, body) = server
            .get_json(&format!("/collections/{cid}/uploads"))
            .await;
        let rows: CollectionRows = serde_json::from_value(body).unwrap();
        assert_eq!(rows.rows.len(), STORES);
        for row in &rows.rows {
            assert_eq!(row.state, RowState::Completed, "trial {trial}: {row:?}");
            assert_eq!(
                row.sha256.as_deref(),
                Some(shas[row.client_id.as_str()].as_str()),
                "trial {trial}"
            );
        }
        let recorded = recorded_uploads(&data_dir, &cid);
        assert_eq!(recorded.len(), STORES, "trial {trial}: {recorded:?}");
        assert!(
            recorded.values().all(|n| *n == 1),
            "trial {trial}: a store asked twice: {recorded:?}"
        );
    }
    assert!(
        interrupted >= TRIALS / 2,
        "only {interrupted} of {TRIALS} kills came while the collection ran"
    );
}
