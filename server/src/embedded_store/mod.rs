//! The embedded store: s3s-fs, with the S3 behaviours Backhaul depends on that s3s-fs 0.14
//! lacks.
//!
//! - UploadPart checks `Content-MD5` against the body, as S3 does, and answers `BadDigest`.
//!   s3s-fs checks it only on PutObject. The check compares the MD5 that s3s-fs computes for
//!   the part's ETag anyway, so the store hashes each byte once rather than twice. A part that
//!   fails the check is removed before the answer goes out. For that short moment a ListParts could
//!   see it, and if a resume then trusted it, verification would still refuse the object,
//!   because the store's multipart ETag is computed from the bytes it holds.
//! - ListMultipartUploads lists the unfinished uploads, so the orphan sweep works here too.
//! - ListParts answers `NoSuchUpload` for an upload that was completed or aborted.
//! - CompleteMultipartUpload runs to its end even if the client goes away, and ListParts waits
//!   for running completions. s3s-fs forgets the upload first and then copies the parts into the
//!   object, so a completion cut off by a dropped connection, or observed halfway, looked like a
//!   finished upload whose object was missing. S3 completes atomically.
//! - A completion is journaled ([`journal`]): a crash, or an error, halfway leaves the upload as
//!   it was (resumable), never neither the upload nor the object. Part files of uploads that no
//!   longer exist are removed at start-up.
//!
//! Every other operation Backhaul, its tests and its users need goes straight to s3s-fs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
        abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        get_object(GetObjectInput) -> GetObjectOutput;
        put_object(PutObjectInput) -> PutObjectOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
    }

    async fn upload_part(
        &self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let Some(content_md5) = req.input.content_md5.take() else {
            return self.fs.upload_part(req).await;
        };
        let expected: [u8; 16] = base64::engine::general_purpose::STANDARD
            .decode(content_md5.as_bytes())
            .ok()
            .and_then(|raw| raw.try_into().ok())
            .ok_or_else(|| S3Error::with_message(S3ErrorCode::InvalidDigest, "bad Content-MD5"))?;
        // Where s3s-fs puts the part. An id that is no UUID is refused by s3s-fs itself.
        let Ok(id) = uuid::Uuid::parse_str(&req.input.upload_id) else {
            return self.fs.upload_part(req).await;
        };
        let part_file = self
            .root
            .join(format!(".upload_id-{id}.part-{}", req.input.part_number));
        let resp = self.fs.upload_part(req).await?;
        match &resp.output.e_tag {
            Some(ETag::Strong(md5)) if *md5 == hex::encode(expected) => Ok(resp),
            _ => {
                if let Err(err) = tokio::fs::remove_file(&part_file).await
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InternalError,
                        format!("removing a part that failed Content-MD5: {err}"),
                    ));
                }
                Err(S3Error::with_message(
                    S3ErrorCode::BadDigest,
                    "The Content-MD5 you specified did not match what we received.",
                ))
            }
        }
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
            let result = fs.complete_multipart_upload(req).await;
            let ended = match (journal, &result) {
                (None, _) => Ok(()),
                (Some(journal), Ok(_)) => journal.finish(),
                (Some(journal), Err(_)) => journal.roll_back(),
            };
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
        self.fs.list_parts(req).await
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
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
