//! The WebSocket protocol between the server and an agent: JSON text frames, one message each.
//!
//! Each direction has one enum, internally tagged by `type`. `docs/PROTOCOL.md` describes the
//! sequence and the versions; this file is the authority on field names.
//!
//! Unknown fields are ignored in both directions, so a field can be added without locking out
//! the peers that do not know it yet. An unknown message type is still an error. Fields that
//! only one protocol version carries are optional here; the server turns what arrived into
//! typed values at its boundary (`uploads::dispatch`), and refuses a mixture.

use serde::{Deserialize, Serialize};

use crate::encoding::{Compression, EncodedPart, Encoding};
use crate::error::ErrorCode;
use crate::ids::{ClientId, FileName, PartNumber, UploadId};
use crate::labels::Labels;

/// The protocol this release speaks, bumped on any incompatible change. The agent sends it in
/// [`AgentMessage::Hello`].
///
/// - 5: compression. `describe_file` carries the compression asked for, and an agent that
///   compresses answers with the encoded layout (`encoding`, `encoded_parts`) and the SHA-256 of
///   the file; the plan carries the encoding it is for. Protocol 4 agents are asked for no
///   compression and served exactly as before.
/// - 4: the server may send `token_renewed`, a fresh token for the agent to keep; nothing else
///   changed, so protocol 3 agents are served exactly as before and are never sent one.
/// - 3: parts carry CRC64NVME checksums, the object a full-object CRC64NVME, and the SHA-256
///   of the file comes with `upload_completed`.
/// - 2: parts carry `Content-MD5`, and the SHA-256 comes with `file_info`.
pub const PROTOCOL_VERSION: u32 = 5;

/// The oldest protocol the server still serves: agents in the field cannot all be upgraded at
/// once. Older ones are refused with [`ErrorCode::ProtocolVersionMismatch`].
pub const OLDEST_PROTOCOL_VERSION: u32 = 2;

/// The share an operator gets when they name none.
pub const DEFAULT_SHARE: &str = "default";

/// Largest WebSocket message either side accepts. A `StartUpload` for a 10,000-part upload is the
/// biggest legitimate message (one presigned URL per part, around 600 bytes each).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Messages the agent sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message of every connection.
    Hello {
        protocol_version: u32,
        agent_version: String,
        /// The agent's labels (`region=north`), for targeting. Optional in every version: a
        /// server that does not know them ignores them. Invalid labels are `MALFORMED_MESSAGE`.
        #[serde(default, skip_serializing_if = "Labels::is_empty")]
        labels: Labels,
    },
    /// Answer to [`ServerMessage::DescribeFile`]: what the agent would upload, hashed. The part
    /// layout is [`plan_parts`] of `size` and the server's minimum part size, unless the file is
    /// encoded (protocol 5), when `encoded_parts` gives it. A protocol 3 agent sends
    /// `part_crc64nvme`; a protocol 2 agent sends `sha256` and `part_md5`.
    FileInfo {
        upload_id: UploadId,
        file_name: FileName,
        size: u64,
        /// Modification time in milliseconds since the Unix epoch, when the file was hashed.
        modified_ms: u64,
        /// The part size the agent hashed with; must equal the server's own [`plan_parts`].
        part_size: u64,
        /// Protocol 3: base64 CRC64NVME of each part, in part order, signed into its URL.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        part_crc64nvme: Vec<String>,
        /// Lowercase hex SHA-256 of the whole file. Protocol 2: always. Protocol 3: only when
        /// the agent already computed it for this very file (an upload whose end the server may
        /// not have heard).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Protocol 2: base64 MD5 of each part, in part order, signed into its URL as
        /// `Content-MD5`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        part_md5: Vec<String>,
        /// Protocol 5: how the parts are stored. Absent means [`Encoding::None`]. With any
        /// other encoding, `encoded_parts` gives the layout, `part_crc64nvme` is over the
        /// stored (compressed, sealed) bytes, and `sha256` is required: of the file itself, or
        /// for [`Encoding::Sealed`] and [`Encoding::ZstdSealed`] its keyed digest
        /// ([`crate::sealed`]), as are `part_digests`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
        /// Protocol 5, encoded files: each part's plaintext and stored lengths, in part order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        encoded_parts: Vec<EncodedPart>,
        /// Protocol 5, added later (optional both ways): the part manifest, one lowercase hex
        /// digest of each part's plaintext, in part order. A part's digest is the SHA-256 of
        /// the BLAKE3s of its 1 MiB blocks (SHA-256s before 2026-12-04; docs/PROTOCOL.md).
        /// The server keeps the manifest of a share's latest object and, on the next fetch,
        /// copies the parts whose digest and stored bytes are the same inside storage instead
        /// of having them sent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        part_digests: Vec<String>,
    },
    /// Sent as parts finish, so the server can report progress.
    Progress {
        upload_id: UploadId,
        parts_done: u32,
        /// Stored bytes sent: for an encoded file, the bytes on the wire.
        bytes_done: u64,
        /// Part attempts that failed and were retried since the current plan arrived.
        #[serde(default)]
        part_retries: u32,
        /// Protocol 3 and later: the file's SHA-256, sent once it is known and before the
        /// completion request, so that an agent killed while storage completes the object does
        /// not take it along. Servers that do not know the field ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// Every part is uploaded and the multipart upload was completed with these ETags.
    UploadCompleted {
        upload_id: UploadId,
        parts: Vec<CompletedPart>,
        /// Milliseconds the completion request took, for the server's phase times.
        #[serde(default)]
        complete_ms: u64,
        /// Protocol 3: lowercase hex SHA-256 of the whole file, computed while the parts
        /// uploaded, over the bytes whose part checksums storage accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// The presigned URLs expired before every part was sent. Parts already stored stay; the
    /// server answers with a new [`ServerMessage::StartUpload`] for the missing ones.
    NeedUrls { upload_id: UploadId },
    /// The agent could not do what was asked; the upload ends `failed` with this code. With
    /// `COMPLETE_FAILED` the server first looks for the object, which the completion may have
    /// built with only its answer lost.
    UploadFailed {
        upload_id: UploadId,
        code: ErrorCode,
        message: String,
        /// Protocol 3, with `COMPLETE_FAILED`: the file's SHA-256, as in `upload_completed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
}

/// Messages the server sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Accepts a [`AgentMessage::Hello`], with the protocol version the agent said it speaks.
    Welcome {
        client_id: ClientId,
        protocol_version: u32,
    },
    /// Asks the agent to describe and hash one of its shared files, by share name (never by
    /// path). Sent before the multipart upload starts, and again when an agent reconnects with
    /// an upload unfinished, so the server can tell whether the file is still the same.
    DescribeFile {
        upload_id: UploadId,
        share: FileName,
        /// The server's minimum part size; the agent hashes parts laid out by [`plan_parts`].
        min_part_size: u64,
        /// Protocol 5: what the operator asked for (`auto` leaves it to the share's own
        /// setting). Never sent to older agents, which do not compress.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compression: Option<Compression>,
        /// Protocol 5, added later (optional both ways): the plaintext length of each part of
        /// the share's previous object, when that object is compressed. An agent that
        /// compresses closes its parts on the same plaintext boundaries where S3's part sizes
        /// allow, so that the unchanged ones are stored byte for byte as before and can be
        /// copied. Agents that do not know it lay out as usual.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        layout_hint: Vec<u64>,
    },
    /// Everything the agent needs to upload straight to storage.
    StartUpload(UploadPlan),
    /// The server gave up on an upload (timeout, shutdown): the agent stops working on it.
    CancelUpload {
        upload_id: UploadId,
        code: ErrorCode,
    },
    /// A fatal problem with the connection itself; the server closes it after sending this.
    Error { code: ErrorCode, message: String },
    /// Protocol 4: a fresh token for this agent, sent when its token is past half the server's
    /// agent token lifetime (at connect, and again while it stays connected). The agent keeps
    /// it (in `AGENT_TOKEN_FILE`) and uses it from its next connection on.
    TokenRenewed {
        token: String,
        /// Unix seconds when the new token expires.
        expires_at: u64,
    },
}

/// The first protocol whose agents accept [`ServerMessage::TokenRenewed`].
pub const TOKEN_RENEWAL_SINCE: u32 = 4;

/// The first protocol whose agents compress.
pub const COMPRESSION_SINCE: u32 = 5;

/// The presigned plan for one multipart upload. Agents of protocol 2 refuse unknown fields, so
/// what only protocol 3 carries is left out when empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadPlan {
    pub upload_id: UploadId,
    /// The size the agent reported; the agent refuses to go on if its file no longer has it.
    pub size: u64,
    /// Every part is this long except the last, which holds the remainder. For an encoded file
    /// the layout is the one the agent described, and this is the part size it aimed at.
    pub part_size: u64,
    /// Protocol 5: the encoding the plan is for, which the agent checks against what it
    /// described. Absent means [`Encoding::None`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// The parts still to send. On a resumed upload, parts already in storage are not here.
    pub parts: Vec<PresignedPart>,
    /// Parts already in storage, with their ETags, for the completion request.
    #[serde(default)]
    pub done: Vec<CompletedPart>,
    /// Presigned `POST ...?uploadId=` that completes the multipart upload.
    pub complete_url: String,
    /// Protocol 3: base64 CRC64NVME of the whole file, signed into `complete_url`. The agent
    /// sends it as `x-amz-checksum-crc64nvme`, with `x-amz-checksum-type: FULL_OBJECT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_crc64nvme: Option<String>,
    /// Unix seconds (server clock) after which the URLs stop working. No agent reads it (they
    /// use `expires_in_secs`), but agents of this protocol version released before 2026-12
    /// require the field, so the server still sends it. It may be absent on the wire, so that a
    /// later protocol version can drop it.
    #[serde(default)]
    pub expires_at: u64,
    /// The same, as seconds from when the plan was sent, so a skewed agent clock does not
    /// matter. Before the URLs run out the agent stops starting parts and sends `need_urls`.
    pub expires_in_secs: u64,
}

/// One part's URL and the checksum signed into it: the agent must send the checksum as its
/// header, and storage refuses a body that does not match it. One of the two is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresignedPart {
    pub part_number: PartNumber,
    pub url: String,
    /// Protocol 3: base64 CRC64NVME of the part, sent as `x-amz-checksum-crc64nvme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_crc64nvme: Option<String>,
    /// Protocol 2: base64 MD5 of the part, sent as `Content-MD5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_md5: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedPart {
    pub part_number: PartNumber,
    /// The ETag S3 returned for the part, quotes included.
    pub etag: String,
}

impl UploadPlan {
    /// Byte range `(offset, len)` of a part within the file.
    pub fn part_range(&self, part_number: PartNumber) -> (u64, u64) {
        part_range(self.size, self.part_size, part_number)
    }
}

/// S3's smallest part (except the last one).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's largest object: 5 TiB.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// Picks a part size: at least `min_part_size`, grown in whole MiB so that `size` fits in
/// 10,000 parts, and returns it with the part count. `None` if the file is too large for one S3
/// object. Server and agent both call it, so they agree on the layout without sending it.
pub fn plan_parts(size: u64, min_part_size: u64) -> Option<(u64, u32)> {
    const MIB: u64 = 1024 * 1024;
    if size > MAX_OBJECT_SIZE {
        return None;
    }
    let max_parts = u64::from(crate::ids::MAX_PARTS);
    let needed = size.div_ceil(max_parts).div_ceil(MIB) * MIB;
    let part_size = min_part_size.max(needed).max(MIN_PART_SIZE);
    if part_size > MAX_PART_SIZE {
        return None;
    }
    let parts = size.div_ceil(part_size).max(1);
    Some((part_size, u32::try_from(parts).ok()?))
}

/// Byte range `(offset, len)` of `part_number` in a file of `size` bytes split into `part_size`
/// parts. A zero-byte file is one empty part.
pub fn part_range(size: u64, part_size: u64, part_number: PartNumber) -> (u64, u64) {
    let offset = u64::from(part_number.get() - 1) * part_size;
    let len = size.saturating_sub(offset).min(part_size);
    (offset, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> UploadId {
        UploadId::parse("7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d").unwrap()
    }

    #[test]
    fn agent_messages_use_a_type_tag() {
        let msg = AgentMessage::NeedUrls { upload_id: id() };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            json,
            r#"{"type":"need_urls","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d"}"#
        );
        assert_eq!(serde_json::from_str::<AgentMessage>(&json).unwrap(), msg);
    }

    #[test]
    fn unknown_and_malformed_messages_are_rejected() {
        for bad in [
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"hello","protocol_version":1}"#,
            r#"{"type":"file_info","upload_id":"x","file_name":"a","size":1}"#,
            r#"{"type":"file_info","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d","file_name":"../a","size":1}"#,
            r#"{"type":"file_info","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d","file_name":"a","size":-1}"#,
            r#"not json"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<AgentMessage>(bad).is_err(), "{bad}");
        }
    }

    /// A field a later release adds must not lock out this one, in either direction.
    #[test]
    fn unknown_fields_are_ignored_both_ways() {
        let hello: AgentMessage = serde_json::from_str(
            r#"{"type":"hello","protocol_version":3,"agent_version":"x","extra":{"a":1}}"#,
        )
        .unwrap();
        assert!(matches!(
            hello,
            AgentMessage::Hello {
                protocol_version: 3,
                ..
            }
        ));
        let plan = r#"{"type":"start_upload","upload_id":"7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d",
            "size":1,"part_size":5242880,"parts":[{"part_number":1,"url":"u","checksum_crc64nvme":"AAAAAAAAAAA=","future":true}],
            "complete_url":"c","expires_in_secs":60,"compression":"zstd"}"#;
        let ServerMessage::StartUpload(plan) = serde_json::from_str(plan).unwrap() else {
            panic!("not a plan");
        };
        assert_eq!(plan.parts.len(), 1);
    }

    #[test]
    fn start_upload_round_trips() {
        let msg = ServerMessage::StartUpload(UploadPlan {
            upload_id: id(),
            size: 10,
            part_size: 5,
            parts: vec![PresignedPart {
                part_number: PartNumber::new(1).unwrap(),
                url: "http://s3/x".into(),
                checksum_crc64nvme: Some("AAAAAAAAAAA=".into()),
                content_md5: None,
            }],
            done: vec![CompletedPart {
                part_number: PartNumber::new(2).unwrap(),
                etag: "\"d41d8cd98f00b204e9800998ecf8427e\"".into(),
            }],
            complete_url: "http://s3/c".into(),
            checksum_crc64nvme: Some("AAAAAAAAAAA=".into()),
            encoding: Some(Encoding::Zstd),
            expires_at: 1,
            expires_in_secs: 900,
        });
        let json = serde_json::to_string(&msg).unwrap();
        assert!(
            json.starts_with(r#"{"type":"start_upload","upload_id""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), msg);
    }

    /// The plan as protocol 2 agents released before 2026-12 parse it: every field required,
    /// none unknown.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ReleasedPlan {
        upload_id: UploadId,
        size: u64,
        part_size: u64,
        parts: Vec<ReleasedPart>,
        #[serde(default)]
        done: Vec<CompletedPart>,
        complete_url: String,
        expires_at: u64,
        expires_in_secs: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ReleasedPart {
        part_number: PartNumber,
        url: String,
        content_md5: String,
    }

    #[test]
    fn plans_stay_readable_by_released_agents() {
        // A protocol 2 plan: MD5s, no whole-object checksum.
        let plan = UploadPlan {
            upload_id: id(),
            size: 10,
            part_size: 5,
            parts: vec![PresignedPart {
                part_number: PartNumber::new(1).unwrap(),
                url: "http://s3/x".into(),
                checksum_crc64nvme: None,
                content_md5: Some("1B2M2Y8AsgTpgAmY7PhCfg==".into()),
            }],
            done: Vec::new(),
            complete_url: "http://s3/c".into(),
            checksum_crc64nvme: None,
            encoding: None,
            expires_at: 1,
            expires_in_secs: 900,
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert!(
            serde_json::from_str::<ReleasedPlan>(&json).is_ok(),
            "{json}"
        );
        // And a plan without `expires_at` is read by this release.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value.as_object_mut().unwrap().remove("expires_at");
        let read: UploadPlan = serde_json::from_value(value).unwrap();
        assert_eq!(read.expires_in_secs, 900);
    }

    #[test]
    fn part_ranges_cover_the_file() {
        let p = |n| PartNumber::new(n).unwrap();
        assert_eq!(part_range(12, 5, p(1)), (0, 5));
        assert_eq!(part_range(12, 5, p(3)), (10, 2));
        assert_eq!(part_range(10, 5, p(2)), (5, 5));
        assert_eq!(part_range(0, 5, p(1)), (0, 0));
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn small_and_empty_files_are_one_part() {
        assert_eq!(plan_parts(0, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(1, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(8 * MIB, 8 * MIB), Some((8 * MIB, 1)));
        assert_eq!(plan_parts(8 * MIB + 1, 8 * MIB), Some((8 * MIB, 2)));
        assert_eq!(
            plan_parts(1, 1),
            Some((MIN_PART_SIZE, 1)),
            "never below 5 MiB"
        );
    }

    #[test]
    fn part_size_grows_to_stay_within_ten_thousand_parts() {
        let size = 100 * 1024 * MIB; // 100 GiB
        let (part_size, parts) = plan_parts(size, 5 * MIB).unwrap();
        assert!(parts <= 10_000);
        assert!(part_size >= 5 * MIB);
        assert_eq!(part_size % MIB, 0);
        assert!(part_size * u64::from(parts) >= size);
        assert_eq!(
            plan_parts(MAX_OBJECT_SIZE, 5 * MIB).map(|p| p.1 <= 10_000),
            Some(true)
        );
        assert_eq!(plan_parts(MAX_OBJECT_SIZE + 1, 5 * MIB), None);
    }
}

#[cfg(test)]
mod decoder_properties {
    //! The decoder faces whatever a hostile peer sends. It must never panic, and anything it
    //! accepts must carry only validated ids.

    use proptest::prelude::*;

    use super::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            prop_oneof![
                Just("hello"),
                Just("file_info"),
                Just("progress"),
                Just("upload_completed"),
                Just("upload_failed"),
                Just("need_urls"),
                Just("7b0c5e4e-3c1a-4a53-9d43-0b5f0e1b2c3d"),
                Just("../x"),
                Just("FILE_NOT_FOUND"),
            ]
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("upload_id".to_owned()),
                        Just("file_name".to_owned()),
                        Just("size".to_owned()),
                        Just("parts".to_owned()),
                        Just("part_number".to_owned()),
                        Just("etag".to_owned()),
                        Just("code".to_owned()),
                        "[a-z_]{1,12}",
                    ],
                    inner,
                    0..6,
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<AgentMessage>(&bytes);
            let _ = serde_json::from_slice::<ServerMessage>(&bytes);
        }

        #[test]
        fn structured_garbage_is_rejected_or_valid(value in json_value()) {
            let text = value.to_string();
            if let Ok(msg) = serde_json::from_str::<AgentMessage>(&text) {
                // Whatever got through re-validates and round-trips.
                let again = serde_json::to_string(&msg).unwrap();
                prop_assert_eq!(serde_json::from_str::<AgentMessage>(&again).unwrap(), msg.clone());
                if let AgentMessage::FileInfo { file_name, .. } = &msg {
                    prop_assert!(crate::FileName::parse(file_name.as_str()).is_ok());
                }
            }
        }

        #[test]
        fn valid_messages_round_trip(parts in 0u32..50, size in any::<u64>(), name in "[A-Za-z0-9._-]{1,40}") {
            prop_assume!(name != "." && name != "..");
            let upload_id = UploadId::new_random();
            let msgs = [
                AgentMessage::FileInfo {
                    upload_id,
                    file_name: FileName::parse(&name).unwrap(),
                    size,
                    modified_ms: size / 2,
                    part_size: MIN_PART_SIZE,
                    part_crc64nvme: (0..parts).map(|n| format!("{n:011}=")).collect(),
                    sha256: None,
                    part_md5: Vec::new(),
                    encoding: None,
                    encoded_parts: Vec::new(),
                    part_digests: Vec::new(),
                },
                AgentMessage::FileInfo {
                    upload_id,
                    file_name: FileName::parse(&name).unwrap(),
                    size,
                    modified_ms: size / 2,
                    part_size: MIN_PART_SIZE,
                    part_crc64nvme: (0..parts).map(|n| format!("{n:011}=")).collect(),
                    sha256: Some(format!("{size:064x}")),
                    part_md5: Vec::new(),
                    encoding: Some(Encoding::Zstd),
                    encoded_parts: (0..parts).map(|n| EncodedPart { plain_len: u64::from(n) * 3, stored_len: u64::from(n) }).collect(),
                    part_digests: (0..parts).map(|n| format!("{n:064x}")).collect(),
                },
                AgentMessage::FileInfo {
                    upload_id,
                    file_name: FileName::parse(&name).unwrap(),
                    size,
                    modified_ms: size / 2,
                    part_size: MIN_PART_SIZE,
                    part_crc64nvme: Vec::new(),
                    sha256: Some(format!("{size:064x}")),
                    part_md5: (0..parts).map(|n| format!("{n:022}==")).collect(),
                    encoding: None,
                    encoded_parts: Vec::new(),
                    part_digests: Vec::new(),
                },
                AgentMessage::NeedUrls { upload_id },
                AgentMessage::Progress { upload_id, parts_done: parts, bytes_done: size, part_retries: parts, sha256: None },
                AgentMessage::UploadCompleted {
                    upload_id,
                    parts: (1..=parts).map(|n| CompletedPart {
                        part_number: PartNumber::new(n).unwrap(),
                        etag: format!("\"{n:032x}\""),
                    }).collect(),
                    complete_ms: size % 1000,
                    sha256: Some(format!("{size:064x}")),
                },
            ];
            for msg in msgs {
                let json = serde_json::to_string(&msg).unwrap();
                prop_assert_eq!(serde_json::from_str::<AgentMessage>(&json).unwrap(), msg);
            }
        }
    }
}
