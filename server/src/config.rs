//! Server settings: every one is a flag with an environment fallback (see `.env.example`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
pub use shared::auth::Secret;
use url::Url;

pub use shared::protocol::{MAX_PART_SIZE, MIN_PART_SIZE};
/// The part size used unless `PART_SIZE` says otherwise.
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;
/// A presigned URL can live at most seven days.
pub const MAX_PRESIGN_TTL_SECS: u64 = 7 * 24 * 3600;
/// The token key file and the database, in `DATA_DIR` unless set: the server and
/// `server token issue` must find the same ones.
pub const DEFAULT_TOKEN_KEY_FILE: &str = "token-keys.json";
pub const DEFAULT_DATABASE_FILE: &str = "backhaul.db";
/// Agent tokens live from a few seconds (tests that make time pass) to a year.
pub const MIN_AGENT_TOKEN_TTL_SECS: u64 = 2;
pub const MAX_AGENT_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// An S3-compatible endpoint inside the server process (s3s + s3s-fs), data under `DATA_DIR`.
    Embedded,
    /// Any real S3 (AWS, LocalStack) through aws-config's standard environment.
    S3,
}

/// Where the durable state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateKind {
    /// A SQLite file in `DATA_DIR` (`DATABASE_PATH`): one server, no external service.
    Sqlite,
    /// A PostgreSQL database (`DATABASE_URL`), shared by several replicas.
    Postgres,
}

/// How replicas reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BusKind {
    /// None: one server, which holds every agent itself.
    Local,
    /// NATS (`NATS_URL`): presence and commands between replicas on one PostgreSQL database.
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Backhaul control plane.
#[derive(Debug, Clone, Parser)]
#[command(name = "server", version, about)]
pub struct Config {
    /// Address of the HTTP API and the agents' WebSocket endpoint.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// Legacy HS256 secret (at least 32 bytes). When set, tokens minted with it (by releases
    /// before the server kept its own key) are still accepted; the server never signs with it.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// The token signing keys (Ed25519, mode 0600), created on first start; defaults to
    /// `token-keys.json` in DATA_DIR. It never leaves the server host.
    #[arg(long, env = "TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,

    /// After a key rotation, each connected agent is sent a token signed by the new key at a
    /// random moment within this many seconds, so that a fleet is not re-signed all at once.
    #[arg(long, env = "TOKEN_ROTATION_SPREAD_SECS", default_value_t = 300)]
    pub token_rotation_spread_secs: u64,

    /// Where uploaded files go: `embedded` or `s3`.
    #[arg(long, env = "STORAGE", value_enum, default_value = "embedded")]
    pub storage: StorageKind,

    /// Bucket that receives the files.
    #[arg(long, env = "S3_BUCKET_NAME", default_value = "pos-uploads")]
    pub bucket: String,

    /// First segment of every object key; objects land at
    /// `<prefix>/<client_id>/<UTC timestamp>-<upload_id>/<file name>`.
    #[arg(long, env = "KEY_PREFIX", default_value = "uploads")]
    pub key_prefix: String,

    /// Directory for the embedded store's objects.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address of the embedded S3 endpoint (STORAGE=embedded only).
    #[arg(
        long,
        env = "EMBEDDED_S3_LISTEN_ADDR",
        default_value = "127.0.0.1:9000"
    )]
    pub embedded_s3_listen_addr: SocketAddr,

    /// Access key of the embedded S3 endpoint.
    #[arg(long, env = "EMBEDDED_S3_ACCESS_KEY", default_value = "backhaul")]
    pub embedded_s3_access_key: String,

    /// Secret key of the embedded S3 endpoint; a random one is made at start-up when unset.
    #[arg(long, env = "EMBEDDED_S3_SECRET_KEY", hide_env_values = true)]
    pub embedded_s3_secret_key: Option<Secret>,

    /// S3 endpoint the server talks to (STORAGE=s3); unset means AWS itself.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint_url: Option<Url>,

    /// Region of the bucket.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,

    /// Static credentials (STORAGE=s3); when unset, aws-config's default chain is used.
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    pub aws_access_key_id: Option<String>,

    /// Secret for `AWS_ACCESS_KEY_ID`.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<Secret>,

    /// Use path-style URLs (`<endpoint>/<bucket>/<key>`); defaults to true when an endpoint is set.
    #[arg(long, env = "S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,

    /// Endpoint signed into presigned URLs: the address agents can reach. Defaults to the
    /// endpoint the server itself uses.
    #[arg(long, env = "S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<Url>,

    /// Server-side encryption requested for every object at CreateMultipartUpload: `AES256`
    /// (SSE-S3) or `aws:kms` (SSE-KMS). Unset leaves it to the bucket's default encryption.
    /// Verification does not depend on it: objects are checked by their CRC64NVME, not their
    /// ETag (which SSE-KMS makes no MD5).
    #[arg(long, env = "S3_SSE", value_enum)]
    pub s3_sse: Option<crate::storage::Sse>,

    /// KMS key (id, ARN or alias) for `S3_SSE=aws:kms`; unset means the account's AWS-managed
    /// key for S3.
    #[arg(long, env = "S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,

    /// Smallest part size in bytes (at least 5 MiB); grows so no file needs over 10,000 parts.
    #[arg(long, env = "PART_SIZE", default_value_t = DEFAULT_PART_SIZE)]
    pub part_size: u64,

    /// Lifetime of presigned URLs, in seconds (at most 7 days).
    #[arg(long, env = "PRESIGN_TTL_SECS", default_value_t = 900)]
    pub presign_ttl_secs: u64,

    /// Lifetime of the agent tokens the server hands out when it renews one, in seconds (default
    /// 30 days, at most 1 year). A connected agent of protocol 4 or later is sent a fresh token
    /// once less than half of this is left on its current one.
    #[arg(long, env = "AGENT_TOKEN_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    pub agent_token_ttl_secs: u64,

    /// Lifetime of the presigned GET that `GET /uploads/{id}/download` redirects to, in seconds
    /// (at most 7 days). Anyone holding the URL can read the object until then.
    #[arg(long, env = "DOWNLOAD_URL_TTL_SECS", default_value_t = 300)]
    pub download_url_ttl_secs: u64,

    /// How long an agent may take to describe (and hash) its file before the upload fails.
    #[arg(long, env = "AGENT_RESPONSE_TIMEOUT_SECS", default_value_t = 120)]
    pub agent_response_timeout_secs: u64,

    /// Where uploads, the inventory, collections, schedules, the token ledger and revocations
    /// are kept: `sqlite` (one server) or `postgres` (several replicas share DATABASE_URL).
    #[arg(long = "state", env = "STATE", value_enum, default_value = "sqlite")]
    pub state: StateKind,

    /// `local` (one server) or `nats`: replicas behind a load balancer, sharing STATE=postgres,
    /// find the replica that holds a store through NATS (NATS_URL, with JetStream).
    #[arg(long = "bus", env = "BUS", value_enum, default_value = "local")]
    pub bus: BusKind,

    /// NATS server URL (BUS=nats), e.g. `nats://nats.internal:4222`.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<Secret>,

    /// What this deployment's names on NATS start with (BUS=nats): its subjects
    /// (`<prefix>.replica.<replica>`, `<prefix>.broadcast`, `<prefix>.collections`) and its
    /// presence bucket (`<prefix>_presence`). Deployments that share a NATS server need one each;
    /// a replica finding another deployment's under its prefix refuses to start.
    #[arg(long, env = "NATS_PREFIX", default_value = "backhaul")]
    pub nats_prefix: String,

    /// This replica's name on the bus (BUS=nats); a random one when unset. Two live replicas
    /// must not share one.
    #[arg(long, env = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// SQLite database (STATE=sqlite); defaults to `backhaul.db` in DATA_DIR.
    #[arg(long, env = "DATABASE_PATH")]
    pub database_path: Option<PathBuf>,

    /// PostgreSQL connection URL (STATE=postgres), e.g.
    /// `postgres://backhaul:secret@db.internal:5432/backhaul`. Plain TCP: keep the database on
    /// a private network or the same host.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<Secret>,

    /// How often multipart uploads under KEY_PREFIX that no upload owns are aborted (also once
    /// at start-up); 0 turns the sweep off, for a prefix that several servers share.
    #[arg(long, env = "ORPHAN_SWEEP_INTERVAL_SECS", default_value_t = 600)]
    pub orphan_sweep_interval_secs: u64,

    /// Records of finished uploads are deleted this many days after the upload was created
    /// (checked hourly, and at start); unfinished ones are kept whatever their age.
    #[arg(long, env = "UPLOAD_RETENTION_DAYS", default_value_t = 90)]
    pub upload_retention_days: u64,

    /// An upload with no progress for this long (agent away included) fails with STALLED.
    #[arg(long, env = "UPLOAD_STALL_TIMEOUT_SECS", default_value_t = 300)]
    pub upload_stall_timeout_secs: u64,

    /// Interval of the server's WebSocket pings.
    #[arg(long, env = "PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,

    /// An agent connection that sends nothing (not even a pong) for this long is closed.
    #[arg(long, env = "AGENT_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub agent_idle_timeout_secs: u64,

    /// Messages (frames of any kind) one agent connection may send per second on average; a
    /// burst of twice as many is tolerated. Beyond it the connection is closed (RATE_LIMITED).
    #[arg(long, env = "AGENT_MAX_MESSAGES_PER_SEC", default_value_t = 50)]
    pub agent_max_messages_per_sec: u32,

    /// Connected agents beyond this number are refused with 503.
    #[arg(long, env = "MAX_AGENT_CONNECTIONS", default_value_t = 100_000)]
    pub max_agent_connections: usize,

    /// PEM certificate chain; with TLS_KEY_FILE, the API, the WebSocket and the embedded S3
    /// endpoint are served over TLS.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// Whether the API (and so the operator page) is served over TLS.
    pub fn serves_tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// Checks the settings that clap cannot, before anything is bound.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.legacy_keys()?;
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            bail!("PART_SIZE must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes");
        }
        if self.presign_ttl_secs == 0 || self.presign_ttl_secs > MAX_PRESIGN_TTL_SECS {
            bail!("PRESIGN_TTL_SECS must be between 1 and {MAX_PRESIGN_TTL_SECS}");
        }
        if !(MIN_AGENT_TOKEN_TTL_SECS..=MAX_AGENT_TOKEN_TTL_SECS)
            .contains(&self.agent_token_ttl_secs)
        {
            bail!(
                "AGENT_TOKEN_TTL_SECS must be between {MIN_AGENT_TOKEN_TTL_SECS} and {MAX_AGENT_TOKEN_TTL_SECS}"
            );
        }
        if self.download_url_ttl_secs == 0 || self.download_url_ttl_secs > MAX_PRESIGN_TTL_SECS {
            bail!("DOWNLOAD_URL_TTL_SECS must be between 1 and {MAX_PRESIGN_TTL_SECS}");
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.starts_with('/')
            || self.key_prefix.ends_with('/')
            || self
                .key_prefix
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            bail!("KEY_PREFIX must be non-empty path segments without leading or trailing '/'");
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            bail!("TLS_CERT_FILE and TLS_KEY_FILE must be set together");
        }
        if !(1..=36_500).contains(&self.upload_retention_days) {
            bail!("UPLOAD_RETENTION_DAYS must be between 1 and 36500");
        }
        if self.agent_max_messages_per_sec == 0 {
            bail!("AGENT_MAX_MESSAGES_PER_SEC must be at least 1");
        }
        if self.aws_access_key_id.is_some() != self.aws_secret_access_key.is_some() {
            bail!("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together");
        }
        if self.s3_sse_kms_key_id.is_some() && self.s3_sse != Some(crate::storage::Sse::Kms) {
            bail!("S3_SSE_KMS_KEY_ID needs S3_SSE=aws:kms");
        }
        if self.state == StateKind::Postgres && self.database_url.is_none() {
            bail!("STATE=postgres needs DATABASE_URL");
        }
        if self.bus == BusKind::Nats {
            if self.nats_url.is_none() {
                bail!("BUS=nats needs NATS_URL");
            }
            if self.state != StateKind::Postgres {
                bail!("BUS=nats needs STATE=postgres: replicas share one database");
            }
        }
        if let Some(id) = &self.replica_id
            && !name_on_the_bus(id)
        {
            bail!("REPLICA_ID must be 1 to 64 letters, digits, '-' or '_'");
        }
        if !name_on_the_bus(&self.nats_prefix) {
            bail!("NATS_PREFIX must be 1 to 64 letters, digits, '-' or '_'");
        }
        Ok(())
    }

    /// The verifier of legacy HS256 tokens, when `JWT_SECRET` is set.
    pub fn legacy_keys(&self) -> anyhow::Result<Option<shared::auth::TokenKeys>> {
        self.jwt_secret
            .as_ref()
            .map(|secret| {
                shared::auth::TokenKeys::new(secret.expose().as_bytes())
                    .context("JWT_SECRET is unusable: use at least 32 random bytes")
            })
            .transpose()
    }

    pub fn token_key_path(&self) -> PathBuf {
        self.token_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_TOKEN_KEY_FILE))
    }

    pub fn token_rotation_spread(&self) -> Duration {
        Duration::from_secs(self.token_rotation_spread_secs)
    }

    /// The server's database: the SQLite file, or the PostgreSQL URL (checked by `validate`).
    pub fn database(&self) -> crate::db::Location {
        match (self.state, &self.database_url) {
            (StateKind::Postgres, Some(url)) => crate::db::Location::Postgres(url.clone()),
            _ => crate::db::Location::Sqlite(
                self.database_path
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join(DEFAULT_DATABASE_FILE)),
            ),
        }
    }

    pub fn presign_ttl(&self) -> Duration {
        Duration::from_secs(self.presign_ttl_secs)
    }

    pub fn agent_token_ttl(&self) -> Duration {
        Duration::from_secs(self.agent_token_ttl_secs)
    }

    pub fn download_url_ttl(&self) -> Duration {
        Duration::from_secs(self.download_url_ttl_secs)
    }
}

/// Whether `name` can be a token of a NATS subject and part of a bucket's name: 1 to 64
/// letters, digits, '-' or '_'.
fn name_on_the_bus(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["server"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap()
    }

    #[test]
    fn weak_or_placeholder_secrets_stop_the_server() {
        for secret in [
            "",
            "short",
            "changeme-changeme-changeme-changeme-changeme",
            &"x".repeat(40),
        ] {
            let err = parse(&["--jwt-secret", secret]).validate().unwrap_err();
            assert!(
                format!("{err:#}").contains("JWT_SECRET"),
                "{secret:?}: {err:#}"
            );
        }
        parse(&["--jwt-secret", "0123456789abcdef0123456789abcdef"])
            .validate()
            .unwrap();
        // The server signs with its own key: the legacy secret is optional.
        parse(&[]).validate().unwrap();
    }

    #[test]
    fn limits_are_checked() {
        let secret = "0123456789abcdef0123456789abcdef";
        for bad in [
            vec!["--part-size", "1024"],
            vec!["--presign-ttl-secs", "0"],
            vec!["--presign-ttl-secs", "604801"],
            vec!["--download-url-ttl-secs", "0"],
            vec!["--agent-token-ttl-secs", "1"],
            vec!["--key-prefix", "../up"],
            vec!["--tls-cert-file", "/c.pem"],
            vec!["--agent-max-messages-per-sec", "0"],
            vec!["--nats-prefix", ""],
            vec!["--nats-prefix", "backhaul.prod"],
            vec!["--nats-prefix", "a*"],
            vec!["--replica-id", "r 1"],
        ] {
            let mut args = vec!["--jwt-secret", secret];
            args.extend(bad.iter().copied());
            assert!(parse(&args).validate().is_err(), "{bad:?}");
        }
        parse(&["--nats-prefix", "backhaul_staging-2"])
            .validate()
            .unwrap();
    }
}
