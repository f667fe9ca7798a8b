//! What the embedded store checks in a request, as S3 does: a part's body against the checksums
//! its request signed, and a completion's whole-object checksum against the parts it lists.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use futures::StreamExt;
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};
use s3s_fs::FileSystem;
use shared::hash::Crc64Nvme;

use super::checksums;
use super::internal;

/// UploadPart: checks the signed `Content-MD5` and `x-amz-checksum-*` (header or trailer)
/// against the bytes that arrived, as S3 does, and records the part's checksums. A refused part
/// is removed before the answer goes out, as S3 keeps no part it refused.
pub async fn upload_part(
    fs: &FileSystem,
    root: &Path,
    mut req: S3Request<UploadPartInput>,
) -> S3Result<S3Response<UploadPartOutput>> {
    let input = &mut req.input;
    // An id that is no UUID is refused by s3s-fs itself.
    let Ok(id) = uuid::Uuid::parse_str(&input.upload_id) else {
        return fs.upload_part(req).await;
    };
    let part_number = input.part_number;
    let expected_md5: Option<[u8; 16]> = match input.content_md5.take() {
        None => None,
        Some(md5) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(md5.as_bytes())
                .ok()
                .and_then(|raw| raw.try_into().ok())
                .ok_or_else(|| {
                    S3Error::with_message(S3ErrorCode::InvalidDigest, "bad Content-MD5")
                })?,
        ),
    };
    let expected_crc = match input.checksum_crc64nvme.take() {
        None => None,
        Some(crc) => Some(Crc64Nvme::parse(&crc).map_err(|_| {
            S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "Value for x-amz-checksum-crc64nvme header is invalid.",
            )
        })?),
    };
    let (other, other_expected) = other_checksum(&req.headers, input)?;
    let trailers = req.trailing_headers.clone();
    // The part's bytes go through the checksums on their way to disk.
    let sums = Arc::new(std::sync::Mutex::new(checksums::BodyChecksums::new(other)));
    let input = &mut req.input;
    if let Some(body) = input.body.take() {
        let sums = sums.clone();
        input.body = Some(StreamingBlob::wrap(body.map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            sums.lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(&chunk);
            Ok::<_, std::io::Error>(chunk)
        })));
    }
    // A record of an earlier part of this number no longer holds once the part is written
    // again; without one, it is computed from the bytes when needed.
    checksums::forget_part(root, &id, part_number).map_err(internal)?;
    let mut resp = fs.upload_part(req).await?;
    let (crc64nvme, other_got) = {
        let sums = sums.lock().unwrap_or_else(|e| e.into_inner());
        (sums.crc64nvme.finish(), sums.other())
    };
    // A trailing checksum is known once the body has been read.
    let other_expected = other_expected.or_else(|| {
        let (other, _) = other_got.as_ref()?;
        trailers?
            .read(|h| {
                h.get(other.header())
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .flatten()
    });
    let other_wrong = match (&other_got, &other_expected) {
        (Some((_, got)), Some(expected)) => got != expected,
        _ => false,
    };
    let md5: Option<[u8; 16]> = match &resp.output.e_tag {
        Some(ETag::Strong(md5)) => hex::decode(md5).ok().and_then(|m| m.try_into().ok()),
        _ => None,
    };
    let part_file = checksums::part_file(root, &id, part_number);
    let refusal = match (md5, expected_md5, expected_crc) {
        (None, _, _) => Some((S3ErrorCode::InternalError, "the part has no MD5")),
        (Some(md5), Some(expected), _) if md5 != expected => Some((
            S3ErrorCode::BadDigest,
            "The Content-MD5 you specified did not match what we received.",
        )),
        (_, _, Some(expected)) if crc64nvme != expected => Some((
            S3ErrorCode::BadDigest,
            "The CRC64NVME you specified did not match the calculated checksum.",
        )),
        _ if other_wrong => Some((
            S3ErrorCode::BadDigest,
            "The checksum you specified did not match the calculated checksum.",
        )),
        _ => None,
    };
    let (Some(md5), None) = (md5, &refusal) else {
        // The part is not kept, as S3 keeps no part it refused.
        if let Err(err) = tokio::fs::remove_file(&part_file).await
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InternalError,
                format!("removing a part that failed its checksum: {err}"),
            ));
        }
        let (code, message) = refusal.unwrap_or((S3ErrorCode::InternalError, "no MD5"));
        return Err(S3Error::with_message(code, message));
    };
    let len = tokio::fs::metadata(&part_file)
        .await
        .map_err(internal)?
        .len();
    let record = checksums::PartRecord {
        crc64nvme,
        md5,
        len,
    };
    checksums::record(root, &id, part_number, &record).map_err(internal)?;
    resp.output.checksum_crc64nvme = Some(crc64nvme.to_base64());
    Ok(resp)
}

/// UploadPartCopy: a byte range of a stored object becomes a part, as on S3. The store refuses
/// an open range (`bytes=first-`), which S3 does not accept either, and a range past the source
/// (`InvalidArgument`, as S3 answers), records the part's checksums like an uploaded part's, and
/// answers the copied bytes' CRC64NVME in `CopyPartResult`, as S3 does, so the object's
/// FULL_OBJECT checksum covers copied and uploaded parts alike.
///
/// The copy is the store's own rather than s3s-fs's, which streams through 4 KiB reads on the
/// async runtime: one blocking pass with 1 MiB reads copies the range into a temporary file,
/// checksums it on the way and renames it into place, so a part is never half there.
pub async fn upload_part_copy(
    fs: &FileSystem,
    root: &Path,
    req: S3Request<UploadPartCopyInput>,
) -> S3Result<S3Response<UploadPartCopyOutput>> {
    let Ok(id) = uuid::Uuid::parse_str(&req.input.upload_id) else {
        return fs.upload_part_copy(req).await;
    };
    let CopySource::Bucket { bucket, key, .. } = &req.input.copy_source else {
        return fs.upload_part_copy(req).await;
    };
    let invalid =
        |message: &str| S3Error::with_message(S3ErrorCode::InvalidArgument, message.to_owned());
    let range = match &req.input.copy_source_range {
        None => None,
        Some(range) => Some(
            range
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .and_then(|(first, last)| {
                    Some((first.parse::<u64>().ok()?, last.parse::<u64>().ok()?))
                })
                .ok_or_else(|| {
                    invalid(
                        "The x-amz-copy-source-range value must be of the form bytes=first-last",
                    )
                })?,
        ),
    };
    // The source is an object: a plain path under its bucket, never a way out of it.
    let relative = Path::new(bucket.as_ref()).join(key.as_ref());
    if !relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(invalid("the copy source is not an object key"));
    }
    if !root.join(format!(".upload-{id}.json")).exists() {
        return Err(S3Error::new(S3ErrorCode::NoSuchUpload));
    }
    let part_number = req.input.part_number;
    let (source, dest, root) = (
        root.join(relative),
        checksums::part_file(root, &id, part_number),
        root.to_owned(),
    );
    let record = tokio::task::spawn_blocking(move || -> S3Result<checksums::PartRecord> {
        // As for an uploaded part: a record of an earlier part of this number no longer holds.
        checksums::forget_part(&root, &id, part_number).map_err(internal)?;
        let copied = copy_range(&source, &dest, range)?;
        checksums::record(&root, &id, part_number, &copied).map_err(internal)?;
        Ok(copied)
    })
    .await
    .map_err(internal)??;
    let output = UploadPartCopyOutput {
        copy_part_result: Some(CopyPartResult {
            e_tag: Some(ETag::Strong(record.etag())),
            checksum_crc64nvme: Some(record.crc64nvme.to_base64()),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(S3Response::new(output))
}

/// Copies `range` (closed; the whole file if `None`) of `source` to `dest` through a temporary
/// file beside it, and returns the copy's checksums.
fn copy_range(
    source: &Path,
    dest: &Path,
    range: Option<(u64, u64)>,
) -> S3Result<checksums::PartRecord> {
    use md5::Digest;
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = match std::fs::File::open(source) {
        Ok(f) if f.metadata().map_err(internal)?.is_file() => f,
        Ok(_) => return Err(S3Error::new(S3ErrorCode::NoSuchKey)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(S3Error::new(S3ErrorCode::NoSuchKey));
        }
        Err(e) => return Err(internal(e)),
    };
    let size = src.metadata().map_err(internal)?.len();
    let (first, len) = match range {
        None => (0, size),
        Some((first, last)) if first <= last && last < size => (first, last - first + 1),
        Some(_) => {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "Range specified is not valid for source object",
            ));
        }
    };
    src.seek(SeekFrom::Start(first)).map_err(internal)?;
    let tmp = dest.with_extension(format!("copying-{}", uuid::Uuid::new_v4()));
    let written = (|| -> std::io::Result<checksums::PartRecord> {
        let mut out = std::fs::File::create(&tmp)?;
        let (mut crc, mut md5) = (shared::hash::Crc64NvmeHasher::default(), md5::Md5::new());
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            src.read_exact(&mut buf[..want])?;
            out.write_all(&buf[..want])?;
            crc.update(&buf[..want]);
            md5.update(&buf[..want]);
            left -= want as u64;
        }
        out.sync_data()?;
        std::fs::rename(&tmp, dest)?;
        Ok(checksums::PartRecord {
            crc64nvme: crc.finish(),
            md5: md5.finalize().into(),
            len,
        })
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(internal)
}

/// The checksum other than CRC64NVME that an UploadPart names, if any: in a header (with its
/// value), or announced as a trailer (the value comes after the body). SHA-1 is refused, not
/// left unchecked.
fn other_checksum(
    headers: &http::HeaderMap,
    input: &UploadPartInput,
) -> S3Result<(Option<checksums::Other>, Option<String>)> {
    use checksums::Other;
    let unsupported = || {
        S3Error::with_message(
            S3ErrorCode::NotImplemented,
            "the embedded store checks CRC64NVME, CRC32, CRC32C and SHA-256 checksums only",
        )
    };
    if input.checksum_sha1.is_some() {
        return Err(unsupported());
    }
    for (other, value) in [
        (Other::Crc32, &input.checksum_crc32),
        (Other::Crc32c, &input.checksum_crc32c),
        (Other::Sha256, &input.checksum_sha256),
    ] {
        if let Some(value) = value {
            return Ok((Some(other), Some(value.clone())));
        }
    }
    let announced = headers
        .get("x-amz-trailer")
        .and_then(|v| v.to_str().ok())
        .map(|names| names.split(',').map(str::trim).filter(|n| !n.is_empty()));
    for name in announced.into_iter().flatten() {
        if let Some(other) = Other::named(name).map_err(|()| unsupported())? {
            return Ok((Some(other), None));
        }
    }
    Ok((None, None))
}

/// The FULL_OBJECT CRC64NVME of the object a completion would build, from the records of the
/// parts it lists, checked as S3 checks it: a part's checksum in the request must be the
/// stored part's (`InvalidPart`), and the object's, if the request gives one, the combination
/// (`BadDigest`). `None` if the upload or a listed part does not exist; s3s-fs refuses those.
pub fn object_checksum(
    root: &Path,
    input: &CompleteMultipartUploadInput,
) -> S3Result<Option<Crc64Nvme>> {
    // A whole-object checksum of another algorithm (the AWS CLI's CRC32) was checked part by
    // part as the parts arrived; only CRC64NVME is checked whole.
    if input.checksum_crc64nvme.is_some() && !full_object_or_unset(input.checksum_type.as_ref()) {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "The upload was created using the FULL_OBJECT checksum type.",
        ));
    }
    let Ok(id) = uuid::Uuid::parse_str(&input.upload_id) else {
        return Ok(None);
    };
    let listed = input
        .multipart_upload
        .as_ref()
        .and_then(|m| m.parts.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut pieces = Vec::with_capacity(listed.len());
    for part in listed {
        let Some(n) = part.part_number else {
            return Ok(None);
        };
        let record = match checksums::part(root, &id, n) {
            Ok(record) => record,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(internal(err)),
        };
        if let Some(given) = &part.checksum_crc64nvme
            && Crc64Nvme::parse(given).ok() != Some(record.crc64nvme)
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidPart,
                format!("part {n}'s checksum does not match the stored part's"),
            ));
        }
        pieces.push((record.crc64nvme, record.len));
    }
    let whole = Crc64Nvme::of_pieces(pieces);
    if let Some(given) = &input.checksum_crc64nvme
        && Crc64Nvme::parse(given).ok() != Some(whole)
    {
        return Err(S3Error::with_message(
            S3ErrorCode::BadDigest,
            "The CRC64NVME you specified did not match the calculated checksum.",
        ));
    }
    Ok(Some(whole))
}

/// Whether a request's checksum type is FULL_OBJECT or left unset: the only type CRC64NVME has.
pub fn full_object_or_unset(checksum_type: Option<&ChecksumType>) -> bool {
    checksum_type.is_none_or(|t| t.as_str() == ChecksumType::FULL_OBJECT)
}
