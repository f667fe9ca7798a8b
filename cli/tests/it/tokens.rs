//! Keys that stay on the server: the first admin token from the server host, every later token
//! from the API (the cli holds no secret), revocation by token id, and key rotation with a fleet
//! connected.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use shared::api::tokens::{SigningKeyInfo, TokenInfo};
use shared::auth::{Role, token_kid};

use crate::harness::*;

/// `server token issue ...` on the host of the server keeping its data in `data_dir`: the
/// server binary's own argument parsing and code, in this process.
pub(crate) fn host_token(data_dir: &Path, args: &[&str]) -> String {
    let data_dir = data_dir.display().to_string();
    let mut all = vec!["server", "token", "issue", "--data-dir", &data_dir];
    all.extend_from_slice(args);
    let cli = server::host::ServerCli::try_parse_from(all).unwrap();
    server::host::run(&cli.command.expect("a host command")).unwrap()
}

/// One API call with `token`: the status and the JSON body.
async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = server
        .http_client()
        .request(method, format!("{}{path}", server.http_url()))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// The cli mints through the server: stdout is the token.
async fn cli_issue(server: &TestServer, admin: &str, args: &[&str]) -> String {
    let mut all = vec!["token", "issue"];
    all.extend_from_slice(args);
    let out = run_cli_as(server, admin, &all).await;
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_owned()
}

async fn token_list(server: &TestServer, admin: &str) -> Vec<TokenInfo> {
    let out = run_cli_as(server, admin, &["token", "list", "--all", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

async fn keys_list(server: &TestServer, admin: &str) -> Vec<SigningKeyInfo> {
    let out = run_cli_as(server, admin, &["keys", "list", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// A server with no `JWT_SECRET` makes its own key (mode 0600) on first start. The first admin
/// token comes from the server host; then the cli, with no secret at all, mints operator and
/// agent tokens through the API, lists them, and revokes one operator's token by its id: that
/// token is refused at once, the other operator's still works, and so after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_mint_list_and_revoke_tokens_with_no_secret_at_hand() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(Mode::Embedded)
        .without_legacy_secret()
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let key_file = data_dir.join("token-keys.json");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is the server's alone");

    let admin = host_token(&data_dir, &["--operator", "--admin", "--name", "alice"]);
    let claims = server.verify(&admin).unwrap();
    assert_eq!((claims.sub.as_str(), claims.role), ("alice", Role::Admin));
    assert!(claims.jti.is_some());
    assert!(
        token_kid(&admin).unwrap().is_some(),
        "tokens name their key"
    );

    let bob = cli_issue(&server, &admin, &["--operator", "--name", "bob"]).await;
    let carol = cli_issue(&server, &admin, &["--operator", "--name", "carol"]).await;
    let store = unique_client("minted");
    let agent = cli_issue(&server, &admin, &["--client-id", &store]).await;
    let agent_claims = server.verify(&agent).unwrap();
    assert_eq!(agent_claims.role, Role::Agent);
    assert_eq!(
        agent_claims.exp - agent_claims.iat,
        30 * 24 * 3600,
        "the server's agent token lifetime"
    );
    for token in [&bob, &carol] {
        let (status, body) = call(&server, reqwest::Method::GET, "/clients", token, None).await;
        assert_eq!(status, 200, "{body}");
    }
    // An operator is not an admin.
    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/tokens",
        &bob,
        Some(json!({"role": "admin", "subject": "mallory"})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "FORBIDDEN"), "{body}");
    // A token signed with some secret the server never had is refused.
    let (status, _) = call(
        &server,
        reqwest::Method::GET,
        "/clients",
        &operator_token(),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // The ledger: who issued what, and no token in it.
    let listed = token_list(&server, &admin).await;
    let by_subject: HashMap<&str, &TokenInfo> =
        listed.iter().map(|t| (t.subject.as_str(), t)).collect();
    assert_eq!(by_subject["alice"].issued_by, "server-host");
    assert_eq!(by_subject["alice"].role, Role::Admin);
    for name in ["bob", "carol", store.as_str()] {
        assert_eq!(by_subject[name].issued_by, "alice", "{name}");
    }
    let raw = run_cli_as(&server, &admin, &["token", "list", "--json"]).await;
    for token in [&admin, &bob, &carol, &agent] {
        assert!(
            !stdout(&raw).contains(token.as_str()),
            "a token is never listed"
        );
    }

    // The agent's minted token connects (fresh: it is not renewed); revoking it by id
    // disconnects it.
    let mut raw_agent = RawAgent::connect_with_token(&server, &agent, 4).await;
    let agent_jti = by_subject[store.as_str()].jti.clone();
    let out = run_cli_as(&server, &admin, &["token", "revoke", "--id", &agent_jti]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let closed_with = tokio::time::timeout(Duration::from_secs(10), async {
        let mut closed_with = None;
        while let Some(msg) = raw_agent.recv_json().await {
            if msg["type"] == "error" {
                closed_with = Some(msg["code"].clone());
            }
        }
        closed_with
    })
    .await
    .expect("the agent is disconnected");
    assert_eq!(closed_with, Some(json!("UNAUTHORIZED")));
    assert_eq!(ws_connect(&server, Some(&agent)).await.err(), Some(401));

    // Bob's token, by its id: refused at once; carol's still works.
    let bob_jti = by_subject["bob"].jti.clone();
    let out = run_cli_as(&server, &admin, &["token", "revoke", "--id", &bob_jti]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked token"), "{}", stdout(&out));
    let (status, body) = call(&server, reqwest::Method::GET, "/clients", &bob, None).await;
    assert_eq!((status, code(&body)), (401, "UNAUTHORIZED"));
    assert!(body.to_string().contains("revoked"), "{body}");
    let (status, _) = call(&server, reqwest::Method::GET, "/clients", &carol, None).await;
    assert_eq!(status, 200);

    // Bad input gets a clear code and changes nothing.
    let post = |body: Value| {
        call(
            &server,
            reqwest::Method::POST,
            "/tokens",
            &admin,
            Some(body),
        )
    };
    for (body, want) in [
        (json!({"role": "root", "subject": "x"}), "BAD_REQUEST"),
        (
            json!({"role": "agent", "subject": "../x"}),
            "INVALID_CLIENT_ID",
        ),
        (
            json!({"role": "operator", "subject": "x\n[audit=true]"}),
            "BAD_REQUEST",
        ),
        (
            json!({"role": "operator", "subject": "x", "ttl_secs": 0}),
            "BAD_REQUEST",
        ),
        (
            json!({"role": "operator", "subject": "x", "ttl_secs": 400 * 86400}),
            "BAD_REQUEST",
        ),
        (json!("not an object"), "BAD_REQUEST"),
    ] {
        let (status, answer) = post(body.clone()).await;
        assert_eq!((status, code(&answer)), (400, want), "{body}: {answer}");
    }
    let active = keys_list(&server, &admin).await;
    assert_eq!(active.len(), 1);
    let active_key = format!("/keys/{}", active[0].kid);
    for (path, want) in [
        ("/tokens/not-a-uuid", (400, "INVALID_TOKEN_ID")),
        (
            "/tokens/6f1c8f8e-2b1d-4c3a-9e55-0d4f8a1b2c3d",
            (404, "TOKEN_NOT_FOUND"),
        ),
        ("/keys/..%2F..%2Fetc", (404, "KEY_NOT_FOUND")),
        // The active key stays.
        (active_key.as_str(), (409, "KEY_IN_USE")),
    ] {
        let (status, body) = call(&server, reqwest::Method::DELETE, path, &admin, None).await;
        assert_eq!((status, code(&body)), want, "{path}: {body}");
    }
    assert_eq!(
        token_list(&server, &admin).await.len(),
        listed.len(),
        "nothing minted"
    );

    // After a restart: the same key, bob still refused, carol still in.
    let addr = server.api_addr;
    server.stop().await;
    let server = TestServer::builder(Mode::Embedded)
        .without_legacy_secret()
        .at(addr, &data_dir)
        .start()
        .await;
    let (status, _) = call(&server, reqwest::Method::GET, "/clients", &bob, None).await;
    assert_eq!(status, 401);
    let (status, _) = call(&server, reqwest::Method::GET, "/clients", &carol, None).await;
    assert_eq!(status, 200);
    assert_eq!(keys_list(&server, &admin).await[0].kid, active[0].kid);
}

/// A fleet of agents stays connected through a key rotation. Each agent holds a token minted
/// through the API (key A) in its token file. After `keys rotate`, every agent is sent a token
/// signed by key B (within the 2-second spread) and writes it to its file; no agent reconnects.
/// Key A is then refused retirement while its tokens are valid, retired with `--force`, and
/// after a restart every agent connects again with its key-B token, while key-A tokens are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_keeps_every_agent_connected() {
    const FLEET: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let settings = ["--token-rotation-spread-secs", "2"];
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .args(&settings)
        .start()
        .await;
    let admin = host_token(&data_dir, &["--operator", "--admin", "--name", "root"]);
    let file = dir.path().join("day.csv");
    write_file(&file, 1000).await;

    let mut fleet = Vec::new();
    for i in 0..FLEET {
        let client_id = unique_client(&format!("rotate-{i}"));
        // Long-lived: nothing renews them by age during the test.
        let token = cli_issue(
            &server,
            &admin,
            &["--client-id", &client_id, "--ttl-secs", "3600"],
        )
        .await;
        let token_file = dir.path().join(format!("agent-{i}.token"));
        std::fs::write(&token_file, &token).unwrap();
        let arg = token_file.display().to_string();
        let agent = TestAgent::start_with(&server, &client_id, &file, &["--token-file", &arg]);
        fleet.push((client_id, token_file, token, agent));
    }
    for (client_id, ..) in &fleet {
        server.wait_connected(client_id).await;
    }
    let since: HashMap<String, String> = connected_since(&server).await;
    assert_eq!(since.len(), FLEET);
    let connects = server.metric("backhaul_agent_connections_total").await;
    let old_kid = token_kid(&fleet[0].2).unwrap().unwrap();
    let keys = keys_list(&server, &admin).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].agents_connected, FLEET as u64);

    let out = run_cli_as(&server, &admin, &["keys", "rotate", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let keys: Vec<SigningKeyInfo> = serde_json::from_str(&stdout(&out)).unwrap();
    let new_kid = keys.iter().find(|k| k.active).unwrap().kid.clone();
    assert_ne!(new_kid, old_kid);

    // Every agent's file gets a key-B token; meanwhile nobody drops off.
    let started = Instant::now();
    loop {
        let moved = fleet
            .iter()
            .filter(|(_, path, ..)| {
                let token = std::fs::read_to_string(path).unwrap();
                token_kid(token.trim()).unwrap().as_deref() == Some(new_kid.as_str())
                    && server.verify(token.trim()).is_ok()
            })
            .count();
        assert_eq!(
            connected_since(&server).await,
            since,
            "an agent reconnected"
        );
        if moved == FLEET {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{moved} of {FLEET} agents moved to the new key in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keys = keys_list(&server, &admin).await;
    let old = keys.iter().find(|k| k.kid == old_kid).unwrap();
    assert_eq!(old.agents_connected, 0, "{keys:?}");
    assert!(old.tokens_outstanding >= FLEET as u64, "{keys:?}");

    // Key A still signs valid tokens: retiring it needs --force.
    let out = run_cli_as(&server, &admin, &["keys", "retire", &old_kid]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("KEY_IN_USE"), "{}", stderr(&out));
    // The admin's own token is signed by key A too: a fresh one by key B first.
    let admin = cli_issue(
        &server,
        &admin,
        &["--operator", "--admin", "--name", "root"],
    )
    .await;
    let out = run_cli_as(&server, &admin, &["keys", "retire", &old_kid, "--force"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(keys_list(&server, &admin).await.len(), 1);
    assert_eq!(
        server.metric("backhaul_agent_connections_total").await,
        connects,
        "no agent reconnected through the rotation"
    );

    // A restart: every agent comes back with its key-B token; key-A tokens are refused.
    let addr = server.api_addr;
    server.stop().await;
    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .args(&settings)
        .start()
        .await;
    for (client_id, ..) in &fleet {
        server.wait_connected(client_id).await;
    }
    assert_eq!(
        ws_connect(&server, Some(&fleet[0].2)).await.err(),
        Some(401)
    );
    assert_eq!(
        server.metric("backhaul_agent_connections_total").await,
        FLEET as u64,
        "each agent connected once after the restart: none was refused"
    );
    drop(fleet);
}

/// Client id to `connected_since`, for every connected agent.
async fn connected_since(server: &TestServer) -> HashMap<String, String> {
    let (status, body) = server.get_json("/clients").await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["client_id"].as_str().unwrap().to_owned(),
                c["connected_since"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
