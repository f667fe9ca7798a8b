//! The embedded store: s3s-fs, with the S3 behaviours Backhaul depends on that s3s-fs 0.14
//! lacks.
//!
//! - UploadPart checks `Content-MD5` and `x-amz-checksum-*` against the body, as S3 does, and
//!   answers `BadDigest` ([`checks`]). s3s-fs checks neither. The MD5 check compares the MD5
//!   that s3s-fs computes for the part's ETag anyway, so the store hashes each byte with MD5 once.
//!   A part that fails a check is removed before the answer goes out. For that short moment a
//!   ListParts could see it; a resume that then trusted it would still be caught, because the
//!   object's checksum is computed from the bytes the store holds.
//! - S3's additional checksums ([`checksums`]): every part gets a CRC64NVME, recorded with its
//!   ETag; ListParts reports it, the completion combines them into the object's FULL_OBJECT
//!   checksum (checked against the one the completion signed, [`checks`]) and HeadObject answers
//!   it when asked with checksum mode on.
//! - ListMultipartUploads lists the unfinished uploads, so the orphan sweep works here too, and
//!   first removes part files of uploads that no longer exist (the orphan sweep's list is the
//!   moment; start-up is another).
//! - ListParts answers `NoSuchUpload` for an upload that was completed or aborted.
//! - CompleteMultipartUpload runs to its end even if the client goes away, and ListParts waits
//!   for running completions. s3s-fs forgets the upload first and then copies the parts into the
//!   object, so a completion cut off by a dropped connection, or observed halfway, looked like a
//!   finished upload whose object was missing. S3 completes atomically.
//! - A completion is journaled ([`journal`]): a crash, or an error, halfway leaves the upload as
//!   it was (resumable), never neither the upload nor the object. Part files of uploads that no
//!   longer exist are removed at start-up.
//! - The completion itself is the store's own ([`complete`]): it copies the parts inside the
//!   kernel and takes the ETag and checksum from the part records, where s3s-fs read and hashed
//!   every byte again (3 s per GiB).
//!
//! Every other operation Backhaul, its tests and its users need goes straight to s3s-fs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

mod checks;
mod checksums;
mod complete;
mod journal;

use base64::Engine;
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};
use s3s_fs::FileSystem;

pub struct EmbeddedStore {
    fs: Arc<FileSystem>,
    root: PathBuf,
    /// Held shared by every running completion, and exclusively by ListParts.
    completions: Arc<tokio::sync::RwLock<()>>,
    /// Upload ids whose completion is running: a second completion of the same upload (a
    /// client that gave up waiting and retried) is refused until the first has ended, so two
    /// never share one journal.
    completing: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl EmbeddedStore {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let fs = FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("opening embedded store at {}: {e:?}", root.display()))?;
        let rolled_back = journal::Journal::recover_all(root).map_err(|e| {
            anyhow::anyhow!(
                "rolling back interrupted completions in {}: {e}",
                root.display()
            )
        })?;
        if rolled_back > 0 {
            tracing::warn!(
                rolled_back,
                "completions cut short by a crash were rolled back; their uploads resume"
            );
        }
        let strays = journal::remove_stray_parts(root)
            .map_err(|e| anyhow::anyhow!("removing stray parts in {}: {e}", root.display()))?;
        let strays = strays
            + checksums::remove_stray(root).map_err(|e| {
                anyhow::anyhow!("removing stray part records in {}: {e}", root.display())
            })?;
        if strays > 0 {
            tracing::info!(strays, "removed part files of uploads that no longer exist");
        }
        Ok(Self {
            fs: Arc::new(fs),
            root: root.to_owned(),
            completions: Arc::default(),
            completing: Arc::default(),
        })
    }
}

impl EmbeddedStore {
    /// Removes part files and part records of uploads that no longer exist: left by a crash, or
    /// by a part that was still being written when its upload was aborted. The orphan sweep
    /// lists unfinished uploads every `ORPHAN_SWEEP_INTERVAL_SECS`, and that is when this runs,
    /// with no completion running (a running completion has forgotten its upload but not yet
    /// consumed its parts).
    async fn remove_strays(&self) -> S3Result<()> {
        let _quiet = self.completions.write().await;
        let root = self.root.clone();
        let strays = tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>(
                journal::remove_stray_parts(&root)? + checksums::remove_stray(&root)?,
            )
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        if strays > 0 {
            tracing::info!(strays, "removed part files of uploads that no longer exist");
        }
        Ok(())
    }
}

/// Implements S3 for the store: the listed operations go to s3s-fs unchanged, the rest is
/// written out. (`async_trait` must see the methods, so the whole impl comes from the macro.)
macro_rules! s3_impl {
    (delegate { $($method:ident($input:ident) -> $output:ident;)* } $($own:tt)*) => {
        #[async_trait::async_trait]
        impl S3 for EmbeddedStore {
            $(
                async fn $method(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.fs.$method(req).await
                }
            )*
            $($own)*
        }
    };
}

s3_impl! {
    delegate {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        get_object(GetObjectInput) -> GetObjectOutput;
        put_object(PutObjectInput) -> PutObjectOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
    }

    /// Every upload gets a FULL_OBJECT CRC64NVME, as on S3, whatever was asked. Another algorithm
    /// the store can check per part (CRC32, CRC32C, SHA-256: the AWS CLI asks for CRC32) is
    /// accepted and checked on each part; its whole-object value is not computed (HeadObject
    /// answers the CRC64NVME). SHA-1 is refused, and CRC64NVME as COMPOSITE, as S3 refuses it.
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = &req.input;
        let algorithm = input
            .checksum_algorithm
            .as_ref()
            .map(|a| a.as_str().to_owned());
        if let Some(a) = &algorithm
            && checksums::Other::named(a).is_err()
        {
            return Err(S3Error::with_message(
                S3ErrorCode::NotImplemented,
                "the embedded store checks CRC64NVME, CRC32, CRC32C and SHA-256 checksums only",
            ));
        }
        let crc64 = algorithm
            .as_deref()
            .is_none_or(|a| a == ChecksumAlgorithm::CRC64NVME);
        if crc64 && !checks::full_object_or_unset(input.checksum_type.as_ref()) {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "CRC64NVME is a FULL_OBJECT checksum",
            ));
        }
        let checksum_type = input.checksum_type.clone();
        let mut resp = self.fs.create_multipart_upload(req).await?;
        let out = &mut resp.output;
        if crc64 {
            out.checksum_algorithm =
                Some(ChecksumAlgorithm::from_static(ChecksumAlgorithm::CRC64NVME));
            out.checksum_type = Some(ChecksumType::from_static(ChecksumType::FULL_OBJECT));
        } else {
            out.checksum_algorithm = algorithm.map(ChecksumAlgorithm::from);
            out.checksum_type = checksum_type;
        }
        Ok(resp)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let id = uuid::Uuid::parse_str(&req.input.upload_id).ok();
        let resp = self.fs.abort_multipart_upload(req).await?;
        if let Some(id) = id {
            checksums::forget(&self.root, &id).map_err(internal)?;
        }
        Ok(resp)
    }

    /// Checksums are answered only with checksum mode on, as S3 does, and with their type.
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let enabled = req
            .input
            .checksum_mode
            .as_ref()
            .is_some_and(|m| m.as_str() == ChecksumMode::ENABLED);
        let mut resp = self.fs.head_object(req).await?;
        let out = &mut resp.output;
        if enabled {
            if out.checksum_crc64nvme.is_some() {
                out.checksum_type = Some(ChecksumType::from_static(ChecksumType::FULL_OBJECT));
            }
        } else {
            out.checksum_crc32 = None;
            out.checksum_crc32c = None;
            out.checksum_crc64nvme = None;
            out.checksum_sha1 = None;
            out.checksum_sha256 = None;
        }
        Ok(resp)
    }

    /// Checks the signed `Content-MD5` and `x-amz-checksum-*` (header or trailer) against the
    /// bytes that arrived, as S3 does, and records the part's checksums.
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        checks::upload_part(&self.fs, &self.root, req).await
    }

    /// A range of a stored object as a part, with the part's checksums recorded and answered.
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        checks::upload_part_copy(&self.fs, &self.root, req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let running = self.completions.clone().read_owned().await;
        let fs = self.fs.clone();
        let root = self.root.clone();
        let completing = self.completing.clone();
        // A task of its own, so a client that goes away cannot cut the copy short.
        tokio::spawn(async move {
            let _running = running;
            let input = &req.input;
            let Some(_only) = OnlyCompletion::claim(&completing, &input.upload_id) else {
                return Err(S3Error::with_message(
                    S3ErrorCode::InternalError,
                    "a completion of this upload is already running; retry later",
                ));
            };
            let parts: Vec<i32> = input
                .multipart_upload
                .as_ref()
                .and_then(|m| m.parts.as_ref())
                .map(|parts| parts.iter().filter_map(|p| p.part_number).collect())
                .unwrap_or_default();
            // Checked before anything is touched: a refused completion leaves the upload as it was.
            let whole = checks::object_checksum(&root, input)?;
            let journal = journal::Journal::begin(
                &root,
                &input.bucket,
                &input.key,
                &input.upload_id,
                &parts,
            )
                    .map_err(|e| {
                        S3Error::with_message(
                            S3ErrorCode::InternalError,
                            format!("journaling the completion: {e}"),
                        )
                    })?;
            let (bucket, key) = (input.bucket.clone(), input.key.clone());
            let id = uuid::Uuid::parse_str(&input.upload_id).ok();
            let result = match whole {
                Some(whole) if complete::handles(input) => {
                    let (root, input) = (root.clone(), input.clone());
                    let access_key = req.credentials.as_ref().map(|c| c.access_key.clone());
                    tokio::task::spawn_blocking(move || {
                        complete::complete(&root, &input, access_key.as_deref(), whole)
                    })
                    .await
                    .map_err(internal)?
                    .map(S3Response::new)
                }
                _ => {
                    let mut result = fs.complete_multipart_upload(req).await;
                    if result.is_ok()
                        && let Some(whole) = whole
                        && let Err(err) =
                            checksums::set_object_checksum(&root, &bucket, &key, whole)
                    {
                        result = Err(internal(err));
                    }
                    result
                }
            };
            let ended = match (journal, &result) {
                (None, _) => Ok(()),
                (Some(journal), Ok(_)) => journal.finish(),
                (Some(journal), Err(_)) => journal.roll_back(),
            };
            if result.is_ok()
                && let Some(id) = id
            {
                // Left behind by a crash here, they are strays at the next start.
                let _ = checksums::forget(&root, &id);
            }
            if let Err(e) = ended {
                return Err(S3Error::with_message(
                    S3ErrorCode::InternalError,
                    format!("ending the completion's journal: {e}"),
                ));
            }
            result
        })
        .await
        .map_err(|e| S3Error::with_message(S3ErrorCode::InternalError, e.to_string()))?
    }

    /// s3s-fs lists whatever part files it finds, even for a completed or aborted upload; S3
    /// answers NoSuchUpload, and resuming relies on that to spot an upload that was completed.
    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        // A completion in progress has already forgotten the upload but not yet written the
        // object: wait for it, so the answer is either the parts or a finished object.
        let _quiet = self.completions.write().await;
        let open = uuid::Uuid::parse_str(&req.input.upload_id)
            .map(|id| self.root.join(format!(".upload-{id}.json")).exists())
            .unwrap_or(false);
        if !open {
            return Err(S3Error::new(S3ErrorCode::NoSuchUpload));
        }
        let id = uuid::Uuid::parse_str(&req.input.upload_id).map_err(internal)?;
        let mut resp = self.fs.list_parts(req).await?;
        for part in resp.output.parts.iter_mut().flatten() {
            let Some(n) = part.part_number else { continue };
            let record = checksums::part(&self.root, &id, n).map_err(internal)?;
            part.e_tag = Some(ETag::Strong(record.etag()));
            part.checksum_crc64nvme = Some(record.crc64nvme.to_base64());
        }
        resp.output.checksum_algorithm =
            Some(ChecksumAlgorithm::from_static(ChecksumAlgorithm::CRC64NVME));
        resp.output.checksum_type = Some(ChecksumType::from_static(ChecksumType::FULL_OBJECT));
        Ok(resp)
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        self.remove_strays().await?;
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let uploads = pending_uploads(&self.root, &input.bucket)
            .map_err(|e| S3Error::with_message(S3ErrorCode::InternalError, e.to_string()))?
            .into_iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(key, upload_id)| MultipartUpload {
                key: Some(key),
                upload_id: Some(upload_id),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            uploads: Some(uploads),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }
}

pub(crate) fn internal(err: impl std::fmt::Display) -> S3Error {
    S3Error::with_message(S3ErrorCode::InternalError, err.to_string())
}

/// The one running completion of an upload, released on drop.
struct OnlyCompletion {
    set: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    upload_id: String,
}

impl OnlyCompletion {
    fn claim(
        set: &Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
        upload_id: &str,
    ) -> Option<Self> {
        let fresh = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upload_id.to_owned());
        fresh.then(|| Self {
            set: set.clone(),
            upload_id: upload_id.to_owned(),
        })
    }
}

impl Drop for OnlyCompletion {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.upload_id);
    }
}

/// `(key, upload id)` of every unfinished multipart upload in `bucket`. s3s-fs keeps, per
/// upload, `.upload-<id>.json` (removed by complete and abort) and the object attributes in
/// `.bucket-<b64 bucket>.object-<b64 key>.upload-<id>.metadata.json`.
fn pending_uploads(root: &Path, bucket: &str) -> std::io::Result<Vec<(String, String)>> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(".bucket-")
            .and_then(|r| r.strip_suffix(".metadata.json"))
        else {
            continue;
        };
        let Some((enc_bucket, rest)) = rest.split_once(".object-") else {
            continue;
        };
        let Some((enc_key, upload_id)) = rest.rsplit_once(".upload-") else {
            continue;
        };
        let decode = |s: &str| {
            b64.decode(s)
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
        };
        if decode(enc_bucket).as_deref() != Some(bucket) {
            continue;
        }
        let Some(key) = decode(enc_key) else { continue };
        if root.join(format!(".upload-{upload_id}.json")).exists() {
            found.push((key, upload_id.to_owned()));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_completion_per_upload_at_a_time() {
        let set = Arc::default();
        let first = OnlyCompletion::claim(&set, "u").unwrap();
        assert!(OnlyCompletion::claim(&set, "u").is_none());
        assert!(OnlyCompletion::claim(&set, "v").is_some());
        drop(first);
        assert!(OnlyCompletion::claim(&set, "u").is_some());
    }
}
