//! Verification that storage trouble cannot fool: a passing error does not delete a good object,
//! a lost completion answer does not fail a completed upload (nor lose the file's SHA-256 when
//! the agent's session is lost with it), and an upload that does not complete leaves no object
//! behind.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;
use crate::proxy::{FaultProxy, Faults};
use crate::relay::Relay;

/// A server whose own S3 calls, and the agents' presigned requests, go through a fault proxy in
/// front of another server's embedded store.
async fn behind_proxy(faults: Faults) -> (TestServer, TestServer, FaultProxy) {
    let store = TestServer::start(Mode::Embedded).await;
    let proxy = FaultProxy::start(&store.s3_endpoint, faults).await;
    let server = TestServer::builder(Mode::Embedded)
        .s3_endpoint(&proxy.url())
        .start()
        .await;
    (store, server, proxy)
}

/// What `download` started: the agent, its file's folder, and the ids and hash to check.
struct Download {
    _agent: TestAgent,
    _dir: tempfile::TempDir,
    client_id: String,
    upload_id: String,
    sha: String,
}

/// Starts an agent sharing a fresh 6 MiB file and triggers its download.
async fn download(server: &TestServer, name: &str) -> Download {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.bin"));
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client(name);
    let agent = TestAgent::start(server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(server, &client_id).await;
    Download {
        _agent: agent,
        _dir: dir,
        client_id,
        upload_id,
        sha,
    }
}

/// HeadObject fails six times in a row (more than the SDK's own retries): the verification
/// tries again, the upload completes, and nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_storage_errors_do_not_fail_a_good_upload() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let (store, server, proxy) = behind_proxy(Faults {
        fail_heads: Some(6),
        ..Faults::default()
    })
    .await;
    let d = download(&server, "blip").await;
    let status = server.wait_finished(&d.upload_id).await;
    assert_eq!(proxy.stats.injected_head_503.load(Ordering::Relaxed), 6);
    assert_identical(&store, &status, &d.sha).await;
}

/// Storage cannot be read at all while the object is checked; an operator cancels. The upload
/// ends `cancelled` and leaves neither an object nor a multipart upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_verification_leaves_no_object() {
    let (store, server, proxy) = behind_proxy(Faults {
        fail_heads: Some(u32::MAX),
        ..Faults::default()
    })
    .await;
    let d = download(&server, "cancelled").await;
    let (client_id, upload_id) = (&d.client_id, &d.upload_id);
    wait_until(
        Duration::from_secs(60),
        "the verification to meet storage errors",
        || async {
            server.upload(upload_id).await.state == UploadState::Verifying
                && proxy.stats.injected_head_503.load(Ordering::Relaxed) >= 3
        },
    )
    .await;
    assert_eq!(
        store.list_keys(client_id).await.len(),
        1,
        "the agent completed the object"
    );
    let out = run_cli(&server, &["cancel", upload_id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status = server.upload(upload_id).await;
    assert_eq!(status.state, UploadState::Cancelled, "{status:?}");
    assert_eq!(status.code(), Some(ErrorCode::Cancelled));
    assert!(store.list_keys(client_id).await.is_empty(), "no object");
    assert_eq!(store.in_progress_multiparts(client_id).await, 0);
}

/// The completion reaches storage but its answer is lost; the agent's retry finds no upload
/// and reports `COMPLETE_FAILED`. The server looks for the object, finds it whole, and the
/// upload ends `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_completion_answer_still_completes() {
    let (store, server, proxy) = behind_proxy(Faults {
        lose_completion_reply: true,
        ..Faults::default()
    })
    .await;
    let d = download(&server, "lostreply").await;
    let status = server.wait_finished(&d.upload_id).await;
    assert_eq!(
        proxy.stats.lost_completion_replies.load(Ordering::Relaxed),
        1
    );
    assert_identical(&store, &status, &d.sha).await;
}

/// The agent's link dies one way just before it reports the file's SHA-256, and then entirely
/// while storage completes the object. The server never heard the SHA-256, and the agent never
/// heard the completion; the agent's next description brings the SHA-256, and the upload ends
/// `completed` with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_while_storage_completes_keeps_the_sha256() {
    let (store, server, proxy) = behind_proxy(Faults {
        hold_completion_reply: Some(Duration::from_secs(15)),
        ..Faults::default()
    })
    .await;
    let relay = Relay::start(server.api_addr).await;
    let front = TestServer::attach(Mode::Embedded, relay.addr, "", &server.data_dir).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("held.bin");
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("held-completion");
    let _agent = TestAgent::start_with(
        &front,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "2097152"],
    );
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    wait_until(
        Duration::from_secs(20),
        "the upload is uploading",
        || async { server.upload(&upload_id).await.state == UploadState::Uploading },
    )
    .await;
    // The parts take about 3 s, and the SHA-256 is reported after them: it is lost.
    relay.freeze();
    wait_until(
        Duration::from_secs(30),
        "storage completed the object",
        || async { proxy.stats.held_completion_replies.load(Ordering::Relaxed) == 1 },
    )
    .await;
    assert_eq!(server.upload(&upload_id).await.sha256, None, "not heard");
    relay.sever();

    let status = server.wait_finished(&upload_id).await;
    assert_identical(&store, &status, &sha).await;
    assert_eq!(proxy.stats.completions_seen.load(Ordering::Relaxed), 1);
}

/// The first AbortMultipartUpload hangs for 35 s, past the REST timeout (30 s) and the server's
/// own S3 operation timeout: the cancel is answered at once, the upload still ends `cancelled`
/// with its multipart upload aborted (on the retry), and the store takes a new trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_outlives_a_hung_storage() {
    let (store, server, proxy) = behind_proxy(Faults {
        slow_first_abort: Some(Duration::from_secs(35)),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.bin");
    write_file(&file, 12 * MIB).await;
    let client_id = unique_client("hung-abort");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "1048576"],
    );
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    wait_until(
        Duration::from_secs(20),
        "the upload to be uploading",
        || async { server.upload(&upload_id).await.state == UploadState::Uploading },
    )
    .await;
    let started = std::time::Instant::now();
    let out = run_cli(&server, &["cancel", &upload_id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the cancel was answered after {:?}",
        started.elapsed()
    );
    assert!(stdout(&out).contains("being cancelled"), "{}", stdout(&out));
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Cancelled);
    assert!(proxy.stats.aborts_seen.load(Ordering::Relaxed) >= 2);
    assert_eq!(store.in_progress_multiparts(&client_id).await, 0);
    let (code, body) = server.trigger(&client_id).await;
    assert_eq!(code, 202, "{body}");
}
