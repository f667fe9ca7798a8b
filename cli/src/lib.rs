//! `cli`, the operator's command line. It talks to the server only over its public HTTP API
//! (plus `token issue`, which signs tokens locally with `JWT_SECRET`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shared::api::{
    ClientInfo, ClientStatus, ErrorBody, PhaseTimes, RevocationResponse, TriggerResponse,
    UploadState, UploadStatus,
};
use shared::auth::{Role, Secret, TokenKeys};
use shared::{ClientId, UploadId};

/// How often `download` polls the upload status.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Parser)]
#[command(
    name = "cli",
    version,
    about = "Operate Backhaul: trigger downloads, inspect agents, mint tokens"
)]
pub struct Cli {
    /// Base URL of the server's HTTP API.
    #[arg(
        long,
        global = true,
        env = "SERVER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server_url: String,

    /// Operator token (`cli token issue --operator`).
    #[arg(long, global = true, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// Extra PEM root certificate(s) to trust for an https:// server.
    #[arg(long, global = true, env = "CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a store's agent for its file and wait until the object is verified in S3.
    Download {
        #[arg(long)]
        client_id: String,
        /// Name of the agent's shared file (its SHARED_FILES entry); `default` is its FILE_PATH.
        #[arg(long, default_value = "default")]
        file: String,
        /// Print the upload id and return at once.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the upload itself goes on).
        #[arg(long, env = "WAIT_TIMEOUT_SECS", default_value_t = 3600)]
        wait_timeout_secs: u64,
    },
    /// Cancel an unfinished upload: the agent stops and the multipart upload is aborted.
    Cancel { upload_id: String },
    /// List connected agents.
    Clients,
    /// Show one agent's connection and latest upload, or one upload.
    Status(StatusArgs),
    /// Mint tokens signed with JWT_SECRET.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct StatusArgs {
    #[arg(long)]
    client_id: Option<String>,
    #[arg(long)]
    upload_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new token on stdout.
    Issue(IssueArgs),
    /// Refuse every agent token of a client issued until now, and disconnect it (needs the server).
    Revoke {
        #[arg(long)]
        client_id: String,
    },
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Issue an agent token for this client id.
    #[arg(
        long,
        conflicts_with = "operator",
        required_unless_present = "operator"
    )]
    client_id: Option<String>,
    /// Issue an operator token.
    #[arg(long)]
    operator: bool,
    /// Subject of an operator token, recorded as who triggered what.
    #[arg(long, default_value = "operator")]
    name: String,
    /// Lifetime in seconds (default 30 days for agents, 12 hours for operators).
    #[arg(long)]
    ttl_secs: Option<u64>,
    /// Secret shared with the server.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Secret,
}

/// Runs a parsed command. `Ok(false)` means the command ran but what it reports failed (an upload
/// that ended `failed`), which the binary turns into a non-zero exit.
pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Command::Token {
            command: TokenCommand::Issue(args),
        } => token_issue(args),
        Command::Token {
            command: TokenCommand::Revoke { client_id },
        } => token_revoke(&cli, client_id).await,
        Command::Download {
            client_id,
            file,
            no_wait,
            wait_timeout_secs,
        } => {
            let wait = (!*no_wait).then(|| Duration::from_secs(*wait_timeout_secs));
            download(&cli, client_id, file, wait).await
        }
        Command::Cancel { upload_id } => cancel(&cli, upload_id).await,
        Command::Clients => clients(&cli).await,
        Command::Status(StatusArgs {
            client_id,
            upload_id,
        }) => match (upload_id, client_id) {
            (Some(upload_id), _) => upload_status(&cli, upload_id).await,
            (None, Some(client_id)) => client_status(&cli, client_id).await,
            // clap's group makes one of them required.
            (None, None) => bail!("give --client-id or --upload-id"),
        },
    }
}

/// `token issue`: signs a token locally; needs no server.
fn token_issue(args: &IssueArgs) -> anyhow::Result<bool> {
    let keys = TokenKeys::new(args.jwt_secret.expose().as_bytes())
        .context("JWT_SECRET must be at least 32 bytes")?;
    let token = match &args.client_id {
        Some(id) => {
            let id = ClientId::parse(id)?;
            let ttl = args.ttl_secs.unwrap_or(30 * 24 * 3600);
            keys.issue(id.as_str(), Role::Agent, Duration::from_secs(ttl))?
        }
        None => {
            let ttl = args.ttl_secs.unwrap_or(12 * 3600);
            keys.issue(&args.name, Role::Operator, Duration::from_secs(ttl))?
        }
    };
    println!("{token}");
    Ok(true)
}

/// `token revoke`.
async fn token_revoke(cli: &Cli, client_id: &str) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let resp: RevocationResponse = api
        .post(&format!("/revocations/{}", path_segment(client_id)))
        .await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        println!(
            "revoked every token of {} issued before unix time {}{}",
            resp.client_id,
            resp.tokens_issued_before,
            if resp.disconnected {
                "; its connection was closed"
            } else {
                ""
            }
        );
    }
    Ok(true)
}

/// `download`: triggers, then (unless `wait` is `None`) follows the upload until it ends or
/// `wait` passes.
async fn download(
    cli: &Cli,
    client_id: &str,
    file: &str,
    wait: Option<Duration>,
) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let trigger: TriggerResponse = api
        .post(&format!(
            "/trigger-download/{}?file={}",
            path_segment(client_id),
            path_segment(file)
        ))
        .await?;
    let Some(wait) = wait else {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&trigger)?);
        } else {
            println!("{}", trigger.upload_id);
        }
        return Ok(true);
    };
    let status = wait_for(&api, trigger.upload_id, wait, cli.json).await?;
    print_outcome(&status, cli.json)?;
    Ok(status.state == UploadState::Completed)
}

/// `cancel`.
async fn cancel(cli: &Cli, upload_id: &str) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let status: UploadStatus = api
        .delete(&format!("/uploads/{}", path_segment(upload_id)))
        .await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("upload {} cancelled", status.upload_id);
    }
    Ok(true)
}

/// `clients`: the connected agents, as a table.
async fn clients(cli: &Cli) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let clients: Vec<ClientInfo> = api.get("/clients").await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&clients)?);
    } else if clients.is_empty() {
        println!("no agents connected");
    } else {
        println!(
            "{:<24} {:<26} {:<26} {:<6} ACTIVE UPLOAD",
            "CLIENT", "CONNECTED SINCE", "LAST SEEN", "PROTO"
        );
        for c in clients {
            let active = c
                .active_upload
                .map(|u| u.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<24} {:<26} {:<26} {:<6} {active}",
                c.client_id, c.connected_since, c.last_seen, c.protocol_version
            );
        }
    }
    Ok(true)
}

/// `status --upload-id`.
async fn upload_status(cli: &Cli, upload_id: &str) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let status: UploadStatus = api
        .get(&format!("/uploads/{}", path_segment(upload_id)))
        .await?;
    print_upload(&status, cli.json)?;
    Ok(true)
}

/// `status --client-id`: the agent's connection and its latest upload.
async fn client_status(cli: &Cli, client_id: &str) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let status: ClientStatus = api
        .get(&format!("/status/{}", path_segment(client_id)))
        .await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(true);
    }
    println!("client:          {}", status.client_id);
    println!("connected:       {}", status.connected);
    if let Some(since) = &status.connected_since {
        println!("connected since: {since}");
    }
    if let Some(seen) = &status.last_seen {
        println!("last seen:       {seen}");
    }
    match &status.last_upload {
        Some(u) => {
            println!("last upload:");
            print_upload(u, false)?;
        }
        None => println!("last upload:     none"),
    }
    Ok(true)
}

/// Percent-encodes a user-supplied id for use as one path segment, so the server (not the URL
/// parser) decides whether it is valid.
fn path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn wait_for(
    api: &Api,
    upload_id: UploadId,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<UploadStatus> {
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:<10} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let log_lines = !json && !std::io::stderr().is_terminal();
    loop {
        let status: UploadStatus = api.get(&format!("/uploads/{upload_id}")).await?;
        if let Some(size) = status.size {
            bar.set_length(size);
        }
        bar.set_position(status.bytes_done);
        // A stalled upload says so, and whether its agent is away, instead of a frozen bar.
        let label = match (status.stalled, status.agent_connected) {
            (true, false) => "agent away".to_owned(),
            (true, true) => "stalled".to_owned(),
            _ => status.state.to_string(),
        };
        bar.set_message(label.clone());
        // Without a terminal there is no bar; a line every few seconds still shows progress.
        if log_lines && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!(
                "{label}: {}/{} bytes, {} parts done, {} B/s, ETA {}s, idle {}s, resumed {} times",
                status.bytes_done,
                status
                    .size
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into()),
                status.parts_done,
                status.rate_bytes_per_sec.unwrap_or(0),
                status
                    .eta_secs
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into()),
                status.idle_secs.unwrap_or(0),
                status.resumes
            );
        }
        if status.state.is_terminal() {
            bar.finish_and_clear();
            return Ok(status);
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!(
                "upload {upload_id} still {:?} after {}s; it goes on, check it with `cli status --upload-id {upload_id}`",
                status.state,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn print_outcome(status: &UploadStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    match status.state {
        UploadState::Completed => {
            println!("upload {} completed and verified", status.upload_id);
            print_upload(status, false)
        }
        _ => {
            let (code, message) = status
                .error
                .as_ref()
                .map(|e| (e.code.to_string(), e.message.clone()))
                .unwrap_or_else(|| ("UNKNOWN".into(), "no error reported".into()));
            let state = status.state.to_string();
            eprintln!("upload {} {state}: {code}: {message}", status.upload_id);
            Ok(())
        }
    }
}

fn print_upload(s: &UploadStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("  upload:   {}", s.upload_id);
    println!("  client:   {}", s.client_id);
    println!("  state:    {}", s.state);
    println!("  bucket:   {}", s.bucket);
    println!("  key:      {}", opt(&s.key));
    println!(
        "  size:     {}",
        s.size
            .map(|v| format!("{v} bytes"))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  parts:    {}/{}",
        s.parts_done,
        s.parts_total
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    );
    println!("  etag:     {}", opt(&s.etag));
    println!("  sha256:   {}", opt(&s.sha256));
    println!("  crc64:    {}", opt(&s.checksum_crc64nvme));
    if let Some(rate) = s.rate_bytes_per_sec {
        println!("  rate:     {:.1} MiB/s", rate as f64 / (1024.0 * 1024.0));
    }
    if let Some(eta) = s.eta_secs {
        println!("  eta:      {eta}s");
    }
    if s.stalled {
        let who = if s.agent_connected {
            "no progress"
        } else {
            "agent away"
        };
        println!("  stalled:  {who} for {}s", s.idle_secs.unwrap_or(0));
    }
    if s.resumes > 0 {
        println!("  resumed:  {} times", s.resumes);
    }
    let p = s.phases;
    if p != PhaseTimes::default() {
        println!(
            "  phases:   describe {} ms, presign {} ms, transfer {} ms (complete {} ms), verify {} ms",
            p.describe_ms, p.presign_ms, p.transfer_ms, p.complete_ms, p.verify_ms
        );
    }
    if let Some(e) = &s.error {
        println!("  error:    {}: {}", e.code, e.message);
    }
    println!("  by:       {} from {}", s.requested_by, s.requested_from);
    Ok(())
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let token = cli
            .api_token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .ok_or_else(|| anyhow!("no operator token: set API_TOKEN or pass --api-token (mint one with `cli token issue --operator`)"))?;
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = &cli.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading CA_FILE {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing CA_FILE {}", path.display()))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: http.build()?,
            base: cli.server_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        decode(resp).await
    }

    async fn post<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(reqwest::Method::POST, path).await
    }

    async fn delete<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(reqwest::Method::DELETE, path).await
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<T> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        decode(resp).await
    }
}

/// An API error, printed as `CODE: message`.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message} (HTTP {status})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the server's answer")?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .context("the server's answer is not what this cli expects");
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(ApiFailure {
            status: status.as_u16(),
            code: body.error.code.to_string(),
            message: body.error.message,
        }
        .into()),
        Err(_) => Err(anyhow!("server answered HTTP {status}")),
    }
}
