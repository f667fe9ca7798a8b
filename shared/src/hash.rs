//! Hashes as validated values. A hash enters as text (a protocol message, a stored record) and is
//! checked there once; past that point its form is a fact of its type, not a re-check by hand.

use std::fmt;

use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("the SHA-256 is not 64 lowercase hex digits")]
    Sha256,
    #[error("a part MD5 is not base64 of 16 bytes")]
    Md5,
    #[error("a CRC64NVME is not base64 of 8 bytes")]
    Crc64Nvme,
}

/// The SHA-256 of a whole file, as 64 lowercase hex digits (the form recorded on the object).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let ok = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(HashError::Sha256)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The MD5 of one part, in the base64 form of a `Content-MD5` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentMd5 {
    base64: String,
    raw: [u8; 16],
}

impl ContentMd5 {
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| HashError::Md5)?;
        let raw: [u8; 16] = raw.try_into().map_err(|_| HashError::Md5)?;
        Ok(Self {
            // Re-encoded, so that two spellings of one digest compare equal.
            base64: base64::engine::general_purpose::STANDARD.encode(raw),
            raw,
        })
    }

    /// The `Content-MD5` header value.
    pub fn as_base64(&self) -> &str {
        &self.base64
    }

    pub fn digest(&self) -> &[u8; 16] {
        &self.raw
    }

    /// The ETag S3 gives a part stored with this `Content-MD5`: quoted lowercase hex.
    pub fn part_etag(&self) -> String {
        format!("\"{}\"", hex::encode(self.raw))
    }
}

/// A CRC64NVME checksum: S3's full-object checksum, and the one Backhaul signs into each part.
///
/// It is a CRC, not a cryptographic hash: it catches corruption on the way and a file that
/// changed, not a forger (the SHA-256 of the whole file is for that). Its use here is that it
/// runs at memory speed, and that the CRCs of consecutive parts [`combine`](Self::combine) into
/// the CRC of the whole, so the object's checksum is known before any byte is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Crc64Nvme(u64);

impl Crc64Nvme {
    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes))
    }

    /// Parses the base64 of the 8 big-endian bytes, the form of S3's `x-amz-checksum-crc64nvme`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| HashError::Crc64Nvme)?;
        let raw: [u8; 8] = raw.try_into().map_err(|_| HashError::Crc64Nvme)?;
        Ok(Self(u64::from_be_bytes(raw)))
    }

    /// The header value: base64 of the 8 big-endian bytes.
    pub fn to_base64(self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0.to_be_bytes())
    }

    /// The checksum of this checksum's bytes followed by `next_len` bytes whose checksum is
    /// `next`: this one multiplied by x^(8·`next_len`) modulo the polynomial, plus `next`
    /// (the initial value and the final XOR are equal, so they cancel).
    ///
    /// `crc_fast::checksum_combine` gives the same answer (a test holds the two together), but
    /// it builds the zeros operator bit matrix by bit matrix for every call: 155 µs per call
    /// here, 20 ms for the 128 parts of a 1 GiB file, which the server paid with it at
    /// presigning, at verification and for every status it rendered. Powers of x from a table built at compile
    /// time take under a microsecond (`hashspeed`: 14-71 µs for the 128).
    pub fn combine(self, next: Crc64Nvme, next_len: u64) -> Self {
        Self(gf2::mul_mod(gf2::x_pow_8n(next_len), self.0) ^ next.0)
    }

    /// The checksum of the whole, from the checksums of consecutive pieces and their lengths.
    pub fn of_pieces(pieces: impl IntoIterator<Item = (Crc64Nvme, u64)>) -> Self {
        pieces
            .into_iter()
            .fold(Self::of(b""), |whole, (crc, len)| whole.combine(crc, len))
    }
}

impl fmt::Display for Crc64Nvme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Polynomials over GF(2) modulo CRC64NVME's, in the CRC's bit-reflected order: the top bit is
/// the coefficient of x^0, the lowest that of x^63.
mod gf2 {
    /// CRC-64/NVME's polynomial 0xAD93D23594C93659, bit-reflected, without its x^64 term.
    const POLY: u64 = 0x9a6c_9329_ac4b_c9b5;
    /// The polynomial 1.
    const ONE: u64 = 1 << 63;

    /// `a` times `b`, modulo the polynomial.
    pub const fn mul_mod(a: u64, mut b: u64) -> u64 {
        let mut product = 0;
        let mut bit = ONE;
        while bit != 0 {
            if a & bit != 0 {
                product ^= b;
            }
            // b times x: one place towards x^63, folding x^64 back in.
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
            bit >>= 1;
        }
        product
    }

    /// x^(2^k) for k up to 66, enough for x^(8n) with any 64-bit n.
    const X_POW_2K: [u64; 67] = {
        let mut table = [0; 67];
        table[0] = ONE >> 1;
        let mut k = 1;
        while k < table.len() {
            table[k] = mul_mod(table[k - 1], table[k - 1]);
            k += 1;
        }
        table
    };

    /// x^(8n): the operator that appends `n` zero bytes to a CRC's register.
    pub fn x_pow_8n(mut n: u64) -> u64 {
        let mut power = ONE;
        let mut k = 3;
        while n != 0 {
            if n & 1 != 0 {
                power = mul_mod(X_POW_2K[k], power);
            }
            n >>= 1;
            k += 1;
        }
        power
    }
}

/// CRC64NVME over bytes that arrive in pieces.
pub struct Crc64NvmeHasher(crc_fast::Digest);

impl Default for Crc64NvmeHasher {
    fn default() -> Self {
        Self(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme))
    }
}

impl Crc64NvmeHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> Crc64Nvme {
        Crc64Nvme(self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_must_be_lowercase_hex_of_32_bytes() {
        assert!(Sha256Hex::parse(&"a".repeat(64)).is_ok());
        assert_eq!(Sha256Hex::parse(&"A".repeat(64)), Err(HashError::Sha256));
        assert_eq!(Sha256Hex::parse(&"a".repeat(63)), Err(HashError::Sha256));
        assert_eq!(Sha256Hex::parse(&"g".repeat(64)), Err(HashError::Sha256));
    }

    #[test]
    fn md5_must_be_base64_of_16_bytes() {
        // MD5 of the empty string.
        let md5 = ContentMd5::parse("1B2M2Y8AsgTpgAmY7PhCfg==").unwrap();
        assert_eq!(md5.part_etag(), "\"d41d8cd98f00b204e9800998ecf8427e\"");
        assert_eq!(md5.as_base64(), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(ContentMd5::parse("not base64"), Err(HashError::Md5));
        assert_eq!(ContentMd5::parse("AAAA"), Err(HashError::Md5));
    }

    #[test]
    fn crc64nvme_matches_s3_and_combines() {
        // The CRC-64/NVME check value: the CRC of "123456789".
        assert_eq!(Crc64Nvme::of(b"123456789").0, 0xae8b_1486_0a79_9888);
        let whole = Crc64Nvme::of(b"hello, world");
        let pieces = [(Crc64Nvme::of(b"hello"), 5), (Crc64Nvme::of(b", world"), 7)];
        assert_eq!(Crc64Nvme::of_pieces(pieces), whole);
        assert_eq!(Crc64Nvme::of_pieces([]), Crc64Nvme::of(b""));
        let mut hasher = Crc64NvmeHasher::default();
        hasher.update(b"hello,");
        hasher.update(b" world");
        assert_eq!(hasher.finish(), whole);
        assert_eq!(Crc64Nvme::parse(&whole.to_base64()), Ok(whole));
        assert_eq!(Crc64Nvme::parse("AAAA"), Err(HashError::Crc64Nvme));
        assert_eq!(Crc64Nvme::parse("no!"), Err(HashError::Crc64Nvme));
    }

    /// The combination is crc-fast's, for lengths from none to far beyond any file, and that
    /// of the concatenated bytes.
    #[test]
    fn crc64nvme_combines_as_crc_fast_does() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for split in [0, 1, 7, 8, 4096, 65_537, 99_999, 100_000] {
            let (a, b) = data.split_at(split);
            let combined = Crc64Nvme::of(a).combine(Crc64Nvme::of(b), b.len() as u64);
            assert_eq!(combined, Crc64Nvme::of(&data), "split at {split}");
        }
        let (a, b) = (Crc64Nvme::of(b"first"), Crc64Nvme::of(b"second"));
        for len in [
            0,
            1,
            2,
            3,
            8 << 20,
            (8 << 20) + 1,
            5 << 30,
            u64::MAX >> 3,
            u64::MAX,
        ] {
            let reference =
                crc_fast::checksum_combine(crc_fast::CrcAlgorithm::Crc64Nvme, a.0, b.0, len);
            assert_eq!(a.combine(b, len).0, reference, "length {len}");
        }
    }
}
