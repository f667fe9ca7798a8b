//! Everything that can go wrong ends with a clear code and nothing left behind in S3.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn trigger_for_unconnected_client_is_404() {
    let server = TestServer::start(Mode::Embedded).await;
    let (status, body) = server.trigger("nobody-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "CLIENT_NOT_CONNECTED");

    // The cli shows the same code and exits non-zero.
    let out = run_cli(&server, &["download", "--client-id", "nobody-here"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("CLIENT_NOT_CONNECTED"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn second_trigger_while_one_runs_is_409() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("busy");
    // An agent that never answers keeps the first upload in `requested`.
    let mut agent = RawAgent::connect(&server, &client_id).await;
    let (status, first) = server.trigger(&client_id).await;
    assert_eq!(status, 202, "{first}");
    let describe = agent.recv_json().await.unwrap();
    assert_eq!(describe["type"], "describe_file");
    assert_eq!(describe["upload_id"], first["upload_id"]);

    let (status, body) = server.trigger(&client_id).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "DOWNLOAD_IN_PROGRESS");
    // The refused trigger changed nothing: the first upload is still the active one.
    let st = server.client(&client_id).await;
    assert_eq!(
        st.active_upload.map(|id| id.to_string()).as_deref(),
        first["upload_id"].as_str()
    );
}

async fn missing_file_fails_with_file_not_found(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let client_id = unique_client("nofile");
    let _agent = TestAgent::start(&server, &client_id, &dir.path().join("does-not-exist.csv"));
    server.wait_connected(&client_id).await;

    let out = run_cli(&server, &["download", "--client-id", &client_id]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("FILE_NOT_FOUND"), "{}", stderr(&out));
    let st = server.client(&client_id).await;
    let upload = st
        .last_upload
        .as_ref()
        .expect("the failed upload is the last one");
    assert_eq!(upload.state, UploadState::Failed);
    assert_eq!(upload.code(), Some(ErrorCode::FileNotFound));
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    assert!(server.list_keys(&client_id).await.is_empty());
    // The client is free for the next attempt.
    assert_eq!(st.active_upload, None);
}

storage_modes!(missing_file, missing_file_fails_with_file_not_found);

/// The agent receives its plan (so a multipart upload exists) and then vanishes for good. The
/// upload waits for it, visibly, and when the stall timeout passes it fails with STALLED and
/// its multipart upload is aborted.
async fn agent_lost_for_good_stalls_and_aborts(mode: Mode) {
    let server = TestServer::builder(mode)
        .args(&["--upload-stall-timeout-secs", "3"])
        .start()
        .await;
    let client_id = unique_client("vanish");
    let (agent, upload_id, plan) =
        RawAgent::with_plan(&server, &client_id, "big.bin", 20 * MIB).await;
    assert_eq!(plan["parts"].as_array().unwrap().len(), 3);
    assert_eq!(server.in_progress_multiparts(&client_id).await, 1);

    drop(agent);
    wait_until(Duration::from_secs(10), "agent shown as away", || async {
        let st = server.upload(&upload_id).await;
        st.state == UploadState::Uploading && !st.agent_connected && st.stalled
    })
    .await;
    // Still resumable: nothing was aborted yet.
    assert_eq!(server.in_progress_multiparts(&client_id).await, 1);
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.code(), Some(ErrorCode::Stalled));
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

storage_modes!(agent_lost_for_good, |mode| {
    agent_lost_for_good_stalls_and_aborts(mode)
});

/// An agent that uploads for real but reports ETags that do not match what is stored: the server
/// must not call that object done, and must not leave it behind.
async fn lying_agent_fails_verification(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("liar");
    let size = 1000u64;
    let (mut agent, upload_id, plan) =
        RawAgent::with_plan(&server, &client_id, "a.bin", size).await;
    let etag = raw_s3::put_planned_part(&plan, 0, vec![7u8; size as usize]).await;
    let resp = raw_s3::complete(&plan, &[etag]).await;
    assert!(resp.status().is_success(), "complete: {}", resp.status());

    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id,
            "parts": [{"part_number": 1, "etag": "\"00000000000000000000000000000000\""}]
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.code(), Some(ErrorCode::VerificationFailed));
    assert!(status.etag.is_none());
    assert!(
        server.list_keys(&client_id).await.is_empty(),
        "unverified object left behind"
    );
}

storage_modes!(lying_agent, lying_agent_fails_verification);

#[tokio::test]
async fn silent_agent_times_out() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--agent-response-timeout-secs", "1"])
        .start()
        .await;
    let client_id = unique_client("silent");
    let mut agent = RawAgent::connect(&server, &client_id).await;
    let (_, trig) = server.trigger(&client_id).await;
    let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
    agent.recv_json().await.unwrap();
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.code(), Some(ErrorCode::AgentTimeout));
    // The agent is told to stop.
    let cancel = agent.recv_json().await.unwrap();
    assert_eq!(cancel["type"], "cancel_upload");
    assert_eq!(cancel["code"], "AGENT_TIMEOUT");
}

#[tokio::test]
async fn agent_reported_failure_codes_surface_in_status() {
    let server = TestServer::start(Mode::Embedded).await;
    for code in [ErrorCode::PermissionDenied, ErrorCode::FileReadError] {
        let client_id = unique_client("denied");
        let mut agent = RawAgent::connect(&server, &client_id).await;
        let (_, trig) = server.trigger(&client_id).await;
        let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
        agent.recv_json().await.unwrap();
        agent
            .send_json(serde_json::json!({
                "type": "upload_failed", "upload_id": upload_id, "code": code, "message": "nope"
            }))
            .await;
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(status.code(), Some(code));
        assert_eq!(status.error.as_ref().unwrap().message, "nope");
    }
}

#[tokio::test]
async fn hostile_ids_are_rejected_at_the_boundary() {
    let server = TestServer::start(Mode::Embedded).await;
    let long = "a".repeat(1024);
    let token = operator_token();
    for raw in [
        "..",
        "%2e%2e",
        ".%2E",
        "a%2Fb",
        "a%5Cb",
        "a%00b",
        "%0Aevil",
        "r%D0%B5staurant",
        "%EF%BD%92x",
        long.as_str(),
        "a%20b",
        "-x",
        ".hidden",
    ] {
        for (method, path) in [("POST", "trigger-download"), ("GET", "status")] {
            let (status, body) =
                raw_request(&server, method, &format!("/{path}/{raw}"), &token).await;
            assert_eq!(status, 400, "{method} /{path}/{raw}: {body}");
            assert_eq!(
                body["error"]["code"], "INVALID_CLIENT_ID",
                "{method} /{path}/{raw}"
            );
        }
    }
    let (status, body) = server.get_json("/uploads/not-a-uuid").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_UPLOAD_ID"))
    );
    let (status, body) = server
        .get_json("/uploads/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("UPLOAD_NOT_FOUND"))
    );
    let (status, body) = server.get_json("/no/such/route").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    // Nothing was created by any of it: no upload was recorded, and the bucket holds neither an
    // object nor a multipart upload.
    assert_eq!(server.metric("backhaul_uploads_triggered_total").await, 0);
    let s3 = server.s3().await;
    let objects = s3.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert!(objects.contents().is_empty(), "{objects:?}");
    let multiparts = s3
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    assert!(multiparts.uploads().is_empty(), "{multiparts:?}");
}

/// An operator cancels an upload whose multipart upload exists: the agent is told to stop, the
/// multipart upload is gone, the state is `cancelled`, and who did it is recorded.
async fn cancel_mid_upload(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("cancel");
    let (mut agent, upload_id, _plan) =
        RawAgent::with_plan(&server, &client_id, "big.bin", 12 * MIB).await;
    assert_eq!(server.in_progress_multiparts(&client_id).await, 1);

    let out = run_cli(&server, &["cancel", &upload_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(st["state"], "cancelled");
    assert_eq!(st["error"]["code"], "CANCELLED");
    assert!(
        st["error"]["message"]
            .as_str()
            .unwrap()
            .contains("test-operator")
    );
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    let cancel = agent.recv_json().await.unwrap();
    assert_eq!(
        (cancel["type"].as_str(), cancel["code"].as_str()),
        (Some("cancel_upload"), Some("CANCELLED"))
    );

    // A finished upload cannot be cancelled again; the client is free for a new one.
    let out = run_cli(&server, &["cancel", &upload_id]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("UPLOAD_FINISHED"), "{}", stderr(&out));
    let (status, _) = server.trigger(&client_id).await;
    assert_eq!(status, 202);

    let http = server.http_client();
    for (id, status, code) in [
        (
            "00000000-0000-4000-8000-000000000000",
            404,
            "UPLOAD_NOT_FOUND",
        ),
        ("not-a-uuid", 400, "INVALID_UPLOAD_ID"),
    ] {
        let resp = http
            .delete(format!("{}/uploads/{id}", server.http_url()))
            .bearer_auth(operator_token())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
    }
}

storage_modes!(cancel_mid_upload, cancel_mid_upload);
