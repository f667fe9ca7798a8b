//! The digest of a part's plaintext that goes into the part manifest (`file_info.part_digests`):
//! the SHA-256 of the BLAKE3s of the part's [`BLOCK`]-sized blocks, the last one possibly
//! shorter. Blocks are aligned to the file, as parts start on block boundaries in both layouts,
//! so the compressed layout hashes each block while it compresses it (on many threads) and the
//! plain layout while it checksums the part, and both give the same digest for the same bytes.
//!
//! The blocks are hashed with BLAKE3 because this pass runs before the first byte moves: it is
//! 3.7 times as fast as SHA-256 on a CPU with SHA extensions, and more on one without
//! (BENCHMARKS.md). Agents released before 2026-12-04 hashed the blocks with SHA-256. The server
//! compares digests as opaque values, so an agent upgraded across the change has its first
//! fetch of each share sent whole, and copies again from the next one.

use sha2::{Digest, Sha256};

/// Plaintext bytes per hashed block: the compressed layout's frame.
pub const BLOCK: usize = 1024 * 1024;

/// The BLAKE3 of one block (or, for a sealed file, its keyed digest).
pub type BlockDigest = [u8; 32];

pub fn block_digest(block: &[u8]) -> BlockDigest {
    blake3::hash(block).into()
}

/// One part's digest, fed in order.
#[derive(Default)]
pub struct PartDigester {
    blocks: Sha256,
    block: blake3::Hasher,
    in_block: usize,
}

impl PartDigester {
    /// More bytes of the part, in any pieces.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (BLOCK - self.in_block).min(bytes.len());
            self.block.update(&bytes[..take]);
            self.in_block += take;
            bytes = &bytes[take..];
            if self.in_block == BLOCK {
                self.end_block();
            }
        }
    }

    /// A whole block hashed elsewhere. Only between blocks.
    pub fn push_block(&mut self, digest: &BlockDigest) {
        debug_assert_eq!(self.in_block, 0, "a block pushed in the middle of one");
        self.blocks.update(digest);
    }

    fn end_block(&mut self) {
        let block = self.block.finalize();
        self.block.reset();
        self.blocks.update(block.as_bytes());
        self.in_block = 0;
    }

    /// Lowercase hex, as the manifest carries it.
    pub fn finish(mut self) -> String {
        if self.in_block > 0 {
            self.end_block();
        }
        hex::encode(self.blocks.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, spelled out: agents compare today's digests with the ones they sent
    /// months ago, so it changes only on purpose.
    #[test]
    fn a_part_digest_is_the_sha256_of_its_blocks_blake3s() {
        let data: Vec<u8> = (0..BLOCK + 3).map(|i| (i % 251) as u8).collect();
        let mut concatenated = Vec::new();
        concatenated.extend_from_slice(blake3::hash(&data[..BLOCK]).as_bytes());
        concatenated.extend_from_slice(blake3::hash(&data[BLOCK..]).as_bytes());
        let mut d = PartDigester::default();
        d.update(&data);
        assert_eq!(d.finish(), hex::encode(Sha256::digest(&concatenated)));
    }

    #[test]
    fn pieces_and_whole_blocks_give_one_digest() {
        let data: Vec<u8> = (0..BLOCK * 2 + 777).map(|i| (i % 253) as u8).collect();
        let mut whole = PartDigester::default();
        for block in data.chunks(BLOCK) {
            whole.push_block(&block_digest(block));
        }
        let whole = whole.finish();
        for piece in [1, 4096, 1000, BLOCK, BLOCK + 1, data.len()] {
            let mut d = PartDigester::default();
            data.chunks(piece).for_each(|c| d.update(c));
            assert_eq!(d.finish(), whole, "pieces of {piece}");
        }
        // Any changed byte changes it; so does a cut at another block edge.
        let mut changed = data.clone();
        changed[BLOCK + 5] ^= 1;
        let mut d = PartDigester::default();
        d.update(&changed);
        assert_ne!(d.finish(), whole);
        let mut d = PartDigester::default();
        d.update(&data[..data.len() - 1]);
        assert_ne!(d.finish(), whole);
    }
}
