//! The `server` binary as an operator starts it: configured from its environment alone, it
//! serves the committed API document, and stops cleanly on SIGTERM. (The end-to-end tests in
//! `cli/tests` run the server as a library; this one runs `main`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_binary_serves_the_committed_document_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
        .env_clear()
        .env("DATA_DIR", dir.path().join("data"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{api}"))
        .env(
            "EMBEDDED_S3_LISTEN_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("STORAGE", "embedded")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{api}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = http.get(format!("{url}/healthz")).send().await
            && resp.status().is_success()
        {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited while starting"
        );
        assert!(
            Instant::now() < deadline,
            "the server did not start in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let served = http
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let committed: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/openapi.json"
    )))
    .unwrap();
    let served: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(
        served == committed,
        "/openapi.json is not docs/openapi.json"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 20 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}
