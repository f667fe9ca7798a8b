//! Several replicas on one PostgreSQL database and one NATS bus (`STATE=postgres`, `BUS=nats`):
//! any replica serves a request about any store, and a store has one holder at a time.

use std::time::Duration;

use shared::api::UploadState;

use crate::harness::*;

/// The NATS server of the test command (`scripts/test.sh` starts it).
fn nats_url() -> String {
    std::env::var("BACKHAUL_TEST_NATS_URL").expect(
        "the replica tests need BACKHAUL_TEST_NATS_URL: run scripts/test.sh, or engines/nats.sh \
         start and export BACKHAUL_TEST_NATS_URL=$(engines/nats.sh url)",
    )
}

/// Replica `name` on `database`; with embedded storage, every replica after the first uses
/// the first one's store (`s3`), as replicas share one bucket.
async fn replica(mode: Mode, database: &str, name: &str, s3: Option<&str>) -> TestServer {
    let nats = nats_url();
    let mut builder = TestServer::builder(mode).args(&[
        "--state",
        "postgres",
        "--database-url",
        database,
        "--bus",
        "nats",
        "--nats-url",
        &nats,
        "--replica-id",
        &format!("{name}-{}", unique_client("r")),
    ]);
    if let Some(endpoint) = s3 {
        builder = builder.s3_endpoint(endpoint);
    }
    builder.start().await
}

/// Two replicas, A and B, on one database and bus.
async fn pair(mode: Mode) -> (TestServer, TestServer) {
    let database = fresh_database();
    let a = replica(mode, &database, "a", None).await;
    let shared_store = (mode == Mode::Embedded).then(|| a.s3_endpoint.clone());
    let b = replica(mode, &database, "b", shared_store.as_deref()).await;
    (a, b)
}

storage_modes!(a_trigger_reaches_an_agent_on_another_replica, |mode| {
    trigger_on_a_for_an_agent_on_b(mode)
});

async fn trigger_on_a_for_an_agent_on_b(mode: Mode) {
    let (a, b) = pair(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.csv");
    let sha = write_file(&file, 11 * MIB + 7).await;
    let client_id = unique_client("on-b");
    let _agent = TestAgent::start(&b, &client_id, &file);
    b.wait_connected(&client_id).await;

    let (code, trig) = a.trigger(&client_id).await;
    assert_eq!(code, 202, "{trig}");
    let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
    // A asks B for the live status until the end.
    let status = a.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_identical(&a, &status, &sha).await;
    let on_b = b.upload(&upload_id).await;
    assert_eq!(on_b.state, UploadState::Completed);
    assert_eq!(on_b.key, status.key);

    // A second trigger while B's agent is busy gets B's own answer; a store nobody holds gets
    // CLIENT_NOT_CONNECTED from either replica.
    let (code, body) = a.trigger(&unique_client("nobody")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("CLIENT_NOT_CONNECTED")),
        "{body}"
    );
    let (code, body) = b.trigger(&unique_client("nobody")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("CLIENT_NOT_CONNECTED")),
        "{body}"
    );
}

/// An agent that reconnects to the other replica, three times over: each new connection
/// closes the one before (CONNECTION_REPLACED), only one replica ever calls the store
/// connected, and a trigger reaches the newest connection alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_flipping_between_replicas_has_one_holder() {
    let (a, b) = pair(Mode::Embedded).await;
    let client_id = unique_client("flipper");
    let mut previous = RawAgent::connect(&a, &client_id).await;
    let mut on_a = true;
    for flip in 1..=3 {
        on_a = !on_a;
        let (here, there) = if on_a { (&a, &b) } else { (&b, &a) };
        let current = RawAgent::connect(here, &client_id).await;
        let said = previous.drain_until_closed().await;
        assert!(
            said.iter().any(|m| m["code"] == "CONNECTION_REPLACED"),
            "flip {flip}: the older connection is told: {said:?}"
        );
        wait_until(
            Duration::from_secs(10),
            "the older replica to drop the store",
            || async { !there.client(&client_id).await.connected },
        )
        .await;
        assert!(here.client(&client_id).await.connected, "flip {flip}");
        previous = current;
    }

    // Triggered through the replica that does not hold it: the newest connection alone is
    // asked, once.
    let holder_is_a = on_a;
    let other = if holder_is_a { &b } else { &a };
    let (code, trig) = other.trigger(&client_id).await;
    assert_eq!(code, 202, "{trig}");
    let first = previous
        .recv_json()
        .await
        .expect("the holder's connection is asked");
    assert_eq!(first["type"], "describe_file", "{first}");
    assert_eq!(first["upload_id"], trig["upload_id"]);
    let (code, body) = other.trigger(&client_id).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("DOWNLOAD_IN_PROGRESS")),
        "{body}"
    );
}
