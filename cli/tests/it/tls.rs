//! The server terminates TLS itself: API, WebSocket and the embedded S3 endpoint.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_over_tls_end_to_end() {
    let server = TestServer::start_tls().await;
    assert!(server.http_url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tls.bin");
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("secure");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    let out = run_cli(&server, &["download", "--client-id", &client_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(st["state"], "completed");
    assert_eq!(server.object_sha256(st["key"].as_str().unwrap()).await, sha);
}

#[tokio::test]
async fn tls_is_verified_and_plain_http_is_refused() {
    let server = TestServer::start_tls().await;
    // An agent that does not trust the certificate cannot connect.
    let untrusting = client::connection::tls_config(None).unwrap();
    let url = url::Url::parse(&server.ws_url()).unwrap();
    let err = client::connection::ServerConnection::connect(&url, &agent_token("x"), &untrusting)
        .await
        .err()
        .expect("an untrusted certificate must be refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // Plain HTTP to the TLS port gets no API answer.
    let plain = format!("http://{}/healthz", server.api_addr);
    let resp = reqwest::Client::new().get(&plain).send().await;
    assert!(resp.is_err() || !resp.unwrap().status().is_success());

    // The cli without the CA refuses the server too.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cli"))
        .args(["clients"])
        .env("SERVER_URL", server.http_url())
        .env("API_TOKEN", operator_token())
        .env_remove("CA_FILE")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
}
