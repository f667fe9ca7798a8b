//! Unchanged parts copied inside storage: a second fetch of a share sends only the parts whose
//! plaintext changed since the previous completed object, and storage copies the others from it
//! (`UploadPartCopy`). Parts sent are counted at the storage side, by the fault proxy that stands
//! between the agent and storage; the server's copies do not pass through it.

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::Ordering;

use rand::RngCore;

use crate::compression::{download, sha_of, write_csv};
use crate::encryption::{generate_identity, sealing_args};
use crate::harness::*;
use crate::proxy::{FaultProxy, Faults, server_behind_proxy};

/// Overwrites `len` bytes of `path` at `at` with noise, in place.
fn scribble(path: &std::path::Path, at: u64, len: usize, rng: &mut impl RngCore) {
    let mut noise = vec![0u8; len];
    rng.fill_bytes(&mut noise);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&noise).unwrap();
}

/// Appends `len` bytes of noise to `path`.
fn append(path: &std::path::Path, len: usize, rng: &mut impl RngCore) {
    let mut noise = vec![0u8; len];
    rng.fill_bytes(&mut noise);
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(&noise).unwrap();
}

/// A server whose presigned URLs lead through a counting proxy, with 5 MiB parts.
pub async fn counted(mode: Mode) -> (FaultProxy, TestServer) {
    server_behind_proxy(mode, Faults::default()).await
}

/// What one fetch moved: the `cli download -o` report, and the parts and bytes the agent sent.
struct Fetched {
    upload: serde_json::Value,
    parts_sent: u32,
    bytes_sent: u64,
}

impl Fetched {
    fn copied(&self) -> (u64, u64) {
        (
            self.upload["parts_copied"].as_u64().unwrap(),
            self.upload["bytes_copied"].as_u64().unwrap(),
        )
    }
}

/// Fetches the agent's default share and checks that what comes out is `file` as it is now.
async fn fetch(
    proxy: &FaultProxy,
    server: &TestServer,
    client_id: &str,
    file: &std::path::Path,
    encoding: &str,
    extra: &[&str],
) -> Fetched {
    let (parts, bytes) = (
        proxy.stats.part_puts.load(Ordering::Relaxed),
        proxy.stats.part_bytes.load(Ordering::Relaxed),
    );
    let want = sha_of(&std::fs::read(file).unwrap());
    let (report, out) = download(server, client_id, "default", encoding, extra).await;
    let upload = report["upload"].clone();
    assert_eq!(upload["state"], "completed", "{upload}");
    assert_eq!(sha_of(&out), want, "the fetched file is the file: {upload}");
    Fetched {
        upload,
        parts_sent: proxy.stats.part_puts.load(Ordering::Relaxed) - parts,
        bytes_sent: proxy.stats.part_bytes.load(Ordering::Relaxed) - bytes,
    }
}

/// A file fetched again sends only what changed: nothing when it did not change, two parts
/// changed in place send those two, an appended tail sends the tail, the previous object stays
/// as it was, and with the previous object gone everything is sent and the download still
/// completes.
async fn only_changed_parts_are_sent(mode: Mode) {
    let (proxy, server) = counted(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal.bin");
    // Eight parts: seven of 5 MiB and one of 3 MiB.
    write_file(&file, 38 * MIB).await;
    let client_id = unique_client("copy");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let mut rng = seeded_rng(&format!("only_changed_parts_are_sent ({mode:?})"));

    let first = fetch(&proxy, &server, &client_id, &file, "auto", &[]).await;
    assert_eq!(first.upload["encoding"], "none", "{}", first.upload);
    assert_eq!(first.parts_sent, 8);
    assert_eq!(first.copied(), (0, 0));
    let first_key = first.upload["key"].as_str().unwrap().to_owned();
    let first_sha = server.object_sha256(&first_key).await;

    // Unchanged: every part is copied, and the agent only completes.
    let again = fetch(&proxy, &server, &client_id, &file, "auto", &[]).await;
    assert_eq!(again.parts_sent, 0, "{}", again.upload);
    assert_eq!(again.copied(), (8, 38 * MIB));

    // Pages of parts 3 and 6 rewritten in place.
    scribble(&file, 2 * 5 * MIB + 12_345, 4096, &mut rng);
    scribble(&file, 5 * 5 * MIB + 77, 4096, &mut rng);
    let second = fetch(&proxy, &server, &client_id, &file, "auto", &[]).await;
    eprintln!(
        "FIGURES part copy ({mode:?}): two parts changed in place: {} parts and {} bytes sent of 8 parts and {} bytes; {:?} copied",
        second.parts_sent,
        second.bytes_sent,
        first.bytes_sent,
        second.copied()
    );
    assert_eq!(second.parts_sent, 2, "{}", second.upload);
    assert_eq!(second.bytes_sent, 10 * MIB);
    assert_eq!(second.copied(), (6, 28 * MIB));
    assert_eq!(second.upload["parts_done"], 8);
    // The previous object is only read.
    assert_eq!(server.object_sha256(&first_key).await, first_sha);

    // 10 MiB appended: the old short last part is now full, and two more follow it.
    append(&file, 10 * MIB as usize, &mut rng);
    let third = fetch(&proxy, &server, &client_id, &file, "auto", &[]).await;
    assert_eq!(third.parts_sent, 3, "{}", third.upload);
    assert_eq!(third.bytes_sent, 13 * MIB);
    assert_eq!(third.copied(), (7, 35 * MIB));

    // The previous object deleted (as a lifecycle rule would): everything is sent.
    let third_key = third.upload["key"].as_str().unwrap();
    server
        .s3()
        .await
        .delete_object()
        .bucket(BUCKET)
        .key(third_key)
        .send()
        .await
        .unwrap();
    let fourth = fetch(&proxy, &server, &client_id, &file, "auto", &[]).await;
    assert_eq!(fourth.parts_sent, 10, "{}", fourth.upload);
    assert_eq!(fourth.copied(), (0, 0));

    assert_eq!(
        server.metric("backhaul_parts_copied_total").await,
        8 + 6 + 7
    );
    assert_eq!(
        server.metric("backhaul_bytes_copied_total").await,
        (38 + 28 + 35) * MIB
    );
    assert_eq!(proxy.stats.duplicates(), vec![]);
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

storage_modes!(only_changed_parts, only_changed_parts_are_sent);

/// A compressed export with one stretch rewritten sends only the part that holds it: the agent
/// lays its parts out along the previous object's, so the stored bytes of every other part are
/// the same as before, even though the changed part stores larger. So too when the share is
/// encrypted (`sealed`): sealing is deterministic under the store's key.
async fn a_compressed_file_changed_in_place_sends_one_part(mode: Mode, sealed: bool) {
    let (proxy, server) = counted(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sales.csv");
    write_csv(&file, 100 * MIB);
    let client_id = unique_client("zcopy");
    let identity = generate_identity(&server, dir.path(), "id.key").await;
    let opens = format!("--identity={}", identity.file.display());
    let (agent_args, extra) = match sealed {
        true => (
            sealing_args(&identity.recipient, &dir.path().join("keys")),
            vec![opens.as_str()],
        ),
        false => (Vec::new(), Vec::new()),
    };
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let _agent = TestAgent::start_with(&server, &client_id, &file, &agent_args);
    server.wait_connected(&client_id).await;
    let mut rng = seeded_rng(&format!("compressed_changed_in_place ({mode:?}, {sealed})"));
    let encoding = shared::encoding::Encoding::of(true, sealed);

    let first = fetch(&proxy, &server, &client_id, &file, "zstd", &extra).await;
    assert_eq!(
        first.upload["encoding"],
        encoding.as_str(),
        "{}",
        first.upload
    );
    let parts = first.upload["parts_total"].as_u64().unwrap();
    assert!(parts >= 3, "{}", first.upload);
    assert_eq!(first.parts_sent as u64, parts);

    // One 1 MiB stretch in the middle becomes noise, which zstd cannot shrink.
    scribble(&file, 50 * MIB, MIB as usize, &mut rng);
    let second = fetch(&proxy, &server, &client_id, &file, "zstd", &extra).await;
    eprintln!(
        "FIGURES part copy, {encoding} ({mode:?}): 1 MiB rewritten in a 100 MiB CSV: {} of {} parts and {} of {} bytes sent; {:?} copied",
        second.parts_sent,
        second.upload["parts_total"],
        second.bytes_sent,
        second.upload["stored_size"],
        second.copied()
    );
    assert_eq!(second.upload["parts_total"].as_u64(), Some(parts));
    assert_eq!(second.parts_sent, 1, "{}", second.upload);
    assert_eq!(second.copied().0, parts - 1);
    assert!(
        second.upload["key"]
            .as_str()
            .unwrap()
            .ends_with(encoding.key_suffix())
    );
}

storage_modes!(compressed_changed_in_place, |mode| {
    a_compressed_file_changed_in_place_sends_one_part(mode, false)
});
storage_modes!(sealed_changed_in_place, |mode| {
    a_compressed_file_changed_in_place_sends_one_part(mode, true)
});

/// A part manifest that does not fit the file is refused as malformed before anything is
/// created in storage: the wrong number of digests, a digest that is not SHA-256 hex, or
/// digests beside MD5 part checksums (protocol 2).
#[tokio::test]
async fn bad_part_digests_are_refused() {
    let server = TestServer::start(Mode::Embedded).await;
    let client_id = unique_client("bad-digests");
    let mut agent = RawAgent::connect_speaking(&server, &client_id, 5).await;
    let crc = shared::hash::Crc64Nvme::of(b"x").to_base64();
    let sha = sha_of(b"x");
    let digest = "ab".repeat(32);
    let crc_info = |digests: serde_json::Value| {
        serde_json::json!({
            "file_name": "x.db", "size": 1, "modified_ms": 1, "part_size": 5242880,
            "part_crc64nvme": [crc], "sha256": sha, "part_digests": digests,
        })
    };
    let cases = [
        (
            crc_info(serde_json::json!([digest, digest])),
            "two digests for one part",
        ),
        (crc_info(serde_json::json!(["zz".repeat(32)])), "not hex"),
        (crc_info(serde_json::json!([&digest[..62]])), "too short"),
        (
            serde_json::json!({
                "file_name": "x.db", "size": 1, "modified_ms": 1, "part_size": 5242880,
                "part_md5": ["nyvntwJR7l5EaKXdzmbOsA=="], "sha256": sha,
                "part_digests": [digest],
            }),
            "beside MD5 part checksums",
        ),
    ];
    for (mut info, why) in cases {
        let (status, trig) = raw_request(
            &server,
            "POST",
            &format!("/trigger-download/{client_id}"),
            &operator_token(),
        )
        .await;
        assert_eq!(status, 202, "{trig}");
        let upload_id = trig["upload_id"].as_str().unwrap().to_owned();
        loop {
            let msg = agent.recv_json().await.expect("a message");
            if msg["type"] == "describe_file" {
                break;
            }
        }
        info["type"] = "file_info".into();
        info["upload_id"] = upload_id.clone().into();
        agent.send_json(info).await;
        let status = server.wait_finished(&upload_id).await;
        assert_eq!(
            status.code(),
            Some(shared::ErrorCode::MalformedMessage),
            "{why}: {status:?}"
        );
        assert_eq!(status.key, None, "{why}: nothing was created");
    }
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}
