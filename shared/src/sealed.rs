//! Sealed objects: a share encrypted on the store to age X25519 recipients that head office
//! holds, so that neither the bucket, nor the server, nor a leaked download link reveals it.
//!
//! Each share that is encrypted has a *store key*: 32 random bytes made on the store, kept
//! there (mode 0600), and wrapped to the share's recipients in a small age file, the *header*.
//! The object is a run of frames, one per 1 MiB block of the file, each one whole on its own:
//!
//! ```text
//! "BHS1"                 magic, 4 bytes
//! header length          u16, big-endian
//! header                 the age file that wraps the store key to the recipients
//! nonce                  12 bytes
//! body length            u32, big-endian
//! body                   ChaCha20-Poly1305 of the block's inner bytes (a zstd frame, or the
//!                        block itself when the share is not compressed), tag included
//! ```
//!
//! Sealing is deterministic, so that a file sealed twice gives the same bytes: a resume after a
//! kill finds the parts already stored, and an unchanged part is copied from the previous
//! object. The nonce is synthetic, an HMAC of the inner bytes under a key derived from the store
//! key (the SIV construction), so one nonce never seals two different bodies. What can be seen
//! without the store key is the length of each frame and whether two frames are equal.
//!
//! The store key also keys the digests the server keeps ([`StoreKey::block_id`] for the part
//! manifest, [`StoreKey::file_digest`] in place of the file's SHA-256): they decide "unchanged"
//! and check a fetch, and reveal nothing of the plaintext to whoever lacks the key.

use std::io::{Read, Write};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The first bytes of every frame.
pub const MAGIC: &[u8; 4] = b"BHS1";
/// Most recipients one share may have: the header is repeated in every frame.
pub const MAX_RECIPIENTS: usize = 16;
/// Longest header a frame may carry (a header of [`MAX_RECIPIENTS`] is about 2 KiB).
const MAX_HEADER: usize = 8 * 1024;
/// Longest body a frame may carry: a 1 MiB block that zstd made larger, and the tag.
pub const MAX_BODY: usize = 2 * 1024 * 1024;
const TAG_LEN: usize = 16;

/// Why sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{0:?} is not an age X25519 recipient (age1...): {1}")]
    BadRecipient(String, &'static str),
    #[error("an encrypted share needs between 1 and {MAX_RECIPIENTS} recipients, not {0}")]
    RecipientCount(usize),
    #[error("{0}")]
    BadIdentity(String),
    #[error("the stored key is unreadable: {0}")]
    BadStoreKey(String),
    #[error("the object is not sealed as Backhaul seals it: {0}")]
    Malformed(String),
    #[error("none of the given identities is a recipient of this object")]
    NotARecipient,
    #[error("a sealed block does not open: the object was altered, or is not what was uploaded")]
    Tampered,
}

/// An age X25519 recipient (`age1...`), as a share's configuration names it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Recipient(String);

impl Recipient {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn key(&self) -> age::x25519::Recipient {
        age::x25519::Recipient::from_str(&self.0).expect("checked when parsed")
    }
}

impl FromStr for Recipient {
    type Err = SealError;
    fn from_str(s: &str) -> Result<Self, SealError> {
        let s = s.trim();
        age::x25519::Recipient::from_str(s)
            .map(|r| Recipient(r.to_string()))
            .map_err(|why| SealError::BadRecipient(s.to_owned(), why))
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keys derived from a store key, each for one purpose.
#[derive(Clone)]
struct Keys {
    seal: LessSafeKey,
    nonce: hmac::Key,
    block_id: hmac::Key,
    file: hmac::Key,
}

impl Keys {
    fn derive(secret: &[u8; 32]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let sub = |label: &[u8]| hmac::sign(&root, label);
        let seal = UnboundKey::new(
            &CHACHA20_POLY1305,
            sub(b"backhaul sealed block key").as_ref(),
        )
        .expect("32 bytes is a ChaCha20 key");
        Self {
            seal: LessSafeKey::new(seal),
            nonce: hmac::Key::new(
                hmac::HMAC_SHA256,
                sub(b"backhaul sealed block nonce").as_ref(),
            ),
            block_id: hmac::Key::new(hmac::HMAC_SHA256, sub(b"backhaul sealed block id").as_ref()),
            file: hmac::Key::new(
                hmac::HMAC_SHA256,
                sub(b"backhaul sealed file digest").as_ref(),
            ),
        }
    }
}

/// A share's store key and its header. It stays on the store; only the header, which only the
/// recipients can open, leaves it.
#[derive(Clone)]
pub struct StoreKey {
    secret: [u8; 32],
    header: Vec<u8>,
    recipients: Vec<Recipient>,
    keys: Keys,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKey")
            .field("recipients", &self.recipients)
            .finish_non_exhaustive()
    }
}

/// The stored form of a store key (a JSON file of mode 0600 on the store).
#[derive(Serialize, Deserialize)]
struct StoreKeyFile {
    recipients: Vec<String>,
    secret: String,
    header: String,
}

impl StoreKey {
    /// A new random key, wrapped to `recipients` (sorted, each once).
    pub fn generate(recipients: &[Recipient]) -> Result<Self, SealError> {
        let recipients = canonical(recipients)?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| SealError::BadStoreKey("the system has no randomness".into()))?;
        let keys: Vec<age::x25519::Recipient> = recipients.iter().map(Recipient::key).collect();
        let encryptor =
            age::Encryptor::with_recipients(keys.iter().map(|k| k as &dyn age::Recipient))
                .map_err(|e| SealError::BadStoreKey(e.to_string()))?;
        let mut header = Vec::new();
        let mut w = encryptor
            .wrap_output(&mut header)
            .map_err(|e| SealError::BadStoreKey(e.to_string()))?;
        w.write_all(&secret)
            .and_then(|()| w.finish().map(drop))
            .map_err(|e| SealError::BadStoreKey(e.to_string()))?;
        if header.len() > MAX_HEADER {
            return Err(SealError::RecipientCount(recipients.len()));
        }
        Ok(Self {
            keys: Keys::derive(&secret),
            secret,
            header,
            recipients,
        })
    }

    /// The key a file holds; `Err` if it is not one.
    pub fn from_json(text: &str) -> Result<Self, SealError> {
        let bad = |e: String| SealError::BadStoreKey(e);
        let file: StoreKeyFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let secret: [u8; 32] = STANDARD
            .decode(&file.secret)
            .map_err(|e| bad(e.to_string()))?
            .try_into()
            .map_err(|_| bad("the secret is not 32 bytes".into()))?;
        let header = STANDARD
            .decode(&file.header)
            .map_err(|e| bad(e.to_string()))?;
        if header.len() > MAX_HEADER {
            return Err(bad("the header is too long".into()));
        }
        let recipients = file
            .recipients
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<Recipient>, _>>()?;
        Ok(Self {
            keys: Keys::derive(&secret),
            secret,
            header,
            recipients: canonical(&recipients)?,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&StoreKeyFile {
            recipients: self.recipients.iter().map(|r| r.0.clone()).collect(),
            secret: STANDARD.encode(self.secret),
            header: STANDARD.encode(&self.header),
        })
        .expect("strings serialize")
    }

    /// Whether this key is wrapped to exactly `recipients`.
    pub fn is_for(&self, recipients: &[Recipient]) -> bool {
        canonical(recipients).is_ok_and(|r| r == self.recipients)
    }

    pub fn recipients(&self) -> &[Recipient] {
        &self.recipients
    }

    /// The keyed digest of one block's plaintext, which the part manifest is made of.
    pub fn block_id(&self, plain: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.keys.block_id, plain);
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// The keyed digest of the whole file, fed in order: what a sealed upload records in place
    /// of the file's SHA-256.
    pub fn file_digest(&self) -> FileDigest {
        FileDigest(hmac::Context::with_key(&self.keys.file))
    }

    /// Bytes a frame adds to its inner bytes.
    pub fn overhead(&self) -> usize {
        frame_overhead(self.header.len())
    }

    /// Appends the frame that seals `inner` to `out`.
    pub fn seal(&self, inner: &[u8], out: &mut Vec<u8>) {
        assert!(
            inner.len() + TAG_LEN <= MAX_BODY,
            "a block is at most 1 MiB"
        );
        let tag = hmac::sign(&self.keys.nonce, inner);
        let nonce: [u8; NONCE_LEN] = tag.as_ref()[..NONCE_LEN].try_into().expect("12 bytes");
        out.reserve(self.overhead() + inner.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.header.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&((inner.len() + TAG_LEN) as u32).to_be_bytes());
        let body = out.len();
        out.extend_from_slice(inner);
        let tag = self
            .keys
            .seal
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[body..],
            )
            .expect("a block is far below ChaCha20's limit");
        out.extend_from_slice(tag.as_ref());
    }
}

fn frame_overhead(header_len: usize) -> usize {
    MAGIC.len() + 2 + header_len + NONCE_LEN + 4 + TAG_LEN
}

/// Sorted, each once, between 1 and [`MAX_RECIPIENTS`].
fn canonical(recipients: &[Recipient]) -> Result<Vec<Recipient>, SealError> {
    let mut r = recipients.to_vec();
    r.sort();
    r.dedup();
    if r.is_empty() || r.len() > MAX_RECIPIENTS {
        return Err(SealError::RecipientCount(r.len()));
    }
    Ok(r)
}

/// A keyed digest of a file being read in order.
pub struct FileDigest(hmac::Context);

impl FileDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Lowercase hex, as a SHA-256 is carried.
    pub fn finish(self) -> String {
        hex::encode(self.0.sign().as_ref())
    }
}

/// Age X25519 identities (`AGE-SECRET-KEY-1...`) that open sealed objects: an identity file
/// holds one or more, one per line, with `#` comments, as `age-keygen` writes it.
pub struct Identities(Vec<age::x25519::Identity>);

impl Identities {
    /// The identities in the text of an identity file.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let ids = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .enumerate()
            .map(|(i, line)| {
                age::x25519::Identity::from_str(line).map_err(|why| {
                    SealError::BadIdentity(format!(
                        "identity {} is not an age X25519 identity: {why}",
                        i + 1
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Err(SealError::BadIdentity("no identity in the file".into()));
        }
        Ok(Self(ids))
    }

    /// A new identity: its text (for the identity file) and its recipient.
    pub fn generate() -> (String, Recipient) {
        use age::secrecy::ExposeSecret;
        let id = age::x25519::Identity::generate();
        let recipient = Recipient(id.to_public().to_string());
        (id.to_string().expose_secret().to_owned(), recipient)
    }

    /// The store key a header wraps.
    fn open_header(&self, header: &[u8]) -> Result<Keys, SealError> {
        let decryptor = age::Decryptor::new_buffered(header)
            .map_err(|e| SealError::Malformed(format!("the frame's header: {e}")))?;
        let mut reader = decryptor
            .decrypt(self.0.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => SealError::NotARecipient,
                other => SealError::Malformed(format!("the frame's header: {other}")),
            })?;
        let mut secret = Vec::new();
        reader
            .read_to_end(&mut secret)
            .map_err(|_| SealError::Tampered)?;
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| SealError::Malformed("the wrapped key is not 32 bytes".into()))?;
        Ok(Keys::derive(&secret))
    }
}

/// Opens a sealed object read in any pieces: frames are taken apart as their bytes arrive, and
/// each one's inner bytes handed on. Holds at most one frame.
pub struct Unsealer {
    identities: Identities,
    buf: Vec<u8>,
    /// The header last opened and its keys: every frame of one object has the same.
    opened: Option<(Vec<u8>, Keys)>,
}

impl Unsealer {
    pub fn new(identities: Identities) -> Self {
        Self {
            identities,
            buf: Vec::new(),
            opened: None,
        }
    }

    /// Whether the bytes so far end on a frame's end.
    pub fn at_frame_end(&self) -> bool {
        self.buf.is_empty()
    }

    /// The keyed digest the object's file was recorded with, once its first frame is open.
    pub fn file_digest(&self) -> Option<FileDigest> {
        self.opened
            .as_ref()
            .map(|(_, keys)| FileDigest(hmac::Context::with_key(&keys.file)))
    }

    /// Takes in more of the object, calling `inner` with each frame's inner bytes in order.
    pub fn push<E: From<SealError>>(
        &mut self,
        mut bytes: &[u8],
        mut inner: impl FnMut(&mut Self, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            let (want, whole) = self.needed()?;
            let take = (want - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if whole && self.buf.len() == want {
                let mut frame = std::mem::take(&mut self.buf);
                let opened = self.open(&mut frame)?;
                inner(self, &frame[opened])?;
                frame.clear();
                self.buf = frame;
            }
        }
        Ok(())
    }

    /// How many bytes the frame being read needs before more can be told of it, and whether
    /// that is its whole length.
    fn needed(&self) -> Result<(usize, bool), SealError> {
        let b = &self.buf;
        if b.len() < 6 {
            return Ok((6, false));
        }
        if &b[..4] != MAGIC {
            return Err(SealError::Malformed(
                "a frame does not start with BHS1".into(),
            ));
        }
        let header = u16::from_be_bytes([b[4], b[5]]) as usize;
        if header > MAX_HEADER {
            return Err(SealError::Malformed(format!("a {header}-byte header")));
        }
        let at = 6 + header + NONCE_LEN;
        if b.len() < at + 4 {
            return Ok((at + 4, false));
        }
        let body = u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize;
        if !(TAG_LEN..=MAX_BODY).contains(&body) {
            return Err(SealError::Malformed(format!("a {body}-byte body")));
        }
        Ok((at + 4 + body, true))
    }

    /// Opens one whole frame in place: the range of its inner bytes.
    fn open(&mut self, frame: &mut [u8]) -> Result<std::ops::Range<usize>, SealError> {
        let header_len = u16::from_be_bytes([frame[4], frame[5]]) as usize;
        let header = &frame[6..6 + header_len];
        if self.opened.as_ref().is_none_or(|(h, _)| h != header) {
            let keys = self.identities.open_header(header)?;
            self.opened = Some((header.to_vec(), keys));
        }
        let (_, keys) = self.opened.as_ref().expect("opened above");
        let at = 6 + header_len;
        let nonce: [u8; NONCE_LEN] = frame[at..at + NONCE_LEN].try_into().expect("12 bytes");
        let body = at + NONCE_LEN + 4;
        let plain = keys
            .seal
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut frame[body..],
            )
            .map_err(|_| SealError::Tampered)?;
        Ok(body..body + plain.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient_and_identities() -> (Recipient, Identities) {
        let (text, recipient) = Identities::generate();
        (
            recipient,
            Identities::parse(&format!("# key\n{text}\n")).unwrap(),
        )
    }

    fn sealed(key: &StoreKey, blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in blocks {
            key.seal(b, &mut out);
        }
        out
    }

    fn open_all(ids: Identities, object: &[u8], piece: usize) -> Result<Vec<Vec<u8>>, SealError> {
        let mut u = Unsealer::new(ids);
        let mut got = Vec::new();
        for chunk in object.chunks(piece.max(1)) {
            u.push(chunk, |_, inner: &[u8]| {
                got.push(inner.to_vec());
                Ok::<(), SealError>(())
            })?;
        }
        assert!(u.at_frame_end());
        Ok(got)
    }

    #[test]
    fn frames_open_in_any_pieces_and_only_for_a_recipient() {
        let (r, ids) = recipient_and_identities();
        let key = StoreKey::generate(std::slice::from_ref(&r)).unwrap();
        let blocks: [&[u8]; 3] = [b"first block", b"", &[7u8; 5000]];
        let object = sealed(&key, &blocks);
        for piece in [1, 7, 100, object.len()] {
            let ids = Identities(ids.0.clone());
            assert_eq!(
                open_all(ids, &object, piece).unwrap(),
                blocks.map(<[u8]>::to_vec)
            );
        }
        let (_, stranger) = recipient_and_identities();
        assert_eq!(
            open_all(stranger, &object, 64).unwrap_err(),
            SealError::NotARecipient
        );
        // Any flipped byte of a body fails to open.
        let mut altered = object.clone();
        let last = altered.len() - 20;
        altered[last] ^= 1;
        assert_eq!(
            open_all(Identities(ids.0.clone()), &altered, 64).unwrap_err(),
            SealError::Tampered
        );
        assert!(matches!(
            open_all(ids, b"PK\x03\x04 not sealed", 64).unwrap_err(),
            SealError::Malformed(_)
        ));
    }

    #[test]
    fn sealing_is_deterministic_and_hides_the_plaintext() {
        let (r, _) = recipient_and_identities();
        let key = StoreKey::generate(std::slice::from_ref(&r)).unwrap();
        let marker = b"CARDHOLDER-4111111111111111-MARKER";
        let a = sealed(&key, &[marker]);
        assert_eq!(a, sealed(&key, &[marker]));
        assert!(!a.windows(marker.len()).any(|w| w == marker));
        assert_eq!(a.len(), marker.len() + key.overhead());
        // The same key, stored and read back, seals the same way; another key does not.
        let again = StoreKey::from_json(&key.to_json()).unwrap();
        assert_eq!(sealed(&again, &[marker]), a);
        assert!(again.is_for(std::slice::from_ref(&r)));
        let other = StoreKey::generate(&[r]).unwrap();
        assert_ne!(sealed(&other, &[marker]), a);
        assert_ne!(other.block_id(marker), key.block_id(marker));
        let mut d = key.file_digest();
        d.update(marker);
        assert_ne!(
            d.finish(),
            hex::encode(ring::digest::digest(&ring::digest::SHA256, marker))
        );
    }

    #[test]
    fn bad_recipients_and_identities_are_named() {
        assert!(matches!(
            "age1nope".parse::<Recipient>(),
            Err(SealError::BadRecipient(..))
        ));
        assert!(matches!(
            StoreKey::generate(&[]),
            Err(SealError::RecipientCount(0))
        ));
        assert!(matches!(
            Identities::parse("# only a comment\n"),
            Err(SealError::BadIdentity(_))
        ));
        assert!(matches!(
            Identities::parse("AGE-SECRET-KEY-1NOTAKEY"),
            Err(SealError::BadIdentity(_))
        ));
    }
}
