//! Several replicas on one PostgreSQL database and one NATS bus (`STATE=postgres`, `BUS=nats`):
//! any replica serves a request about any store, and a store has one holder at a time.

use std::time::Duration;

use shared::api::UploadState;

use crate::proxy::{FaultProxy, Faults};
use crate::replica_collections::{
    DrivenByA, a_collection_driven_by_a, assert_cancel_refused_as_finished,
};

use crate::harness::*;

/// The NATS server of the test command (`scripts/test.sh` starts it).
fn nats_url() -> String {
    std::env::var("BACKHAUL_TEST_NATS_URL").expect(
        "the replica tests need BACKHAUL_TEST_NATS_URL: run scripts/test.sh, or engines/nats.sh \
         start and export BACKHAUL_TEST_NATS_URL=$(engines/nats.sh url)",
    )
}

/// The arguments that make a server replica `name` on `database` and the test bus, signing
/// tokens with the shared key file `keys`.
pub(crate) fn replica_args(database: &str, keys: &std::path::Path, name: &str) -> Vec<String> {
    [
        "--token-key-file",
        &keys.display().to_string(),
        "--state",
        "postgres",
        "--database-url",
        database,
        "--bus",
        "nats",
        "--nats-url",
        &nats_url(),
        // Tests run side by side on one NATS server, each deployment (database) on names of
        // its own, as deployments sharing a NATS server must be.
        "--nats-prefix",
        url::Url::parse(database)
            .unwrap()
            .path()
            .trim_start_matches('/'),
        "--replica-id",
        &format!("{name}-{}", unique_client("r")),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Replica `name` on `database`, signing tokens with the key file `keys` that every replica
/// shares (a token one replica renews must open a connection to any other); with embedded
/// storage, every replica after the first uses the first one's store (`s3`), as replicas share
/// one bucket.
pub(crate) async fn replica(
    mode: Mode,
    database: &str,
    keys: &std::path::Path,
    name: &str,
    s3: Option<&str>,
) -> TestServer {
    let args = replica_args(database, keys, name);
    let mut builder =
        TestServer::builder(mode).args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if let Some(endpoint) = s3 {
        builder = builder.s3_endpoint(endpoint);
    }
    builder.start().await
}

/// Two replicas, A and B, on one database and bus, and the folder of their shared key file.
async fn pair(mode: Mode) -> (TestServer, TestServer, tempfile::TempDir) {
    let database = fresh_database();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("token-keys.json");
    let a = replica(mode, &database, &key_file, "a", None).await;
    let shared_store = (mode == Mode::Embedded).then(|| a.s3_endpoint.clone());
    let b = replica(mode, &database, &key_file, "b", shared_store.as_deref()).await;
    (a, b, keys)
}

storage_modes!(a_trigger_reaches_an_agent_on_another_replica, |mode| {
    trigger_on_a_for_an_agent_on_b(mode)
});

async fn trigger_on_a_for_an_agent_on_b(mode: Mode) {
    let (a, b, _keys) = pair(mode).await;
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
    let (a, b, _keys) = pair(Mode::Embedded).await;
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
        // Each replica counts the agents connected to it; both show the store connected.
        wait_until(
            Duration::from_secs(10),
            "the older replica to drop the store",
            || async { there.metric("backhaul_connected_agents").await == 0 },
        )
        .await;
        assert_eq!(
            here.metric("backhaul_connected_agents").await,
            1,
            "flip {flip}"
        );
        assert!(there.client(&client_id).await.connected, "flip {flip}");
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

/// A replica as a process of its own, to be killed with SIGKILL, with `bus` its replica
/// arguments, presigning for `public`; in LocalStack mode, its own S3 calls go to `endpoint`
/// when one is given. Its process, and a handle on its API.
pub(crate) async fn killable_replica(
    mode: Mode,
    data: &std::path::Path,
    bus: Vec<String>,
    public: &str,
    endpoint: Option<&str>,
) -> (ChildProcess, TestServer) {
    let api = free_addr();
    let mut args = child_server_args(mode, data, api, free_addr(), public);
    if let Some(endpoint) = endpoint {
        let at = args.iter().position(|a| a == "--s3-endpoint-url").unwrap();
        args[at + 1] = endpoint.to_owned();
    }
    args.extend(bus);
    let process = ChildProcess::spawn("server", &args);
    (process, TestServer::attach(mode, api, "", data).await)
}

/// kill -9 of the replica that holds an agent in the middle of an upload triggered through the
/// other one: the agent reconnects (through the balancer) to the surviving replica, which takes
/// the upload on from the database and finishes it, with no stored part sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_death_moves_the_upload_to_another_replica() {
    let mode = Mode::LocalStack;
    let database = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(&localstack_endpoint(), Faults::default()).await;
    let key_file = dir.path().join("token-keys.json");
    let bus_args = |name: &str| replica_args(&database, &key_file, name);
    // A runs in this process; B is a process of its own, to be killed.
    let a_args: Vec<String> = [
        bus_args("a"),
        vec![
            "--s3-public-endpoint".into(),
            proxy.url(),
            "--part-size".into(),
            "5242880".into(),
        ],
    ]
    .concat();
    let a = TestServer::builder(mode)
        .args(&a_args.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .await;
    let (mut b_proc, b) = killable_replica(
        mode,
        &dir.path().join("b"),
        bus_args("b"),
        &proxy.url(),
        None,
    )
    .await;
    let b_api = b.api_addr;
    let b_data = b.data_dir.clone();

    // The agent reaches B first, through the balancer, and A once B is gone.
    let balancer = Balancer::start(vec![b_api, a.api_addr]).await;
    let front = TestServer::attach(mode, balancer.addr, "", &b_data).await;
    let file = dir.path().join("export.bin");
    let sha = write_file(&file, 60 * MIB).await;
    let client_id = unique_client("moves");
    let _agent = TestAgent::start_with(
        &front,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "20971520"],
    );
    b.wait_connected(&client_id).await;

    let upload_id = trigger_id(&a, &client_id).await;
    wait_until(Duration::from_secs(60), "two parts stored", || async {
        a.upload(&upload_id).await.parts_done >= 2
    })
    .await;
    b_proc.kill9().await;

    let status = a.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_identical(&a, &status, &sha).await;
    assert!(status.resumes >= 1, "{status:?}");
    assert_eq!(
        proxy.stats.duplicates(),
        vec![],
        "no stored part was sent twice"
    );
    assert_eq!(a.in_progress_multiparts(&client_id).await, 0);
    assert!(a.client(&client_id).await.connected);
}

/// kill -9 of the replica that holds an upload while it verifies the object (its storage
/// answers no HeadObject): the agent reconnects to the other replica, which takes the upload
/// on as it was left, verifies the object itself, and completes it within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_cut_short_by_the_holders_death_completes_elsewhere() {
    let mode = Mode::LocalStack;
    let database = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token-keys.json");
    let proxy = FaultProxy::start(
        &localstack_endpoint(),
        Faults {
            fail_heads: Some(u32::MAX),
            ..Faults::default()
        },
    )
    .await;
    let a_args = replica_args(&database, &key_file, "a");
    let a = TestServer::builder(mode)
        .args(&a_args.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .await;
    // B, to be killed, reaches storage through the proxy: its verification never gets an answer.
    let (mut b_proc, b) = killable_replica(
        mode,
        &dir.path().join("b"),
        replica_args(&database, &key_file, "b"),
        &proxy.url(),
        Some(&proxy.url()),
    )
    .await;
    let (b_api, b_data) = (b.api_addr, b.data_dir.clone());

    let balancer = Balancer::start(vec![b_api, a.api_addr]).await;
    let front = TestServer::attach(mode, balancer.addr, "", &b_data).await;
    let file = dir.path().join("export.bin");
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("verifying");
    let _agent = TestAgent::start(&front, &client_id, &file);
    b.wait_connected(&client_id).await;
    let upload_id = trigger_id(&a, &client_id).await;
    wait_until(Duration::from_secs(60), "B verifies", || async {
        a.upload(&upload_id).await.state == UploadState::Verifying
            && proxy
                .stats
                .injected_head_503
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
    })
    .await;
    b_proc.kill9().await;

    let status = a.wait_finished(&upload_id).await;
    assert_identical(&a, &status, &sha).await;
    assert_eq!(a.in_progress_multiparts(&client_id).await, 0);
}

/// A cancel sent to the replica that does not hold the store ends the upload where it runs:
/// both replicas then say `cancelled`, and no multipart upload is left; a second cancel gets
/// the holder's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_any_replica_ends_the_upload() {
    let (a, b, _keys) = pair(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    write_file(&file, 40 * MIB).await;
    let client_id = unique_client("cancelled");
    let _agent = TestAgent::start_with(
        &b,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "10485760"],
    );
    b.wait_connected(&client_id).await;
    let upload_id = trigger_id(&a, &client_id).await;
    wait_until(Duration::from_secs(60), "a part stored", || async {
        a.upload(&upload_id).await.parts_done >= 1
    })
    .await;

    let cancel = || async {
        let resp = a
            .http_client()
            .delete(format!("{}/uploads/{upload_id}", a.http_url()))
            .bearer_auth(operator_token())
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<serde_json::Value>().await.unwrap(),
        )
    };
    let (code, body) = cancel().await;
    assert_eq!(code, 200, "{body}");
    let status = a.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Cancelled, "{status:?}");
    assert_eq!(b.upload(&upload_id).await.state, UploadState::Cancelled);
    assert_eq!(b.in_progress_multiparts(&client_id).await, 0);
    let (code, body) = cancel().await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("UPLOAD_FINISHED")),
        "{body}"
    );
}

/// kill -9 of the replica that holds the leases, while it holds an upload whose agent went
/// away: the other replica takes the leases over, finds the upload that no live replica holds,
/// and fails it (STALLED) once the stall timeout has passed; its multipart upload is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_moves_when_its_holder_dies() {
    let mode = Mode::LocalStack;
    let database = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token-keys.json");
    let common = |name: &str| {
        let mut args = replica_args(&database, &key_file, name);
        args.extend(["--upload-stall-timeout-secs".to_owned(), "3".to_owned()]);
        args
    };
    // A starts first, so it takes the leases; it is a process of its own, to be killed.
    let (a_api, a_s3) = (free_addr(), free_addr());
    let a_data = dir.path().join("a");
    let mut a_args = child_server_args(mode, &a_data, a_api, a_s3, &localstack_endpoint());
    a_args.extend(common("a"));
    let mut a_proc = ChildProcess::spawn("server", &a_args);
    let a = TestServer::attach(mode, a_api, "", &a_data).await;
    let b_args = common("b");
    let b = TestServer::builder(mode)
        .args(&b_args.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .await;

    // An upload on A whose agent goes away after its first part.
    let file = dir.path().join("export.bin");
    write_file(&file, 40 * MIB).await;
    let client_id = unique_client("abandoned");
    let agent = TestAgent::start_with(
        &a,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "10485760"],
    );
    a.wait_connected(&client_id).await;
    let upload_id = trigger_id(&b, &client_id).await;
    wait_until(Duration::from_secs(60), "a part stored", || async {
        b.upload(&upload_id).await.parts_done >= 1
    })
    .await;
    drop(agent);
    a.wait_disconnected(&client_id).await;
    // A dies before its own stall timeout could fail the upload.
    a_proc.kill9().await;

    let status = tokio::time::timeout(Duration::from_secs(60), b.wait_finished(&upload_id))
        .await
        .expect("B fails the abandoned upload within a minute");
    assert_eq!(status.state, UploadState::Failed, "{status:?}");
    assert_eq!(
        status.error.as_ref().map(|e| e.code),
        Some(shared::ErrorCode::Stalled),
        "{status:?}"
    );
    assert_eq!(b.in_progress_multiparts(&client_id).await, 0);
}

/// A replica that is on the bus but answers nothing (stopped with SIGSTOP, as a frozen or
/// overloaded one would be): a trigger through another replica for a store it holds, and a
/// cancel of a collection while it drives the collections, are `TIMEOUT` (503), not internal
/// errors; the collection stays open meanwhile. Once it runs again, it carries both out, as if
/// it had answered late: the download completes, the collection is cancelled, and a second
/// cancel is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_answer_is_a_timeout() {
    let DrivenByA {
        a_proc,
        a,
        b,
        collection_id,
        cancel_url,
        ..
    } = a_collection_driven_by_a().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    let sha = write_file(&file, 2 * MIB).await;
    let client_id = unique_client("paused");
    let _agent = TestAgent::start(&a, &client_id, &file);
    b.wait_connected(&client_id).await;

    a_proc.pause(true);
    let started = std::time::Instant::now();
    let (trigger, cancel) = tokio::join!(
        b.trigger(&client_id),
        b.as_operator(b.http_client().delete(&cancel_url)),
    );
    for (what, (status, body)) in [("trigger", trigger), ("collection cancel", cancel)] {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (503, Some("TIMEOUT")),
            "{what}: {body}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let (status, body) = b.get_json(&format!("/collections/{collection_id}")).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("open")),
        "{body}"
    );

    a_proc.pause(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let upload_id = loop {
        let seen = b.client(&client_id).await;
        if let Some(id) = seen.active_upload.or(seen.last_upload.map(|u| u.upload_id)) {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A did not carry the trigger out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = tokio::time::timeout(Duration::from_secs(60), b.wait_finished(&upload_id))
        .await
        .expect("the download completes once A runs again");
    assert_identical(&b, &status, &sha).await;
    crate::collections::wait_summary(&b, &collection_id, "A carries the cancel out", |s| {
        s.state.as_str() == "cancelled"
    })
    .await;
    assert_cancel_refused_as_finished(&b, &cancel_url).await;
}

/// A store revoked through one replica is closed on the replica that holds it, and its old
/// token opens no connection on either; so is a single token revoked by its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_holds_on_every_replica() {
    let (a, b, key_dir) = pair(Mode::Embedded).await;
    let client_id = unique_client("revoked");
    let old_token = agent_token(&client_id);
    let mut on_b = RawAgent::connect(&b, &client_id).await;

    let out = run_cli(
        &a,
        &["token", "revoke", "--client-id", &client_id, "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let resp: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(resp["disconnected"], true, "{resp}");
    let said = on_b.drain_until_closed().await;
    assert!(said.iter().any(|m| m["code"] == "UNAUTHORIZED"), "{said:?}");
    assert_eq!(ws_connect(&b, Some(&old_token)).await.err(), Some(401));
    assert_eq!(ws_connect(&a, Some(&old_token)).await.err(), Some(401));

    // One token by its id: minted through B, connected to B, revoked through A.
    let admin = keys()
        .issue("root", shared::auth::Role::Admin, Duration::from_secs(600))
        .unwrap();
    let other = unique_client("revoked-one");
    let out = run_cli_as(&b, &admin, &["token", "issue", "--client-id", &other]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let minted = stdout(&out).trim().to_owned();
    let jti = verify_with_keys_in(key_dir.path(), &minted)
        .unwrap()
        .jti
        .expect("a minted token has an id");
    let mut on_b = RawAgent::connect_with_token(&b, &minted, RAW_PROTOCOL_VERSION).await;
    let out = run_cli_as(&a, &admin, &["token", "revoke", "--id", &jti]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let said = on_b.drain_until_closed().await;
    assert!(said.iter().any(|m| m["code"] == "UNAUTHORIZED"), "{said:?}");
    assert_eq!(ws_connect(&b, Some(&minted)).await.err(), Some(401));
    assert_eq!(ws_connect(&a, Some(&minted)).await.err(), Some(401));
}

/// A second live replica under a name already in use is refused at start, saying why; the
/// first goes on serving. (Under one name both would take the other's stores for their own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_under_a_name_in_use_refuses_to_start() {
    let database = fresh_database();
    let keys = tempfile::tempdir().unwrap();
    let args = replica_args(&database, &keys.path().join("token-keys.json"), "same");
    let first = TestServer::builder(Mode::Embedded)
        .args(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .await;
    let name = args.last().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = refused_start(&dir.path().join("data"), &args).await;
    assert!(
        err.contains(&format!(
            "REPLICA_ID {name} is in use by another running replica"
        )),
        "{err}"
    );
    let (status, _) = first.get_json("/healthz").await;
    assert_eq!(status, 200, "the first replica still serves");
}
