//! What an agent's description and its digests mean: the checks a `file_info` meets, how a resume
//! sorts stored parts by their checksums, and how a stored object is verified.

use super::*;

fn info() -> FileInfo {
    FileInfo {
        file_name: FileName::parse("f.csv").unwrap(),
        size: 6 * MIB,
        modified_ms: 1,
        part_size: 5 * MIB,
        part_crc64nvme: Vec::new(),
        sha256: Some("a".repeat(64)),
        part_md5: vec![EMPTY_MD5.into(); 2],
        encoding: Encoding::None,
        encoded_parts: Vec::new(),
        part_digests: Vec::new(),
    }
}

/// The same description from a protocol 3 agent.
fn crc_info() -> FileInfo {
    FileInfo {
        part_crc64nvme: part_crcs()[..2].iter().map(|c| c.to_base64()).collect(),
        sha256: None,
        part_md5: Vec::new(),
        ..info()
    }
}

/// A compressed file of 12 MiB in two stored parts of 6 MiB and 1 MiB (protocol 5).
fn zstd_info() -> FileInfo {
    let parts = [6 * MIB, MIB];
    FileInfo {
        size: 12 * MIB,
        part_size: 5 * MIB,
        part_crc64nvme: parts
            .iter()
            .map(|&n| Crc64Nvme::of(&vec![1u8; n as usize]).to_base64())
            .collect(),
        sha256: Some("b".repeat(64)),
        part_md5: Vec::new(),
        encoding: Encoding::Zstd,
        encoded_parts: vec![
            EncodedPart {
                plain_len: 10 * MIB,
                stored_len: 6 * MIB,
            },
            EncodedPart {
                plain_len: 2 * MIB,
                stored_len: MIB,
            },
        ],
        ..info()
    }
}

/// An encoded layout is the agent's, checked for S3's rules; sizes, part lengths and the
/// whole-object checksum are those of the stored bytes.
#[test]
fn encoded_descriptions_are_checked_and_stored_sizes_rule() {
    let facts = check_facts(5 * MIB, zstd_info()).unwrap();
    assert_eq!(facts.encoding(), Encoding::Zstd);
    assert_eq!(facts.size, 12 * MIB);
    assert_eq!(facts.stored_size(), 7 * MIB);
    assert_eq!(facts.parts_total(), 2);
    assert_eq!(facts.part_len(PartNumber::new(1).unwrap()), 6 * MIB);
    assert_eq!(facts.part_len(PartNumber::new(2).unwrap()), MIB);
    let stored: Vec<u8> = vec![1u8; (7 * MIB) as usize];
    assert_eq!(facts.whole_crc64nvme(), Some(Crc64Nvme::of(&stored)));

    let code = |f: FileInfo| check_facts(5 * MIB, f).map(|_| ()).map_err(|r| r.code);
    let malformed = Err(ErrorCode::MalformedMessage);
    let mut short_first = zstd_info();
    short_first.encoded_parts[0].stored_len = MIB;
    assert_eq!(code(short_first), malformed);
    let mut uncovered = zstd_info();
    uncovered.encoded_parts[1].plain_len += 1;
    assert_eq!(code(uncovered), malformed);
    let mut no_sha = zstd_info();
    no_sha.sha256 = None;
    assert_eq!(code(no_sha), malformed);
    let mut one_crc = zstd_info();
    one_crc.part_crc64nvme.pop();
    assert_eq!(code(one_crc), malformed);
    let mut plain_with_parts = info();
    plain_with_parts.encoded_parts = zstd_info().encoded_parts;
    assert_eq!(code(plain_with_parts), malformed);
    let mut too_many = zstd_info();
    too_many.encoded_parts = vec![
        EncodedPart {
            plain_len: 1,
            stored_len: 5 * MIB,
        };
        10_001
    ];
    assert_eq!(code(too_many), malformed);
}

#[test]
fn descriptions_must_match_the_servers_layout() {
    let min = 5 * MIB;
    assert!(check_facts(min, info()).is_ok());
    let code = |f: FileInfo| check_facts(min, f).map(|_| ()).map_err(|r| r.code);
    let mut f = info();
    f.part_md5.pop();
    assert_eq!(
        code(f),
        Err(ErrorCode::MalformedMessage),
        "too few part hashes"
    );
    let mut f = info();
    f.part_size = 6 * MIB;
    assert_eq!(
        code(f),
        Err(ErrorCode::MalformedMessage),
        "another part size"
    );
    let mut f = info();
    f.sha256 = Some("A".repeat(64));
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "uppercase hex");
    let mut f = info();
    f.part_md5[0] = "not base64".into();
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "bad md5");
    let mut f = info();
    f.size = shared::protocol::MAX_OBJECT_SIZE + 1;
    assert_eq!(code(f), Err(ErrorCode::FileTooLarge), "too large");
}

#[test]
fn protocol_3_descriptions_carry_part_checksums_and_nothing_else() {
    let min = 5 * MIB;
    let facts = check_facts(min, crc_info()).unwrap();
    assert_eq!(
        facts.digests,
        Digests::Crc64Nvme {
            parts: part_crcs()[..2].to_vec(),
            sha256: None
        }
    );
    let code = |f: FileInfo| check_facts(min, f).map(|_| ()).map_err(|r| r.code);
    // An agent that already hashed the whole file says so.
    let mut f = crc_info();
    f.sha256 = Some("a".repeat(64));
    assert_eq!(
        check_facts(min, f)
            .unwrap()
            .sha256()
            .map(|s| s.as_str().to_owned()),
        Some("a".repeat(64))
    );
    let mut f = crc_info();
    f.sha256 = Some("A".repeat(64));
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "uppercase hex");
    let mut f = crc_info();
    f.part_md5 = vec![EMPTY_MD5.into(); 2];
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "both kinds");
    let mut f = crc_info();
    f.part_crc64nvme[1] = EMPTY_MD5.into();
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "16 bytes, not 8");
    let mut f = crc_info();
    f.part_crc64nvme.pop();
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "too few");
    let mut f = crc_info();
    f.part_crc64nvme.clear();
    assert_eq!(code(f), Err(ErrorCode::MalformedMessage), "no checksums");
}

/// On an SSE-KMS bucket a part's ETag is no MD5: a protocol 3 resume trusts a stored part by
/// its size and CRC64NVME, and completes with the ETag storage gave it.
#[test]
fn a_resume_trusts_part_checksums_not_etags() {
    let mut u = uploading();
    if let Stage::Open(Open::Uploading(t)) = &mut u.stage {
        t.file = crc_facts();
    }
    let crcs = part_crcs();
    let mut stored = all_parts_stored();
    for (i, p) in stored.iter_mut().enumerate() {
        p.etag = Some(format!("\"kms-etag-{i}\""));
        p.checksum_crc64nvme = Some(crcs[i]);
    }
    stored[1].checksum_crc64nvme = Some(Crc64Nvme::of(b"other bytes")); // corrupt
    stored[2].checksum_crc64nvme = None; // storage said nothing
    let effects = u
        .on(
            Event::PartsListed {
                stored,
                why: Resume::Reconnect,
            },
            Now::read(),
        )
        .unwrap();
    let Some(Effect::Presign { missing, done, .. }) = effects.last() else {
        panic!("{effects:?}");
    };
    let n = |n| PartNumber::new(n).unwrap();
    assert_eq!(missing, &vec![n(2), n(3)]);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].etag, "\"kms-etag-0\"");
}

/// Verification of a protocol 3 upload reads the object's size and FULL_OBJECT CRC64NVME; its
/// ETag (an MD5 or not) and the agent's SHA-256 play no part.
#[test]
fn a_protocol_3_object_is_verified_by_its_checksum() {
    let mut file = crc_facts();
    if let Digests::Crc64Nvme { sha256, .. } = &mut file.digests {
        *sha256 = Some(Sha256Hex::parse(&"b".repeat(64)).unwrap());
    }
    let whole = file.whole_crc64nvme().unwrap();
    let obj = crate::storage::ObjectInfo {
        size: file.size,
        etag: "\"not-an-md5-3\"".into(),
        sha256: None,
        checksum_crc64nvme: Some(whole.to_base64()),
        checksum_type: Some("FULL_OBJECT".into()),
    };
    assert_eq!(object_matches(&file, &obj), Ok(()));
    let wrong_crc = crate::storage::ObjectInfo {
        checksum_crc64nvme: Some(Crc64Nvme::of(b"x").to_base64()),
        ..obj.clone()
    };
    assert!(object_matches(&file, &wrong_crc).is_err());
    let no_crc = crate::storage::ObjectInfo {
        checksum_crc64nvme: None,
        ..obj.clone()
    };
    assert!(object_matches(&file, &no_crc).is_err());
    let composite = crate::storage::ObjectInfo {
        checksum_type: Some("COMPOSITE".into()),
        ..obj.clone()
    };
    assert!(object_matches(&file, &composite).is_err());
    let short = crate::storage::ObjectInfo {
        size: file.size - 1,
        ..obj.clone()
    };
    assert!(object_matches(&file, &short).is_err());
    // The whole is the parts' CRCs combined with their lengths (5, 5 and 2 MiB).
    let crcs = part_crcs();
    assert_eq!(
        whole,
        Crc64Nvme::of_pieces([(crcs[0], 5 * MIB), (crcs[1], 5 * MIB), (crcs[2], 2 * MIB)])
    );
    // The agent's SHA-256 is reported, not proof: storage's checksum decides.
    assert_eq!(object_matches(&crc_facts(), &obj), Ok(()));
}

#[test]
fn completed_parts_carry_the_etags_of_their_md5s() {
    let parts: Vec<CompletedPart> = facts().md5_completed_parts().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[2].part_number.get(), 3);
    assert_eq!(parts[0].etag, "\"d41d8cd98f00b204e9800998ecf8427e\"");
}
