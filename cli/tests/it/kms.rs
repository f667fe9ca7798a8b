//! Buckets whose ETags are not MD5s, as SSE-KMS and SSE-C make them. The fault proxy stands in
//! for such a bucket: every ETag storage gives (UploadPart, ListParts, CompleteMultipartUpload,
//! HeadObject) comes out rewritten, and completions get storage's own back. The server's calls
//! and its agents' all go through it. Verification and resume must rest on S3's checksums.

use std::sync::atomic::Ordering;

use crate::harness::*;
use crate::proxy::{FaultProxy, Faults};

/// A server on `mode`'s storage seen through an SSE-KMS-like proxy with `faults`, and the
/// server that holds the store (itself, for LocalStack), for reading objects back.
async fn kms_bucket(mode: Mode, faults: Faults) -> (TestServer, Option<TestServer>, FaultProxy) {
    let faults = Faults {
        kms_etags: true,
        ..faults
    };
    let args = ["--part-size", "5242880"];
    match mode {
        Mode::Embedded => {
            let store = TestServer::start(Mode::Embedded).await;
            let proxy = FaultProxy::start(&store.s3_endpoint, faults).await;
            let server = TestServer::builder(Mode::Embedded)
                .s3_endpoint(&proxy.url())
                .args(&args)
                .start()
                .await;
            (server, Some(store), proxy)
        }
        Mode::LocalStack => {
            let proxy = FaultProxy::start(&localstack_endpoint(), faults).await;
            let server = TestServer::builder(Mode::LocalStack)
                .s3_endpoint(&proxy.url())
                .args(&args)
                .start()
                .await;
            (server, None, proxy)
        }
    }
}

/// The multipart ETag an MD5 bucket would give `data` in parts of 5 MiB.
fn md5_multipart_etag(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    let mut all = Md5::new();
    let chunks: Vec<&[u8]> = data.chunks(5 * MIB as usize).collect();
    for c in &chunks {
        all.update(Md5::digest(c));
    }
    format!("\"{}-{}\"", hex::encode(all.finalize()), chunks.len())
}

/// A download completes and verifies, though no ETag is an MD5.
async fn downloads_verify_by_checksum(mode: Mode) {
    let (server, store, proxy) = kms_bucket(mode, Faults::default()).await;
    let store = store.as_ref().unwrap_or(&server);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z-report.bin");
    let sha = write_file(&file, 12 * MIB).await;
    let client_id = unique_client("kms");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(store, &status, &sha).await;
    let data = tokio::fs::read(&file).await.unwrap();
    assert_ne!(
        status.etag.as_deref(),
        Some(md5_multipart_etag(&data).as_str()),
        "the proxy's ETags are no MD5s"
    );
    assert!(proxy.stats.etags_rewritten.load(Ordering::Relaxed) >= 4);
    assert_eq!(server.in_progress_multiparts(&client_id).await, 0);
}

storage_modes!(kms_downloads, downloads_verify_by_checksum);

/// kill -9 of the agent once parts are stored: the resume keeps them (it trusts their
/// CRC64NVME, not their ETag) and no part is sent twice.
async fn a_resume_keeps_the_stored_parts(mode: Mode) {
    let (server, store, proxy) = kms_bucket(mode, Faults::default()).await;
    let store = store.as_ref().unwrap_or(&server);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.bin");
    let sha = write_file(&file, 40 * MIB).await;
    let client_id = unique_client("kmskill");
    let args = agent_args(
        &server.ws_url(),
        &client_id,
        &file,
        &["--max-upload-bytes-per-sec", "10485760"],
    );
    let mut agent = ChildProcess::spawn("agent", &args);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    wait_until(
        std::time::Duration::from_secs(60),
        "two parts to be stored",
        || async { server.upload(&upload_id).await.parts_done >= 2 },
    )
    .await;
    agent.kill9().await;
    let _agent = ChildProcess::spawn("agent", &args);
    let status = server.wait_finished(&upload_id).await;
    assert_identical(store, &status, &sha).await;
    assert!(status.resumes >= 1, "{status:?}");
    assert_eq!(
        proxy.stats.duplicates(),
        vec![],
        "a stored part was sent again"
    );
    assert_eq!(proxy.stats.stored_parts(), 8);
}

storage_modes!(kms_resume, a_resume_keeps_the_stored_parts);

/// Parts corrupted on the way are refused by storage (their signed CRC64NVME) and sent again.
async fn corrupted_parts_are_refused(mode: Mode) {
    let faults = Faults {
        corrupt_every: Some(3),
        ..Faults::default()
    };
    let (server, store, proxy) = kms_bucket(mode, faults).await;
    let store = store.as_ref().unwrap_or(&server);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    let sha = write_file(&file, 30 * MIB).await;
    let client_id = unique_client("kmsflip");
    let _agent = TestAgent::start_with(
        &server,
        &client_id,
        &file,
        &["--part-attempts", "10", "--part-retry-min-ms", "10"],
    );
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(store, &status, &sha).await;
    let st = &proxy.stats;
    assert!(st.injected_corruptions.load(Ordering::Relaxed) >= 2);
    assert_eq!(
        st.rejected_by_storage.load(Ordering::Relaxed),
        st.injected_corruptions.load(Ordering::Relaxed)
    );
}

storage_modes!(kms_corruption, corrupted_parts_are_refused);

/// `S3_SSE=aws:kms` with a key asks for SSE-KMS at every CreateMultipartUpload, and the upload
/// verifies as any other. (The embedded store keeps no encryption at rest, and LocalStack
/// encrypts with AES256 whatever is asked, so what is checked is the request storage gets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_encryption_reaches_storage() {
    let store = TestServer::start(Mode::Embedded).await;
    let proxy = FaultProxy::start(&store.s3_endpoint, Faults::default()).await;
    let server = TestServer::builder(Mode::Embedded)
        .s3_endpoint(&proxy.url())
        .args(&[
            "--s3-sse",
            "aws:kms",
            "--s3-sse-kms-key-id",
            "alias/pos-exports",
        ])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cardholder.csv");
    let sha = write_file(&file, 6 * MIB).await;
    let client_id = unique_client("sse");
    let _agent = TestAgent::start(&server, &client_id, &file);
    server.wait_connected(&client_id).await;
    let upload_id = trigger_id(&server, &client_id).await;
    let status = server.wait_finished(&upload_id).await;
    assert_identical(&store, &status, &sha).await;
    assert_eq!(
        *proxy.stats.encryption_asked.lock().unwrap(),
        vec![(
            Some("aws:kms".to_owned()),
            Some("alias/pos-exports".to_owned())
        )]
    );
}

/// A KMS key without `S3_SSE=aws:kms` is a mistake, refused at start.
#[test]
fn a_kms_key_needs_kms_encryption() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let mut args = server_args(Mode::Embedded, dir.path(), &[]);
    args.extend(["--s3-sse-kms-key-id".into(), "alias/pos".into()]);
    let config = server::config::Config::try_parse_from(&args).unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("S3_SSE=aws:kms"), "{err}");
    args.extend(["--s3-sse".into(), "aws:kms".into()]);
    let config = server::config::Config::try_parse_from(&args).unwrap();
    assert!(config.validate().is_ok());
}
