//! Agent messages and connections, turned into events.
//!
//! This is where what an agent says enters the upload core: a `file_info` is checked against the
//! server's part layout and its hashes become typed values here, once. Each message is applied in
//! the order it arrived; only the S3 calls it leads to run in the background.

use shared::encoding::{EncodedPart, Encoding};
use shared::hash::{ContentMd5, Crc64Nvme, Sha256Hex};
use shared::ids::MAX_PARTS;
use shared::protocol::{AgentMessage, MAX_PART_SIZE, MIN_PART_SIZE, plan_parts};
use shared::{ClientId, ErrorCode, UploadId};

use super::Uploads;
use super::events::{AgentRef, Effect, Event, Rejection};
use super::record::{Digests, FileFacts, Stored};
use crate::registry::ConnId;

/// Longest agent-supplied failure message kept; it is shown to operators.
const MAX_AGENT_MESSAGE_CHARS: usize = 1024;

impl Uploads {
    /// An agent (re)connected: an upload it left unfinished picks up where it stopped, starting
    /// with a fresh description of the file.
    /// `epoch` is the claim under which this replica holds the store (0 for one server).
    pub fn on_agent_connected(&self, client_id: &ClientId, conn: ConnId, epoch: u64) {
        if self.agents().connection(client_id) != Some(conn) {
            return;
        }
        // A replica takes on what the store left unfinished, wherever it was driven before.
        for (id, effect) in self.adopt(client_id, epoch) {
            self.start(id, vec![effect]);
        }
        if let Some((id, Ok(effects))) = self
            .table()
            .apply_to_client(client_id, Event::AgentConnected { conn })
        {
            tracing::info!(%client_id, upload_id = %id, "agent is back; asking it to describe the file again");
            self.start(id, effects);
        }
    }

    /// Takes on the unfinished uploads of `client_id` from the database that this replica does
    /// not hold yet, under the claim `epoch`. Returns what their previous holder was doing on
    /// the server's side (a verification, an abort), for the caller to do again: that replica
    /// may be gone, and both are safe to repeat.
    pub(super) fn adopt(&self, client_id: &ClientId, epoch: u64) -> Vec<(UploadId, Effect)> {
        let adopted = self.table().adopt(client_id, epoch).unwrap_or_else(|err| {
            tracing::error!(%client_id, error = format!("{err:#}"), "the store's unfinished uploads could not be read; they wait for its next connection");
            Vec::new()
        });
        adopted
            .into_iter()
            .filter_map(|id| {
                let effect = self.table().read(id, |u| u.recovery()).flatten()?;
                tracing::info!(%client_id, upload_id = %id, "finishing what the store's previous replica left half-done");
                Some((id, effect))
            })
            .collect()
    }

    /// Whether the upload is unfinished and driven by this server.
    pub fn holds(&self, id: shared::UploadId) -> bool {
        self.table().holds(id)
    }

    /// Another replica claimed `client_id` under `epoch`: its unfinished uploads are let go,
    /// untouched, unless this replica's own claim is later.
    pub fn release(&self, client_id: &ClientId, epoch: u64) {
        for id in self.table().release(client_id, epoch) {
            tracing::info!(%client_id, upload_id = %id, "another replica holds the store now; letting its upload go");
        }
    }

    /// A connection ended. Its uploads wait for the agent to come back; the stall timeout
    /// bounds the wait.
    pub fn on_agent_disconnected(&self, conn: ConnId) {
        for id in self.table().held_by(conn) {
            if self.handle(id, Event::AgentDisconnected { conn }).is_ok() {
                tracing::info!(upload_id = %id, "agent disconnected; the upload waits for it");
            }
        }
    }

    /// One message from the agent `client_id` on connection `conn`.
    pub fn on_agent_message(&self, client_id: &ClientId, conn: ConnId, msg: AgentMessage) {
        let agent = AgentRef {
            client_id: client_id.clone(),
            conn,
        };
        let (upload_id, event) = match msg {
            AgentMessage::Hello { .. } => {
                tracing::warn!(%client_id, "ignoring a second hello");
                return;
            }
            AgentMessage::FileInfo {
                upload_id,
                file_name,
                size,
                modified_ms,
                part_size,
                part_crc64nvme,
                sha256,
                part_md5,
                encoding,
                encoded_parts,
                part_digests,
            } => {
                // A resumed upload keeps the layout it was planned with, whatever PART_SIZE
                // says now.
                let min_part_size = self
                    .table()
                    .read(upload_id, |u| u.stage.transfer().map(|t| t.file.part_size))
                    .flatten()
                    .unwrap_or(self.settings().part_size);
                let facts = check_facts(
                    min_part_size,
                    FileInfo {
                        file_name,
                        size,
                        modified_ms,
                        part_size,
                        part_crc64nvme,
                        sha256,
                        part_md5,
                        encoding: encoding.unwrap_or_default(),
                        encoded_parts,
                        part_digests,
                    },
                );
                (upload_id, Event::Described { agent, facts })
            }
            AgentMessage::Progress {
                upload_id,
                parts_done,
                bytes_done,
                part_retries,
                sha256,
            } => (
                upload_id,
                Event::Progress {
                    agent,
                    parts_done,
                    bytes_done,
                    part_retries,
                    sha256: reported_sha256(client_id, upload_id, sha256),
                },
            ),
            AgentMessage::NeedUrls { upload_id } => {
                tracing::info!(%client_id, %upload_id, "agent's URLs expired; presigning the missing parts again");
                (upload_id, Event::NeedUrls { agent })
            }
            AgentMessage::UploadCompleted {
                upload_id,
                parts,
                complete_ms,
                sha256,
            } => {
                let sha256 = reported_sha256(client_id, upload_id, sha256);
                (
                    upload_id,
                    Event::AgentCompleted {
                        agent,
                        parts,
                        complete_ms,
                        sha256,
                    },
                )
            }
            AgentMessage::UploadFailed {
                upload_id,
                code,
                message,
                sha256,
            } => (
                upload_id,
                Event::AgentFailed {
                    client_id: client_id.clone(),
                    code,
                    message: message.chars().take(MAX_AGENT_MESSAGE_CHARS).collect(),
                    sha256: reported_sha256(client_id, upload_id, sha256),
                },
            ),
        };
        if let Err(refused) = self.handle(upload_id, event) {
            tracing::warn!(%client_id, %upload_id, reason = refused.0, "ignoring an agent message");
        }
    }
}

/// The SHA-256 a protocol 3 agent reports at the end. A malformed one counts as none (the
/// status then shows none); the object's checksum, not this, is what verification reads.
fn reported_sha256(
    client_id: &ClientId,
    upload_id: shared::UploadId,
    sha256: Option<String>,
) -> Option<Sha256Hex> {
    sha256.and_then(|s| {
        Sha256Hex::parse(&s)
            .inspect_err(|e| tracing::warn!(%client_id, %upload_id, error = %e, "ignoring the agent's SHA-256"))
            .ok()
    })
}

/// `file_info` as it arrived, its hashes still text.
pub(super) struct FileInfo {
    pub file_name: shared::FileName,
    pub size: u64,
    pub modified_ms: u64,
    pub part_size: u64,
    pub part_crc64nvme: Vec<String>,
    pub sha256: Option<String>,
    pub part_md5: Vec<String>,
    pub encoding: Encoding,
    pub encoded_parts: Vec<EncodedPart>,
    pub part_digests: Vec<String>,
}

/// Checks a description against the server's own part layout and parses its hashes. The
/// rejection names what is wrong, with the code the upload fails with.
pub(super) fn check_facts(min_part_size: u64, info: FileInfo) -> Result<FileFacts, Rejection> {
    let malformed = |message: String| Rejection {
        code: ErrorCode::MalformedMessage,
        message,
    };
    if info.encoding != Encoding::None {
        return check_encoded(info);
    }
    if !info.encoded_parts.is_empty() {
        return Err(malformed(
            "file_info carries encoded_parts for a file that is not encoded".to_owned(),
        ));
    }
    let Some((part_size, parts)) = plan_parts(info.size, min_part_size) else {
        return Err(Rejection {
            code: ErrorCode::FileTooLarge,
            message: format!(
                "file of {} bytes is larger than one S3 object may be",
                info.size
            ),
        });
    };
    let digests = match (info.part_crc64nvme.is_empty(), &info.sha256) {
        // Protocol 3, with the SHA-256 when the agent already knows it (a file described again
        // after its upload's end went unheard).
        (false, sha256) if info.part_md5.is_empty() => Digests::Crc64Nvme {
            parts: parse_crcs(&info.part_crc64nvme).map_err(malformed)?,
            sha256: sha256
                .as_deref()
                .map(Sha256Hex::parse)
                .transpose()
                .map_err(|e| malformed(e.to_string()))?,
        },
        // Protocol 2.
        (true, Some(sha256)) => Digests::Md5 {
            parts: info
                .part_md5
                .iter()
                .map(|m| ContentMd5::parse(m))
                .collect::<Result<_, _>>()
                .map_err(|e| malformed(e.to_string()))?,
            sha256: Sha256Hex::parse(sha256).map_err(|e| malformed(e.to_string()))?,
        },
        _ => {
            return Err(malformed(
                "file_info must carry either part_crc64nvme (protocol 3) or sha256 and part_md5 \
                 (protocol 2), not both"
                    .to_owned(),
            ));
        }
    };
    let part_digests =
        parse_part_digests(&info.part_digests, &digests, parts as usize).map_err(malformed)?;
    let facts = FileFacts {
        file_name: info.file_name,
        size: info.size,
        modified_ms: info.modified_ms,
        part_size: info.part_size,
        digests,
        stored: Stored::Plain,
        part_digests,
    };
    if facts.part_size != part_size || facts.parts_total() != parts {
        return Err(malformed(format!(
            "the agent hashed {} parts of {} bytes; expected {parts} parts of {part_size}",
            facts.parts_total(),
            facts.part_size
        )));
    }
    Ok(facts)
}

/// Checks an encoded file's description (protocol 5): the parts cover the file, each but the
/// last holds S3's smallest part, none its largest, at most 10,000 of them, each with the
/// CRC64NVME of its stored bytes; and the file's SHA-256, which the object records.
fn check_encoded(info: FileInfo) -> Result<FileFacts, Rejection> {
    let malformed = |message: String| Rejection {
        code: ErrorCode::MalformedMessage,
        message,
    };
    let parts = &info.encoded_parts;
    if parts.is_empty() || parts.len() > MAX_PARTS as usize {
        return Err(malformed(format!(
            "an encoded file has 1 to {MAX_PARTS} parts, not {}",
            parts.len()
        )));
    }
    if info.part_crc64nvme.len() != parts.len() || !info.part_md5.is_empty() {
        return Err(malformed(format!(
            "an encoded file carries one CRC64NVME per part: {} for {} parts",
            info.part_crc64nvme.len(),
            parts.len()
        )));
    }
    let plain: u64 = parts.iter().map(|p| p.plain_len).sum();
    if plain != info.size {
        return Err(malformed(format!(
            "the encoded parts hold {plain} bytes of a {}-byte file",
            info.size
        )));
    }
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if (part.stored_len < MIN_PART_SIZE && !last) || part.stored_len > MAX_PART_SIZE {
            return Err(malformed(format!(
                "encoded part {} has {} stored bytes: parts but the last hold {MIN_PART_SIZE} to {MAX_PART_SIZE}",
                i + 1,
                part.stored_len
            )));
        }
        if part.plain_len == 0 && info.size > 0 {
            return Err(malformed(format!("encoded part {} is empty", i + 1)));
        }
    }
    let Some(sha256) = &info.sha256 else {
        return Err(malformed(
            "an encoded file is described with its SHA-256".to_owned(),
        ));
    };
    let digests = Digests::Crc64Nvme {
        parts: parse_crcs(&info.part_crc64nvme).map_err(malformed)?,
        sha256: Some(Sha256Hex::parse(sha256).map_err(|e| malformed(e.to_string()))?),
    };
    let part_digests =
        parse_part_digests(&info.part_digests, &digests, parts.len()).map_err(malformed)?;
    let stored = Stored::encoded(info.encoding, info.encoded_parts)
        .expect("plain files are checked by check_facts");
    Ok(FileFacts {
        file_name: info.file_name,
        size: info.size,
        modified_ms: info.modified_ms,
        part_size: info.part_size,
        digests,
        stored,
        part_digests,
    })
}

/// The part manifest of a `file_info`: none, or one SHA-256 digest per part. Only CRC64NVME
/// uploads (protocol 3 and later) can have parts copied, so a protocol 2 description with one
/// is malformed.
fn parse_part_digests(
    text: &[String],
    digests: &Digests,
    parts: usize,
) -> Result<Option<Vec<Sha256Hex>>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    if matches!(digests, Digests::Md5 { .. }) {
        return Err("part_digests come with part_crc64nvme, not part_md5".to_owned());
    }
    if text.len() != parts {
        return Err(format!(
            "the part manifest has {} digests for {parts} parts",
            text.len()
        ));
    }
    text.iter()
        .map(|d| Sha256Hex::parse(d).map_err(|e| format!("part digest: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The part CRC64NVMEs of a `file_info`, each in S3's base64 form.
fn parse_crcs(crcs: &[String]) -> Result<Vec<Crc64Nvme>, String> {
    crcs.iter()
        .map(|c| Crc64Nvme::parse(c).map_err(|e| e.to_string()))
        .collect()
}
