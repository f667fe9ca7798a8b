//! The agent outlives the server.

use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let addr = server.api_addr;
    let file = dir.path().join("day.csv");
    let sha = write_file(&file, 7 * MIB).await;
    let client_id = unique_client("phoenix");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;

    server.stop().await;
    // While the server is down the agent keeps trying. Something else holds the address for a
    // while and refuses the WebSocket upgrade (it closes every connection at once): the agent
    // must come back to it, not give up after the first failure.
    let stand_in = tokio::net::TcpListener::bind(addr).await.unwrap();
    for attempt in 1..=3 {
        let (sock, _) = tokio::time::timeout(Duration::from_secs(30), stand_in.accept())
            .await
            .unwrap_or_else(|_| panic!("the agent stopped trying after {} attempts", attempt - 1))
            .unwrap();
        drop(sock);
    }
    drop(stand_in);

    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .start()
        .await;
    server.wait_connected(&client_id).await;
    let out = run_cli(&server, &["download", "--client-id", &client_id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(server.object_sha256(st["key"].as_str().unwrap()).await, sha);
}
