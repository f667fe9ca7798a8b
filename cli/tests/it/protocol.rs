//! The WebSocket protocol's edges: handshake, replacement, malformed input.

use crate::harness::*;

#[tokio::test]
async fn newer_connection_replaces_the_older_one() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("twin");
    let mut old = RawAgent::connect(&server, &client_id).await;
    let mut new = RawAgent::connect(&server, &client_id).await;

    let msgs = old.drain_until_closed().await;
    assert!(
        msgs.iter()
            .any(|m| m["type"] == "error" && m["code"] == "CONNECTION_REPLACED"),
        "{msgs:?}"
    );
    let (_, clients) = server.get_json("/clients").await;
    assert_eq!(clients.as_array().unwrap().len(), 1);

    // Commands now go to the new connection.
    let (status, _) = server.trigger(&client_id).await;
    assert_eq!(status, 202);
    assert_eq!(new.recv_json().await.unwrap()["type"], "describe_file");
}

#[tokio::test]
async fn malformed_messages_close_only_that_connection() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.bin");
    let sha = write_file(&file, 2 * MIB).await;
    let good_id = unique_client("good");
    let _good = TestAgent::start(&server, &good_id, &file);
    server.wait_connected(&good_id).await;

    for bad in [
        "not json",
        r#"{"type":"launch_missiles"}"#,
        r#"{"type":"progress","upload_id":"../../x","parts_done":1,"bytes_done":1}"#,
        r#"{"type":"file_info","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d","file_name":"../../etc/passwd","size":1}"#,
    ] {
        let bad_id = unique_client("bad");
        let mut agent = RawAgent::connect(&server, &bad_id).await;
        agent.send_text(bad).await;
        let msgs = agent.drain_until_closed().await;
        assert!(
            msgs.iter()
                .any(|m| m["type"] == "error" && m["code"] == "MALFORMED_MESSAGE"),
            "{bad}: {msgs:?}"
        );
        server.wait_disconnected(&bad_id).await;
    }

    // The well-behaved agent is untouched and still works end to end.
    let out = run_cli(&server, &["download", "--client-id", &good_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(server.object_sha256(st["key"].as_str().unwrap()).await, sha);
}

#[tokio::test]
async fn handshake_errors_are_explained() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("old");

    let mut agent = ws_connect(&server, Some(&agent_token(&client_id)))
        .await
        .unwrap();
    agent
        .send_json(serde_json::json!({"type":"hello","protocol_version":999,"agent_version":"x"}))
        .await;
    let msgs = agent.drain_until_closed().await;
    assert_eq!(msgs[0]["code"], "PROTOCOL_VERSION_MISMATCH", "{msgs:?}");
    assert!(
        msgs[0]["message"]
            .as_str()
            .unwrap()
            .contains("upgrade the server")
    );

    let mut agent = ws_connect(&server, Some(&agent_token(&client_id)))
        .await
        .unwrap();
    agent
        .send_json(serde_json::json!({"type":"progress","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d","parts_done":1,"bytes_done":1}))
        .await;
    let msgs = agent.drain_until_closed().await;
    assert_eq!(msgs[0]["code"], "UNEXPECTED_MESSAGE", "{msgs:?}");

    server.wait_disconnected(&client_id).await;
}

#[tokio::test]
async fn messages_about_other_clients_uploads_are_ignored() {
    let server = TestServer::start(Mode::Embedded).await;
    let victim = unique_client("victim");
    let mut victim_agent = RawAgent::connect(&server, &victim).await;
    let (_, trig) = server.trigger(&victim).await;
    let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
    victim_agent.recv_json().await.unwrap();

    // Another agent tries to fail the victim's upload, then gets itself closed: the server reads a
    // connection's messages in order, so once the close arrives the first one was handled.
    let mut attacker = RawAgent::connect(&server, &unique_client("attacker")).await;
    attacker
        .send_json(serde_json::json!({
            "type":"upload_failed","upload_id": upload_id,"code":"FILE_NOT_FOUND","message":"x"
        }))
        .await;
    attacker.send_text("garbage").await;
    attacker.drain_until_closed().await;
    let (_, st) = server.get_json(&format!("/uploads/{upload_id}")).await;
    assert_eq!(st["state"], "requested", "{st}");
    assert!(st["error"].is_null(), "{st}");

    // The real owner's report is the one that counts.
    victim_agent
        .send_json(serde_json::json!({
            "type":"upload_failed","upload_id": upload_id,"code":"PERMISSION_DENIED","message":"y"
        }))
        .await;
    let st = server.wait_finished(&upload_id).await;
    assert_eq!(st.code(), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn oversized_frames_and_floods_close_only_the_offender() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--agent-max-messages-per-sec", "20"])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.bin");
    let sha = write_file(&file, MIB).await;
    let good_id = unique_client("steady");
    let _good = TestAgent::start(&server, &good_id, &file);
    server.wait_connected(&good_id).await;

    // A 9 MiB message, over the 8 MiB limit.
    let big_id = unique_client("big");
    let mut big = RawAgent::connect(&server, &big_id).await;
    let huge = format!(
        r#"{{"type":"hello","protocol_version":1,"agent_version":"{}"}}"#,
        "x".repeat(9 * MIB as usize)
    );
    use futures::SinkExt;
    let _ = big
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Text(huge.into()))
        .await;
    big.drain_until_closed().await;
    server.wait_disconnected(&big_id).await;

    // A flood of well-formed messages.
    let flood_id = unique_client("flood");
    let mut flood = RawAgent::connect(&server, &flood_id).await;
    let msg = r#"{"type":"progress","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d","parts_done":1,"bytes_done":1}"#;
    for _ in 0..200 {
        if flood
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Text(msg.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let msgs = flood.drain_until_closed().await;
    assert!(msgs.iter().any(|m| m["code"] == "RATE_LIMITED"), "{msgs:?}");

    // The server is healthy and the well-behaved agent still works end to end.
    let out = run_cli(&server, &["download", "--client-id", &good_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(server.object_sha256(st["key"].as_str().unwrap()).await, sha);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--max-agent-connections", "1"])
        .start()
        .await;
    let first = unique_client("first");
    let _a = RawAgent::connect(&server, &first).await;
    let second = unique_client("second");
    assert_eq!(
        ws_connect(&server, Some(&agent_token(&second))).await.err(),
        Some(503)
    );
    // The connected agent may still reconnect (replace itself) at the limit.
    let _again = RawAgent::connect(&server, &first).await;
    let (_, clients) = server.get_json("/clients").await;
    assert_eq!(clients.as_array().unwrap().len(), 1);
}

/// Agents in the field speak protocol 2 until they are upgraded: the server still serves them
/// on their own path (MD5s signed into the part URLs, the SHA-256 up front and recorded on the
/// object, verification by the multipart ETag), in plans shaped exactly as they parse them.
async fn a_protocol_2_agent_completes_a_download(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("proto2");
    let size = 12 * MIB;
    let (mut agent, upload_id, plan) =
        RawAgent::with_plan(&server, &client_id, "export.csv", size).await;
    // Released protocol 2 agents refuse unknown fields: the plan carries none.
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&plan),
        [
            "complete_url",
            "done",
            "expires_at",
            "expires_in_secs",
            "part_size",
            "parts",
            "size",
            "type",
            "upload_id"
        ]
    );
    // Operators see who is left to upgrade.
    let (_, clients) = server.get_json("/clients").await;
    let me = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == client_id.as_str())
        .unwrap();
    assert_eq!(me["protocol_version"], 2, "{me}");
    assert_eq!(me["agent_version"], "raw", "{me}");
    let parts = plan["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    for part in parts {
        assert_eq!(keys(part), ["content_md5", "part_number", "url"]);
    }
    let data = vec![7u8; size as usize];
    let part_size = plan["part_size"].as_u64().unwrap() as usize;
    let mut etags = Vec::new();
    for (i, chunk) in data.chunks(part_size).enumerate() {
        etags.push(raw_s3::put_planned_part(&plan, i, chunk.to_vec()).await);
    }
    let resp = raw_s3::complete(&plan, &etags).await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let parts: Vec<serde_json::Value> = etags
        .iter()
        .enumerate()
        .map(|(i, etag)| serde_json::json!({"part_number": i + 1, "etag": etag}))
        .collect();
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id, "parts": parts
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    assert_identical(&server, &status, &sha).await;
    assert_eq!(
        status.checksum_crc64nvme, None,
        "protocol 2 is verified by ETag"
    );
    let head = server
        .s3()
        .await
        .head_object()
        .bucket(BUCKET)
        .key(status.key())
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata().and_then(|m| m.get("sha256")),
        Some(&sha),
        "the SHA-256 is recorded on the object, as protocol 2 agents were promised"
    );
}

storage_modes!(protocol_2_agent, a_protocol_2_agent_completes_a_download);

/// An agent's labels (from its configuration) reach `/clients`; labels that are not plain
/// `key=value` close that connection with `MALFORMED_MESSAGE`, and an older agent without labels
/// is served as before.
#[tokio::test]
async fn labels_come_with_hello() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.csv");
    write_file(&file, 1000).await;
    let client_id = unique_client("labelled");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--label", "region=north", "--label", "brand=burger-co"],
    );
    server.wait_connected(&client_id).await;
    let out = run_cli(&server, &["clients", "--json"]).await;
    let clients: Vec<shared::api::ClientInfo> = serde_json::from_str(&stdout(&out)).unwrap();
    let me = clients
        .iter()
        .find(|c| c.client_id.as_str() == client_id)
        .unwrap();
    assert_eq!(me.labels.to_string(), "brand=burger-co,region=north");
    let text = run_cli(&server, &["clients"]).await;
    assert!(
        stdout(&text).contains("brand=burger-co,region=north"),
        "{}",
        stdout(&text)
    );

    let bad_id = unique_client("bad-labels");
    let mut bad = ws_connect(&server, Some(&agent_token(&bad_id)))
        .await
        .unwrap();
    bad.send_json(serde_json::json!({
        "type": "hello", "protocol_version": 4, "agent_version": "x",
        "labels": {"region": "north\n2026-12-02 forged"}
    }))
    .await;
    let msgs = bad.drain_until_closed().await;
    assert_eq!(msgs[0]["code"], "MALFORMED_MESSAGE", "{msgs:?}");
    assert!(!server.client(&bad_id).await.connected);

    let plain = unique_client("no-labels");
    let _old = RawAgent::connect(&server, &plain).await;
    server.wait_connected(&plain).await;
}
