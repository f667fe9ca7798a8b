//! Transfers that survive bad links, crashes and restarts, and prove their integrity. Part PUTs
//! go through [`FaultProxy`], which counts them: a part that storage accepted twice would be a
//! completed part uploaded again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;

use crate::harness::*;
use crate::proxy::{FaultProxy, Faults};

/// A server whose presigned URLs point at a fresh proxy in front of its storage.
async fn proxied(mode: Mode, faults: Faults, extra: &[&str]) -> (TestServer, FaultProxy) {
    let proxy = FaultProxy::start(&localstack_endpoint(), faults).await;
    let url = proxy.url();
    let mut args = vec![
        "--s3-public-endpoint",
        url.as_str(),
        "--part-size",
        "5242880",
    ];
    args.extend_from_slice(extra);
    let server = TestServer::builder(mode).args(&args).start().await;
    proxy.set_upstream(&server.s3_endpoint);
    (server, proxy)
}

/// A store: an agent started with `agent_extra`, sharing a file of `size` random bytes.
struct Store {
    client_id: String,
    file: std::path::PathBuf,
    sha: String,
    _agent: TestAgent,
    _dir: tempfile::TempDir,
}

async fn store(server: &TestServer, name: &str, size: u64, agent_extra: &[&str]) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    let sha = write_file(&file, size).await;
    let client_id = unique_client(name);
    let agent = TestAgent::start_with(server, &client_id, &file, agent_extra);
    server.wait_connected(&client_id).await;
    Store {
        client_id,
        file,
        sha,
        _agent: agent,
        _dir: dir,
    }
}

async fn wait_parts_done(server: &TestServer, upload_id: &str, at_least: u64) {
    wait_until(Duration::from_secs(60), "parts to be stored", || async {
        u64::from(server.upload(upload_id).await.parts_done) >= at_least
    })
    .await;
}

/// Storage itself refuses a part whose bytes differ from the checksum signed into its URL, and a
/// request that drops or changes the checksum no longer matches the signature.
async fn storage_rejects_tampered_parts(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("tamper");
    let size = 1000usize;
    let (mut agent, upload_id, plan) =
        RawAgent::with_plan(&server, &client_id, "a.bin", size as u64).await;
    let part = &plan["parts"][0];
    let (url, md5) = (
        part["url"].as_str().unwrap(),
        part["content_md5"].as_str().unwrap(),
    );
    let mut flipped = vec![7u8; size];
    flipped[10] ^= 1;
    let resp = raw_s3::put_part(url, Some(md5), flipped.clone()).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("BadDigest"));
    // Storage keeps nothing of a refused part.
    let (key, s3_upload_id) = raw_s3::multipart_of(url);
    let listed = server
        .s3()
        .await
        .list_parts()
        .bucket(BUCKET)
        .key(&key)
        .upload_id(&s3_upload_id)
        .send()
        .await
        .unwrap();
    assert!(listed.parts().is_empty(), "{:?}", listed.parts());
    // Without the header, or with the header of the tampered bytes, the signature fails.
    let own_md5 = {
        use base64::Engine;
        use md5::Digest;
        base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&flipped))
    };
    for header in [None, Some(own_md5.as_str())] {
        let status = raw_s3::try_put_part(url, header, flipped.clone())
            .await
            .map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(403) | Err(_)),
            "an unsigned checksum must not pass: {status:?}"
        );
    }
    // The honest bytes go in, and the upload completes and verifies.
    let etag = raw_s3::put_planned_part(&plan, 0, vec![7u8; size]).await;
    let resp = raw_s3::complete(&plan, std::slice::from_ref(&etag)).await;
    assert!(resp.status().is_success());
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id,
            "parts": [{"part_number": 1, "etag": etag}]
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

storage_modes!(tampered_parts, storage_rejects_tampered_parts);

/// A link that corrupts every part: storage refuses each one, the agent gives up after its
/// attempts, and the upload ends failed with nothing left behind, never completed.
async fn always_corrupted_never_completes(mode: Mode) {
    let faults = Faults {
        corrupt_every: Some(1),
        ..Faults::default()
    };
    let (server, proxy) = proxied(mode, faults, &[]).await;
    let store = store(
        &server,
        "corrupt",
        6 * MIB,
        &["--part-attempts", "3", "--part-retry-min-ms", "10"],
    )
    .await;
    let client_id = &store.client_id;
    let upload_id = trigger_id(&server, client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.code(), Some(ErrorCode::PartUploadFailed));
    let corrupted = proxy.stats.injected_corruptions.load(Ordering::Relaxed);
    // The failing part used all 3 attempts; a part still in flight when the upload failed is
    // cut off by the agent and may never get an answer from storage.
    assert!(corrupted >= 3, "{corrupted}");
    assert!(
        proxy.stats.rejected_by_storage.load(Ordering::Relaxed) >= 3,
        "storage refused the corrupted parts"
    );
    assert_eq!(
        proxy.stats.stored_parts(),
        0,
        "no corrupted part was stored"
    );
    assert_eq!(server.in_progress_multiparts(client_id).await, 0);
    assert!(server.list_keys(client_id).await.is_empty());
}

storage_modes!(always_corrupted, always_corrupted_never_completes);

/// 503s, cut connections and flipped bytes on a share of part PUTs: the download still
/// completes byte-identical, and no part is stored twice.
async fn faulty_link_completes(mode: Mode) {
    let faults = Faults {
        fail_every: Some(4),
        cut_every: Some(7),
        corrupt_every: Some(5),
        ..Faults::default()
    };
    let (server, proxy) = proxied(mode, faults, &[]).await;
    let size = 40 * MIB;
    let store = store(
        &server,
        "faulty",
        size,
        &["--part-attempts", "10", "--part-retry-min-ms", "10"],
    )
    .await;
    let (client_id, sha) = (&store.client_id, &store.sha);
    let upload_id = trigger_id(&server, client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, sha).await;
    let st = &proxy.stats;
    assert!(st.faults() >= 4, "faults were injected: {}", st.faults());
    assert_eq!(
        st.rejected_by_storage.load(Ordering::Relaxed),
        st.injected_corruptions.load(Ordering::Relaxed)
    );
    assert_eq!(st.duplicates(), vec![]);
    assert_eq!(st.stored_parts(), 8);
    assert_eq!(server.in_progress_multiparts(client_id).await, 0);
    // Every failed attempt was retried, and the agent reported each retry.
    let failed_attempts = st.part_puts.load(Ordering::Relaxed) - 8;
    let reported = server.metric("backhaul_part_retries_total").await;
    assert_eq!(
        reported,
        u64::from(failed_attempts),
        "retries reported to /metrics"
    );
    eprintln!(
        "FIGURES faulty link ({mode:?}): {} part PUTs for 8 parts, {reported} retries, {} 503s, {} cuts, {} corruptions refused, {} bytes re-sent",
        st.part_puts.load(Ordering::Relaxed),
        st.injected_503.load(Ordering::Relaxed),
        st.injected_cuts.load(Ordering::Relaxed),
        st.injected_corruptions.load(Ordering::Relaxed),
        st.part_bytes.load(Ordering::Relaxed) - size
    );
}

storage_modes!(faulty_link, faulty_link_completes);

/// kill -9 the agent process at random points of a 100 MiB upload, five times, and start it
/// again: every download completes byte-identical and no stored part is sent twice.
async fn agent_killed_resumes(mode: Mode) {
    let (server, proxy) = proxied(mode, Faults::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    let size = 100 * MIB;
    let sha = write_file(&file, size).await;
    let mut resumed = 0;
    let mut rng = seeded_rng(&format!("agent_killed_resumes ({mode:?})"));
    for trial in 0..5 {
        let client_id = unique_client("kill9");
        let args = agent_args(
            &server.ws_url(),
            &client_id,
            &file,
            &["--max-upload-bytes-per-sec", "41943040"],
        );
        let mut agent = ChildProcess::spawn("agent", &args);
        server.wait_connected(&client_id).await;
        let upload_id = trigger_id(&server, &client_id).await;
        // The first trial dies anywhere from hashing on; the others once parts are flowing,
        // anywhere in the 2.5 s the parts take at 40 MiB/s.
        if trial > 0 {
            wait_until(Duration::from_secs(60), "the upload to start", || async {
                server.upload(&upload_id).await.state == UploadState::Uploading
            })
            .await;
        }
        let delay = rng.gen_range(100..2500);
        eprintln!("kill -9 trial {trial} ({mode:?}): killing the agent after {delay} ms");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        agent.kill9().await;
        let before = server.upload(&upload_id).await;
        let _agent = ChildProcess::spawn("agent", &args);
        let status = server.wait_finished(&upload_id).await;
        assert_identical(&server, &status, &sha).await;
        resumed += u64::from(status.resumes);
        eprintln!(
            "FIGURES kill -9 trial {trial} ({mode:?}): killed after {delay} ms in state {} with {} parts stored; resumes {}",
            before.state, before.parts_done, status.resumes
        );
        assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    }
    let st = &proxy.stats;
    assert_eq!(st.duplicates(), vec![], "a stored part was uploaded twice");
    assert_eq!(st.stored_parts(), 5 * 20);
    eprintln!(
        "FIGURES kill -9 ({mode:?}): 5 trials, {resumed} resumes, {} part PUTs for 100 parts, {} bytes re-sent",
        st.part_puts.load(Ordering::Relaxed),
        st.part_bytes.load(Ordering::Relaxed) - 5 * size
    );
}

storage_modes!(agent_killed_resumes, agent_killed_resumes);

/// kill -9 the server mid-upload and start it again on the same address and data directory:
/// the status API still knows every upload and the download completes.
async fn server_killed_resumes(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (api, s3) = (free_addr(), free_addr());
    let proxy = FaultProxy::start(
        &match mode {
            Mode::Embedded => format!("http://{s3}"),
            Mode::LocalStack => localstack_endpoint(),
        },
        Faults::default(),
    )
    .await;
    let args = child_server_args(mode, &data_dir, api, s3, &proxy.url());
    let mut server_proc = ChildProcess::spawn("server", &args);
    let server = TestServer::attach(mode, api, &format!("http://{s3}"), &data_dir).await;

    let file = dir.path().join("export.bin");
    let first_sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("srvkill");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "20971520"],
    );
    server.wait_connected(&client_id).await;
    let first = trigger_id(&server, &client_id).await;
    let first_status = server.wait_finished(&first).await;
    assert_identical(&server, &first_status, &first_sha).await;

    let sha = write_file(&file, 60 * MIB).await;
    let upload_id = trigger_id(&server, &client_id).await;
    wait_parts_done(&server, &upload_id, 2).await;
    server_proc.kill9().await;
    let _server_proc = ChildProcess::spawn("server", &args);
    let server = TestServer::attach(mode, api, &format!("http://{s3}"), &data_dir).await;

    // The earlier upload is still known after the restart.
    assert_eq!(server.upload(&first).await.state, UploadState::Completed);
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, &sha).await;
    assert!(u64::from(status.resumes) >= 1, "{status:?}");
    assert_eq!(proxy.stats.duplicates(), vec![]);
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    eprintln!(
        "FIGURES server kill -9 ({mode:?}): {} part PUTs for 12+2 parts",
        proxy.stats.part_puts.load(Ordering::Relaxed)
    );
}

storage_modes!(server_killed_resumes, server_killed_resumes);

/// URLs that live 3 seconds and an agent held to 5 MiB/s, one part at a time (LocalStack checks
/// expiry when a request ends, so each part must take less than the URL lifetime): the agent
/// asks for fresh URLs for the missing parts and carries on.
async fn expired_urls_are_refreshed(mode: Mode) {
    let (server, proxy) = proxied(mode, Faults::default(), &["--presign-ttl-secs", "3"]).await;
    let store = store(
        &server,
        "expiry",
        30 * MIB,
        &[
            "--max-upload-bytes-per-sec",
            "5242880",
            "--upload-concurrency",
            "1",
        ],
    )
    .await;
    let (client_id, sha) = (&store.client_id, &store.sha);
    let upload_id = trigger_id(&server, client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, sha).await;
    assert!(u64::from(status.resumes) >= 1, "{status:?}");
    assert_eq!(proxy.stats.duplicates(), vec![]);
    assert_eq!(proxy.stats.stored_parts(), 6);
    assert_eq!(server.in_progress_multiparts(client_id).await, 0);
}

storage_modes!(expired_urls, expired_urls_are_refreshed);

/// URLs that die before one part can get through (LocalStack checks expiry when a request
/// ends): after three fruitless refreshes the upload fails with a message that names the fix,
/// instead of looping.
#[tokio::test]
async fn urls_shorter_than_a_part_fail_clearly_localstack() {
    let (server, proxy) = proxied(
        Mode::LocalStack,
        Faults::default(),
        &["--presign-ttl-secs", "2"],
    )
    .await;
    let store = store(
        &server,
        "shortttl",
        6 * MIB,
        &[
            "--max-upload-bytes-per-sec",
            "2097152",
            "--upload-concurrency",
            "1",
        ],
    )
    .await;
    let client_id = &store.client_id;
    let upload_id = trigger_id(&server, client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.code(), Some(ErrorCode::Stalled), "{status:?}");
    assert!(
        status
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("PRESIGN_TTL_SECS")
    );
    assert_eq!(proxy.stats.stored_parts(), 0);
    assert_eq!(server.in_progress_multiparts(client_id).await, 0);
}

/// The file grows while its parts are being sent: FILE_CHANGED, and nothing left behind.
async fn file_changed_mid_upload(mode: Mode) {
    let (server, _proxy) = proxied(mode, Faults::default(), &[]).await;
    let store = store(
        &server,
        "changed",
        20 * MIB,
        &["--max-upload-bytes-per-sec", "5242880"],
    )
    .await;
    let client_id = &store.client_id;
    let upload_id = trigger_id(&server, client_id).await;
    wait_until(Duration::from_secs(30), "bytes to flow", || async {
        server.upload(&upload_id).await.bytes_done > 0
    })
    .await;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&store.file)
            .unwrap();
        f.write_all(b"one more line\n").unwrap();
    }
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.state, UploadState::Failed);
    assert_eq!(status.code(), Some(ErrorCode::FileChanged), "{status:?}");
    assert_eq!(server.in_progress_multiparts(client_id).await, 0);
    assert!(server.list_keys(client_id).await.is_empty());
}

storage_modes!(file_changed_mid_upload, file_changed_mid_upload);

/// The agent comes back describing different content for the same upload: FILE_CHANGED.
#[tokio::test]
async fn file_changed_while_agent_away() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("away");
    let (agent, upload_id, _plan) =
        RawAgent::with_plan(&server, &client_id, "f.bin", 6 * MIB).await;
    drop(agent);
    let mut agent = RawAgent::connect(&server, &client_id).await;
    let describe = agent.recv_json().await.unwrap();
    assert_eq!(describe["type"], "describe_file", "{describe}");
    assert_eq!(describe["upload_id"], upload_id.as_str());
    let min = describe["min_part_size"].as_u64().unwrap();
    agent
        .send_json(file_info(
            &upload_id,
            "f.bin",
            &vec![8u8; 6 * MIB as usize],
            min,
        ))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_eq!(status.code(), Some(ErrorCode::FileChanged));
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

/// MAX_UPLOAD_BYTES_PER_SEC holds for all parts together, measured where the bytes arrive.
#[tokio::test]
async fn bandwidth_cap_holds() {
    let (server, proxy) = proxied(Mode::Embedded, Faults::default(), &[]).await;
    let size = 20 * MIB;
    let cap = 4 * MIB;
    let store = store(
        &server,
        "capped",
        size,
        &["--max-upload-bytes-per-sec", &cap.to_string()],
    )
    .await;
    let (client_id, sha) = (&store.client_id, &store.sha);
    let upload_id = trigger_id(&server, client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, sha).await;
    let (first, last) = proxy.stats.window.lock().unwrap().unwrap();
    let rate = size as f64 / (last - first).as_secs_f64();
    eprintln!("FIGURES bandwidth cap: {cap} B/s cap, measured {rate:.0} B/s");
    assert!(
        (rate - cap as f64).abs() <= cap as f64 * 0.10,
        "measured {rate:.0} B/s against a cap of {cap}"
    );
}

/// Multipart uploads under the prefix that no upload owns are aborted by the sweep; others are
/// not touched. The server gets a prefix of its own, as LocalStack's bucket is shared by tests.
async fn orphans_are_aborted(mode: Mode) {
    let prefix = unique_client("sweep");
    let server = TestServer::builder(mode)
        .args(&["--orphan-sweep-interval-secs", "1", "--key-prefix", &prefix])
        .start()
        .await;
    let s3 = server.s3().await;
    let orphan_key =
        format!("{prefix}/store-1/20260101T000000Z-7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d/x.bin");
    let outside_key = format!("{prefix}-elsewhere/store-1/x.bin");
    let mut ids = Vec::new();
    for key in [&orphan_key, &outside_key] {
        let out = s3
            .create_multipart_upload()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        ids.push(out.upload_id.unwrap());
    }
    let pending = |p: String| {
        let s3 = s3.clone();
        async move {
            s3.list_multipart_uploads()
                .bucket(BUCKET)
                .prefix(p)
                .send()
                .await
                .unwrap()
                .uploads()
                .len()
        }
    };
    wait_until(
        Duration::from_secs(20),
        "the orphan to be aborted",
        || async { pending(format!("{prefix}/")).await == 0 },
    )
    .await;
    assert_eq!(pending(format!("{prefix}/")).await, 0);
    assert_eq!(
        pending(format!("{prefix}-elsewhere/")).await,
        1,
        "outside the prefix stays"
    );
    s3.abort_multipart_upload()
        .bucket(BUCKET)
        .key(&outside_key)
        .upload_id(&ids[1])
        .send()
        .await
        .unwrap();
}

storage_modes!(orphans, orphans_are_aborted);

/// Every part is stored but the agent died before completing, and (second upload) the agent
/// completed but died before reporting: either way the upload ends `completed` once the agent is
/// back, without a byte sent again.
async fn finished_work_is_not_lost(mode: Mode) {
    let server = TestServer::start(mode).await;
    for complete_before_dying in [false, true] {
        let client_id = unique_client("almost");
        // Two parts: 8 MiB and 4 MiB.
        let size = 12 * MIB;
        let (agent, upload_id, plan) =
            RawAgent::with_plan(&server, &client_id, "f.bin", size).await;
        let data = vec![7u8; size as usize];
        let part_size = plan["part_size"].as_u64().unwrap() as usize;
        let mut etags = Vec::new();
        assert_eq!(plan["parts"].as_array().unwrap().len(), 2);
        for i in 0..2 {
            let body = data[i * part_size..((i + 1) * part_size).min(data.len())].to_vec();
            etags.push(raw_s3::put_planned_part(&plan, i, body).await);
        }
        if complete_before_dying {
            let resp = raw_s3::complete(&plan, &etags).await;
            assert!(resp.status().is_success());
        }
        drop(agent);

        let mut agent = RawAgent::connect(&server, &client_id).await;
        let describe = agent.recv_json().await.unwrap();
        assert_eq!(describe["upload_id"], upload_id.as_str());
        let min = describe["min_part_size"].as_u64().unwrap();
        agent
            .send_json(file_info(&upload_id, "f.bin", &data, min))
            .await;
        if !complete_before_dying {
            let plan = agent.recv_json().await.unwrap();
            assert_eq!(plan["type"], "start_upload", "{plan}");
            assert_eq!(
                plan["parts"],
                serde_json::json!([]),
                "nothing to send again"
            );
            assert_eq!(plan["done"].as_array().unwrap().len(), etags.len());
            let resp = raw_s3::complete(&plan, &etags).await;
            assert!(resp.status().is_success());
            agent
                .send_json(serde_json::json!({
                    "type": "upload_completed", "upload_id": upload_id, "parts": plan["done"]
                }))
                .await;
        }
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(status.state, UploadState::Completed, "{status:?}");
        assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    }
}

storage_modes!(finished_work_is_not_lost, finished_work_is_not_lost);

/// Protocol 3: storage refuses a part whose bytes differ from the CRC64NVME signed into its URL,
/// and a completion whose whole-object checksum is not the signed one; dropping or changing a
/// signed checksum breaks the signature.
async fn storage_rejects_tampered_parts_by_checksum(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("tamper3");
    let mut agent = RawAgent::connect_speaking(&server, &client_id, 3).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let describe = agent.recv_json().await.unwrap();
    let min_part_size = describe["min_part_size"].as_u64().unwrap();
    let data = vec![7u8; 1000];
    agent
        .send_json(file_info_v3(&upload_id, "a.bin", &data, min_part_size))
        .await;
    let plan = agent.recv_json().await.unwrap();
    assert_eq!(plan["type"], "start_upload", "{plan}");
    let part = &plan["parts"][0];
    assert!(part.get("content_md5").is_none(), "{part}");
    let (url, crc) = (
        part["url"].as_str().unwrap(),
        part["checksum_crc64nvme"].as_str().unwrap(),
    );
    assert_eq!(crc, shared::hash::Crc64Nvme::of(&data).to_base64());
    let mut flipped = data.clone();
    flipped[10] ^= 1;
    let header = "x-amz-checksum-crc64nvme";
    let resp = raw_s3::try_put_part_with(url, &[(header, crc)], flipped.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("BadDigest"));
    let own = shared::hash::Crc64Nvme::of(&flipped).to_base64();
    for headers in [vec![], vec![(header, own.as_str())]] {
        let status = raw_s3::try_put_part_with(url, &headers, flipped.clone())
            .await
            .map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(403) | Err(_)),
            "an unsigned checksum must not pass: {status:?}"
        );
    }
    let resp = raw_s3::try_put_part_with(url, &[(header, crc)], data.clone())
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    // The completion signs the whole-object checksum: another one is refused.
    let whole = plan["checksum_crc64nvme"].as_str().unwrap();
    let body = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag>\
         <ChecksumCRC64NVME>{crc}</ChecksumCRC64NVME></Part></CompleteMultipartUpload>"
    );
    let complete = |checksum: String| {
        reqwest::Client::new()
            .post(plan["complete_url"].as_str().unwrap())
            .header(header, checksum)
            .header("x-amz-checksum-type", "FULL_OBJECT")
            .body(body.clone())
            .send()
    };
    let refused = complete(own.clone()).await.unwrap();
    assert_eq!(
        refused.status(),
        403,
        "a checksum other than the signed one"
    );
    let resp = complete(whole.to_owned()).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id,
            "parts": [{"part_number": 1, "etag": etag}], "sha256": sha
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, &sha).await;
    assert_eq!(status.checksum_crc64nvme.as_deref(), Some(whole));
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

storage_modes!(
    tampered_parts_v3,
    storage_rejects_tampered_parts_by_checksum
);
