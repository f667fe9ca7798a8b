//! The agent shares only what it is told to, and uploads only where it is told to.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::harness::*;

async fn trigger_share(
    server: &TestServer,
    client_id: &str,
    share: &str,
) -> (u16, serde_json::Value) {
    raw_request(
        server,
        "POST",
        &format!("/trigger-download/{client_id}?file={share}"),
        &operator_token(),
    )
    .await
}

#[tokio::test]
async fn only_named_shares_are_uploaded() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let default_file = dir.path().join("default.bin");
    write_file(&default_file, 10).await;
    let z_report = dir.path().join("z-report.csv");
    let z_sha = write_file(&z_report, 3000).await;
    let big = dir.path().join("big.bin");
    write_file(&big, 5000).await;
    let link = dir.path().join("link.csv");
    std::os::unix::fs::symlink(&z_report, &link).unwrap();
    let client_id = unique_client("shares");
    let shares = format!(
        "z-report={},big={},link={}",
        z_report.display(),
        big.display(),
        link.display()
    );
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &default_file,
        &["--share", &shares, "--max-file-size", "4096"],
    );
    server.wait_connected(&client_id).await;

    // A named share is uploaded under its own file name.
    let out = run_cli(
        &server,
        &[
            "download",
            "--client-id",
            &client_id,
            "--file",
            "z-report",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(st["share"], "z-report");
    assert!(st["key"].as_str().unwrap().ends_with("/z-report.csv"));
    assert_eq!(
        server.object_sha256(st["key"].as_str().unwrap()).await,
        z_sha
    );

    // Anything else is refused by the agent, before any multipart upload exists.
    for (share, code) in [
        ("secrets", ErrorCode::FileNotShared),
        ("etc-passwd", ErrorCode::FileNotShared),
        ("link", ErrorCode::FileNotShared),
        ("big", ErrorCode::FileTooLarge),
    ] {
        let (status, trig) = trigger_share(&server, &client_id, share).await;
        assert_eq!(status, 202, "{share}: {trig}");
        let st = server
            .wait_finished(trig["upload_id"].as_str().unwrap())
            .await;
        assert_eq!(st.state, UploadState::Failed, "{share}");
        assert_eq!(st.code(), Some(code), "{share}");
    }
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    assert_eq!(server.list_keys(&client_id).await.len(), 1);

    // A share name that could be a path never reaches the agent.
    for hostile in ["..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "a%00b", ".."] {
        let (status, body) = trigger_share(&server, &client_id, hostile).await;
        assert_eq!(status, 400, "{hostile}: {body}");
        assert_eq!(body["error"]["code"], "INVALID_FILE_NAME", "{hostile}");
    }
}

#[tokio::test]
async fn urls_to_a_foreign_host_are_refused_and_no_byte_leaves() {
    // A "foreign" storage host on another loopback address that counts connections.
    let foreign = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let foreign_addr = foreign.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = foreign.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });

    // A server that presigns for that host, as a compromised or misconfigured one might.
    let public = format!("http://{foreign_addr}");
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--s3-public-endpoint", &public])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("till.csv");
    write_file(&file, 20_000).await;
    let client_id = unique_client("careful");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let out = run_cli(&server, &["download", "--client-id", &client_id]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("UPLOAD_HOST_NOT_ALLOWED"), "{err}");
    assert!(
        !err.contains("X-Amz-Signature"),
        "a signature leaked into the error: {err}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the agent connected to the foreign host"
    );
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

/// With its bucket pinned (`ALLOWED_UPLOAD_HOSTS=host/bucket`), the agent uploads to that bucket
/// and refuses any other on the same host: with path-style S3, a compromised server could
/// otherwise send a store's file to a bucket of its own there.
#[tokio::test]
async fn a_pinned_bucket_is_the_only_one_used() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("till.csv");
    let sha = write_file(&file, 20_000).await;
    for (pin, allowed) in [
        (format!("127.0.0.1/{BUCKET}"), true),
        ("127.0.0.1/another-bucket".to_owned(), false),
    ] {
        let client_id = unique_client("pinned");
        let _agent =
            TestAgent::start_with(&server, &client_id, &file, &["--allowed-upload-host", &pin]);
        server.wait_connected(&client_id).await;
        let upload_id = trigger_id(&server, &client_id).await;
        let status = server.wait_finished(&upload_id).await;
        if allowed {
            assert_identical(&server, &status, &sha).await;
        } else {
            assert_eq!(
                status.code(),
                Some(ErrorCode::UploadHostNotAllowed),
                "{pin}"
            );
            assert!(server.list_keys(&client_id).await.is_empty());
            assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
        }
    }
}
