//! The operator page's sign-in, without a browser: what the session cookie is, what it allows,
//! and every way it is refused (a bad token, an agent token, a forged cookie, a missing or
//! forged CSRF token, a revoked token, signing out), with the error code each gets. Also the
//! new list routes' answers to hostile input.

use reqwest::Method;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{Value, json};

use crate::harness::*;
use crate::tokens::host_token;

struct Answer {
    status: u16,
    body: Value,
    set_cookie: Option<String>,
}

/// One request with optional bearer token, cookie, CSRF header and JSON body.
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = server
        .http_client()
        .request(method, format!("{}{path}", server.http_url()));
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    if let Some(cookie) = cookie {
        req = req.header(COOKIE, format!("backhaul_session={cookie}"));
    }
    if let Some(csrf) = csrf {
        req = req.header("x-csrf-token", csrf);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let set_cookie = resp
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        set_cookie,
    }
}

fn code(a: &Answer) -> &str {
    a.body["error"]["code"].as_str().unwrap_or_default()
}

/// Signs in with `token`: the cookie's value and the CSRF token.
async fn sign_in(server: &TestServer, token: &str) -> (String, String) {
    let a = call(
        server,
        Method::POST,
        "/ui/session",
        None,
        None,
        None,
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let set = a.set_cookie.expect("a session cookie is set");
    let value = set
        .strip_prefix("backhaul_session=")
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_owned();
    assert!(!set.contains(token), "the cookie is not the token");
    (value, a.body["csrf_token"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_allow_what_the_token_allows_and_nothing_forged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .start()
        .await;
    let admin = host_token(&data_dir, &["--operator", "--admin", "--name", "alice"]);
    let ttl_secs = 120;
    let operator = host_token(
        &data_dir,
        &[
            "--operator",
            "--name",
            "bob",
            "--ttl-secs",
            &ttl_secs.to_string(),
        ],
    );
    let post = |path: &str, body: Value| {
        let path = path.to_owned();
        let server = &server;
        async move { call(server, Method::POST, &path, None, None, None, Some(body)).await }
    };

    // Sign-in refusals: a junk token, an agent token, a malformed or unknown body. None sets a
    // cookie.
    for (body, status, want) in [
        (json!({ "token": "not-a-jwt" }), 401, "UNAUTHORIZED"),
        (json!({ "token": agent_token("store-1") }), 403, "FORBIDDEN"),
        (json!({ "token": operator, "extra": 1 }), 400, "BAD_REQUEST"),
        (json!({ "tok": operator }), 400, "BAD_REQUEST"),
        (json!("just a string"), 400, "BAD_REQUEST"),
    ] {
        let a = post("/ui/session", body.clone()).await;
        assert_eq!((a.status, code(&a)), (status, want), "{body}: {}", a.body);
        assert!(a.set_cookie.is_none(), "{body}: no cookie on a refusal");
    }

    // A good sign-in: the cookie's attributes, and a lifetime no longer than the token's.
    let a = post("/ui/session", json!({ "token": operator })).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["operator"], "bob");
    let set = a.set_cookie.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: not Secure ({set})");
    let max_age: u64 = set
        .split("Max-Age=")
        .nth(1)
        .and_then(|v| v.split(';').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age <= ttl_secs, "Max-Age {max_age} outlives the token");
    let (cookie, csrf) = sign_in(&server, &operator).await;
    let c = Some(cookie.as_str());

    // The cookie reads, and it shows the same CSRF token again.
    let a = call(&server, Method::GET, "/ui/session", None, c, None, None).await;
    assert_eq!(
        (a.status, a.body["csrf_token"].as_str()),
        (200, Some(csrf.as_str()))
    );
    let a = call(&server, Method::GET, "/stores", None, c, None, None).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Changing state needs the CSRF token: missing and forged are 403, the right one passes
    // (to the trigger's own answer: no such store is connected).
    let trigger = "/trigger-download/store-nowhere";
    for (csrf_sent, status, want) in [
        (None, 403, "FORBIDDEN"),
        (Some("forged"), 403, "FORBIDDEN"),
        (Some(&csrf[..csrf.len() - 1]), 403, "FORBIDDEN"),
        (Some(csrf.as_str()), 404, "CLIENT_NOT_CONNECTED"),
    ] {
        let a = call(&server, Method::POST, trigger, None, c, csrf_sent, None).await;
        assert_eq!(
            (a.status, code(&a)),
            (status, want),
            "{csrf_sent:?}: {}",
            a.body
        );
    }
    // A forged or empty cookie is no session.
    for forged in ["forged", "AAAA", ""] {
        let a = call(
            &server,
            Method::GET,
            "/stores",
            None,
            Some(forged),
            None,
            None,
        )
        .await;
        assert_eq!((a.status, code(&a)), (401, "UNAUTHORIZED"), "{forged:?}");
    }
    // A bearer token wins over the cookie: an agent's is refused even with a good cookie.
    let a = call(
        &server,
        Method::GET,
        "/stores",
        Some(&agent_token("s")),
        c,
        None,
        None,
    )
    .await;
    assert_eq!((a.status, code(&a)), (403, "FORBIDDEN"));
    // The cookie never opens the admin API.
    let a = call(&server, Method::GET, "/tokens", None, c, None, None).await;
    assert_eq!((a.status, code(&a)), (401, "UNAUTHORIZED"));

    // Revoking the token ends its sessions.
    let jti = server.verify(&operator).unwrap().jti.unwrap();
    let path = format!("/tokens/{jti}");
    let a = call(
        &server,
        Method::DELETE,
        &path,
        Some(&admin),
        None,
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(&server, Method::GET, "/stores", None, c, None, None).await;
    assert_eq!((a.status, code(&a)), (401, "UNAUTHORIZED"), "{}", a.body);

    // Signing out: needs the CSRF token, clears the cookie, and the session is gone.
    let (cookie, csrf) = sign_in(&server, &admin).await;
    let c = Some(cookie.as_str());
    let a = call(&server, Method::DELETE, "/ui/session", None, c, None, None).await;
    assert_eq!((a.status, code(&a)), (403, "FORBIDDEN"));
    let a = call(
        &server,
        Method::DELETE,
        "/ui/session",
        None,
        c,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(a.status, 204);
    assert!(a.set_cookie.unwrap().contains("Max-Age=0"));
    let a = call(&server, Method::GET, "/ui/session", None, c, None, None).await;
    assert_eq!((a.status, code(&a)), (401, "UNAUTHORIZED"));
    let a = call(&server, Method::GET, "/ui/session", None, None, None, None).await;
    assert_eq!((a.status, code(&a)), (401, "UNAUTHORIZED"));
}

/// The page's list routes and streams answer hostile input with a code, and the page's assets
/// carry the Content-Security-Policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_routes_refuse_hostile_input() {
    let server = TestServer::start(Mode::Embedded).await;
    for (path, status, want) in [
        ("/stores?limit=0", 400, "BAD_REQUEST"),
        ("/stores?limit=501", 400, "BAD_REQUEST"),
        ("/stores?after=..%2Fetc", 400, "INVALID_CLIENT_ID"),
        ("/stores?glob=%5B", 400, "BAD_REQUEST"),
        ("/stores?label=not-a-pair", 400, "BAD_REQUEST"),
        ("/stores?connected=maybe", 400, "BAD_REQUEST"),
        ("/stores?surprise=1", 400, "BAD_REQUEST"),
        ("/stores/..%2F..%2Fetc/uploads", 400, "INVALID_CLIENT_ID"),
        ("/stores/store-1/uploads?limit=1000", 400, "BAD_REQUEST"),
        ("/uploads/not-a-uuid/events", 400, "INVALID_UPLOAD_ID"),
        (
            "/uploads/3f0e4b7e-8d2a-4c4b-9a55-0d3f1f1b2c3d/events",
            404,
            "UPLOAD_NOT_FOUND",
        ),
        (
            "/collections/%3Cimg%3E/events",
            400,
            "INVALID_COLLECTION_ID",
        ),
        (
            "/collections/3f0e4b7e-8d2a-4c4b-9a55-0d3f1f1b2c3d/events",
            404,
            "COLLECTION_NOT_FOUND",
        ),
    ] {
        let (got, body) = server.get_json(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str().unwrap_or_default()),
            (status, want),
            "{path}: {body}"
        );
    }
    // A store the server never saw has no uploads, which is no error.
    let (got, body) = server.get_json("/stores/never-seen/uploads").await;
    assert_eq!((got, &body["uploads"]), (200, &json!([])));

    let resp = server
        .http_client()
        .get(format!("{}/ui", server.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let html = resp.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script");
}
