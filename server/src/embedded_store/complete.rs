//! The embedded store's own CompleteMultipartUpload.
//!
//! s3s-fs builds the object by reading every part through 64 KiB reads and hashing it again
//! with MD5 for the multipart ETag: 3 s per GiB here, most of a 1 GiB upload's time from
//! trigger to verified. The store already knows each part's MD5 and CRC64NVME from the moment
//! it arrived ([`checksums`]), so this completion only copies the parts into a temporary file
//! inside the kernel (`copy_file_range`, through [`std::io::copy`]) and renames it into place.
//!
//! The parts, the upload's record and its metadata are left alone until the object is in
//! place; the running completion's [`super::journal`] still rolls back a crash at any point.
//! The order of the steps:
//! 1. every listed part is checked (ascending numbers, present, 5 MiB but the last);
//! 2. the object is written under a `.tmp.*.internal.part` name (s3s-fs removes such files at
//!    start-up) and renamed into place;
//! 3. the object's ETag and CRC64NVME are written where s3s-fs keeps them;
//! 4. the upload's metadata becomes the object's, and its record and parts are removed.
//!
//! Requests this does not cover go to s3s-fs: conditional completions (`If-Match`,
//! `If-None-Match`), and bucket or key names that are not plain relative paths.

use std::io;
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use md5::{Digest, Md5};
use s3s::dto::{ChecksumType, CompleteMultipartUploadInput, CompleteMultipartUploadOutput, ETag};
use s3s::{S3Error, S3ErrorCode, S3Result};
use shared::hash::Crc64Nvme;

use super::checksums;

/// S3's smallest part, but for the last.
const MIN_PART: u64 = 5 * 1024 * 1024;

/// Whether this completion handles `input`; s3s-fs handles the rest.
pub fn handles(input: &CompleteMultipartUploadInput) -> bool {
    input.if_match.is_none()
        && input.if_none_match.is_none()
        && plain(&input.bucket)
        && plain(&input.key)
}

/// A name made only of ordinary path components: it stays under the store's root.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && !name.ends_with('/')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Completes upload `input.upload_id` as described in the module's text, for a caller with
/// access key `access_key`. `whole` is the object's CRC64NVME, combined from the part records
/// and already checked against the request. Blocking: it copies the whole object.
pub fn complete(
    root: &Path,
    input: &CompleteMultipartUploadInput,
    access_key: Option<&str>,
    whole: Crc64Nvme,
) -> S3Result<CompleteMultipartUploadOutput> {
    let id = uuid::Uuid::parse_str(&input.upload_id)
        .map_err(|_| S3Error::new(S3ErrorCode::NoSuchUpload))?;
    let record = root.join(format!(".upload-{id}.json"));
    let owner: Option<String> = match std::fs::read(&record) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(internal)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(S3Error::new(S3ErrorCode::NoSuchUpload));
        }
        Err(err) => return Err(internal(err)),
    };
    if owner.as_deref() != access_key {
        return Err(S3Error::new(S3ErrorCode::AccessDenied));
    }
    let parts = listed_parts(root, &id, input)?;

    let object = root.join(&input.bucket).join(&input.key);
    let tmp = root.join(format!(".tmp.{}.internal.part", uuid::Uuid::new_v4()));
    let built = build(root, &id, &tmp, &object, &parts);
    if built.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    built.map_err(internal)?;

    let mut etag = Md5::new();
    for (_, record) in &parts {
        etag.update(record.md5);
    }
    let e_tag = format!("{}-{}", hex::encode(etag.finalize()), parts.len());
    write_object_info(root, &input.bucket, &input.key, &e_tag, whole).map_err(internal)?;

    // The object is whole and described: what is left is tidying. A file that cannot be removed
    // here is a stray, which the orphan sweep removes later.
    // The upload's metadata becomes the object's; with none, nothing of the key's previous
    // object stays either.
    let upload_metadata = metadata_path(root, &input.bucket, &input.key, Some(&id));
    let object_metadata = metadata_path(root, &input.bucket, &input.key, None);
    let moved = if upload_metadata.exists() {
        std::fs::rename(&upload_metadata, &object_metadata)
    } else {
        std::fs::remove_file(&object_metadata)
            .or_else(|e| (e.kind() == io::ErrorKind::NotFound).then_some(()).ok_or(e))
    };
    if let Err(err) = moved {
        tracing::warn!(upload_id = %id, error = %err, "replacing the object's metadata failed");
    }
    if let Err(err) = std::fs::remove_file(&record) {
        tracing::warn!(upload_id = %id, error = %err, "removing the upload's record failed");
    }
    for (n, _) in &parts {
        let _ = std::fs::remove_file(checksums::part_file(root, &id, *n));
    }
    Ok(CompleteMultipartUploadOutput {
        bucket: Some(input.bucket.clone()),
        key: Some(input.key.clone()),
        e_tag: Some(ETag::Strong(e_tag)),
        checksum_crc64nvme: Some(whole.to_base64()),
        checksum_type: Some(ChecksumType::from_static(ChecksumType::FULL_OBJECT)),
        ..Default::default()
    })
}

/// The listed parts with their records, checked as S3 checks them.
fn listed_parts(
    root: &Path,
    id: &uuid::Uuid,
    input: &CompleteMultipartUploadInput,
) -> S3Result<Vec<(i32, checksums::PartRecord)>> {
    let listed = input
        .multipart_upload
        .as_ref()
        .and_then(|m| m.parts.as_deref())
        .unwrap_or_default();
    if listed.is_empty() {
        return Err(S3Error::with_message(
            S3ErrorCode::MalformedXML,
            "You must specify at least one part",
        ));
    }
    let mut parts = Vec::with_capacity(listed.len());
    for part in listed {
        let n = part.part_number.ok_or_else(|| {
            S3Error::with_message(S3ErrorCode::InvalidPart, "a part has no number")
        })?;
        if parts.last().is_some_and(|(last, _)| *last >= n) {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidPartOrder,
                "The list of parts was not in ascending order.",
            ));
        }
        let record = checksums::part(root, id, n).map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                S3Error::with_message(
                    S3ErrorCode::InvalidPart,
                    format!("part {n} could not be found"),
                )
            } else {
                internal(err)
            }
        })?;
        parts.push((n, record));
    }
    if let Some((n, _)) = parts[..parts.len() - 1]
        .iter()
        .find(|(_, record)| record.len < MIN_PART)
    {
        return Err(S3Error::with_message(
            S3ErrorCode::EntityTooSmall,
            format!("part {n} is smaller than the minimum allowed size"),
        ));
    }
    Ok(parts)
}

/// Copies the parts of upload `id`, in order, into `tmp`, and renames it to `object`.
fn build(
    root: &Path,
    id: &uuid::Uuid,
    tmp: &Path,
    object: &Path,
    parts: &[(i32, checksums::PartRecord)],
) -> io::Result<()> {
    let mut out = std::fs::File::create(tmp)?;
    for (n, record) in parts {
        let mut part = std::fs::File::open(checksums::part_file(root, id, *n))?;
        let copied = io::copy(&mut part, &mut out)?;
        if copied != record.len {
            return Err(io::Error::other(format!(
                "part {n} changed while the object was built ({copied} bytes, {} recorded)",
                record.len
            )));
        }
    }
    drop(out);
    if let Some(dir) = object.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::rename(tmp, object)
}

/// Where s3s-fs keeps an object's attributes, or an upload's.
fn metadata_path(root: &Path, bucket: &str, key: &str, upload: Option<&uuid::Uuid>) -> PathBuf {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let upload = upload.map(|u| format!(".upload-{u}")).unwrap_or_default();
    root.join(format!(
        ".bucket-{}.object-{}{upload}.metadata.json",
        b64.encode(bucket),
        b64.encode(key)
    ))
}

/// The new object's ETag and checksum, where s3s-fs's HeadObject and GetObject read them. A
/// fresh record: nothing of an object the key held before carries over.
fn write_object_info(
    root: &Path,
    bucket: &str,
    key: &str,
    e_tag: &str,
    whole: Crc64Nvme,
) -> io::Result<()> {
    let mut info = serde_json::Map::new();
    info.insert("e_tag".to_owned(), e_tag.into());
    info.insert("checksum_crc64nvme".to_owned(), whole.to_base64().into());
    checksums::write_object_info(root, bucket, key, &info)
}

fn internal(err: impl std::fmt::Display) -> S3Error {
    S3Error::with_message(S3ErrorCode::InternalError, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3s::dto::{CompletedMultipartUpload, CompletedPart};

    const KEY: &str = "store-1/today.csv";

    /// An upload of `parts` (their bytes) by access key `ak`, as s3s-fs lays it out.
    fn upload(root: &Path, parts: &[Vec<u8>]) -> uuid::Uuid {
        let id = uuid::Uuid::new_v4();
        std::fs::write(root.join(format!(".upload-{id}.json")), b"\"ak\"").unwrap();
        std::fs::write(metadata_path(root, "b", KEY, Some(&id)), b"{}").unwrap();
        for (i, bytes) in parts.iter().enumerate() {
            std::fs::write(checksums::part_file(root, &id, i as i32 + 1), bytes).unwrap();
        }
        id
    }

    fn request(id: &uuid::Uuid, key: &str, numbers: &[i32]) -> CompleteMultipartUploadInput {
        let parts = numbers
            .iter()
            .map(|n| CompletedPart {
                part_number: Some(*n),
                ..Default::default()
            })
            .collect();
        let mut input = CompleteMultipartUploadInput::builder()
            .bucket("b".to_owned())
            .key(key.to_owned())
            .upload_id(id.to_string())
            .build()
            .unwrap();
        input.multipart_upload = Some(CompletedMultipartUpload { parts: Some(parts) });
        input
    }

    fn files(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_object_is_the_parts_in_order_with_s3s_etag_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let parts: Vec<Vec<u8>> = vec![vec![1; MIN_PART as usize], vec![2; 1000]];
        let id = upload(root, &parts);
        // What the key held before must not carry over.
        std::fs::create_dir_all(root.join("b/store-1")).unwrap();
        std::fs::write(root.join("b").join(KEY), b"old object").unwrap();
        checksums::write_object_info(
            root,
            "b",
            KEY,
            &serde_json::json!({"e_tag": "old", "checksum_crc32": "AAAAAA=="})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();

        let whole = Crc64Nvme::of(&parts.concat());
        let out = complete(root, &request(&id, KEY, &[1, 2]), Some("ak"), whole).unwrap();

        assert_eq!(
            std::fs::read(root.join("b").join(KEY)).unwrap(),
            parts.concat()
        );
        let mut of_md5s = Md5::new();
        for p in &parts {
            of_md5s.update(Md5::digest(p));
        }
        let e_tag = format!("{}-2", hex::encode(of_md5s.finalize()));
        assert_eq!(out.e_tag, Some(ETag::Strong(e_tag.clone())));
        assert_eq!(out.checksum_crc64nvme, Some(whole.to_base64()));
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(object_info_path_for_test(root)).unwrap())
                .unwrap();
        assert_eq!(
            info,
            serde_json::json!({"e_tag": e_tag, "checksum_crc64nvme": whole.to_base64()})
        );
        // The upload is gone; its metadata is the object's; nothing temporary is left.
        assert!(metadata_path(root, "b", KEY, None).exists());
        let left = files(root);
        assert!(
            left.iter()
                .all(|f| !f.contains(&id.to_string()) && !f.starts_with(".tmp.")),
            "{left:?}"
        );
    }

    fn object_info_path_for_test(root: &Path) -> PathBuf {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        root.join(format!(
            ".bucket-{}.object-{}.internal.json",
            b64.encode("b"),
            b64.encode(KEY)
        ))
    }

    /// Every refusal is S3's code, and leaves the upload exactly as it was.
    #[test]
    fn a_refused_completion_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let parts: Vec<Vec<u8>> = vec![vec![1; 1000], vec![2; MIN_PART as usize]];
        let id = upload(root, &parts);
        let before = files(root);
        let whole = Crc64Nvme::of(b"");
        let code = |input: &CompleteMultipartUploadInput, ak: Option<&str>| {
            complete(root, input, ak, whole).unwrap_err().code().clone()
        };
        assert_eq!(
            code(&request(&id, KEY, &[2, 1]), Some("ak")),
            S3ErrorCode::InvalidPartOrder
        );
        assert_eq!(
            code(&request(&id, KEY, &[1, 1]), Some("ak")),
            S3ErrorCode::InvalidPartOrder
        );
        assert_eq!(
            code(&request(&id, KEY, &[1, 3]), Some("ak")),
            S3ErrorCode::InvalidPart
        );
        assert_eq!(
            code(&request(&id, KEY, &[1, 2]), Some("ak")),
            S3ErrorCode::EntityTooSmall
        );
        assert_eq!(
            code(&request(&id, KEY, &[]), Some("ak")),
            S3ErrorCode::MalformedXML
        );
        assert_eq!(
            code(&request(&id, KEY, &[2]), Some("other")),
            S3ErrorCode::AccessDenied
        );
        assert_eq!(
            code(&request(&id, KEY, &[2]), None),
            S3ErrorCode::AccessDenied
        );
        let unknown = uuid::Uuid::new_v4();
        assert_eq!(
            code(&request(&unknown, KEY, &[1]), Some("ak")),
            S3ErrorCode::NoSuchUpload
        );
        let mut hostile = request(&id, KEY, &[2]);
        hostile.upload_id = "../../etc".to_owned();
        assert_eq!(code(&hostile, Some("ak")), S3ErrorCode::NoSuchUpload);
        // Part records are written as parts are read; nothing else may change.
        let after: Vec<String> = files(root)
            .into_iter()
            .filter(|f| f != ".backhaul-parts")
            .collect();
        assert_eq!(before, after);
        assert!(!root.join("b").exists());
        // A single last part may be small.
        complete(
            root,
            &request(&id, KEY, &[1]),
            Some("ak"),
            Crc64Nvme::of(&parts[0]),
        )
        .unwrap();
        assert_eq!(std::fs::read(root.join("b").join(KEY)).unwrap(), parts[0]);
    }

    #[test]
    fn an_upload_without_metadata_leaves_none_of_the_previous_objects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let part = vec![3u8; 100];
        let id = upload(root, std::slice::from_ref(&part));
        std::fs::remove_file(metadata_path(root, "b", KEY, Some(&id))).unwrap();
        let old = metadata_path(root, "b", KEY, None);
        std::fs::write(&old, br#"{"content_type":"text/old"}"#).unwrap();
        complete(
            root,
            &request(&id, KEY, &[1]),
            Some("ak"),
            Crc64Nvme::of(&part),
        )
        .unwrap();
        assert!(!old.exists());
    }

    #[test]
    fn names_that_leave_the_root_go_to_s3s_fs() {
        let id = uuid::Uuid::new_v4();
        assert!(handles(&request(&id, KEY, &[1])));
        for key in ["../x", "a/../../x", "/etc/passwd", "", "dir/", "./x"] {
            assert!(!handles(&request(&id, key, &[1])), "{key}");
        }
        let mut conditional = request(&id, KEY, &[1]);
        conditional.if_none_match = Some(s3s::dto::ETagCondition::Any);
        assert!(!handles(&conditional));
    }
}
