//! The server terminates TLS itself: API, WebSocket and the embedded S3 endpoint.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_over_tls_end_to_end() {
    let server = TestServer::builder(Mode::Embedded).tls().start().await;
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
    let server = TestServer::builder(Mode::Embedded).tls().start().await;
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

/// The server's own S3 client (aws-sdk-s3 on hyper 1 and rustls with ring) speaks HTTPS to an S3
/// endpoint behind a private CA: it refuses the endpoint while the CA is unknown, and completes
/// and verifies a download once `SSL_CERT_FILE` names the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_https_with_a_private_ca() {
    // An embedded store served over TLS with a throwaway certificate stands in for the private
    // S3 endpoint; a second server uses it as plain `STORAGE=s3`.
    let store = TestServer::builder(Mode::Embedded).tls().start().await;
    let ca = store.ca_file.clone().unwrap();
    let https_endpoint = store.s3_endpoint.replacen("http://", "https://", 1);

    // Without the CA, the SDK refuses the certificate.
    let untrusting = server::storage::Storage::connect(server::storage::StorageSettings {
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        endpoint: Some(url::Url::parse(&https_endpoint).unwrap()),
        public_endpoint: None,
        force_path_style: true,
        credentials: Some(aws_sdk_s3::config::Credentials::new(
            EMBEDDED_ACCESS_KEY,
            EMBEDDED_SECRET_KEY,
            None,
            None,
            "test",
        )),
        encryption: Default::default(),
    })
    .await
    .unwrap();
    let err = untrusting
        .ensure_bucket(false)
        .await
        .expect_err("an unknown CA must be refused");
    let chain = format!("{err:#}").to_lowercase();
    assert!(
        chain.contains("certificate") || chain.contains("issuer"),
        "{chain}"
    );

    // With SSL_CERT_FILE set for its process alone, a server on that endpoint completes a
    // download: CreateMultipartUpload, presigning, HeadObject, all over HTTPS.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let api = free_addr();
    let args = s3_server_args(&data_dir, api, &https_endpoint, true);
    let _server_proc =
        ChildProcess::spawn_with_env("server", &args, &[("SSL_CERT_FILE", ca.as_os_str())]);
    let server = TestServer::attach(Mode::Embedded, api, &https_endpoint, &data_dir).await;

    let file = dir.path().join("private-ca.bin");
    let sha = write_file(&file, 12 * MIB).await;
    let client_id = unique_client("privca");
    let ca_s = ca.display().to_string();
    let _agent = TestAgent::start_with(&server, &client_id, &file, &["--ca-file", &ca_s]);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&store, &status, &sha).await;
}
