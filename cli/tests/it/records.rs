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

/// `PART_SIZE` changes across a restart while an upload is half done: the agent is asked to
/// describe its file in the layout the upload was planned with, the file is found the same
/// (though its modification time moved), and the upload resumes and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_keeps_its_part_layout_across_a_part_size_change() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let five_mib = (5 * MIB).to_string();
    let mut server = TestServer::builder(Mode::Embedded)
        .at("127.0.0.1:0".parse().unwrap(), &data_dir)
        .args(&["--part-size", &five_mib])
        .start()
        .await;
    let addr = server.api_addr;
    let client_id = unique_client("layout");
    let size = 12 * MIB;
    let data = vec![7u8; size as usize];
    let (agent, upload_id, plan) = RawAgent::with_plan(&server, &client_id, "f.bin", size).await;
    assert_eq!(plan["part_size"], 5 * MIB);
    let first = raw_s3::put_planned_part(&plan, 0, data[..(5 * MIB) as usize].to_vec()).await;
    drop(agent);
    server.stop().await;

    let eight_mib = (8 * MIB).to_string();
    let server = TestServer::builder(Mode::Embedded)
        .at(addr, &data_dir)
        .args(&["--part-size", &eight_mib])
        .start()
        .await;
    let mut agent = RawAgent::connect(&server, &client_id).await;
    let describe = agent.recv_json().await.unwrap();
    assert_eq!(describe["upload_id"], upload_id.as_str(), "{describe}");
    assert_eq!(describe["min_part_size"], 5 * MIB, "the recorded layout");
    let mut info = file_info(&upload_id, "f.bin", &data, 5 * MIB);
    info["modified_ms"] = serde_json::json!(2);
    agent.send_json(info).await;
    let plan = agent.recv_json().await.unwrap();
    assert_eq!(plan["type"], "start_upload", "{plan}");
    assert_eq!(plan["done"].as_array().unwrap().len(), 1, "{plan}");
    let mut etags = vec![first];
    for (i, range) in [(1, 5 * MIB..10 * MIB), (2, 10 * MIB..size)] {
        let body = data[range.start as usize..range.end as usize].to_vec();
        etags.push(raw_s3::put_planned_part(&plan, i - 1, body).await);
    }
    let resp = raw_s3::complete(&plan, &etags).await;
    assert!(resp.status().is_success(), "{}", resp.status());
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id,
            "parts": etags.iter().enumerate().map(|(i, e)| serde_json::json!({
                "part_number": i + 1, "etag": e
            })).collect::<Vec<_>>()
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_eq!(status.part_size, Some(5 * MIB));
}
