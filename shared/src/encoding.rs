//! How a file travels and is stored: as it is, compressed with zstd, and sealed (encrypted on the
//! store, [`crate::sealed`]) or not. Operators and shares ask for a [`Compression`]; a share's
//! configuration alone decides whether it is sealed; the agent decides the [`Encoding`] of each
//! upload, and the object says which it got (its key ends in `.zst`, `.sealed` or
//! `.zst.sealed`, and its metadata records the encoding, the original size and the plaintext
//! SHA-256, or for a sealed object its keyed digest).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an operator (a request, a collection) or a share (the agent's config) asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Compression {
    /// The agent samples the file and compresses it only when that pays.
    #[default]
    Auto,
    /// Always zstd, even when the file does not shrink.
    Zstd,
    /// Never compressed.
    None,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::Auto, Compression::Zstd, Compression::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// What applies when an operator asked for `self` of a share configured with `share`: an
    /// explicit request wins; `auto` leaves it to the share.
    pub fn over(self, share: Compression) -> Compression {
        match self {
            Compression::Auto => share,
            explicit => explicit,
        }
    }

    /// Whether an upload asked for this may be stored with `encoding`.
    pub fn allows(self, encoding: Encoding) -> bool {
        match self {
            Compression::Auto => true,
            Compression::Zstd => encoding.compressed(),
            Compression::None => !encoding.compressed(),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compression name that is not one of `auto`, `zstd` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown encoding {0:?}: expected auto, zstd or none")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCompression(s.to_owned()))
    }
}

/// How an uploaded object's bytes relate to the file's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Encoding {
    /// The object is the file, byte for byte.
    #[default]
    None,
    /// The object is a run of zstd frames (at least one per part) whose decompressed
    /// concatenation is the file.
    Zstd,
    /// The object is a run of sealed frames, one per 1 MiB block of the file
    /// ([`crate::sealed`]).
    Sealed,
    /// The object is a run of sealed frames, each holding the zstd frame of one 1 MiB block.
    ZstdSealed,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::None => "none",
            Encoding::Zstd => "zstd",
            Encoding::Sealed => "sealed",
            Encoding::ZstdSealed => "zstd_sealed",
        }
    }

    /// The encoding of a file compressed or not, sealed or not.
    pub fn of(compressed: bool, sealed: bool) -> Self {
        match (compressed, sealed) {
            (false, false) => Encoding::None,
            (true, false) => Encoding::Zstd,
            (false, true) => Encoding::Sealed,
            (true, true) => Encoding::ZstdSealed,
        }
    }

    pub fn compressed(self) -> bool {
        matches!(self, Encoding::Zstd | Encoding::ZstdSealed)
    }

    pub fn sealed(self) -> bool {
        matches!(self, Encoding::Sealed | Encoding::ZstdSealed)
    }

    /// What the object key ends with after the file name.
    pub fn key_suffix(self) -> &'static str {
        match self {
            Encoding::None => "",
            Encoding::Zstd => ".zst",
            Encoding::Sealed => ".sealed",
            Encoding::ZstdSealed => ".zst.sealed",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// User metadata on an encoded object (`x-amz-meta-...`).
pub mod metadata {
    /// `zstd` on a compressed object.
    pub const ENCODING: &str = "encoding";
    /// The file's size in bytes, before encoding.
    pub const ORIGINAL_SIZE: &str = "original-size";
    /// Lowercase hex SHA-256 of the file, before encoding; for a sealed object, the keyed
    /// digest ([`crate::sealed::StoreKey::file_digest`]).
    pub const SHA256: &str = "sha256";
}

/// One part of an encoded upload: how many of the file's bytes it holds, and how many it takes
/// in storage (and on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedPart {
    pub plain_len: u64,
    pub stored_len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
        assert!("gzip".parse::<Compression>().is_err());
        assert_eq!(serde_json::to_string(&Encoding::Zstd).unwrap(), "\"zstd\"");
    }

    #[test]
    fn an_explicit_request_wins_over_the_share() {
        assert_eq!(Compression::Auto.over(Compression::None), Compression::None);
        assert_eq!(Compression::Zstd.over(Compression::None), Compression::Zstd);
        assert_eq!(Compression::None.over(Compression::Zstd), Compression::None);
        assert!(Compression::Auto.allows(Encoding::Zstd));
        assert!(Compression::Auto.allows(Encoding::None));
        assert!(!Compression::None.allows(Encoding::Zstd));
        assert!(!Compression::Zstd.allows(Encoding::None));
        assert!(Compression::None.allows(Encoding::Sealed));
        assert!(!Compression::None.allows(Encoding::ZstdSealed));
        assert!(Compression::Zstd.allows(Encoding::ZstdSealed));
        assert!(!Compression::Zstd.allows(Encoding::Sealed));
        for compressed in [false, true] {
            for sealed in [false, true] {
                let e = Encoding::of(compressed, sealed);
                assert_eq!((e.compressed(), e.sealed()), (compressed, sealed));
            }
        }
    }
}
