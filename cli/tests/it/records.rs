//! Upload records across a restart, as an upgrade meets them.

use std::time::Duration;

use crate::harness::*;

/// A record this release cannot read (a field renamed by a careless upgrade, say) is reported and
/// left alone: the orphan sweep does not abort its multipart upload, and its status says the
/// record cannot be read rather than that the upload does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_keeps_its_multipart_upload() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let prefix = unique_client("unreadable");
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .args(&["--key-prefix", &prefix])
        .start()
        .await;
    let addr = server.api_addr;
    let client_id = unique_client("store");
    let (agent, upload_id, plan) = RawAgent::with_plan(&server, &client_id, "a.bin", 1000).await;
    let (key, s3_upload_id) = raw_s3::multipart_of(plan["parts"][0]["url"].as_str().unwrap());
    drop(agent);
    server.stop().await;

    let db = rusqlite::Connection::open(data_dir.join("backhaul.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE uploads SET record = replace(record, '\"stage\":', '\"renamed_stage\":')
             WHERE id = ?1",
            [&upload_id],
        )
        .unwrap();
    assert_eq!(changed, 1, "the upload's record is in the database");
    drop(db);

    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .args(&["--key-prefix", &prefix, "--orphan-sweep-interval-secs", "1"])
        .start()
        .await;
    // A true orphan beside it shows when a sweep has run.
    let s3 = server.s3().await;
    let orphan_key =
        format!("{prefix}/store-2/20260101T000000Z-7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d/x.bin");
    s3.create_multipart_upload()
        .bucket(BUCKET)
        .key(&orphan_key)
        .send()
        .await
        .unwrap();
    let pending = || async {
        s3.list_multipart_uploads()
            .bucket(BUCKET)
            .prefix(format!("{prefix}/"))
            .send()
            .await
            .unwrap()
            .uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    wait_until(
        Duration::from_secs(20),
        "the orphan to be aborted",
        || async { !pending().await.contains(&orphan_key) },
    )
    .await;
    assert_eq!(
        pending().await,
        vec![key.clone()],
        "the unreadable upload's stays"
    );
    let parts = s3
        .list_parts()
        .bucket(BUCKET)
        .key(&key)
        .upload_id(&s3_upload_id)
        .send()
        .await;
    assert!(parts.is_ok(), "its multipart upload is whole: {parts:?}");

    let (code, body) = server.get_json(&format!("/uploads/{upload_id}")).await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["error"]["code"], "INTERNAL", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be read"),
        "{body}"
    );
}
