//! The file in the operator's hands: `GET /uploads/{id}/download`, `cli download -o` and
//! `cli fetch`, which read the object straight from storage and check its bytes.

use crate::harness::*;
use crate::proxy::{FaultProxy, Faults};

fn sha_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Files in `dir` other than `keep`: what a fetch left lying around.
fn others_in(dir: &std::path::Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

async fn download_output_is_byte_identical(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("transactions.csv");
    let sha = write_file(&file, 20 * MIB + 7).await;
    let client_id = unique_client("fetch");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("z.csv");
    let out = run_cli(
        &server,
        &[
            "download",
            &format!("--client-id={client_id}"),
            "-o",
            target.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["upload"]["state"], "completed", "{report}");
    assert_eq!(report["fetch"]["sha256"], sha);
    assert_eq!(
        report["fetch"]["checked"],
        serde_json::json!(["sha256", "crc64nvme"])
    );
    assert_eq!(sha_of(&std::fs::read(&target).unwrap()), sha);
    assert!(
        others_in(out_dir.path(), &["z.csv"]).is_empty(),
        "no partial file is left"
    );

    // `cli fetch` of the finished upload, to stdout: the bytes alone on stdout, the report on
    // stderr.
    let upload_id = report["upload"]["upload_id"].as_str().unwrap();
    let out = run_cli(&server, &["fetch", upload_id, "-o", "-"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha_of(&out.stdout), sha);
    assert!(
        stderr(&out).contains("sha256 and crc64nvme match the upload"),
        "{}",
        stderr(&out)
    );
}

storage_modes!(download_output, download_output_is_byte_identical);

/// A zero-byte file fetches as an empty file.
#[tokio::test]
async fn an_empty_file_is_fetched() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.csv");
    let sha = write_file(&file, 0).await;
    let client_id = unique_client("fetch-empty");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let target = dir.path().join("out.csv");
    let out = run_cli(
        &server,
        &[
            "download",
            "--client-id",
            &client_id,
            "-o",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(sha_of(&std::fs::read(&target).unwrap()), sha);
    assert!(stdout(&out).contains("fetched 0 bytes"), "{}", stdout(&out));
}

/// An object whose bytes changed in storage after verification (same size) is refused: the cli
/// exits non-zero, and no file appears under the name, not even a partial one.
async fn a_changed_object_is_refused(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    write_file(&file, 6 * MIB).await;
    let client_id = unique_client("fetch-tampered");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed);

    let mut other = tokio::fs::read(&file).await.unwrap();
    other[3 * MIB as usize] ^= 0x40;
    server
        .s3()
        .await
        .put_object()
        .bucket(BUCKET)
        .key(status.key.as_deref().unwrap())
        .body(other.into())
        .send()
        .await
        .unwrap();

    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("export.bin");
    let out = run_cli(
        &server,
        &["fetch", &upload_id, "-o", target.to_str().unwrap()],
    )
    .await;
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("do not match the upload"), "{err}");
    assert!(err.contains("SHA-256"), "{err}");
    assert!(!target.exists(), "a file that does not match never appears");
    assert!(
        others_in(out_dir.path(), &[]).is_empty(),
        "the partial file is removed"
    );
}

storage_modes!(changed_object, a_changed_object_is_refused);

/// The link itself: a redirect to storage whose target serves the object, and clear errors for a
/// hostile id, an unknown upload, an unfinished one and a missing token.
#[tokio::test]
async fn download_link_answers() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z-report.txt");
    let sha = write_file(&file, 300_000).await;
    let client_id = unique_client("link");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    assert_eq!(
        server.wait_finished(&upload_id).await.state,
        UploadState::Completed
    );

    let http = server.http_client();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let link_url = format!("{}/uploads/{upload_id}/download", server.http_url());
    let resp = no_redirects
        .get(&link_url)
        .bearer_auth(operator_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let link: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(link["url"], location.as_str());
    assert_eq!(link["size"], 300_000);
    assert_eq!(link["sha256"], sha.as_str());
    assert_eq!(link["expires_in_secs"], 300);
    assert!(location.contains("X-Amz-Expires=300"), "{location}");
    assert!(
        !location.contains(server.http_url().trim_start_matches("http://")),
        "the bytes come from storage, not the API: {location}"
    );
    // The link works without any token, for whoever holds it.
    let object = http.get(&location).send().await.unwrap();
    assert_eq!(object.status(), 200);
    assert_eq!(sha_of(&object.bytes().await.unwrap()), sha);

    let anonymous = http.get(&link_url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let (status, body) = server.get_json("/uploads/..%2F..%2Fetc/download").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_UPLOAD_ID"))
    );
    let unknown = uuid_like();
    let (status, body) = server
        .get_json(&format!("/uploads/{unknown}/download"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("UPLOAD_NOT_FOUND"))
    );

    // An upload that has not finished: an agent that never describes its file.
    let silent = unique_client("link-silent");
    let _raw = RawAgent::connect(&server, &silent).await;
    server.wait_connected(&silent).await;
    let pending = trigger_id(&server, &silent).await;
    let (status, body) = server
        .get_json(&format!("/uploads/{pending}/download"))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "UPLOAD_NOT_COMPLETED");
    assert_eq!(body["state"], "requested");
    let out = run_cli(&server, &["fetch", &pending, "-o", "-"]).await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains("UPLOAD_NOT_COMPLETED"),
        "{}",
        stderr(&out)
    );
    let out = run_cli(&server, &["fetch", "not-a-uuid", "-o", "-"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not an upload id"),
        "{}",
        stderr(&out)
    );
}

fn uuid_like() -> String {
    "0b9e6a52-3f0e-4c36-9f53-1f0d5f1e2a77".to_owned()
}

/// Storage cuts the first two answers halfway: the fetch resumes each time from where it broke
/// off, with a `Range` on a fresh link, and the file is whole.
async fn a_cut_fetch_resumes(mode: Mode) {
    let faults = Faults {
        cut_object_gets: Some(2),
        ..Faults::default()
    };
    let proxy = FaultProxy::start(&localstack_endpoint(), faults).await;
    let url = proxy.url();
    let server = TestServer::builder(mode)
        .args(&["--s3-public-endpoint", url.as_str()])
        .start()
        .await;
    proxy.set_upstream(&server.s3_endpoint);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    let sha = write_file(&file, 12 * MIB).await;
    let client_id = unique_client("fetch-cut");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    assert_eq!(
        server.wait_finished(&upload_id).await.state,
        UploadState::Completed
    );

    let target = dir.path().join("fetched.bin");
    let out = run_cli(
        &server,
        &[
            "fetch",
            &upload_id,
            "-o",
            target.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let fetched: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(fetched["retries"], 2, "{fetched}");
    assert_eq!(sha_of(&std::fs::read(&target).unwrap()), sha);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(proxy.stats.injected_get_cuts.load(Relaxed), 2);
    assert_eq!(proxy.stats.object_gets.load(Relaxed), 3);
    assert_eq!(
        proxy.stats.ranged_gets.load(Relaxed),
        2,
        "each retry asks only for what is missing"
    );
}

storage_modes!(cut_fetch, a_cut_fetch_resumes);
