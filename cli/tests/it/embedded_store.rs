//! The embedded store as S3 clients see it: atomic completions, the checksums other clients
//! send, and part files nobody owns swept away.

use std::time::Duration;

use crate::harness::*;

/// The embedded store completes a multipart upload atomically, as S3 does: a client that gives
/// up on CompleteMultipartUpload does not cut the completion short, and ListParts during a
/// completion never answers `NoSuchUpload` while the object is still missing. (An agent killed
/// right after sending its completion once left a resume with neither parts nor object.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_completion_is_atomic() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let server = TestServer::start(Mode::Embedded).await;
    let s3 = server.s3().await;
    let key = "tests/atomic/f.bin";
    let part = vec![5u8; 5 * MIB as usize];
    let parts = 20;
    let upload_id = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap();
    let mut done = Vec::new();
    for n in 1..=parts {
        let out = s3
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&upload_id)
            .part_number(n)
            .body(part.clone().into())
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(out.e_tag.unwrap())
                .build(),
        );
    }
    // Give up on the completion almost at once: the connection is dropped mid-copy.
    let impatient = s3
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .customize()
        .config_override(
            aws_sdk_s3::config::Config::builder().timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .operation_timeout(Duration::from_millis(30))
                    .build(),
            ),
        )
        .send()
        .await;
    assert!(impatient.is_err(), "the completion should outlast 30 ms");
    let listed = s3
        .list_parts()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .send()
        .await;
    let size = Some(i64::from(parts) * 5 * MIB as i64);
    match &listed {
        // The completion had not begun: the upload is still whole.
        Ok(out) => assert_eq!(out.parts().len(), parts as usize, "{out:?}"),
        // It is over: then the object is whole.
        Err(err) => {
            assert!(
                format!("{:?}", err.as_service_error()).contains("NoSuchUpload"),
                "{err:?}"
            );
            let head = s3.head_object().bucket(BUCKET).key(key).send().await;
            assert_eq!(
                head.expect("NoSuchUpload, so the object must be there")
                    .content_length(),
                size
            );
        }
    }
    wait_until(
        Duration::from_secs(30),
        "the object to be complete",
        || async {
            s3.head_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .is_ok()
        },
    )
    .await;
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), size);
}

/// The embedded store checks the checksums other S3 clients send, as S3 does: the AWS SDKs and
/// CLI create uploads with CRC32 and send it with each part. A wrong one is `BadDigest`, and
/// every object still gets its FULL_OBJECT CRC64NVME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_checks_other_clients_checksums() {
    use aws_sdk_s3::types::{
        ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart,
    };
    let server = TestServer::start(Mode::Embedded).await;
    let s3 = server.s3().await;
    let key = "tests/crc32/f.bin";
    let part = vec![9u8; 5 * MIB as usize];
    let upload_id = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap();
    let wrong = s3
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_crc32("AAAAAA==")
        .body(part.clone().into())
        .send()
        .await;
    let err = format!("{:?}", wrong.unwrap_err());
    assert!(err.contains("BadDigest"), "{err}");
    let sha1 = s3
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_algorithm(ChecksumAlgorithm::Sha1)
        .body(part.clone().into())
        .send()
        .await;
    assert!(sha1.is_err(), "SHA-1 is not checked, so it is refused");
    // The SDK's own CRC32 (a trailer) passes.
    let out = s3
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(part.clone().into())
        .send()
        .await
        .unwrap();
    s3.complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    CompletedPart::builder()
                        .part_number(1)
                        .e_tag(out.e_tag.unwrap())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.checksum_crc64_nvme(),
        Some(shared::hash::Crc64Nvme::of(&part).to_base64().as_str())
    );
    // Without checksum mode, no checksum is answered, as on S3.
    let plain = s3
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.checksum_crc64_nvme(), None);
}

/// Part files of uploads that no longer exist (a part still being written when its upload was
/// aborted, say) are found and removed by the orphan sweep, not only at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_part_files_are_swept() {
    let server = TestServer::builder(Mode::Embedded)
        .args(&["--orphan-sweep-interval-secs", "1"])
        .start()
        .await;
    let stray_files = |id: String| {
        let part = server.data_dir.join(format!(".upload_id-{id}.part-1"));
        let record = server.data_dir.join(format!(".backhaul-parts/{id}"));
        std::fs::write(&part, b"left behind").unwrap();
        std::fs::create_dir_all(&record).unwrap();
        std::fs::write(record.join("1"), b"{}").unwrap();
        (part, record)
    };
    let (part, record) = stray_files(shared::UploadId::new_random().to_string());
    wait_until(
        Duration::from_secs(20),
        "the sweep to remove the stray part",
        || async { !part.exists() && !record.exists() },
    )
    .await;
    // A live upload's parts are not strays: they outlast a sweep that removes another stray.
    let client_id = unique_client("notstray");
    let (_agent, _upload_id, plan) = RawAgent::with_plan(&server, &client_id, "a.bin", 1000).await;
    raw_s3::put_planned_part(&plan, 0, vec![7u8; 1000]).await;
    let (_, s3_upload_id) = raw_s3::multipart_of(plan["parts"][0]["url"].as_str().unwrap());
    let (part, record) = stray_files(shared::UploadId::new_random().to_string());
    wait_until(Duration::from_secs(20), "another sweep", || async {
        !part.exists() && !record.exists()
    })
    .await;
    assert!(
        server
            .data_dir
            .join(format!(".upload_id-{s3_upload_id}.part-1"))
            .exists(),
        "the sweep removed a live upload's part"
    );
}

/// UploadPartCopy, as S3 does it and as unchanged parts will use it: a closed range of a stored
/// object becomes a part, mixed with an uploaded one, and the object's FULL_OBJECT CRC64NVME
/// covers both. Each store answers the copied range's CRC64NVME; a range past the source is
/// `InvalidArgument` (as S3 and LocalStack answer it), and the embedded store refuses an open
/// range, which S3 does not accept either.
async fn a_copied_part_joins_an_uploaded_one(mode: Mode) {
    use aws_sdk_s3::types::{
        ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
    };
    use shared::hash::Crc64Nvme;
    let server = TestServer::start(mode).await;
    let s3 = server.s3().await;
    let prefix = format!("tests/copy/{}", unique_client("copy"));
    let source_key = format!("{prefix}/previous.bin");
    let source: Vec<u8> = (0..12 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    s3.put_object()
        .bucket(BUCKET)
        .key(&source_key)
        .body(source.clone().into())
        .send()
        .await
        .unwrap();
    let key = format!("{prefix}/next.bin");
    let upload_id = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(&key)
        .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
        .checksum_type(ChecksumType::FullObject)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap();
    let fresh = vec![3u8; 6 * MIB as usize];
    let fresh_crc = Crc64Nvme::of(&fresh).to_base64();
    let sent = s3
        .upload_part()
        .bucket(BUCKET)
        .key(&key)
        .upload_id(&upload_id)
        .part_number(1)
        .checksum_crc64_nvme(&fresh_crc)
        .body(fresh.clone().into())
        .send()
        .await
        .unwrap();
    let copy = |range: &str| {
        s3.upload_part_copy()
            .bucket(BUCKET)
            .key(&key)
            .upload_id(&upload_id)
            .part_number(2)
            .copy_source(format!("{BUCKET}/{source_key}"))
            .copy_source_range(range)
            .send()
    };
    let past = copy(&format!("bytes={}-{}", 5 * MIB, 12 * MIB)).await;
    let err = format!("{:?}", past.unwrap_err());
    assert!(err.contains("InvalidArgument"), "{err}");
    if mode == Mode::Embedded {
        let open = copy(&format!("bytes={}-", 5 * MIB)).await;
        let err = format!("{:?}", open.unwrap_err());
        assert!(err.contains("InvalidArgument"), "{err}");
    }
    let range = &source[(5 * MIB) as usize..];
    let copied = copy(&format!("bytes={}-{}", 5 * MIB, 12 * MIB - 1))
        .await
        .unwrap()
        .copy_part_result
        .unwrap();
    let range_crc = Crc64Nvme::of(range).to_base64();
    assert_eq!(copied.checksum_crc64_nvme(), Some(range_crc.as_str()));
    let whole: Vec<u8> = fresh.iter().chain(range).copied().collect();
    let whole_crc = Crc64Nvme::of(&whole).to_base64();
    s3.complete_multipart_upload()
        .bucket(BUCKET)
        .key(&key)
        .upload_id(&upload_id)
        .checksum_crc64_nvme(&whole_crc)
        .checksum_type(ChecksumType::FullObject)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    CompletedPart::builder()
                        .part_number(1)
                        .e_tag(sent.e_tag.unwrap())
                        .checksum_crc64_nvme(&fresh_crc)
                        .build(),
                )
                .parts(
                    CompletedPart::builder()
                        .part_number(2)
                        .e_tag(copied.e_tag.unwrap())
                        .checksum_crc64_nvme(&range_crc)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key(&key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.checksum_crc64_nvme(), Some(whole_crc.as_str()));
    assert_eq!(head.content_length(), Some(whole.len() as i64));
    assert_eq!(
        server.object_sha256(&key).await,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&whole))
    );
    // The source is untouched.
    assert_eq!(
        server.object_sha256(&source_key).await,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&source))
    );
}

storage_modes!(part_copy, a_copied_part_joins_an_uploaded_one);
