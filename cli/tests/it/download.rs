//! The main job: an operator asks, the agent uploads straight to S3, the server verifies.

use crate::harness::*;

async fn download_via_cli_is_byte_identical(mode: Mode, size: u64) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("transactions.csv");
    let sha = write_file(&file, size).await;
    let client_id = unique_client("store");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let out = run_cli(
        &server,
        &["download", &format!("--client-id={client_id}"), "--json"],
    )
    .await;
    assert!(
        out.status.success(),
        "cli failed: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["size"], size);
    assert_eq!(status["bytes_done"], size);
    let key = status["key"].as_str().unwrap();
    assert!(key.starts_with(&format!("uploads/{client_id}/")), "{key}");
    assert!(key.ends_with("/transactions.csv"), "{key}");

    assert_eq!(
        server.object_sha256(key).await,
        sha,
        "object differs from the agent's file"
    );
    let head = server
        .s3()
        .await
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(size as i64));
    assert_eq!(head.e_tag(), status["etag"].as_str());
    // Storage computed the object's CRC64NVME itself, and it is the file's.
    let crc = shared::hash::Crc64Nvme::of(&tokio::fs::read(&file).await.unwrap()).to_base64();
    assert_eq!(head.checksum_crc64_nvme(), Some(crc.as_str()));
    assert_eq!(
        head.checksum_type(),
        Some(&aws_sdk_s3::types::ChecksumType::FullObject)
    );
    assert_eq!(status["checksum_crc64nvme"], crc);
    assert_eq!(
        status["sha256"], sha,
        "the agent's SHA-256, computed during the upload"
    );
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

/// `/metrics` counts what happened, in Prometheus text, for operators only.
#[tokio::test]
async fn metrics_count_a_download() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    let size = 12 * MIB;
    write_file(&file, size).await;
    let client_id = unique_client("metrics");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let (_, trig) = server.trigger(&client_id).await;
    let status = server
        .wait_finished(trig["upload_id"].as_str().unwrap())
        .await;
    assert_eq!(status.state, UploadState::Completed);

    let http = server.http_client();
    let url = format!("{}/metrics", server.http_url());
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let resp = http
        .get(&url)
        .bearer_auth(operator_token())
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for line in [
        "backhaul_connected_agents 1".to_owned(),
        "backhaul_uploads_triggered_total 1".to_owned(),
        "backhaul_uploads_finished_total{state=\"completed\"} 1".to_owned(),
        format!("backhaul_bytes_uploaded_total {size}"),
        "backhaul_parts_uploaded_total 2".to_owned(),
        "backhaul_trigger_dispatch_seconds_count 1".to_owned(),
        "backhaul_uploads_open{state=\"uploading\"} 0".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

/// The status says where an upload's time went, and the phases fit inside the time it took.
#[tokio::test]
async fn phases_account_for_a_download() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    write_file(&file, 12 * MIB).await;
    let client_id = unique_client("phases");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let started = std::time::Instant::now();
    let (_, trig) = server.trigger(&client_id).await;
    let status = server
        .wait_finished(trig["upload_id"].as_str().unwrap())
        .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    assert_eq!(status.state, UploadState::Completed);
    let p = status.phases;
    // Hashing 12 MiB and sending two 6 MiB parts each take well over a millisecond.
    assert!(p.describe_ms > 0, "{p:?}");
    assert!(p.transfer_ms > 0, "{p:?}");
    assert!(p.complete_ms <= p.transfer_ms, "{p:?}");
    let sum = p.describe_ms + p.presign_ms + p.transfer_ms + p.verify_ms;
    assert!(
        sum <= elapsed_ms,
        "phases {p:?} add up to more than {elapsed_ms} ms"
    );

    let out = run_cli(&server, &["status", &format!("--client-id={client_id}")]).await;
    assert!(
        stdout(&out).contains("phases:   describe "),
        "{}",
        stdout(&out)
    );
}

storage_modes!(cli_download_100_mib, |mode| {
    download_via_cli_is_byte_identical(mode, 100 * MIB)
});

storage_modes!(zero_byte_file, |mode| download_via_cli_is_byte_identical(
    mode, 0
));

storage_modes!(file_smaller_than_one_part, |mode| {
    download_via_cli_is_byte_identical(mode, 12_345)
});

#[tokio::test]
async fn part_boundary_sizes_embedded() {
    // Exactly one part, and one byte into a second part.
    download_via_cli_is_byte_identical(Mode::Embedded, 8 * MIB).await;
    download_via_cli_is_byte_identical(Mode::Embedded, 8 * MIB + 1).await;
}

async fn two_downloads_make_two_objects(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    let client_id = unique_client("twice");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let first_sha = write_file(&file, 6 * MIB).await;
    let first = run_cli(&server, &["download", "--client-id", &client_id, "--json"]).await;
    assert!(first.status.success(), "{}", stderr(&first));
    let first: serde_json::Value = serde_json::from_str(&stdout(&first)).unwrap();

    // The same file name, new content: the first object must survive untouched.
    let second_sha = write_file(&file, 3 * MIB).await;
    let second = run_cli(&server, &["download", "--client-id", &client_id, "--json"]).await;
    assert!(second.status.success(), "{}", stderr(&second));
    let second: serde_json::Value = serde_json::from_str(&stdout(&second)).unwrap();

    let (k1, k2) = (
        first["key"].as_str().unwrap(),
        second["key"].as_str().unwrap(),
    );
    assert_ne!(k1, k2);
    let mut keys = server.list_keys(&client_id).await;
    keys.sort();
    let mut expected = vec![k1.to_owned(), k2.to_owned()];
    expected.sort();
    assert_eq!(keys, expected);
    assert_eq!(server.object_sha256(k1).await, first_sha);
    assert_eq!(server.object_sha256(k2).await, second_sha);
}

storage_modes!(two_downloads_two_objects, |mode| {
    two_downloads_make_two_objects(mode)
});

#[tokio::test]
async fn cli_no_wait_prints_the_upload_id_and_status_reports_it() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    write_file(&file, 1000).await;
    let client_id = unique_client("nowait");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let out = run_cli(
        &server,
        &["download", "--client-id", &client_id, "--no-wait"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let upload_id = stdout(&out).trim().to_owned();
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed);
    assert_eq!(status.requested_by, "test-operator");
    assert!(
        status.requested_from.starts_with("127.0.0.1:"),
        "{status:?}"
    );

    let out = run_cli(&server, &["status", "--client-id", &client_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(st["connected"], true);
    assert_eq!(st["last_upload"]["upload_id"], upload_id.as_str());

    let out = run_cli(&server, &["clients", "--json"]).await;
    let clients: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        clients
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client_id"] == client_id.as_str())
    );
}
