//! Agent settings: every one is a flag with an environment fallback (see `.env.example`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, ValueEnum};
use shared::FileName;
pub use shared::auth::Secret;
use shared::encoding::Compression;
use shared::labels::{Label, Labels};
use shared::protocol::DEFAULT_SHARE;
use shared::sealed::{MAX_RECIPIENTS, Recipient};
use url::Url;

pub const DEFAULT_FILE_NAME: &str = "file_to_download.txt";
/// 5 GiB: a day's export is around 100 MB, so anything near this is a mistake.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// One shared file: the name the server may ask for, where it is, how it is compressed when
/// the operator leaves that to the share, and whom it is encrypted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub name: FileName,
    pub path: PathBuf,
    /// `None`: the agent's `COMPRESSION`.
    pub compression: Option<Compression>,
    /// Empty: the agent's `ENCRYPT_TO`.
    pub encrypt_to: Vec<Recipient>,
}

impl std::str::FromStr for Share {
    type Err = String;
    /// `name=path`, optionally followed by `;compression=auto|zstd|none` and by
    /// `;encrypt_to=age1...`, once per recipient.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut fields = s.split(';');
        let first = fields.next().unwrap_or_default();
        let (name, path) = first
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not name=path"))?;
        let name = FileName::parse(name.trim()).map_err(|e| format!("share name {name:?}: {e}"))?;
        let path = PathBuf::from(path.trim());
        if !path.is_absolute() {
            return Err(format!("share {name}: path must be absolute"));
        }
        let mut compression = None;
        let mut encrypt_to = Vec::new();
        for option in fields {
            match option.trim().split_once('=') {
                Some(("compression", value)) => {
                    compression = Some(
                        value
                            .trim()
                            .parse::<Compression>()
                            .map_err(|e| format!("share {name}: {e}"))?,
                    );
                }
                Some(("encrypt_to", value)) => {
                    encrypt_to.push(
                        value
                            .parse::<Recipient>()
                            .map_err(|e| format!("share {name}: {e}"))?,
                    );
                }
                _ => {
                    return Err(format!(
                        "share {name}: unknown option {option:?} (expected compression=... or encrypt_to=...)"
                    ));
                }
            }
        }
        Ok(Share {
            name,
            path,
            compression,
            encrypt_to,
        })
    }
}

/// Age recipients, comma-separated; an empty list (`ENCRYPT_TO=`) is none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipients(pub Vec<Recipient>);

impl std::str::FromStr for Recipients {
    type Err = shared::sealed::SealError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(Recipients)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Backhaul store agent: keeps one outbound WebSocket to the server and uploads its file to S3
/// when asked.
#[derive(Debug, Clone, Parser)]
#[command(name = "client", version, about)]
pub struct Config {
    /// WebSocket URL of the server's agent endpoint.
    #[arg(
        long,
        env = "AGENT_SERVER_URL",
        default_value = "ws://127.0.0.1:8080/ws/connect"
    )]
    pub server_url: Url,

    /// This agent's JWT (`cli token issue --client-id <id>`); its subject is the client id.
    /// Used when AGENT_TOKEN_FILE does not exist yet (the install token).
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// File holding this agent's token (mode 0600). It wins over AGENT_TOKEN when it exists,
    /// and the agent writes every token the server renews into it, atomically.
    #[arg(long, env = "AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The file this agent uploads when asked; defaults to `$HOME/file_to_download.txt`.
    #[arg(long, env = "FILE_PATH")]
    pub file_path: Option<PathBuf>,

    /// More shared files, as comma-separated `name=path` pairs. The server asks for a file by
    /// name, never by path; `default` is FILE_PATH.
    #[arg(long = "share", env = "SHARED_FILES", value_delimiter = ',')]
    pub shares: Vec<Share>,

    /// Largest file the agent uploads, in bytes (checked before any upload starts).
    #[arg(long, env = "MAX_FILE_SIZE", default_value_t = DEFAULT_MAX_FILE_SIZE)]
    pub max_file_size: u64,

    /// Hosts the agent may upload to, comma-separated: `host` or `host:port`, each optionally
    /// followed by `/bucket` to allow that bucket only (path style or virtual-hosted). Empty
    /// means the host of AGENT_SERVER_URL, which is where the embedded store runs.
    #[arg(
        long = "allowed-upload-host",
        env = "ALLOWED_UPLOAD_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_upload_hosts: Vec<String>,

    /// Parts uploaded at the same time.
    #[arg(long, env = "UPLOAD_CONCURRENCY", default_value_t = 4)]
    pub upload_concurrency: usize,

    /// Threads that compute the parts' CRC64NVME checksums before a file is uploaded. The
    /// SHA-256 of the whole is computed on one more thread while the parts upload.
    #[arg(long, env = "HASH_THREADS", default_value_t = 2)]
    pub hash_threads: usize,

    /// Attempts per part (and for the completion request) before the upload fails. Retries
    /// wait with exponential backoff and jitter, from PART_RETRY_MIN_MS up to 10 s.
    #[arg(long, env = "PART_ATTEMPTS", default_value_t = 4)]
    pub part_attempts: u32,

    /// First delay before retrying a failed part, in milliseconds.
    #[arg(long, env = "PART_RETRY_MIN_MS", default_value_t = 200)]
    pub part_retry_min_ms: u64,

    /// Cap on the disk reads of hashing (the describe pass and the SHA-256 pass together), in
    /// bytes per second, so hashing a large file leaves the disk to the point-of-sale software;
    /// 0 means no cap.
    #[arg(long, env = "HASH_READ_BYTES_PER_SEC", default_value_t = 0)]
    pub hash_read_bytes_per_sec: u64,

    /// What compression a share gets when the operator asks for `auto` and the share names
    /// none of its own (`name=path;compression=...`): `auto` compresses a file when a sample of
    /// it shrinks by 10 % or more, `zstd` always, `none` never.
    #[arg(long, env = "COMPRESSION", default_value = "auto")]
    pub compression: Compression,

    /// zstd level for compressed parts, 1 (fastest) to 19.
    #[arg(long, env = "ZSTD_LEVEL", default_value_t = 3)]
    pub zstd_level: i32,

    /// Encrypt every share that names no recipients of its own (`;encrypt_to=...`) to these age
    /// X25519 recipients (`age1...`, from `cli key generate`), comma-separated. An encrypted
    /// share is compressed (as COMPRESSION says), then encrypted on this machine; the server
    /// and the bucket never see it in the clear, and no request can turn that off. Empty: not
    /// encrypted.
    #[arg(long = "encrypt-to", env = "ENCRYPT_TO", default_value = "")]
    pub encrypt_to: Recipients,

    /// Where the agent keeps the store keys of encrypted shares (files of mode 0600). A lost
    /// key costs nothing but the next fetch's copied parts. Default: the directory of
    /// AGENT_TOKEN_FILE, else `$HOME/.backhaul`.
    #[arg(long, env = "KEY_DIR")]
    pub key_dir: Option<PathBuf>,

    /// Where compressed parts wait to be sent, in files without a name (nothing is left behind
    /// if the agent dies). Needs room for the compressed file. Default: the system's temporary
    /// directory.
    #[arg(long, env = "SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Cap on upload bandwidth in bytes per second, all parts together; 0 means no cap.
    #[arg(long, env = "MAX_UPLOAD_BYTES_PER_SEC", default_value_t = 0)]
    pub max_upload_bytes_per_sec: u64,

    /// First reconnect delay, in milliseconds; doubles per failed attempt, with jitter.
    #[arg(long, env = "RECONNECT_MIN_MS", default_value_t = 500)]
    pub reconnect_min_ms: u64,

    /// How long to wait before reconnecting after the server replaced this connection with a
    /// newer one of the same identity (two machines sharing one token), in seconds.
    #[arg(long, env = "REPLACED_BACKOFF_SECS", default_value_t = 300)]
    pub replaced_backoff_secs: u64,

    /// Longest reconnect delay, in milliseconds.
    #[arg(long, env = "RECONNECT_MAX_MS", default_value_t = 30_000)]
    pub reconnect_max_ms: u64,

    /// Interval of the agent's WebSocket pings.
    #[arg(long, env = "AGENT_PING_INTERVAL_SECS", default_value_t = 15)]
    pub ping_interval_secs: u64,

    /// A server that sends nothing for this long is considered gone; the agent reconnects.
    #[arg(long, env = "SERVER_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub server_idle_timeout_secs: u64,

    /// Timeout of one part PUT or completion request, in seconds.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,

    /// Extra PEM root certificate(s) to trust for wss:// and https://, on top of the system's
    /// roots (a private CA, a self-signed server).
    #[arg(long, env = "CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Labels sent with `hello`, comma-separated `key=value` (`region=north,brand=burger-co`),
    /// so the fleet can be targeted by them.
    #[arg(long = "label", env = "AGENT_LABELS", value_delimiter = ',')]
    pub labels: Vec<Label>,

    /// TOML configuration file (see `config_file`); defaults to /etc/backhaul/agent.toml when
    /// that exists. Flags and the environment override it.
    #[arg(long, env = "AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Check the configuration and the token, print what the agent would use, and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.server_url.scheme(), "ws" | "wss") {
            bail!("AGENT_SERVER_URL must be a ws:// or wss:// URL");
        }
        if self.upload_concurrency == 0 || self.upload_concurrency > 64 {
            bail!("UPLOAD_CONCURRENCY must be between 1 and 64");
        }
        if self.hash_threads == 0 || self.hash_threads > 16 {
            bail!("HASH_THREADS must be between 1 and 16");
        }
        if self.part_attempts == 0 {
            bail!("PART_ATTEMPTS must be at least 1");
        }
        if !(1..=19).contains(&self.zstd_level) {
            bail!("ZSTD_LEVEL must be between 1 and 19");
        }
        if self.encrypt_to.0.len() > MAX_RECIPIENTS {
            bail!("ENCRYPT_TO names more than {MAX_RECIPIENTS} recipients");
        }
        let mut names = std::collections::HashSet::new();
        for share in &self.shares {
            if share.name.as_str() == DEFAULT_SHARE {
                bail!("the share name '{DEFAULT_SHARE}' is FILE_PATH; pick another name");
            }
            if share.encrypt_to.len() > MAX_RECIPIENTS {
                bail!(
                    "share '{}' names more than {MAX_RECIPIENTS} recipients",
                    share.name
                );
            }
            if !names.insert(share.name.as_str()) {
                bail!("share '{}' is configured twice", share.name);
            }
        }
        for entry in &self.allowed_upload_hosts {
            if let Err(why) = crate::uploader::check_entry(entry) {
                bail!(
                    "ALLOWED_UPLOAD_HOSTS entries are `host`, `host:port`, `host/bucket` or `host:port/bucket`: {why}"
                );
            }
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            bail!("RECONNECT_MIN_MS must be positive and at most RECONNECT_MAX_MS");
        }
        self.labels()?;
        Ok(())
    }

    /// The labels, each key once.
    pub fn labels(&self) -> anyhow::Result<Labels> {
        Ok(Labels::from_list(self.labels.iter().cloned())?)
    }

    /// The shared file, with the `$HOME` default applied.
    pub fn file_path(&self) -> PathBuf {
        self.file_path.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(DEFAULT_FILE_NAME)
        })
    }

    /// The path of a share, or `None` if the agent does not share that name.
    pub fn share_path(&self, name: &FileName) -> Option<PathBuf> {
        if name.as_str() == DEFAULT_SHARE {
            return Some(self.file_path());
        }
        self.shares
            .iter()
            .find(|s| s.name == *name)
            .map(|s| s.path.clone())
    }

    /// The compression a share gets when the operator leaves it to the share.
    pub fn share_compression(&self, name: &FileName) -> Compression {
        self.shares
            .iter()
            .find(|s| s.name == *name)
            .and_then(|s| s.compression)
            .unwrap_or(self.compression)
    }

    /// Whom a share is encrypted to; empty when it is not encrypted.
    pub fn share_recipients(&self, name: &FileName) -> &[Recipient] {
        match self.shares.iter().find(|s| s.name == *name) {
            Some(share) if !share.encrypt_to.is_empty() => &share.encrypt_to,
            _ => &self.encrypt_to.0,
        }
    }

    pub fn key_dir(&self) -> PathBuf {
        if let Some(dir) = &self.key_dir {
            return dir.clone();
        }
        if let Some(dir) = self.token_file.as_deref().and_then(std::path::Path::parent)
            && !dir.as_os_str().is_empty()
        {
            return dir.to_path_buf();
        }
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".backhaul")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// Where this agent may send bytes.
    pub fn upload_policy(&self) -> crate::uploader::UploadPolicy {
        let hosts = if self.allowed_upload_hosts.is_empty() {
            self.server_url
                .host_str()
                .map(|h| vec![h.to_owned()])
                .unwrap_or_default()
        } else {
            self.allowed_upload_hosts.clone()
        };
        crate::uploader::UploadPolicy::new(hosts)
    }

    pub fn reconnect_policy(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(
            Duration::from_millis(self.reconnect_min_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }
}
