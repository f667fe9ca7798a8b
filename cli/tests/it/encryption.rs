//! Encrypted shares: the agent seals every block to recipients pinned in its configuration, so
//! that storage, the wire to storage and the server's database never hold the plaintext, and
//! only `cli --identity` with a matching identity gets the file back, byte for byte.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::compression::{download, sha_of, write_csv, write_shapes};
use crate::harness::*;
use crate::part_copy::counted;

/// A plaintext marker, as a card number would sit in an export.
const MARKER: &[u8] = b"PAN=4111111111111111;MARKER-7f3c9e";

/// An operator's identity: the file `cli key generate` wrote, and its recipient.
pub struct Identity {
    pub file: PathBuf,
    pub recipient: String,
}

/// Makes an identity in `dir` with the real `cli key generate`.
pub async fn generate_identity(server: &TestServer, dir: &Path, name: &str) -> Identity {
    let file = dir.join(name);
    let out = run_cli(server, &["key", "generate", "-o", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let recipient = stdout(&out).trim().to_owned();
    assert!(recipient.starts_with("age1"), "{recipient}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the identity file is the operator's alone"
    );
    // It never overwrites one.
    let again = run_cli(server, &["key", "generate", "-o", file.to_str().unwrap()]).await;
    assert!(!again.status.success());
    Identity { file, recipient }
}

/// The agent arguments that encrypt every share to `recipient`, with store keys in `key_dir`.
pub fn sealing_args(recipient: &str, key_dir: &Path) -> Vec<String> {
    vec![
        format!("--encrypt-to={recipient}"),
        format!("--key-dir={}", key_dir.display()),
    ]
}

/// Whether `needle` is in any file under `dir`.
fn found_under(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path);
            }
        }
    }
    hits
}

/// The keys of `client_id`'s objects whose bytes hold `needle`.
async fn objects_holding(server: &TestServer, client_id: &str, needle: &[u8]) -> Vec<String> {
    let s3 = server.s3().await;
    let mut hits = Vec::new();
    for key in server.list_keys(client_id).await {
        let object = s3
            .get_object()
            .bucket(BUCKET)
            .key(&key)
            .send()
            .await
            .unwrap();
        let bytes = object.body.collect().await.unwrap().into_bytes();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            hits.push(key);
        }
    }
    hits
}

/// A CSV export of `len` bytes with the marker in three places (start, middle, end).
fn write_marked_csv(path: &Path, len: u64) -> String {
    write_csv(path, len);
    let mut bytes = std::fs::read(path).unwrap();
    for at in [10, bytes.len() / 2, bytes.len() - MARKER.len() - 1] {
        bytes[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(path, &bytes).unwrap();
    sha_of(&bytes)
}

/// Every shape of file, encrypted, comes back byte-identical with the identity; its object says
/// what it is; the marker is nowhere in storage, on the wire to storage, or in the server's
/// data; a wrong or missing identity fails and writes nothing. Then the same marker sent
/// unencrypted is found by each of those searches, so they can find it.
async fn encrypted_shares_come_back_and_reveal_nothing(mode: Mode) {
    let (proxy, server) = counted(mode).await;
    *proxy.stats.watch_for.lock().unwrap() = Some(MARKER.to_vec());
    let operator = tempfile::tempdir().unwrap();
    let head_office = generate_identity(&server, operator.path(), "head-office.key").await;
    let stranger = generate_identity(&server, operator.path(), "stranger.key").await;
    let store = tempfile::tempdir().unwrap();
    let path = |name: &str| store.path().join(name);
    let csv_sha = write_marked_csv(&path("sales.csv"), 20 * MIB + 17);
    let ([random_sha, exact_sha, empty_sha, zeros_sha], shares) = write_shapes(store.path()).await;
    let client_id = unique_client("sealed");
    let mut args = sealing_args(&head_office.recipient, &path("keys"));
    args.extend(shares);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = TestAgent::start_with(&server, &client_id, &path("sales.csv"), &args);
    server.wait_connected(&client_id).await;
    let identity = format!("--identity={}", head_office.file.display());

    // (share, --encoding, the file's SHA-256, the encoding expected)
    let cases = [
        ("default", "auto", &csv_sha, "zstd_sealed"),
        ("default", "none", &csv_sha, "sealed"),
        ("backup-bin", "auto", &random_sha, "sealed"),
        ("exact-bin", "auto", &exact_sha, "sealed"),
        ("exact-bin", "zstd", &exact_sha, "zstd_sealed"),
        ("empty-bin", "auto", &empty_sha, "sealed"),
        ("zeros-bin", "auto", &zeros_sha, "zstd_sealed"),
    ];
    let mut csv_upload = String::new();
    for (share, asked, sha, encoding) in cases {
        let (report, bytes) = download(&server, &client_id, share, asked, &[&identity]).await;
        let upload = &report["upload"];
        let what = format!("{share} --encoding={asked}: {upload}");
        assert_eq!(upload["state"], "completed", "{what}");
        assert_eq!(sha_of(&bytes), *sha, "{what}");
        assert_eq!(upload["encoding"], encoding, "{what}");
        assert_eq!(
            report["fetch"]["checked"],
            serde_json::json!(["keyed digest", "crc64nvme"]),
            "{what}"
        );
        // The server holds a keyed digest, never the file's SHA-256.
        assert_ne!(upload["sha256"], sha.as_str(), "{what}");
        let key = upload["key"].as_str().unwrap();
        assert!(key.ends_with(".sealed"), "{what}");
        assert_eq!(key.contains(".zst."), encoding == "zstd_sealed", "{what}");
        let stored = upload["stored_size"].as_u64().unwrap();
        if share == "zeros-bin" {
            assert!(stored * 1000 < 200 * MIB, "{what}");
        }
        if share == "default" {
            csv_upload = upload["upload_id"].as_str().unwrap().to_owned();
        }
    }

    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("out.csv");
    let upload_id = csv_upload;
    let junk = operator.path().join("junk.key");
    std::fs::write(&junk, "# nothing here\nnot-a-key\n").unwrap();
    // A stranger's identity, none at all, a file that holds none: each a clear error.
    let cases = [
        (
            Some(&stranger.file),
            "none of the given identities is a recipient",
        ),
        (None, "give --identity"),
        (Some(&junk), "not an age X25519 identity"),
    ];
    for (identity, says) in cases {
        let mut args = vec![
            "fetch".to_owned(),
            upload_id.clone(),
            "-o".to_owned(),
            target.display().to_string(),
        ];
        args.extend(identity.map(|f| format!("--identity={}", f.display())));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_cli(&server, &args).await;
        assert!(!out.status.success(), "{says}");
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "nothing written in place of the output: {left:?}"
    );

    // The marker went nowhere: not to storage, not on the wire, not into the server's data.
    assert_eq!(proxy.stats.watch_hits.load(Ordering::Relaxed), 0);
    assert_eq!(
        objects_holding(&server, &client_id, MARKER).await,
        Vec::<String>::new()
    );
    assert_eq!(found_under(&server.data_dir, MARKER), Vec::<PathBuf>::new());

    // The same file unencrypted, from another store: each search finds the marker.
    let plain_client = unique_client("plain");
    let _plain = TestAgent::start(&server, &plain_client, &path("sales.csv"));
    server.wait_connected(&plain_client).await;
    let (report, bytes) = download(&server, &plain_client, "default", "none", &[]).await;
    assert_eq!(sha_of(&bytes), csv_sha, "{report}");
    assert!(proxy.stats.watch_hits.load(Ordering::Relaxed) > 0);
    assert_eq!(
        objects_holding(&server, &plain_client, MARKER).await.len(),
        1
    );
    if mode == Mode::Embedded {
        assert!(!found_under(&server.data_dir, MARKER).is_empty());
    }
}

storage_modes!(
    encrypted_shares,
    encrypted_shares_come_back_and_reveal_nothing
);

/// A fake server that asks for an encrypted share and plans it unencrypted: the agent refuses
/// before a byte leaves. The same plan for the sealed form is followed (its parts reach the
/// storage address), so the refusal is the encryption's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_plan_for_an_encrypted_share_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z-report.csv");
    write_marked_csv(&file, 64 * 1024);
    let (_, recipient) = shared::sealed::Identities::generate();
    // "Storage": counts the connections the agent makes to it.
    let storage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let storage_addr = storage.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = storage.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(conn);
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_url = format!("ws://{}/ws/connect", listener.local_addr().unwrap());
    let client_id = unique_client("refuses");
    let mut args = agent_args(&ws_url, &client_id, &file, &[]);
    args.extend(sealing_args(recipient.as_str(), &dir.path().join("keys")));
    args.push(format!("--allowed-upload-host={storage_addr}"));
    let config = client::Config::try_parse_from(&args).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(client::run(config, shutdown));

    let (tcp, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    next_of_type(&mut ws, "hello").await;
    let send = |v: serde_json::Value| Message::text(v.to_string());
    ws.send(send(serde_json::json!({
        "type": "welcome", "client_id": client_id, "protocol_version": 5,
    })))
    .await
    .unwrap();
    for (attempt, planned) in [(1, None), (2, Some("sealed"))] {
        let upload_id = format!("00000000-0000-4000-8000-00000000000{attempt}");
        ws.send(send(serde_json::json!({
            "type": "describe_file", "upload_id": upload_id, "share": "default",
            "min_part_size": 5242880, "compression": "none",
        })))
        .await
        .unwrap();
        let info = next_of_type(&mut ws, "file_info").await;
        assert_eq!(info["encoding"], "sealed", "{info}");
        let mut plan = serde_json::json!({
            "type": "start_upload", "upload_id": upload_id, "size": info["size"],
            "part_size": info["part_size"],
            "parts": [{
                "part_number": 1,
                "url": format!("http://{storage_addr}/bucket/k?partNumber=1&uploadId=u"),
                "checksum_crc64nvme": info["part_crc64nvme"][0],
            }],
            "done": [], "complete_url": format!("http://{storage_addr}/bucket/k?uploadId=u"),
            "expires_in_secs": 600,
        });
        if let Some(encoding) = planned {
            plan["encoding"] = encoding.into();
        }
        ws.send(send(plan)).await.unwrap();
        if planned.is_none() {
            let failed = next_of_type(&mut ws, "upload_failed").await;
            assert_eq!(failed["code"], "UNEXPECTED_MESSAGE", "{failed}");
            assert!(
                failed["message"].as_str().unwrap().contains("refused"),
                "{failed}"
            );
            assert_eq!(reached.load(Ordering::Relaxed), 0, "nothing was sent");
        } else {
            wait_until(Duration::from_secs(20), "a part PUT to storage", || async {
                reached.load(Ordering::Relaxed) > 0
            })
            .await;
        }
    }
}

/// The agent's next message of type `kind`, the ones before it (pings, progress) passed over.
async fn next_of_type(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    kind: &str,
) -> serde_json::Value {
    loop {
        let Message::Text(text) = ws.next().await.expect("the agent stays").unwrap() else {
            continue;
        };
        let message: serde_json::Value = serde_json::from_str(&text).unwrap();
        if message["type"] == kind {
            return message;
        }
    }
}
