//! `STATE=postgres`: every durable record in PostgreSQL, none in the data directory. A server
//! started afresh on the same database (and a new data directory, storage aside) knows every
//! upload, store, collection and revocation the first one made.

use std::time::Duration;

use shared::api::UploadState;

use crate::harness::*;

storage_modes!(state_in_postgres_outlives_the_server, |mode| {
    everything_durable_is_in_postgres(mode)
});

async fn everything_durable_is_in_postgres(mode: Mode) {
    let database = fresh_database();
    let state = ["--state", "postgres", "--database-url", database.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = TestServer::builder(mode)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .args(&state)
        .start()
        .await;

    // One download, then a collection over the same store.
    let file = dir.path().join("export.csv");
    let sha = write_file(&file, 7 * MIB + 3).await;
    let client_id = unique_client("pg-store");
    let agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let (code, trig) = server.trigger(&client_id).await;
    assert_eq!(code, 202, "{trig}");
    let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_identical(&server, &status, &sha).await;

    let resp = server
        .http_client()
        .post(format!("{}/collections", server.http_url()))
        .bearer_auth(operator_token())
        .json(&serde_json::json!({"target": {"kind": "ids", "client_ids": [client_id]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let collection: serde_json::Value = resp.json().await.unwrap();
    let collection_id = collection["collection_id"].as_str().unwrap().to_owned();
    wait_until(
        Duration::from_secs(60),
        "the collection to complete",
        || async {
            let (_, body) = server
                .get_json(&format!("/collections/{collection_id}"))
                .await;
            body["counts"]["completed"] == 1
        },
    )
    .await;

    // A revoked store, whose old token must stay refused.
    let revoked = unique_client("pg-revoked");
    let old_token = agent_token(&revoked);
    let out = run_cli(&server, &["token", "revoke", "--client-id", &revoked]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    drop(agent);
    let addr = server.api_addr;
    server.stop().await;
    assert!(
        !data_dir.join("backhaul.db").exists(),
        "nothing durable is kept in SQLite"
    );

    // A new server on the same database. Embedded storage keeps its objects in the data
    // directory, so that one stays; its database file must still not appear.
    let data_dir = match mode {
        Mode::Embedded => data_dir,
        Mode::LocalStack => dir.path().join("fresh-data"),
    };
    let server = TestServer::builder(mode)
        .at(addr, &data_dir)
        .args(&state)
        .start()
        .await;
    let again = server.upload(&upload_id).await;
    assert_eq!(again.state, UploadState::Completed);
    assert_eq!(again.key, status.key);
    let (code, body) = server
        .get_json(&format!("/collections/{collection_id}"))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["counts"]["completed"], 1, "{body}");
    let (_, stores) = server.get_json("/clients?all=true").await;
    assert!(
        stores.to_string().contains(&client_id),
        "the inventory knows the store: {stores}"
    );
    let (_, uploads) = server
        .get_json(&format!("/stores/{client_id}/uploads"))
        .await;
    assert!(uploads.to_string().contains(&upload_id), "{uploads}");
    assert_eq!(ws_connect(&server, Some(&old_token)).await.err(), Some(401));
    assert!(!data_dir.join("backhaul.db").exists());
}

/// A server that cannot reach its database does not start, and says why; one with
/// `STATE=postgres` and no URL is refused before it binds anything.
#[tokio::test]
async fn a_server_without_its_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let unreachable = format!("postgres://backhaul@{}/nothing", free_addr());
    for (args, expected) in [
        (
            vec![
                "--state",
                "postgres",
                "--database-url",
                unreachable.as_str(),
            ],
            "connecting to PostgreSQL (DATABASE_URL)",
        ),
        (
            vec!["--state", "postgres"],
            "STATE=postgres needs DATABASE_URL",
        ),
        (
            vec!["--state", "postgres", "--database-url", "mysql://x"],
            "DATABASE_URL is not a PostgreSQL connection URL",
        ),
    ] {
        let err = refused_start(&dir.path().join("data"), &args).await;
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !err.contains("backhaul@"),
            "the URL (which may carry a password) is not printed: {err}"
        );
    }
}
