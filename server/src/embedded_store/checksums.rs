//! S3's additional checksums, for the embedded store: s3s-fs 0.14 computes MD5s only.
//!
//! The store computes a CRC64NVME for every part it receives, checks it against the one the
//! request signed, and keeps it with the part's ETag in `.backhaul-parts/<upload id>/<part>`,
//! so that ListParts and the completion need not read the part again. A part stored without
//! its record (a crash between the two writes) has it computed from its bytes when it is next
//! needed. A completion combines the parts' CRCs into the object's FULL_OBJECT checksum and
//! records it where s3s-fs keeps the object's ETag, whence HeadObject answers it.
//!
//! CRC64NVME is the object's algorithm, as it is S3's default. A part may also carry a CRC32,
//! CRC32C or SHA-256 (the AWS SDKs send a CRC32 by default), which is checked as it arrives;
//! SHA-1 is refused with `NotImplemented` rather than left unchecked.

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use shared::hash::{Crc64Nvme, Crc64NvmeHasher};

/// Where the part records live, under the store's root. A leading dot keeps it out of the
/// buckets.
const PARTS: &str = ".backhaul-parts";

/// What the store knows of one stored part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRecord {
    pub crc64nvme: Crc64Nvme,
    /// Hex MD5, the part's ETag without quotes.
    pub md5: [u8; 16],
    pub len: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredRecord {
    crc64nvme: String,
    md5: String,
    len: u64,
}

impl PartRecord {
    pub fn etag(&self) -> String {
        hex::encode(self.md5)
    }
}

fn upload_dir(root: &Path, upload_id: &uuid::Uuid) -> PathBuf {
    root.join(PARTS).join(upload_id.to_string())
}

/// The part file s3s-fs writes.
pub fn part_file(root: &Path, upload_id: &uuid::Uuid, part: i32) -> PathBuf {
    root.join(format!(".upload_id-{upload_id}.part-{part}"))
}

/// Records a part the store has just written and checked.
pub fn record(
    root: &Path,
    upload_id: &uuid::Uuid,
    part: i32,
    record: &PartRecord,
) -> io::Result<()> {
    let dir = upload_dir(root, upload_id);
    std::fs::create_dir_all(&dir)?;
    let stored = StoredRecord {
        crc64nvme: record.crc64nvme.to_base64(),
        md5: hex::encode(record.md5),
        len: record.len,
    };
    let tmp = dir.join(format!("{part}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&stored)?)?;
    std::fs::rename(&tmp, dir.join(part.to_string()))
}

/// The record of a stored part: the one written when it arrived if it still describes the
/// part file, or else one computed from the file's bytes (and written). `NotFound` if there is
/// no such part.
pub fn part(root: &Path, upload_id: &uuid::Uuid, part: i32) -> io::Result<PartRecord> {
    let file = part_file(root, upload_id, part);
    let len = std::fs::metadata(&file)?.len();
    let path = upload_dir(root, upload_id).join(part.to_string());
    if let Ok(raw) = std::fs::read(&path)
        && let Ok(stored) = serde_json::from_slice::<StoredRecord>(&raw)
        && stored.len == len
        && let Ok(crc64nvme) = Crc64Nvme::parse(&stored.crc64nvme)
        && let Some(md5) = hex::decode(&stored.md5)
            .ok()
            .and_then(|m| <[u8; 16]>::try_from(m).ok())
    {
        return Ok(PartRecord {
            crc64nvme,
            md5,
            len,
        });
    }
    let computed = of_file(&file)?;
    record(root, upload_id, part, &computed)?;
    Ok(computed)
}

/// Reads a part file once for both of its checksums.
fn of_file(path: &Path) -> io::Result<PartRecord> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut crc = Crc64NvmeHasher::default();
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        md5.update(&buf[..n]);
        len += n as u64;
    }
    Ok(PartRecord {
        crc64nvme: crc.finish(),
        md5: md5.finalize().into(),
        len,
    })
}

/// The checksums a part's body is run through on its way to disk: always CRC64NVME (the
/// store's own, for the object), and whichever other algorithm the request names, in a
/// `x-amz-checksum-*` header or as a trailer (the AWS SDKs send a CRC32 trailer by default).
pub struct BodyChecksums {
    pub crc64nvme: Crc64NvmeHasher,
    other: Option<(Other, OtherHasher)>,
}

/// The other algorithms S3 offers that the store can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Other {
    Crc32,
    Crc32c,
    Sha256,
}

enum OtherHasher {
    Crc(Box<crc_fast::Digest>),
    Sha256(Box<sha2::Sha256>),
}

impl Other {
    /// The algorithm a header name (`x-amz-checksum-crc32`) or an algorithm name (`CRC32`)
    /// stands for; `Err` for one the store cannot check (SHA-1).
    pub fn named(name: &str) -> Result<Option<Self>, ()> {
        let name = name.trim().to_ascii_lowercase();
        match name.strip_prefix("x-amz-checksum-").unwrap_or(&name) {
            "crc32" => Ok(Some(Other::Crc32)),
            "crc32c" => Ok(Some(Other::Crc32c)),
            "sha256" => Ok(Some(Other::Sha256)),
            "crc64nvme" => Ok(None),
            _ => Err(()),
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Other::Crc32 => "x-amz-checksum-crc32",
            Other::Crc32c => "x-amz-checksum-crc32c",
            Other::Sha256 => "x-amz-checksum-sha256",
        }
    }
}

impl BodyChecksums {
    pub fn new(other: Option<Other>) -> Self {
        let other = other.map(|o| {
            let hasher = match o {
                Other::Crc32 => OtherHasher::Crc(Box::new(crc_fast::Digest::new(
                    crc_fast::CrcAlgorithm::Crc32IsoHdlc,
                ))),
                Other::Crc32c => OtherHasher::Crc(Box::new(crc_fast::Digest::new(
                    crc_fast::CrcAlgorithm::Crc32Iscsi,
                ))),
                Other::Sha256 => OtherHasher::Sha256(Box::default()),
            };
            (o, hasher)
        });
        Self {
            crc64nvme: Crc64NvmeHasher::default(),
            other,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.crc64nvme.update(bytes);
        match &mut self.other {
            Some((_, OtherHasher::Crc(d))) => d.update(bytes),
            Some((_, OtherHasher::Sha256(h))) => h.update(bytes),
            None => {}
        }
    }

    /// The other algorithm and the base64 value the body gave, as S3 writes it.
    pub fn other(&self) -> Option<(Other, String)> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        self.other.as_ref().map(|(o, h)| {
            let value = match h {
                OtherHasher::Crc(d) => b64.encode((d.finalize() as u32).to_be_bytes()),
                OtherHasher::Sha256(h) => b64.encode(h.as_ref().clone().finalize()),
            };
            (*o, value)
        })
    }
}

/// Removes the record of one part, before the part is written again.
pub fn forget_part(root: &Path, upload_id: &uuid::Uuid, part: i32) -> io::Result<()> {
    match std::fs::remove_file(upload_dir(root, upload_id).join(part.to_string())) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Removes the records of an upload that was completed or aborted.
pub fn forget(root: &Path, upload_id: &uuid::Uuid) -> io::Result<()> {
    match std::fs::remove_dir_all(upload_dir(root, upload_id)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Removes the records of uploads that no longer exist; returns how many.
pub fn remove_stray(root: &Path) -> io::Result<usize> {
    let dir = root.join(PARTS);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let open = name
            .to_str()
            .is_some_and(|id| root.join(format!(".upload-{id}.json")).exists());
        if !open {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Records an object's full-object CRC64NVME in s3s-fs's own record of the object (its
/// "internal info", which holds the ETag), from which s3s-fs's HeadObject and GetObject answer
/// it. Written to a temporary file and renamed into place.
pub fn set_object_checksum(
    root: &Path,
    bucket: &str,
    key: &str,
    whole: Crc64Nvme,
) -> io::Result<()> {
    let mut info: serde_json::Map<String, serde_json::Value> =
        match std::fs::read(object_info_path(root, bucket, key)) {
            Ok(raw) => serde_json::from_slice(&raw)?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(err) => return Err(err),
        };
    info.insert(
        "checksum_crc64nvme".to_owned(),
        serde_json::Value::String(whole.to_base64()),
    );
    write_object_info(root, bucket, key, &info)
}

/// Where s3s-fs keeps what it knows of an object beyond its bytes: its ETag and checksums.
fn object_info_path(root: &Path, bucket: &str, key: &str) -> PathBuf {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    root.join(format!(
        ".bucket-{}.object-{}.internal.json",
        b64.encode(bucket),
        b64.encode(key)
    ))
}

/// Replaces an object's record of its ETag and checksums, atomically.
pub fn write_object_info(
    root: &Path,
    bucket: &str,
    key: &str,
    info: &serde_json::Map<String, serde_json::Value>,
) -> io::Result<()> {
    let path = object_info_path(root, bucket, key);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(info)?)?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_record_is_computed_again_from_the_part() {
        let root = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::new_v4();
        let bytes = b"some part bytes".repeat(1000);
        std::fs::write(part_file(root.path(), &id, 1), &bytes).unwrap();
        let expected = PartRecord {
            crc64nvme: Crc64Nvme::of(&bytes),
            md5: Md5::digest(&bytes).into(),
            len: bytes.len() as u64,
        };
        // No record: computed, and written.
        assert_eq!(part(root.path(), &id, 1).unwrap(), expected);
        assert!(upload_dir(root.path(), &id).join("1").exists());
        // A record that no longer fits the file (the part was written again): recomputed.
        let shorter = &bytes[..100];
        std::fs::write(part_file(root.path(), &id, 1), shorter).unwrap();
        assert_eq!(
            part(root.path(), &id, 1).unwrap().crc64nvme,
            Crc64Nvme::of(shorter)
        );
        assert_eq!(
            part(root.path(), &id, 2).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // The upload is gone (no `.upload-<id>.json`): its records are strays.
        assert_eq!(remove_stray(root.path()).unwrap(), 1);
        assert!(!upload_dir(root.path(), &id).exists());
    }
}
