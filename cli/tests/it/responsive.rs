//! The agent stays responsive while it works, and does not flap.

use std::time::Duration;

use crate::harness::*;

/// Hashing takes twice the server's idle timeout (the agent's disk reads are capped at 2 MiB/s,
/// for a 12 MiB file), yet the agent keeps pinging and answering: the upload completes
/// on its first connection, without a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_longer_than_the_idle_timeout_keeps_the_connection() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--agent-idle-timeout-secs", "3"])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.csv");
    let sha = write_file(&file, 12 * MIB).await;
    let client_id = unique_client("slow-disk");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &[
            "--ping-interval-secs",
            "1",
            "--hash-read-bytes-per-sec",
            "2097152",
        ],
    );
    server.wait_connected(&client_id).await;
    let since = server.client(&client_id).await.connected_since;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{:?}", status.error);
    assert_eq!(status.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(status.resumes, 0);
    assert!(
        status.phases.describe_ms >= 5_000,
        "hashing was paced: {:?}",
        status.phases
    );
    assert_eq!(server.client(&client_id).await.connected_since, since);
    assert_eq!(server.metric("backhaul_agent_connections_total").await, 1);
}

/// A cancel that arrives while the file is still being hashed stops the hashing, and the store
/// is free for the next trigger at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_hashing_is_answered() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.csv");
    let sha = write_file(&file, 4 * MIB).await;
    let client_id = unique_client("cancel-hashing");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--hash-read-bytes-per-sec", "1048576"],
    );
    server.wait_connected(&client_id).await;
    let first = trigger_id(&server, &client_id).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = run_cli(&server, &["cancel", &first]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.upload(&first).await.state, UploadState::Cancelled);
    let second = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&second).await;
    assert_eq!(status.state, UploadState::Completed, "{:?}", status.error);
    assert_eq!(status.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(server.metric("backhaul_agent_connections_total").await, 1);
}

/// Two machines installed with the same token knock each other off once, then the one that was
/// replaced backs off for minutes instead of reconnecting twice a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_identity_do_not_flap() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.csv");
    write_file(&file, 1000).await;
    let client_id = unique_client("twin");
    let _first = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let _second = TestAgent::start(&server, &client_id, &file);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let connections = server.metric("backhaul_agent_connections_total").await;
    // Before the back-off: the harness's agents reconnect within a second, so about 30.
    assert!(
        (2..=3).contains(&connections),
        "{connections} connections in 15 s"
    );
    assert!(server.client(&client_id).await.connected);
}
