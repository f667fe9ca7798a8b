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

    let cases: [(&str, Option<&str>, u16); 7] = [
        ("no token", None, 401),
        ("garbage", Some("not-a-jwt"), 401),
        ("wrong secret", Some(&wrong_secret), 401),
        ("tampered signature", Some(&tampered), 401),
        ("expired", Some(&expired), 401),
        ("subject is not a client id", Some(&bad_sub), 401),
        ("operator token", Some(&operator), 403),
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

#[tokio::test]
async fn cli_mints_tokens_the_server_accepts() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cli"))
        .args(["token", "issue", "--client-id", "restaurant-1"])
        .env("JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let claims = keys().verify(stdout(&out).trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("restaurant-1", Role::Agent)
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cli"))
        .args(["token", "issue", "--operator"])
        .env("JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let claims = keys().verify(stdout(&out).trim()).unwrap();
    assert_eq!(claims.role, Role::Operator);

    // A short secret and a hostile client id are refused.
    for (args, secret) in [
        (vec!["token", "issue", "--operator"], "short"),
        (vec!["token", "issue", "--client-id", "../x"], SECRET),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cli"))
            .args(&args)
            .env("JWT_SECRET", secret)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(stdout(&out).is_empty());
    }
}
