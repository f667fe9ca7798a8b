//! `cli`, the operator's command line. It talks to the server only over its public HTTP API and
//! holds no secret but the caller's token.

pub mod admin;
pub mod api;
pub mod collect;
mod decode;
pub mod fetch;
pub mod identity;
pub mod report;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shared::UploadId;
use shared::api::{ClientInfo, ClientStatus, TriggerResponse, UploadState, UploadStatus};
use shared::auth::Secret;
use shared::encoding::{Compression, Encoding};

use crate::api::{Api, path_segment};
use crate::fetch::{Fetched, Output};
use crate::report::{print_outcome, print_upload};

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

    /// Operator token (admin for `token` and `keys`).
    #[arg(long, global = true, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// Extra PEM root certificate(s) to trust for an https:// server.
    #[arg(long, global = true, env = "CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Age identity file (`cli key generate`) that opens encrypted shares when they are fetched
    /// (`fetch`, `download -o`, `collect --output-dir`).
    #[arg(long, global = true, env = "IDENTITY_FILE")]
    pub identity: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a store's agent for its file and wait until the object is verified in S3; with
    /// `--output`, fetch it too and check its SHA-256.
    Download {
        #[arg(long)]
        client_id: String,
        /// Name of the agent's shared file (its SHARED_FILES entry); `default` is its FILE_PATH.
        #[arg(long, default_value = "default")]
        file: String,
        /// Once verified, fetch the file here (`-` for stdout) and check its bytes.
        #[arg(short, long, conflicts_with = "no_wait")]
        output: Option<Output>,
        /// `auto` (the share decides; by default the agent compresses a file that shrinks),
        /// `zstd` or `none`.
        #[arg(long, default_value = "auto")]
        encoding: Compression,
        /// With `-o`: write a compressed or encrypted file as stored instead of decoding it.
        #[arg(long, requires = "output")]
        raw: bool,
        /// Print the upload id and return at once.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the upload itself goes on).
        #[arg(long, env = "WAIT_TIMEOUT_SECS", default_value_t = 3600)]
        wait_timeout_secs: u64,
    },
    /// Fetch a completed upload's file from storage and check its SHA-256 (and CRC64NVME).
    /// A file appears under its name only once its bytes check out.
    Fetch {
        upload_id: String,
        /// Where to write it; `-` for stdout.
        #[arg(short, long)]
        output: Output,
        /// Write a compressed or encrypted file as stored instead of decoding it.
        #[arg(long)]
        raw: bool,
    },
    /// Age identities for encrypted shares: `key generate` writes one and prints its recipient,
    /// for the agents' `ENCRYPT_TO` or a share's `encrypt_to=`.
    Key {
        #[command(subcommand)]
        command: identity::KeyCommand,
    },
    /// Cancel an unfinished upload: the agent stops and the multipart upload is aborted.
    Cancel { upload_id: String },
    /// List connected agents; with `--all`, every store the server has seen.
    Clients {
        /// Stores that are offline now too.
        #[arg(long)]
        all: bool,
        /// Only stores with this label (`key=value`); repeat for several, all of which must hold.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<shared::labels::Label>,
    },
    /// Show one agent's connection and latest upload, or one upload.
    Status(StatusArgs),
    /// Ask many stores for a file at once: a collection. Stores offline now are asked when
    /// they connect, until the expiry.
    Collect(collect::CollectArgs),
    /// List collections, the newest first.
    Collections,
    /// Show a collection and its stores, cancel it, or print its manifest.
    Collection(collect::CollectionArgs),
    /// Collections on a schedule: create, list and delete.
    Schedule {
        #[command(subcommand)]
        command: collect::ScheduleCommand,
    },
    /// Mint, list and revoke tokens (admin).
    Token {
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// The keys the server signs tokens with (admin).
    Keys {
        #[command(subcommand)]
        command: admin::KeysCommand,
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

/// Runs a parsed command. `Ok(false)` means the command ran but what it reports failed (an upload
/// that ended `failed`), which the binary turns into a non-zero exit.
pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Command::Token { command } => admin::token(&cli, command).await,
        Command::Keys { command } => admin::keys(&cli, command).await,
        Command::Key { command } => identity::key(&cli, command),
        Command::Download {
            client_id,
            file,
            output,
            encoding,
            raw,
            no_wait,
            wait_timeout_secs,
        } => {
            let wait = (!*no_wait).then(|| Duration::from_secs(*wait_timeout_secs));
            let asked = Asked {
                client_id,
                file,
                encoding: *encoding,
            };
            download(&cli, &asked, wait, output.as_ref(), *raw).await
        }
        Command::Fetch {
            upload_id,
            output,
            raw,
        } => {
            let upload_id = UploadId::parse(upload_id).context("not an upload id")?;
            let api = Api::new(&cli)?;
            let how = fetch::Decode::new(*raw, cli.identity.as_deref());
            let fetched = fetch::fetch(&api, upload_id, output, &how, cli.json).await?;
            report_fetch(&fetched, output, cli.json)?;
            Ok(true)
        }
        Command::Cancel { upload_id } => cancel(&cli, upload_id).await,
        Command::Collect(args) => collect::collect(&cli, args).await,
        Command::Collections => collect::list(&cli).await,
        Command::Collection(args) => collect::collection(&cli, args).await,
        Command::Schedule { command } => collect::schedule(&cli, command).await,
        Command::Clients { all, labels } => clients(&cli, *all, labels).await,
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

/// What `download` asks for: which store's which share, compressed how.
struct Asked<'a> {
    client_id: &'a str,
    file: &'a str,
    encoding: Compression,
}

/// `download`: triggers, then (unless `wait` is `None`) follows the upload until it ends or
/// `wait` passes, and fetches the file into `output` (decoded unless `raw`).
async fn download(
    cli: &Cli,
    asked: &Asked<'_>,
    wait: Option<Duration>,
    output: Option<&Output>,
    raw: bool,
) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let trigger: TriggerResponse = api
        .post(&format!(
            "/trigger-download/{}?file={}&encoding={}",
            path_segment(asked.client_id),
            path_segment(asked.file),
            asked.encoding
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
    let (UploadState::Completed, Some(output)) = (status.state, output) else {
        // With `-o -`, stdout would have carried the file: the report goes to stderr.
        print_outcome(&mut report_stream(output), &status, cli.json)?;
        return Ok(status.state == UploadState::Completed);
    };
    let how = fetch::Decode::new(raw, cli.identity.as_deref());
    let fetched = fetch::fetch(&api, status.upload_id, output, &how, cli.json).await?;
    let mut out = report_stream(Some(output));
    if cli.json {
        let both = serde_json::json!({ "upload": status, "fetch": fetched });
        writeln!(out, "{}", serde_json::to_string_pretty(&both)?)?;
    } else {
        print_outcome(&mut out, &status, false)?;
        report_fetch(&fetched, output, false)?;
    }
    Ok(true)
}

/// Where a command's report goes: stdout, unless stdout carries the fetched file.
fn report_stream(output: Option<&Output>) -> Box<dyn Write> {
    match output {
        Some(o) if o.is_stdout() => Box::new(std::io::stderr()),
        _ => Box::new(std::io::stdout()),
    }
}

/// What a fetch checked: JSON or a line, on stdout unless the file went there.
fn report_fetch(fetched: &Fetched, output: &Output, json: bool) -> anyhow::Result<()> {
    let mut out = report_stream(Some(output));
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(fetched)?)?;
        return Ok(());
    }
    let place = fetched
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdout".into());
    let how = match (fetched.encoding, fetched.raw) {
        (Encoding::None, _) => String::new(),
        (encoding, true) => format!(" ({encoding}, kept as stored)"),
        (encoding, false) => format!(" (decoded from {} {encoding} bytes)", fetched.stored_size),
    };
    writeln!(
        out,
        "fetched {} bytes to {place}{how}; {} match the upload (sha256 {})",
        fetched.size,
        fetched.checked.join(" and "),
        fetched.sha256
    )?;
    Ok(())
}

/// `cancel`.
async fn cancel(cli: &Cli, upload_id: &str) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let status: UploadStatus = api
        .delete(&format!("/uploads/{}", path_segment(upload_id)))
        .await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else if status.state == UploadState::Cancelled {
        println!("upload {} cancelled", status.upload_id);
    } else {
        println!(
            "upload {} is being cancelled: storage is still being cleaned up (follow it with `cli status --upload-id {}`)",
            status.upload_id, status.upload_id
        );
    }
    Ok(true)
}

/// `clients`: the connected agents (or every store seen), as a table.
async fn clients(cli: &Cli, all: bool, labels: &[shared::labels::Label]) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let label = labels
        .iter()
        .map(|l| format!("{}={}", l.key, l.value))
        .collect::<Vec<_>>()
        .join(",");
    let clients: Vec<ClientInfo> = api
        .get(&format!(
            "/clients?all={all}&label={}",
            path_segment(&label)
        ))
        .await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&clients)?);
    } else if clients.is_empty() {
        println!(
            "{}",
            if all {
                "no stores"
            } else {
                "no agents connected"
            }
        );
    } else {
        println!(
            "{:<24} {:<26} {:<26} {:<6} {:<26} {:<37} LABELS",
            "CLIENT", "CONNECTED SINCE", "LAST SEEN", "PROTO", "TOKEN EXPIRES", "ACTIVE UPLOAD"
        );
        for c in clients {
            let active = c
                .active_upload
                .map(|u| u.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<24} {:<26} {:<26} {:<6} {:<26} {active:<37} {}",
                c.client_id,
                c.connected_since.as_deref().unwrap_or("offline"),
                c.last_seen,
                c.protocol_version,
                c.token_expires_at.as_deref().unwrap_or("-"),
                c.labels
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
    print_upload(&mut std::io::stdout(), &status, cli.json)?;
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
    if let Some(expires) = &status.token_expires_at {
        println!("token expires:   {expires}");
    }
    match &status.last_upload {
        Some(u) => {
            println!("last upload:");
            print_upload(&mut std::io::stdout(), u, false)?;
        }
        None => println!("last upload:     none"),
    }
    Ok(true)
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
        // Progress counts bytes on the wire: the stored (compressed) size.
        if let Some(size) = status.stored_size.or(status.size) {
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
                "{label}: {}/{} bytes, {} parts done ({} copied), {} B/s, ETA {}s, idle {}s, resumed {} times",
                status.bytes_done,
                status
                    .stored_size
                    .or(status.size)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into()),
                status.parts_done,
                status.parts_copied,
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
