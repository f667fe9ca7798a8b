//! Collections over raw agents (protocol 2, as agents in the field still speak) that count their
//! own uploads in flight: the limit on how many stores upload at once, and a cancel halfway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shared::api::UploadState;
use shared::api::collections::RowState;

use crate::collections::{created, id_of, rows, summary, wait_summary};
use crate::harness::*;

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
