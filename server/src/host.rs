//! Commands run on the server host itself, beside the key file: `server token issue` mints the
//! first admin token (after that, admins mint tokens through the API, with no secret at hand).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shared::auth::Role;

use crate::config::{Config, DEFAULT_DATABASE_FILE, DEFAULT_TOKEN_KEY_FILE, StateKind};
use crate::db::Location;
use crate::tokens::Tokens;

/// The ledger's `issued_by` of a token minted on the server host.
pub const HOST_ISSUER: &str = "server-host";

/// Backhaul control plane: with no command it serves; `server token issue` mints a token on the
/// server host.
#[derive(Debug, Parser)]
#[command(
    name = "server",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct ServerCli {
    #[command(subcommand)]
    pub command: Option<HostCommand>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Tokens signed with the server's own key, on the server host.
    Token {
        #[command(subcommand)]
        command: HostTokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostTokenCommand {
    /// Print a new token on stdout (for the first admin; then use `cli token issue`).
    Issue(HostIssueArgs),
}

#[derive(Debug, Args)]
pub struct HostIssueArgs {
    /// An agent token for this client id.
    #[arg(
        long,
        conflicts_with = "operator",
        required_unless_present = "operator"
    )]
    pub client_id: Option<String>,
    /// An operator token.
    #[arg(long)]
    pub operator: bool,
    /// An admin token: an operator who also mints and revokes tokens and rotates keys.
    #[arg(long, requires = "operator")]
    pub admin: bool,
    /// The operator's name, recorded as who did what.
    #[arg(long, default_value = "admin")]
    pub name: String,
    /// Lifetime in seconds (default 30 days for agents, 12 hours for operators).
    #[arg(long)]
    pub ttl_secs: Option<u64>,
    /// The server's data directory (as for `server`).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The key file (as for `server`); defaults to `token-keys.json` in DATA_DIR.
    #[arg(long, env = "TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Where the server keeps its state (as for `server`): `sqlite` or `postgres`.
    #[arg(long = "state", env = "STATE", value_enum, default_value = "sqlite")]
    pub state: StateKind,
    /// The SQLite database (as for `server`); defaults to `backhaul.db` in DATA_DIR.
    #[arg(long, env = "DATABASE_PATH")]
    pub database_path: Option<PathBuf>,
    /// The PostgreSQL URL (as for `server`, with STATE=postgres).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<shared::auth::Secret>,
}

/// Runs a host command; returns what it prints on stdout.
pub fn run(command: &HostCommand) -> anyhow::Result<String> {
    match command {
        HostCommand::Token {
            command: HostTokenCommand::Issue(args),
        } => issue(args),
    }
}

fn issue(args: &HostIssueArgs) -> anyhow::Result<String> {
    let key_file = args
        .token_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join(DEFAULT_TOKEN_KEY_FILE));
    let database = match (args.state, &args.database_url) {
        (StateKind::Sqlite, _) => Location::Sqlite(
            args.database_path
                .clone()
                .unwrap_or_else(|| args.data_dir.join(DEFAULT_DATABASE_FILE)),
        ),
        (StateKind::Postgres, Some(url)) => Location::Postgres(url.clone()),
        (StateKind::Postgres, None) => anyhow::bail!("STATE=postgres needs DATABASE_URL"),
    };
    let tokens = Tokens::open(&key_file, &database, None)?;
    let (subject, role, default_ttl) = match &args.client_id {
        Some(id) => (id.as_str(), Role::Agent, 30 * 24 * 3600),
        None if args.admin => (args.name.as_str(), Role::Admin, 12 * 3600),
        None => (args.name.as_str(), Role::Operator, 12 * 3600),
    };
    let ttl = Duration::from_secs(args.ttl_secs.unwrap_or(default_ttl));
    let minted = tokens
        .mint(subject, role, ttl, HOST_ISSUER)
        .context("minting the token")?;
    tracing::info!(
        audit = true,
        jti = minted.entry.jti,
        subject,
        %role,
        "token issued on the server host"
    );
    Ok(minted.token)
}
