//! How a fetch turns stored bytes into the file: [`Decode`], the operator's choice (as stored,
//! or decoded, opening a sealed object with the identity file), and [`Unzstd`], the bounded
//! zstd decoder. `fetch` runs them on the bytes as they arrive.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use shared::api::DownloadLink;
use shared::sealed::{Identities, Unsealer};
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

/// How a fetch writes what it gets: decoded (decompressed, and opened with the identity file if
/// the object is sealed), or `raw`, as stored.
#[derive(Debug, Clone, Default)]
pub struct Decode {
    raw: bool,
    identity: Option<PathBuf>,
}

impl Decode {
    pub fn new(raw: bool, identity: Option<&Path>) -> Self {
        Self {
            raw,
            identity: identity.map(Path::to_path_buf),
        }
    }

    /// Whether the object is written as stored.
    pub fn raw(&self) -> bool {
        self.raw
    }

    /// The unsealer for a sealed object, from the identity file.
    pub(crate) fn unsealer(&self, link: &DownloadLink) -> anyhow::Result<Unsealer> {
        let Some(path) = &self.identity else {
            bail!(
                "upload {} is encrypted ({}): give --identity FILE, an identity whose recipient the share is encrypted to (or --raw to keep it as stored)",
                link.upload_id,
                link.encoding
            );
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the identity file {}", path.display()))?;
        let identities = Identities::parse(&text)
            .with_context(|| format!("the identity file {}", path.display()))?;
        Ok(Unsealer::new(identities))
    }
}

/// A zstd stream decoded in bounded pieces: however much one compressed byte expands, at most
/// [`Unzstd::OUT`] bytes are held at a time.
pub(crate) struct Unzstd {
    ctx: zstd::stream::raw::Decoder<'static>,
    pub(crate) out: Vec<u8>,
    /// The last call ended a frame: the stream may end here.
    pub(crate) at_frame_end: bool,
}

impl Unzstd {
    pub(crate) const OUT: usize = 256 * 1024;

    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            ctx: zstd::stream::raw::Decoder::new().context("starting the zstd decoder")?,
            out: vec![0; Self::OUT],
            at_frame_end: true,
        })
    }

    /// Decodes from `input` into the output buffer: how many input bytes were used, and how
    /// many output bytes are ready in `self.out`.
    pub(crate) fn step(&mut self, input: &[u8]) -> anyhow::Result<(usize, usize)> {
        let mut src = InBuffer::around(input);
        let mut dst = OutBuffer::around(&mut self.out[..]);
        let hint = self
            .ctx
            .run(&mut src, &mut dst)
            .context("the compressed object is not valid zstd")?;
        let produced = dst.pos();
        // A call that did nothing (all flushed, no input) says nothing about where it stands.
        if src.pos > 0 || produced > 0 {
            self.at_frame_end = hint == 0;
        }
        Ok((src.pos, produced))
    }
}
