//! Agent tokens that renew themselves, with tokens of seconds so that time passes.

use std::time::{Duration, Instant};

use shared::auth::{Claims, Role, unix_now};

use crate::harness::*;

fn claims_of(server: &TestServer, token: &str) -> Claims {
    server
        .verify(token)
        .expect("a token the server minted verifies")
}

/// An agent installed with a 3-second token is renewed at its first connection, then again
/// each time its token is past half of the server's 10-second lifetime. Every renewal lands in
/// its token file. The server then goes down until the install token is long dead (past its
/// expiry and the 30 s leeway), comes back, and the agent reconnects with the newest token, on
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_renew_across_generations_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let ttl = ["--agent-token-ttl-secs", "10"];
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .args(&ttl)
        .start()
        .await;
    let addr = server.api_addr;
    let client_id = unique_client("renew");
    let install = keys()
        .issue(&client_id, Role::Agent, Duration::from_secs(3))
        .unwrap();
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, &install).unwrap();
    let file = dir.path().join("day.csv");
    write_file(&file, 1000).await;
    let token_file_arg = token_file.display().to_string();
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--token-file", &token_file_arg],
    );
    server.wait_connected(&client_id).await;

    // Three generations after the install token, each in the file.
    let mut seen: Vec<Claims> = Vec::new();
    let mut last = install.clone();
    let started = Instant::now();
    while seen.len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} renewals in 30 s",
            seen.len()
        );
        let now = std::fs::read_to_string(&token_file).unwrap();
        let now = now.trim();
        if now != last {
            let claims = claims_of(&server, now);
            assert_eq!(claims.sub, client_id);
            assert_eq!(claims.role, Role::Agent);
            assert_eq!(claims.exp - claims.iat, 10, "the server's lifetime");
            if let Some(prev) = seen.last() {
                assert!(claims.iat > prev.iat, "{claims:?} after {prev:?}");
                assert_ne!(claims.jti, prev.jti);
            }
            seen.push(claims);
            last = now.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = &seen[0];
    assert!(
        first.iat <= claims_of(&server, &install).iat + 2,
        "the 3-second install token is renewed at once: {first:?}"
    );
    let status = server.client(&client_id).await;
    let shown = status
        .token_expires_at
        .expect("the token's expiry is shown");
    assert!(shown.starts_with("20"), "{shown}");

    server.stop().await;
    // Down until the install token no longer verifies, expiry and leeway included.
    while keys().verify(&install).is_ok() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .args(&ttl)
        .start()
        .await;
    assert_eq!(
        ws_connect(&server, Some(&install)).await.err(),
        Some(401),
        "the install token is dead"
    );
    server.wait_connected(&client_id).await;
    // And the renewals go on.
    let newest = last.clone();
    let started = Instant::now();
    loop {
        let now = std::fs::read_to_string(&token_file).unwrap();
        if now.trim() != newest {
            assert!(claims_of(&server, now.trim()).iat > seen[2].iat);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no renewal after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Only agents that speak protocol 4 are sent a token: a protocol 3 agent keeps its own, and the
/// server still serves it.
#[tokio::test]
async fn only_protocol_4_agents_are_sent_a_token() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--agent-token-ttl-secs", "100"])
        .start()
        .await;
    for (version, renewed) in [(3, false), (4, true)] {
        let client_id = unique_client(&format!("renew-v{version}"));
        let short = keys()
            .issue(&client_id, Role::Agent, Duration::from_secs(20))
            .unwrap();
        let mut agent = RawAgent::connect_with_token(&server, &short, version).await;
        let next = tokio::time::timeout(Duration::from_secs(2), agent.recv_json()).await;
        match (renewed, next) {
            (true, Ok(Some(msg))) => {
                assert_eq!(msg["type"], "token_renewed", "{msg}");
                let claims = claims_of(&server, msg["token"].as_str().unwrap());
                assert_eq!(claims.sub, client_id);
                assert_eq!(msg["expires_at"], claims.exp);
                assert!(claims.exp >= unix_now() + 95, "{claims:?}");
            }
            (false, Err(_)) => {}
            (renewed, next) => panic!("protocol {version}: renewed {renewed}, got {next:?}"),
        }
        // Either way the agent is served.
        let (status, body) = server.trigger(&client_id).await;
        assert_eq!(status, 202, "{body}");
        let describe = agent.recv_json().await.unwrap();
        assert_eq!(describe["type"], "describe_file", "{describe}");
    }
}
