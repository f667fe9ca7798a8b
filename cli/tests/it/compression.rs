//! Compressed parts (protocol 5): the agent compresses what pays, storage holds zstd frames under
//! a `.zst` key that says what it is, and `cli` hands back the file byte for byte.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;

use crate::encryption::{generate_identity, sealing_args};
use crate::harness::*;
use crate::proxy::{Faults, server_behind_proxy};

pub fn sha_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A point-of-sale export: `len` bytes of CSV rows (transaction id, time, SKU, quantity, price,
/// card last four, auth code), which zstd shrinks severalfold, as it does real exports. Returns
/// its SHA-256.
pub fn write_csv(path: &std::path::Path, len: u64) -> String {
    use std::fmt::Write as _;
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D ^ len;
    let (mut written, mut txn, mut secs) = (0u64, 88_000_000u64, 8 * 3600u64);
    let mut row = String::from("txn_id,timestamp,store,sku,qty,unit_price,card_last4,auth_code\n");
    while written < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        txn += 1;
        secs += state % 7;
        let sku = (state >> 8) % 300;
        let _ = writeln!(
            row,
            "{txn},2026-12-01T{:02}:{:02}:{:02}Z,store-0042,SKU-{sku:05},{},{}.{:02},{:04},{:06}",
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            1 + (state >> 20) % 3,
            1 + sku % 40,
            (sku * 37) % 100,
            (state >> 24) % 10_000,
            (state >> 40) % 1_000_000,
        );
        let take = (len - written).min(row.len() as u64) as usize;
        out.write_all(&row.as_bytes()[..take]).unwrap();
        sha2::Digest::update(&mut hasher, &row.as_bytes()[..take]);
        written += take as u64;
        row.clear();
    }
    out.flush().unwrap();
    hex::encode(sha2::Digest::finalize(hasher))
}

/// The next message that is not a token renewal (agents of protocol 4 and later are sent one
/// when they connect).
async fn recv_command(agent: &mut RawAgent) -> serde_json::Value {
    loop {
        let msg = agent.recv_json().await.expect("a message");
        if msg["type"] != "token_renewed" {
            return msg;
        }
    }
}

/// `cli download -o` of one share with `--encoding`, returning the report and what came out.
pub async fn download(
    server: &TestServer,
    client_id: &str,
    share: &str,
    encoding: &str,
    extra: &[&str],
) -> (serde_json::Value, Vec<u8>) {
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("out");
    let mut args = vec![
        "download".to_owned(),
        format!("--client-id={client_id}"),
        format!("--file={share}"),
        format!("--encoding={encoding}"),
        "-o".to_owned(),
        target.display().to_string(),
        "--json".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(server, &args).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    (report, std::fs::read(&target).unwrap())
}

/// What the object records about itself: its user metadata.
async fn object_metadata(
    server: &TestServer,
    key: &str,
) -> std::collections::HashMap<String, String> {
    let head = server
        .s3()
        .await
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    head.metadata().cloned().unwrap_or_default()
}

/// The files besides a CSV that every encoding must carry, written into `dir` and shared by
/// their names with `-` for `.` (`backup-bin`): random bytes over two parts, exactly one part,
/// empty, and 200 MiB of zeros (sparse), which zstd shrinks by far more than 1,000x into one
/// part. Returns their SHA-256s in that order, and the `--share` arguments.
pub async fn write_shapes(dir: &std::path::Path) -> ([String; 4], Vec<String>) {
    let path = |name: &str| dir.join(name);
    let random_sha = write_file(&path("backup.bin"), 12 * MIB + 3).await;
    let exact_sha = write_file(&path("exact.bin"), 5 * MIB).await;
    let empty_sha = write_file(&path("empty.bin"), 0).await;
    std::fs::File::create(path("zeros.bin"))
        .unwrap()
        .set_len(200 * MIB)
        .unwrap();
    let zeros_sha = sha_of(&vec![0u8; (200 * MIB) as usize]);
    let shares = ["backup.bin", "exact.bin", "empty.bin", "zeros.bin"]
        .iter()
        .map(|n| format!("--share={}={}", n.replace('.', "-"), path(n).display()))
        .collect();
    ([random_sha, exact_sha, empty_sha, zeros_sha], shares)
}

/// Every shape of file comes back byte-identical, compressed when that pays and as asked
/// otherwise; a compressed object says what it is.
async fn every_shape_comes_back(mode: Mode) {
    let server = TestServer::start(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let csv_sha = write_csv(&path("sales.csv"), 60 * MIB + 17);
    let ([random_sha, exact_sha, empty_sha, zeros_sha], mut shares) =
        write_shapes(dir.path()).await;
    let client_id = unique_client("shapes");
    shares.push(format!("--share=sales-csv={}", path("sales.csv").display()));
    let shares: Vec<&str> = shares.iter().map(String::as_str).collect();
    let _agent = TestAgent::start_with(&server, &client_id, &path("sales.csv"), &shares);
    server.wait_connected(&client_id).await;

    // (share, --encoding, the file's SHA-256, the encoding expected, the fewest parts)
    let cases = [
        ("sales-csv", "auto", &csv_sha, "zstd", 2),
        ("sales-csv", "none", &csv_sha, "none", 8),
        ("backup-bin", "auto", &random_sha, "none", 2),
        ("backup-bin", "zstd", &random_sha, "zstd", 2),
        ("exact-bin", "auto", &exact_sha, "none", 1),
        ("exact-bin", "zstd", &exact_sha, "zstd", 1),
        ("empty-bin", "auto", &empty_sha, "none", 1),
        ("empty-bin", "zstd", &empty_sha, "zstd", 1),
        ("zeros-bin", "auto", &zeros_sha, "zstd", 1),
    ];
    for (share, asked, sha, encoding, parts) in cases {
        let (report, bytes) = download(&server, &client_id, share, asked, &[]).await;
        let upload = &report["upload"];
        let what = format!("{share} --encoding={asked}: {upload}");
        assert_eq!(upload["state"], "completed", "{what}");
        assert_eq!(sha_of(&bytes), *sha, "{what}");
        assert_eq!(report["fetch"]["sha256"], sha.as_str(), "{what}");
        assert_eq!(upload["encoding"], encoding, "{what}");
        assert_eq!(upload["compression"], asked, "{what}");
        let parts_total = upload["parts_total"].as_u64().unwrap();
        assert!(parts_total >= parts, "{what}");
        let key = upload["key"].as_str().unwrap();
        let size = upload["size"].as_u64().unwrap();
        let stored = upload["stored_size"].as_u64().unwrap();
        assert_eq!(size, bytes.len() as u64, "{what}");
        if encoding == "zstd" {
            assert!(key.ends_with(".zst"), "{what}");
            let meta = object_metadata(&server, key).await;
            assert_eq!(meta.get("encoding").map(String::as_str), Some("zstd"));
            assert_eq!(meta.get("original-size"), Some(&size.to_string()));
            assert_eq!(meta.get("sha256"), Some(sha));
            assert_eq!(report["fetch"]["stored_size"], stored, "{what}");
        } else {
            assert!(!key.ends_with(".zst"), "{what}");
            assert_eq!(stored, size, "{what}");
        }
        match share {
            "sales-csv" if encoding == "zstd" => {
                assert!(stored * 4 < size, "CSV shrinks at least 4x: {what}")
            }
            "zeros-bin" => assert!(stored * 1000 < size, "{what}"),
            _ => {}
        }
    }

    // `--raw` keeps the stored form: zstd frames that decode to the file.
    let (report, raw) = download(&server, &client_id, "sales-csv", "auto", &["--raw"]).await;
    assert_eq!(report["fetch"]["raw"], true);
    assert_eq!(report["fetch"]["checked"], serde_json::json!(["crc64nvme"]));
    assert_eq!(
        raw.len() as u64,
        report["upload"]["stored_size"].as_u64().unwrap()
    );
    assert_eq!(
        sha_of(&zstd::stream::decode_all(&raw[..]).unwrap()),
        csv_sha
    );

    // The bytes compression kept off the wire are counted.
    assert!(server.metric("backhaul_bytes_saved_total").await > 200 * MIB);
}

storage_modes!(every_shape, every_shape_comes_back);

/// A share configured `compression=none` is sent as it is when the operator leaves it to the
/// share, and compressed when the operator asks for zstd; an unknown encoding is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_share_decides_unless_the_operator_does() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z.csv");
    let sha = write_csv(&file, 6 * MIB);
    let client_id = unique_client("share-setting");
    let share = format!("--share=z={};compression=none", file.display());
    let _agent = TestAgent::start_with(&server, &client_id, &file, &[&share]);
    server.wait_connected(&client_id).await;
    let (report, bytes) = download(&server, &client_id, "z", "auto", &[]).await;
    assert_eq!(report["upload"]["encoding"], "none");
    assert_eq!(sha_of(&bytes), sha);
    let (report, bytes) = download(&server, &client_id, "z", "zstd", &[]).await;
    assert_eq!(report["upload"]["encoding"], "zstd");
    assert_eq!(sha_of(&bytes), sha);
    // The default share follows COMPRESSION (auto): a CSV is compressed.
    let (report, _) = download(&server, &client_id, "default", "auto", &[]).await;
    assert_eq!(report["upload"]["encoding"], "zstd");

    let (status, body) = raw_request(
        &server,
        "POST",
        &format!("/trigger-download/{client_id}?encoding=gzip"),
        &operator_token(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "INVALID_ENCODING", "{body}");
}

/// kill -9 of the agent while a compressed (and, when `sealed`, encrypted) file uploads: the next
/// agent encodes the file the same way, the upload resumes, and storage never receives a
/// finished part twice.
async fn killed_while_encoding_resumes(mode: Mode, sealed: bool) {
    let (proxy, server) = server_behind_proxy(mode, Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sales.csv");
    let sha = write_csv(&file, 120 * MIB);
    let mut rng = seeded_rng(&format!("killed_while_encoding ({mode:?}, {sealed})"));
    let operator = tempfile::tempdir().unwrap();
    let identity = match sealed {
        true => Some(generate_identity(&server, operator.path(), "id.key").await),
        false => None,
    };
    let trials = 3;
    let mut stored_parts = 0;
    for trial in 0..trials {
        let client_id = unique_client("zkill");
        // Two parts at a time at 4 MiB/s on the wire: a pair of compressed parts (about 5 MiB
        // each) is stored every 2.5 s or so.
        let mut args = agent_args(
            &server.ws_url(),
            &client_id,
            &file,
            &[
                "--max-upload-bytes-per-sec",
                "4194304",
                "--upload-concurrency",
                "2",
            ],
        );
        if let Some(id) = &identity {
            // The restarted agent finds the store key the killed one made.
            args.extend(sealing_args(&id.recipient, &dir.path().join("keys")));
        }
        let mut agent = ChildProcess::spawn("agent", &args);
        server.wait_connected(&client_id).await;
        let upload_id = trigger_id(&server, &client_id).await;
        // Killed once parts are stored, with the next ones in flight.
        wait_until(Duration::from_secs(60), "parts to be stored", || async {
            server.upload(&upload_id).await.parts_done >= 2
        })
        .await;
        let delay = rng.gen_range(0..2000);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        agent.kill9().await;
        let before = server.upload(&upload_id).await;
        eprintln!(
            "FIGURES {} kill -9 trial {trial} ({mode:?}): killed {delay} ms after two parts were stored, {} of {:?} parts stored",
            shared::encoding::Encoding::of(true, sealed),
            before.parts_done,
            before.parts_total
        );
        assert!(before.parts_done >= 2, "{before:?}");
        let _agent = ChildProcess::spawn("agent", &args);
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(status.state, UploadState::Completed, "{status:?}");
        let encoding = shared::encoding::Encoding::of(true, sealed);
        assert_eq!(status.encoding, Some(encoding));
        assert!(status.resumes >= 1, "{status:?}");
        // A sealed file is recorded with its keyed digest, never its SHA-256.
        assert_eq!(status.sha256.as_deref() == Some(sha.as_str()), !sealed);
        stored_parts += status.parts_total.unwrap();
        let out = dir.path().join("fetched.csv");
        let mut args = vec!["fetch", &upload_id, "-o", out.to_str().unwrap()];
        let opens = identity
            .as_ref()
            .map(|id| format!("--identity={}", id.file.display()));
        args.extend(opens.as_deref());
        let fetched = run_cli(&server, &args).await;
        assert!(fetched.status.success(), "{}", stderr(&fetched));
        assert_eq!(sha_of(&std::fs::read(&out).unwrap()), sha);
        assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
    }
    let st = &proxy.stats;
    assert_eq!(st.duplicates(), vec![], "a stored part was uploaded twice");
    assert_eq!(st.stored_parts(), stored_parts);
    eprintln!(
        "FIGURES {} kill -9 ({mode:?}): {trials} trials, {} part PUTs for {stored_parts} parts",
        shared::encoding::Encoding::of(true, sealed),
        st.part_puts.load(Ordering::Relaxed),
    );
}

storage_modes!(killed_while_compressing, |mode| {
    killed_while_encoding_resumes(mode, false)
});
storage_modes!(killed_while_sealing, |mode| killed_while_encoding_resumes(
    mode, true
));

/// A compressed file that changes while its parts upload is still `FILE_CHANGED`, encrypted or
/// not: the parts come from the spool, but the file is watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_file_that_changes_is_refused() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let identity = generate_identity(&server, dir.path(), "id.key").await;
    for sealed in [false, true] {
        let file = dir.path().join(format!("sales-{sealed}.csv"));
        write_csv(&file, 60 * MIB);
        let client_id = unique_client("zchanged");
        let mut args = vec![
            "--max-upload-bytes-per-sec".to_owned(),
            "2097152".to_owned(),
        ];
        if sealed {
            args.extend(sealing_args(&identity.recipient, &dir.path().join("keys")));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _agent = TestAgent::start_with(&server, &client_id, &file, &args);
        server.wait_connected(&client_id).await;
        let upload_id = trigger_id(&server, &client_id).await;
        wait_until(Duration::from_secs(60), "parts to flow", || async {
            server.upload(&upload_id).await.bytes_done > 0
        })
        .await;
        write_csv(&file, 61 * MIB);
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(status.state, UploadState::Failed, "{status:?}");
        assert_eq!(
            status.code(),
            Some(shared::ErrorCode::FileChanged),
            "{status:?}"
        );
        assert_eq!(status.encoding.map(|e| e.sealed()), Some(sealed));
    }
}

/// The previous protocol (4) still completes a download: its agents are asked for no
/// compression (the field is not even sent) and get plans without an encoding.
async fn a_protocol_4_agent_completes_a_download(mode: Mode) {
    let server = TestServer::start(mode).await;
    let client_id = unique_client("proto4");
    let mut agent = RawAgent::connect_speaking(&server, &client_id, 4).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let describe = recv_command(&mut agent).await;
    assert_eq!(describe["type"], "describe_file", "{describe}");
    assert!(describe.get("compression").is_none(), "{describe}");
    let min_part_size = describe["min_part_size"].as_u64().unwrap();
    let data: Vec<u8> = (0..7 * MIB).map(|i| (i % 251) as u8).collect();
    agent
        .send_json(file_info_v3(&upload_id, "z.csv", &data, min_part_size))
        .await;
    let plan = recv_command(&mut agent).await;
    assert_eq!(plan["type"], "start_upload", "{plan}");
    assert!(plan.get("encoding").is_none(), "{plan}");
    let part_size = plan["part_size"].as_u64().unwrap() as usize;
    let mut body = String::from("<CompleteMultipartUpload>");
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(part_size).enumerate() {
        let part = &plan["parts"][i];
        let crc = part["checksum_crc64nvme"].as_str().unwrap();
        let resp = raw_s3::try_put_part_with(
            part["url"].as_str().unwrap(),
            &[("x-amz-checksum-crc64nvme", crc)],
            chunk.to_vec(),
        )
        .await
        .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag><ChecksumCRC64NVME>{crc}</ChecksumCRC64NVME></Part>",
            i + 1
        ));
        parts.push(serde_json::json!({"part_number": i + 1, "etag": etag}));
    }
    body.push_str("</CompleteMultipartUpload>");
    let resp = reqwest::Client::new()
        .post(plan["complete_url"].as_str().unwrap())
        .header(
            "x-amz-checksum-crc64nvme",
            plan["checksum_crc64nvme"].as_str().unwrap(),
        )
        .header("x-amz-checksum-type", "FULL_OBJECT")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let sha = sha_of(&data);
    agent
        .send_json(serde_json::json!({
            "type": "upload_completed", "upload_id": upload_id, "parts": parts, "sha256": sha
        }))
        .await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&server, &status, &sha).await;
    assert_eq!(status.encoding, Some(shared::encoding::Encoding::None));
}

storage_modes!(protocol_4_agent, a_protocol_4_agent_completes_a_download);

/// An agent that compresses when it was asked not to is refused, and so is a malformed encoded
/// layout; neither leaves a multipart upload behind.
#[tokio::test]
async fn bad_encoded_descriptions_are_refused() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("bad-zstd");
    let mut agent = RawAgent::connect_speaking(&server, &client_id, 5).await;
    let part =
        |plain: u64, stored: u64| serde_json::json!({"plain_len": plain, "stored_len": stored});
    let crc = shared::hash::Crc64Nvme::of(b"x").to_base64();
    let sha = sha_of(b"x");
    // (query, the description's parts, why it is refused)
    let cases = [
        ("?encoding=none", vec![part(100, 10)], "asked for none"),
        (
            "",
            vec![part(60, 10), part(40, 10)],
            "a first part under 5 MiB",
        ),
        ("", vec![part(99, 10)], "parts that do not cover the file"),
    ];
    for (query, parts, why) in cases {
        let (status, trig) = raw_request(
            &server,
            "POST",
            &format!("/trigger-download/{client_id}{query}"),
            &operator_token(),
        )
        .await;
        assert_eq!(status, 202, "{trig}");
        let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
        let describe = recv_command(&mut agent).await;
        assert_eq!(describe["type"], "describe_file", "{describe}");
        assert_eq!(
            describe["compression"],
            if query.is_empty() { "auto" } else { "none" }
        );
        let crcs: Vec<&str> = parts.iter().map(|_| crc.as_str()).collect();
        agent
            .send_json(serde_json::json!({
                "type": "file_info", "upload_id": upload_id, "file_name": "z.csv",
                "size": 100, "modified_ms": 1, "part_size": 5242880,
                "part_crc64nvme": crcs, "sha256": sha,
                "encoding": "zstd", "encoded_parts": parts,
            }))
            .await;
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(status.state, UploadState::Failed, "{why}: {status:?}");
        assert_eq!(
            status.code(),
            Some(shared::ErrorCode::MalformedMessage),
            "{why}: {status:?}"
        );
        assert_eq!(status.key, None, "{why}: nothing was created");
        let cancel = recv_command(&mut agent).await;
        assert_eq!(cancel["type"], "cancel_upload", "{cancel}");
        assert_eq!(cancel["code"], "MALFORMED_MESSAGE", "{cancel}");
    }
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

/// A collection asks every store for its encoding: `auto` lets CSV exports shrink, `none` keeps
/// them as they are, and `cli collect --output-dir` hands back the files either way. A schedule
/// keeps the encoding in its template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_carry_the_encoding() {
    let server = TestServer::start(Mode::Embedded).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_client("zcoll");
    let identity = generate_identity(&server, dir.path(), "id.key").await;
    let mut agents = Vec::new();
    let mut shas = Vec::new();
    // Store 1 encrypts its share; the operator's identity opens it.
    for i in 0..2 {
        let file = dir.path().join(format!("z{i}.csv"));
        shas.push(write_csv(&file, 3 * MIB + i * 1000));
        let id = format!("{prefix}-{i}");
        let sealing = match i {
            1 => sealing_args(&identity.recipient, &dir.path().join("keys")),
            _ => Vec::new(),
        };
        let sealing: Vec<&str> = sealing.iter().map(String::as_str).collect();
        agents.push(TestAgent::start_with(&server, &id, &file, &sealing));
        server.wait_connected(&id).await;
    }
    for (encoding, expected) in [("auto", "zstd"), ("none", "none")] {
        let out_dir = dir.path().join(format!("out-{encoding}"));
        let out = run_cli(
            &server,
            &[
                "collect",
                &format!("--client-id={prefix}-*"),
                &format!("--encoding={encoding}"),
                "--output-dir",
                out_dir.to_str().unwrap(),
                &format!("--identity={}", identity.file.display()),
                "--json",
            ],
        )
        .await;
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(summary["encoding"], encoding, "{summary}");
        assert_eq!(summary["counts"]["completed"], 2, "{summary}");
        let id = summary["collection_id"].as_str().unwrap();
        let (_, rows) = server.get_json(&format!("/collections/{id}/uploads")).await;
        for row in rows["rows"].as_array().unwrap() {
            let upload = server.upload(row["upload_id"].as_str().unwrap()).await;
            let sealed = row["client_id"].as_str().unwrap().ends_with("-1");
            let expected = match (expected, sealed) {
                (e, false) => e.to_owned(),
                ("none", true) => "sealed".to_owned(),
                (e, true) => format!("{e}_sealed"),
            };
            assert_eq!(
                upload.encoding.map(|e| e.as_str()),
                Some(expected.as_str()),
                "{upload:?}"
            );
        }
        for (i, sha) in shas.iter().enumerate() {
            let file = out_dir.join(format!("{prefix}-{i}")).join("default");
            let got = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(sha_of(&got), *sha);
        }
    }
    let resp = server
        .http_client()
        .post(format!("{}/schedules", server.http_url()))
        .bearer_auth(operator_token())
        .json(&serde_json::json!({
            "cron": "0 3 * * *",
            "template": {"target": {"kind": "all"}, "encoding": "zstd"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let schedule: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(schedule["template"]["encoding"], "zstd", "{schedule}");
}
