//! Part manifests: what the latest verified object of a store's share holds, part by part, so
//! that the next fetch of that share copies the unchanged parts inside storage
//! (`UploadPartCopy`) instead of having the store send them again.
//!
//! A part is unchanged when the new file has a part over the same plaintext range whose digest
//! (over the plaintext, computed by the agent, opaque to the server) is the same, and whose
//! stored bytes have the same length and CRC64NVME: so a copied part is byte for byte the part
//! the agent would have sent, and the new object's checksum, verification and resume are exactly as if it had.
//! CRCs, sizes and modification times alone never decide it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use shared::encoding::Encoding;
use shared::hash::{Crc64Nvme, Sha256Hex};
use shared::protocol::MIN_PART_SIZE;
use shared::{ClientId, FileName, PartNumber, UploadId};

use super::record::{FileFacts, Transfer, UnixMs};
use crate::db::ManifestRow;

/// The current form of a stored manifest.
const FORMAT: u32 = 1;

/// The latest verified object of a share, part by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub upload_id: UploadId,
    pub key: String,
    pub encoding: Encoding,
    pub parts: Vec<ManifestPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestPart {
    pub plain_len: u64,
    pub stored_len: u64,
    pub crc64nvme: Crc64Nvme,
    pub digest: Sha256Hex,
}

/// A part of the new upload that storage copies from the previous object: the closed byte
/// range `first..=last` of the previous object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartCopy {
    pub part_number: PartNumber,
    pub first: u64,
    pub last: u64,
}

impl Manifest {
    /// The manifest of a verified upload, if its agent sent part digests.
    pub fn of(upload_id: UploadId, transfer: &Transfer) -> Option<Self> {
        let file = &transfer.file;
        let digests = file.part_digests.as_ref()?;
        let parts = file
            .parts()
            .zip(digests)
            .zip(file.plain_ranges())
            .map(|(((n, _), digest), (_, plain_len))| {
                Some(ManifestPart {
                    plain_len,
                    stored_len: file.part_len(n),
                    crc64nvme: file.part_crc64nvme(n)?,
                    digest: digest.clone(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            upload_id,
            key: transfer.multipart.key.clone(),
            encoding: file.encoding(),
            parts,
        })
    }

    pub fn stored_size(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_len).sum()
    }

    /// The object's full-object CRC64NVME, as HeadObject reports it.
    pub fn whole_crc64nvme(&self) -> Crc64Nvme {
        Crc64Nvme::of_pieces(self.parts.iter().map(|p| (p.crc64nvme, p.stored_len)))
    }

    /// The plaintext length of each part, for an agent that compresses to lay its parts out on
    /// the same boundaries. Empty for an object that is not compressed: plain parts follow the
    /// part size, which is the same for files of much the same size.
    pub fn layout_hint(&self) -> Vec<u64> {
        match self.encoding {
            Encoding::None => Vec::new(),
            _ => self.parts.iter().map(|p| p.plain_len).collect(),
        }
    }

    /// The parts of `file` this object holds unchanged, with where they are in it. None when
    /// the encodings differ, or the object is too small for S3 to copy a range of it (5 MiB).
    pub fn unchanged(&self, file: &FileFacts) -> Vec<PartCopy> {
        if self.encoding != file.encoding() || self.stored_size() <= MIN_PART_SIZE {
            return Vec::new();
        }
        let Some(digests) = &file.part_digests else {
            return Vec::new();
        };
        // Previous parts by plaintext range, with where their stored bytes start.
        let mut previous = HashMap::new();
        let (mut plain_at, mut stored_at) = (0u64, 0u64);
        for part in &self.parts {
            previous.insert((plain_at, part.plain_len), (part, stored_at));
            plain_at += part.plain_len;
            stored_at += part.stored_len;
        }
        file.parts()
            .zip(digests)
            .zip(file.plain_ranges())
            .filter_map(|(((n, _), digest), range)| {
                let (old, at) = previous.get(&range)?;
                let same = old.digest == *digest
                    && old.stored_len == file.part_len(n)
                    && Some(old.crc64nvme) == file.part_crc64nvme(n)
                    && old.stored_len > 0;
                same.then(|| PartCopy {
                    part_number: n,
                    first: *at,
                    last: at + old.stored_len - 1,
                })
            })
            .collect()
    }
}

/// The stored form, format 1.
#[derive(Debug, Serialize, Deserialize)]
struct ManifestV1 {
    upload_id: UploadId,
    key: String,
    #[serde(default)]
    encoding: Encoding,
    parts: Vec<PartV1>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartV1 {
    plain_len: u64,
    stored_len: u64,
    crc64nvme: String,
    digest: String,
}

/// The row that keeps `manifest` as the latest of `client_id`'s share `share`.
pub fn to_row(
    client_id: &ClientId,
    share: &FileName,
    finished: UnixMs,
    manifest: &Manifest,
) -> Result<ManifestRow, serde_json::Error> {
    let form = ManifestV1 {
        upload_id: manifest.upload_id,
        key: manifest.key.clone(),
        encoding: manifest.encoding,
        parts: manifest
            .parts
            .iter()
            .map(|p| PartV1 {
                plain_len: p.plain_len,
                stored_len: p.stored_len,
                crc64nvme: p.crc64nvme.to_base64(),
                digest: p.digest.as_str().to_owned(),
            })
            .collect(),
    };
    Ok(ManifestRow {
        client_id: client_id.clone(),
        share: share.clone(),
        finished_ms: finished.0,
        format: FORMAT,
        record: serde_json::to_string(&form)?,
    })
}

/// The manifest a row holds; `Err` says why it cannot be used (and nothing is then copied).
pub fn from_row(row: &ManifestRow) -> Result<Manifest, String> {
    if row.format != FORMAT {
        return Err(format!("unknown manifest format {}", row.format));
    }
    let form: ManifestV1 = serde_json::from_str(&row.record).map_err(|e| e.to_string())?;
    let parts = form
        .parts
        .into_iter()
        .map(|p| {
            Ok(ManifestPart {
                plain_len: p.plain_len,
                stored_len: p.stored_len,
                crc64nvme: Crc64Nvme::parse(&p.crc64nvme).map_err(|e| e.to_string())?,
                digest: Sha256Hex::parse(&p.digest).map_err(|e| e.to_string())?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Manifest {
        upload_id: form.upload_id,
        key: form.key,
        encoding: form.encoding,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use shared::encoding::EncodedPart;

    use super::super::record::{Digests, Multipart, Stored};
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn digest(n: u8) -> Sha256Hex {
        Sha256Hex::parse(&hex::encode([n; 32])).unwrap()
    }

    /// A plain file of `parts` 8 MiB parts (the last `tail` bytes), with the given digests and
    /// CRCs made from them.
    fn plain(size: u64, digests: &[u8]) -> FileFacts {
        FileFacts {
            file_name: FileName::parse("f.bin").unwrap(),
            size,
            modified_ms: 0,
            part_size: 8 * MIB,
            digests: Digests::Crc64Nvme {
                parts: digests.iter().map(|d| Crc64Nvme::of(&[*d])).collect(),
                sha256: None,
            },
            stored: Stored::Plain,
            part_digests: Some(digests.iter().map(|d| digest(*d)).collect()),
        }
    }

    fn manifest_of(file: FileFacts) -> Manifest {
        let transfer = Transfer {
            file,
            multipart: Multipart {
                key: "k".into(),
                upload_id: "u".into(),
            },
        };
        Manifest::of(UploadId::new_random(), &transfer).unwrap()
    }

    fn numbers(copies: &[PartCopy]) -> Vec<u32> {
        copies.iter().map(|c| c.part_number.get()).collect()
    }

    #[test]
    fn parts_changed_in_place_are_the_only_ones_not_copied() {
        let before = manifest_of(plain(32 * MIB, &[1, 2, 3, 4]));
        let copies = before.unchanged(&plain(32 * MIB, &[1, 9, 3, 8]));
        assert_eq!(numbers(&copies), vec![1, 3]);
        assert_eq!((copies[1].first, copies[1].last), (16 * MIB, 24 * MIB - 1));
    }

    #[test]
    fn an_appended_file_copies_all_but_its_tail() {
        // The old last part was short: with the file grown it is a full part, so it differs.
        let before = manifest_of(plain(20 * MIB, &[1, 2, 3]));
        let copies = before.unchanged(&plain(40 * MIB, &[1, 2, 7, 8, 9]));
        assert_eq!(numbers(&copies), vec![1, 2]);
    }

    #[test]
    fn an_equal_digest_is_not_enough_without_the_same_stored_bytes() {
        let before = manifest_of(plain(16 * MIB, &[1, 2]));
        let mut after = plain(16 * MIB, &[1, 2]);
        if let Digests::Crc64Nvme { parts, .. } = &mut after.digests {
            parts[1] = Crc64Nvme::of(b"other");
        }
        assert_eq!(numbers(&before.unchanged(&after)), vec![1]);
        // Nor is an equal CRC without the same digest.
        let mut after = plain(16 * MIB, &[1, 2]);
        after.part_digests.as_mut().unwrap()[0] = digest(5);
        assert_eq!(numbers(&before.unchanged(&after)), vec![2]);
    }

    #[test]
    fn nothing_is_copied_across_encodings_from_small_objects_or_without_a_manifest() {
        let before = manifest_of(plain(16 * MIB, &[1, 2]));
        let mut zstd = plain(16 * MIB, &[1, 2]);
        zstd.stored = Stored::Encoded(
            Encoding::Zstd,
            vec![
                EncodedPart {
                    plain_len: 8 * MIB,
                    stored_len: 8 * MIB,
                };
                2
            ],
        );
        assert!(before.unchanged(&zstd).is_empty());
        let mut none = plain(16 * MIB, &[1, 2]);
        none.part_digests = None;
        assert!(before.unchanged(&none).is_empty());
        let small = manifest_of(plain(5 * MIB, &[1]));
        assert!(small.unchanged(&plain(5 * MIB, &[1])).is_empty());
    }

    #[test]
    fn compressed_parts_match_by_plaintext_range_even_when_renumbered() {
        let part = |plain_len, stored_len| EncodedPart {
            plain_len,
            stored_len,
        };
        let mut before = plain(30 * MIB, &[1, 2, 3]);
        before.stored = Stored::Encoded(
            Encoding::Zstd,
            vec![
                part(10 * MIB, 6 * MIB),
                part(10 * MIB, 6 * MIB),
                part(10 * MIB, 2 * MIB),
            ],
        );
        let before = manifest_of(before);
        assert_eq!(before.layout_hint(), vec![10 * MIB; 3]);
        // The new file split the first range in two (it compressed worse), and kept the rest.
        let mut after = plain(30 * MIB, &[4, 5, 2, 3]);
        after.stored = Stored::Encoded(
            Encoding::Zstd,
            vec![
                part(5 * MIB, 5 * MIB),
                part(5 * MIB, 5 * MIB),
                part(10 * MIB, 6 * MIB),
                part(10 * MIB, 2 * MIB),
            ],
        );
        let copies = before.unchanged(&after);
        assert_eq!(numbers(&copies), vec![3, 4]);
        assert_eq!((copies[0].first, copies[0].last), (6 * MIB, 12 * MIB - 1));
    }

    #[test]
    fn rows_round_trip_and_bad_ones_are_refused() {
        let before = manifest_of(plain(20 * MIB, &[1, 2, 3]));
        let client = ClientId::parse("store-1").unwrap();
        let share = FileName::parse("default").unwrap();
        let row = to_row(&client, &share, UnixMs(5), &before).unwrap();
        assert_eq!(from_row(&row).unwrap(), before);
        let mut bad = row.clone();
        bad.record = bad.record.replace(before.parts[0].digest.as_str(), "zz");
        assert!(from_row(&bad).is_err());
        bad = row;
        bad.format = 9;
        assert!(from_row(&bad).unwrap_err().contains("format 9"));
    }
}
