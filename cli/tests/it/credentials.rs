//! The server finds AWS credentials through aws-config's default chain, on the SDK HTTP client
//! Backhaul builds itself (the SDK's own default client is compiled out).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A stand-in for the ECS (and EKS Pod Identity) credentials endpoint: it answers every GET with
/// the embedded store's keys as temporary credentials, and counts the requests.
async fn fake_container_credentials() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v2/credentials/test",
        listener.local_addr().unwrap()
    );
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
                let body = format!(
                    r#"{{"AccessKeyId":"{EMBEDDED_ACCESS_KEY}","SecretAccessKey":"{EMBEDDED_SECRET_KEY}","Token":"session-token-from-the-container","Expiration":"2099-01-01T00:00:00Z"}}"#
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, served)
}

/// With no keys in its settings, a `STORAGE=s3` server takes its credentials from the container
/// endpoint and completes a download with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_chain_takes_container_credentials() {
    let store = TestServer::start(Mode::Embedded).await;
    let (creds_url, served) = fake_container_credentials().await;

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let api = free_addr();
    let args = s3_server_args(&data_dir, api, &store.s3_endpoint, false);
    // Empty profile files, so the chain reaches the container provider (environment keys are
    // not set in tests).
    let empty = OsStr::new("/dev/null");
    let _server_proc = ChildProcess::spawn_with_env(
        "server",
        &args,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", OsStr::new(&creds_url)),
            ("AWS_SHARED_CREDENTIALS_FILE", empty),
            ("AWS_CONFIG_FILE", empty),
        ],
    );
    let server = TestServer::attach(Mode::Embedded, api, &store.s3_endpoint, &data_dir).await;
    assert!(
        served.load(Ordering::Relaxed) >= 1,
        "the server started without asking the container endpoint for credentials"
    );

    let file = dir.path().join("container-creds.bin");
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("ecscreds");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&store, &status, &sha).await;
}
