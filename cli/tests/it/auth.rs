//! Bad credentials are refused before anything happens.

use std::time::Duration;

use shared::auth::{AUDIENCE, Claims, ISSUER, Role, TokenKeys, unix_now};

use crate::harness::*;

fn claims(sub: &str, role: Role, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        role,
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        iat: unix_now(),
        exp,
        nbf: None,
        jti: None,
    }
}

#[tokio::test]
async fn websocket_refuses_bad_credentials() {
    let server = TestServer::start(Mode::Embedded).await;
    let other = TokenKeys::new(b"some-other-secret-some-other-secret!").unwrap();
    let wrong_secret = other
        .issue("store-1", Role::Agent, Duration::from_secs(60))
        .unwrap();
    let expired = keys()
        .encode(&claims("store-1", Role::Agent, unix_now() - 3600))
        .unwrap();
    let bad_sub = keys()
        .encode(&claims("../etc", Role::Agent, unix_now() + 60))
        .unwrap();
    // Change one character in the middle of the signature (the last one may carry padding bits
    // that decoding ignores).
    let token = agent_token("store-1");
    let sig_start = token.rfind('.').unwrap() + 1;
    let i = sig_start + 5;
    let swapped = if &token[i..=i] == "A" { "B" } else { "A" };
    let tampered = format!("{}{swapped}{}", &token[..i], &token[i + 1..]);
    let operator = operator_token();
    let not_yet = keys()
        .encode(&Claims {
            nbf: Some(unix_now() + 600),
            ..claims("store-1", Role::Agent, unix_now() + 3600)
        })
        .unwrap();
    let future_iat = keys()
        .encode(&Claims {
            iat: unix_now() + 600,
            ..claims("store-1", Role::Agent, unix_now() + 3600)
        })
        .unwrap();
    let wrong_aud = keys()
        .encode(&Claims {
            aud: "someone-else".into(),
            ..claims("store-1", Role::Agent, unix_now() + 3600)
        })
        .unwrap();
    let wrong_iss = keys()
        .encode(&Claims {
            iss: "evil".into(),
            ..claims("store-1", Role::Agent, unix_now() + 3600)
        })
        .unwrap();
    // {"alg":"none"} with a valid-looking payload and no signature.
    let alg_none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        agent_token("store-1").split('.').nth(1).unwrap()
    );
    // The same claims signed with HS512 under the right secret: the algorithm is pinned.
    let hs512 = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512);
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(
            &header,
            &claims("store-1", Role::Agent, unix_now() + 3600),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let empty_sub = keys()
        .encode(&claims("", Role::Agent, unix_now() + 3600))
        .unwrap();

    let cases: [(&str, Option<&str>, u16); 15] = [
        ("no token", None, 401),
        ("garbage", Some("not-a-jwt"), 401),
        ("wrong secret", Some(&wrong_secret), 401),
        ("tampered signature", Some(&tampered), 401),
        ("expired", Some(&expired), 401),
        ("subject is not a client id", Some(&bad_sub), 401),
        ("operator token", Some(&operator), 403),
        ("not yet valid", Some(&not_yet), 401),
        ("issued in the future", Some(&future_iat), 401),
        ("wrong audience", Some(&wrong_aud), 401),
        ("wrong issuer", Some(&wrong_iss), 401),
        ("alg none", Some(&alg_none), 401),
        ("HS512 instead of HS256", Some(&hs512), 401),
        ("empty subject", Some(&empty_sub), 401),
        ("empty bearer", Some(""), 401),
    ];
    for (name, token, expected) in cases {
        match ws_connect(&server, token).await {
            Ok(_) => panic!("{name}: connection was accepted"),
            Err(status) => assert_eq!(status, expected, "{name}"),
        }
    }
    // None of them registered an agent.
    let (_, clients) = server.get_json("/clients").await;
    assert_eq!(clients, serde_json::json!([]));
}

#[tokio::test]
async fn rest_api_refuses_bad_credentials() {
    let server = TestServer::start(Mode::Embedded).await;
    let http = reqwest::Client::new();
    let expired = keys()
        .encode(&claims("ops", Role::Operator, unix_now() - 3600))
        .unwrap();
    let agent = agent_token("store-1");
    let cases: [(&str, Option<String>, u16, &str); 5] = [
        ("no token", None, 401, "UNAUTHORIZED"),
        ("garbage", Some("nope".into()), 401, "UNAUTHORIZED"),
        ("expired operator", Some(expired), 401, "UNAUTHORIZED"),
        ("agent token", Some(agent), 403, "FORBIDDEN"),
        ("basic auth", None, 401, "UNAUTHORIZED"),
    ];
    for (name, token, expected, code) in cases {
        for (method, path) in [
            ("POST", "/trigger-download/store-1"),
            ("GET", "/clients"),
            ("GET", "/status/store-1"),
        ] {
            let mut req = http.request(
                method.parse().unwrap(),
                format!("{}{path}", server.http_url()),
            );
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            } else if name == "basic auth" {
                req = req.basic_auth("admin", Some("admin"));
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), expected, "{name} {method} {path}");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], code, "{name} {method} {path}");
        }
    }
    // /healthz needs no token.
    let resp = http
        .get(format!("{}/healthz", server.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn cli_reports_a_bad_operator_token() {
    let server = TestServer::start(Mode::Embedded).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cli"))
        .args(["clients"])
        .env("SERVER_URL", server.http_url())
        .env("API_TOKEN", "bogus")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("UNAUTHORIZED"), "{}", stderr(&out));
}

/// `cli token issue` asks the server, as an admin: an operator's token, a hostile client id and
/// a bad name are refused with the server's code, and nothing is printed where the token goes.
/// An admin token from the legacy secret still mints (tokens signed by the server's key).
#[tokio::test]
async fn cli_mints_tokens_only_as_an_admin() {
    let server = TestServer::start(Mode::Embedded).await;
    let admin = keys()
        .issue("legacy-admin", Role::Admin, Duration::from_secs(600))
        .unwrap();
    let out = run_cli_as(
        &server,
        &admin,
        &["token", "issue", "--client-id", "restaurant-1"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let claims = server.verify(stdout(&out).trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("restaurant-1", Role::Agent)
    );
    assert!(
        shared::auth::token_kid(stdout(&out).trim())
            .unwrap()
            .is_some()
    );

    for (token, args, code) in [
        (
            operator_token(),
            vec!["token", "issue", "--operator"],
            "FORBIDDEN",
        ),
        (
            admin.clone(),
            vec!["token", "issue", "--client-id", "../x"],
            "INVALID_CLIENT_ID",
        ),
        (
            admin.clone(),
            vec!["token", "issue", "--operator", "--name", "a b"],
            "BAD_REQUEST",
        ),
    ] {
        let out = run_cli_as(&server, &token, &args).await;
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(code), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
}

#[tokio::test]
async fn revoking_a_client_closes_it_and_refuses_its_old_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let client_id = unique_client("stolen");
    let bystander = unique_client("bystander");
    let old_token = agent_token(&client_id);
    let mut victim = RawAgent::connect(&server, &client_id).await;
    let _other = RawAgent::connect(&server, &bystander).await;

    let out = run_cli(
        &server,
        &["token", "revoke", "--client-id", &client_id, "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let resp: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(resp["disconnected"], true);
    let not_before = resp["tokens_issued_before"].as_u64().unwrap();

    // The live connection is told and closed; the old token no longer opens one.
    let msgs = victim.drain_until_closed().await;
    assert!(msgs.iter().any(|m| m["code"] == "UNAUTHORIZED"), "{msgs:?}");
    assert_eq!(ws_connect(&server, Some(&old_token)).await.err(), Some(401));
    // Other stores are untouched.
    assert!(server.client(&bystander).await.connected);

    // A token issued after the revocation works.
    wait_until(
        Duration::from_secs(5),
        "the revocation second to pass",
        || async { unix_now() >= not_before },
    )
    .await;
    RawAgent::connect(&server, &client_id).await;

    // The revocation survives a restart.
    let addr = server.api_addr;
    server.stop().await;
    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .start()
        .await;
    assert_eq!(ws_connect(&server, Some(&old_token)).await.err(), Some(401));
}
