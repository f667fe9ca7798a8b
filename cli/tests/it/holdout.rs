//! The server holds up against sockets that connect and then dawdle.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// Sends the start of a request and then a byte a second, never finishing the headers; returns
/// how long the server took to close the connection.
async fn dawdle(addr: &str) -> Duration {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{addr}: still open after 30 s"
        );
        tokio::select! {
            r = sock.read(&mut buf) => match r {
                // Closed, or an answer (408) followed by the close.
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => continue,
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if sock.write_all(b"X").await.is_err() {
                    return started.elapsed();
                }
            }
        }
    }
}

/// Slow headers are cut on the API listener and on the embedded S3 endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut() {
    let server = TestServer::start(Mode::Embedded).await;
    let api = server.api_addr.to_string();
    let s3 = server.s3_endpoint.trim_start_matches("http://").to_owned();
    let (api_took, s3_took) = tokio::join!(dawdle(&api), dawdle(&s3));
    for (what, took) in [("api", api_took), ("s3", s3_took)] {
        assert!(
            took >= Duration::from_secs(5) && took <= Duration::from_secs(15),
            "{what}: cut after {took:?}"
        );
    }
}

/// With room for two agents, two sockets that upgrade and never say hello fill it (a third
/// connection is refused), but they are cut after the hello timeout, and a real agent gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_hello_connections_do_not_crowd_out_agents() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--max-agent-connections", "2"])
        .start()
        .await;
    let squatters = [unique_client("squat-a"), unique_client("squat-b")];
    let mut held = Vec::new();
    for id in &squatters {
        held.push(ws_connect(&server, Some(&agent_token(id))).await.unwrap());
    }
    let third = ws_connect(&server, Some(&agent_token(&unique_client("third")))).await;
    assert_eq!(third.err(), Some(503), "handshaking connections count");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.csv");
    write_file(&file, 1000).await;
    let client_id = unique_client("real");
    let started = Instant::now();
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    for mut squatter in held {
        let msgs = squatter.drain_until_closed().await;
        assert_eq!(msgs[0]["code"], "AGENT_TIMEOUT", "{msgs:?}");
    }
}

/// An agent's failure message that tries to forge a log line (a newline, a timestamp, an
/// `audit=true` entry, a terminal escape) comes out escaped in the server's text log and in the
/// cli.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_text_is_escaped_in_logs_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (api, s3) = (free_addr(), free_addr());
    let args = child_server_args(Mode::Embedded, &data_dir, api, s3, &format!("http://{s3}"));
    let log_path = dir.path().join("server.log");
    let _server_proc =
        ChildProcess::spawn_logging("server", &args, std::fs::File::create(&log_path).unwrap());
    let server = TestServer::attach(Mode::Embedded, api, &format!("http://{s3}"), &data_dir).await;

    let client_id = unique_client("forger");
    let mut agent = RawAgent::connect(&server, &client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let describe = agent.recv_json().await.unwrap();
    assert_eq!(describe["type"], "describe_file");
    let forged = "disk error\n2026-12-02T00:00:00.000000Z  WARN server::api: upload cancelled audit=true operator=\"alice\"\u{1b}[2J";
    agent
        .send_json(serde_json::json!({
            "type": "upload_failed",
            "upload_id": upload_id,
            "code": "FILE_READ_ERROR",
            "message": forged,
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.error.unwrap().message, forged, "stored as sent");

    let mut log = String::new();
    wait_until(
        Duration::from_secs(10),
        "the upload's end in the log",
        || {
            log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let done = log.contains("upload ended");
            async move { done }
        },
    )
    .await;
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-02T00:00:00")),
        "a forged line:\n{log}"
    );
    assert!(log.contains("disk error\\n2026-12-02"), "{log}");
    assert!(!log.contains("\u{1b}[2J"), "{log}");

    let out = run_cli(&server, &["status", "--upload-id", &upload_id]).await;
    let text = stdout(&out);
    assert!(text.contains("disk error\\n2026-12-02"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("2026-12-02")), "{text}");
}
