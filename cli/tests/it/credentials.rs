//! The server finds AWS credentials through aws-config's default chain, on the SDK HTTP client
//! Backhaul builds itself (the SDK's own default client is compiled out).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A stand-in for the ECS (and EKS Pod Identity) credentials endpoint: it answers every GET with
/// the embedded store's keys as temporary credentials that expire `lifetime` after the request
/// (in 2099 without one), and counts the requests.
async fn fake_container_credentials(lifetime: Option<Duration>) -> (String, Arc<AtomicUsize>) {
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
                let expiration = match lifetime {
                    Some(d) => (time::OffsetDateTime::now_utc() + d)
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap(),
                    None => "2099-01-01T00:00:00Z".to_owned(),
                };
                let body = format!(
                    r#"{{"AccessKeyId":"{EMBEDDED_ACCESS_KEY}","SecretAccessKey":"{EMBEDDED_SECRET_KEY}","Token":"session-token-from-the-container","Expiration":"{expiration}"}}"#
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

/// A `STORAGE=s3` server process, on another test server's embedded store, with no keys in its
/// settings: the default chain finds the container endpoint's. Returns the store, the server,
/// the request count of the endpoint, the server process and its directory.
async fn server_on_container_credentials(
    lifetime: Option<Duration>,
) -> (
    TestServer,
    TestServer,
    Arc<AtomicUsize>,
    ChildProcess,
    tempfile::TempDir,
) {
    let store = TestServer::start(Mode::Embedded).await;
    let (creds_url, served) = fake_container_credentials(lifetime).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let api = free_addr();
    let args = s3_server_args(&data_dir, api, &store.s3_endpoint, false);
    // Empty profile files, so the chain reaches the container provider (environment keys are
    // not set in tests).
    let empty = OsStr::new("/dev/null");
    let server_proc = ChildProcess::spawn_with_env(
        "server",
        &args,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", OsStr::new(&creds_url)),
            ("AWS_SHARED_CREDENTIALS_FILE", empty),
            ("AWS_CONFIG_FILE", empty),
        ],
    );
    let server = TestServer::attach(Mode::Embedded, api, &store.s3_endpoint, &data_dir).await;
    (store, server, served, server_proc, dir)
}

/// With no keys in its settings, a `STORAGE=s3` server takes its credentials from the container
/// endpoint and completes a download with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_chain_takes_container_credentials() {
    let (store, server, served, _server_proc, dir) = server_on_container_credentials(None).await;
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

/// Temporary credentials that expire in two minutes sign URLs that live less than that,
/// whatever PRESIGN_TTL_SECS says: a URL that outlived them would get `ExpiredToken`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_end_before_their_credentials() {
    let (_store, server, _served, _server_proc, _dir) =
        server_on_container_credentials(Some(Duration::from_secs(120))).await;
    let client_id = unique_client("shortcreds");
    let (_agent, _upload_id, plan) = RawAgent::with_plan(&server, &client_id, "a.bin", 1000).await;
    let ttl = plan["expires_in_secs"].as_u64().unwrap();
    assert!(
        (1..=90).contains(&ttl),
        "URLs live {ttl} s past credentials of 120 s"
    );
}

/// Temporary credentials that expire 40 s after each fetch: every plan's URLs live 10 s, so a
/// transfer paced over 16 s runs out of them midway. The agent asks for fresh URLs, the server
/// signs them with fresh credentials, and the download completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_outlives_its_credentials() {
    let (store, server, served, _server_proc, dir) =
        server_on_container_credentials(Some(Duration::from_secs(40))).await;
    let file = dir.path().join("slow.bin");
    let sha = write_file(&file, 24 * MIB).await;
    let client_id = unique_client("renewcreds");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &[
            "--upload-concurrency",
            "1",
            "--max-upload-bytes-per-sec",
            "1572864",
        ],
    );
    server.wait_connected(&client_id).await;
    let before = served.load(Ordering::Relaxed);
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&store, &status, &sha).await;
    assert!(status.resumes >= 1, "the URLs never ran out: {status:?}");
    assert!(
        served.load(Ordering::Relaxed) > before + 1,
        "every plan is signed with freshly loaded credentials"
    );
}
