//! Starts real servers and agents on ephemeral ports and drives them the way users do.
//!
//! The pieces: [`servers`] (a server in this process, [`TestServer`]), [`args`] (the command
//! lines of servers and agents), [`process`] (agents in this process, and servers or agents as
//! processes of their own, to kill), [`wire`] (the protocol and HTTP spoken by hand),
//! [`raw_s3`] (storage through presigned URLs, with no SDK) and [`balancer`] (a TCP load
//! balancer in front of replicas). What they share is here.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::Credentials;
use clap::Parser;
use sha2::{Digest, Sha256};
pub use shared::ErrorCode;
pub use shared::api::{ClientStatus, UploadState, UploadStatus};
use shared::auth::{Role, TokenKeys};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod args;
mod balancer;
mod process;
pub mod raw_s3;
mod servers;
mod wire;

pub use args::*;
pub use balancer::*;
pub use process::*;
pub use servers::*;
pub use wire::*;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const BUCKET: &str = "pos-uploads";
pub const EMBEDDED_ACCESS_KEY: &str = "backhaul-test";
pub const EMBEDDED_SECRET_KEY: &str = "backhaul-test-secret-key";
pub const MIB: u64 = 1024 * 1024;

/// Defines one test per storage mode from one body: `storage_modes!(name, |mode| body(mode))`
/// makes a module `name` with the tests `embedded` and `localstack`, each awaiting the body with
/// its [`Mode`].
macro_rules! storage_modes {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)(Mode::Embedded).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn localstack() {
                ($body)(Mode::LocalStack).await
            }
        }
    };
}
pub(crate) use storage_modes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    LocalStack,
}

pub fn localstack_endpoint() -> String {
    std::env::var("LOCALSTACK_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

pub fn keys() -> TokenKeys {
    TokenKeys::new(SECRET.as_bytes()).unwrap()
}

/// Checks a token as the server keeping its keys in `data_dir` does.
pub fn verify_with_keys_in(data_dir: &Path, token: &str) -> Result<shared::auth::Claims, String> {
    let Some(kid) = shared::auth::token_kid(token).map_err(|e| e.to_string())? else {
        return keys().verify(token).map_err(|e| e.to_string());
    };
    let file = server::tokens::keyfile::KeyFile::new(data_dir.join("token-keys.json"));
    let set = file.load_or_create().map_err(|e| format!("{e:#}"))?;
    let key = set.keys.get(&kid).ok_or_else(|| format!("no key {kid}"))?;
    key.keys.verify(token).map_err(|e| e.to_string())
}

pub fn agent_token(client_id: &str) -> String {
    keys()
        .issue(client_id, Role::Agent, Duration::from_secs(3600))
        .unwrap()
}

pub fn operator_token() -> String {
    keys()
        .issue("test-operator", Role::Operator, Duration::from_secs(3600))
        .unwrap()
}

/// A unique client id per test, so tests sharing a bucket never share a key prefix.
pub fn unique_client(name: &str) -> String {
    format!("{name}-{}", &uuid_like()[..8])
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    hex::encode(Sha256::digest(format!("{t}-{n}-{}", std::process::id())))
}

/// Waits for `cond` to hold, polling, up to `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Triggers a download of the agent's default file and returns the upload id.
pub async fn trigger_id(server: &TestServer, client_id: &str) -> String {
    let (status, trig) = server.trigger(client_id).await;
    assert_eq!(status, 202, "{trig}");
    trig["upload_id"].as_str().unwrap().to_owned()
}

/// The upload completed, with the file's SHA-256 recorded and the same bytes in `store`.
pub async fn assert_identical(store: &TestServer, status: &UploadStatus, sha: &str) {
    assert_eq!(status.state, UploadState::Completed, "{status:?}");
    assert_eq!(
        status.sha256.as_deref(),
        Some(sha),
        "the recorded SHA-256 is the file's"
    );
    assert_eq!(
        store.object_sha256(status.key()).await,
        sha,
        "stored bytes differ"
    );
}

/// Short reads of a typed upload status.
pub trait StatusExt {
    /// The code the upload ended with, if it failed or was cancelled.
    fn code(&self) -> Option<ErrorCode>;
    /// The object key, which every upload past `requested` has.
    fn key(&self) -> &str;
}

impl StatusExt for UploadStatus {
    fn code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    fn key(&self) -> &str {
        self.key
            .as_deref()
            .unwrap_or_else(|| panic!("upload {} has no key: {self:?}", self.upload_id))
    }
}

/// A random generator for a test's random choices (kill points, delays), seeded from
/// `BACKHAUL_TEST_SEED` when set and from the OS otherwise. The seed is printed first, so a failing
/// run can be replayed with the same choices.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = match std::env::var("BACKHAUL_TEST_SEED") {
        Ok(s) => s.parse().expect("BACKHAUL_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: random choices from seed {seed} (replay with BACKHAUL_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// With `BACKHAUL_TEST_LOG_FILE` set, this test process's log (its in-process servers and
/// agents, filtered by `RUST_LOG`, `info` by default) is written to that file: for a test run
/// many times to catch a rare failure.
pub fn log_to_file_if_asked() {
    let Ok(path) = std::env::var("BACKHAUL_TEST_LOG_FILE") else {
        return;
    };
    let file = std::fs::File::create(&path).expect("creating BACKHAUL_TEST_LOG_FILE");
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .try_init();
}

/// A new, empty PostgreSQL database on the test command's server (`scripts/test.sh` starts it
/// and sets `BACKHAUL_TEST_DATABASE_URL`); its URL.
pub fn fresh_database() -> String {
    let admin = std::env::var("BACKHAUL_TEST_DATABASE_URL").expect(
        "the PostgreSQL tests need BACKHAUL_TEST_DATABASE_URL: run scripts/test.sh, or \
         engines/postgres.sh start and export BACKHAUL_TEST_DATABASE_URL=$(engines/postgres.sh url)",
    );
    let name = format!("backhaul_it_{}", uuid::Uuid::new_v4().simple());
    // The blocking client runs its own runtime, so not on this test's.
    let create = format!("CREATE DATABASE {name}");
    let admin_for_thread = admin.clone();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin_for_thread, postgres::NoTls)
            .expect("connecting to the test PostgreSQL");
        client.batch_execute(&create).expect("creating a database");
    })
    .join()
    .unwrap();
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// A free loopback port (bound and released; the tiny race is acceptable in tests).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Writes `len` pseudo-random bytes (cheap, incompressible enough) and returns the SHA-256.
pub async fn write_file(path: &Path, len: u64) -> String {
    let mut f = tokio::fs::File::create(path).await.unwrap();
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ len;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).await.unwrap();
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush().await.unwrap();
    hex::encode(hasher.finalize())
}

/// Runs the real `cli` binary against `server`, as the test operator.
pub async fn run_cli(server: &TestServer, args: &[&str]) -> Output {
    run_cli_as(server, &operator_token(), args).await
}

/// Runs the real `cli` binary against `server` with `token` as its API token, and no
/// `JWT_SECRET` in its environment.
pub async fn run_cli_as(server: &TestServer, token: &str, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_cli");
    let mut cmd = tokio::process::Command::new(bin);
    if let Some(ca) = &server.ca_file {
        cmd.env("CA_FILE", ca);
    } else {
        cmd.env_remove("CA_FILE");
    }
    cmd.args(args)
        .env("SERVER_URL", server.http_url())
        .env("API_TOKEN", token)
        .env_remove("JWT_SECRET")
        .output()
        .await
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
