//! `token ...` and `keys ...`: the admin API. Tokens are signed by the server with its own key;
//! the cli holds no secret, only the caller's admin token.

use anyhow::Context;
use clap::{Args, Subcommand};
use shared::api::RevocationResponse;
use shared::api::tokens::{IssueTokenRequest, IssuedToken, SigningKeyInfo, TokenInfo};
use shared::auth::Role;

use crate::Cli;
use crate::api::{Api, path_segment};
use crate::report::printable;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Ask the server for a new token (needs an admin token) and print it on stdout.
    Issue(IssueArgs),
    /// List the tokens the server signed (never the tokens themselves).
    List {
        #[arg(long)]
        role: Option<Role>,
        #[arg(long)]
        subject: Option<String>,
        /// Include expired and revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Refuse one token by its id (any role), or every agent token of a client issued until
    /// now; a connected agent holding it is disconnected.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// An agent token for this client id.
    #[arg(
        long,
        conflicts_with = "operator",
        required_unless_present = "operator"
    )]
    client_id: Option<String>,
    /// An operator token.
    #[arg(long)]
    operator: bool,
    /// An admin token (an operator who also manages tokens and keys).
    #[arg(long, requires = "operator")]
    admin: bool,
    /// Subject of an operator token, recorded as who triggered what.
    #[arg(long, default_value = "operator")]
    name: String,
    /// Lifetime in seconds (default: the server's agent token lifetime, 12 hours for operators).
    #[arg(long)]
    ttl_secs: Option<u64>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeArgs {
    /// Every agent token of this client issued until now.
    #[arg(long)]
    client_id: Option<String>,
    /// The token with this id (`jti`, from `token list`).
    #[arg(long)]
    id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// The signing keys and what still depends on each.
    List,
    /// Sign with a new key from now on; the old ones still verify, and connected agents are
    /// moved to the new key by renewal.
    Rotate,
    /// Stop accepting tokens signed by a key (refused while tokens it signed are valid).
    Retire {
        kid: String,
        /// Retire it even though tokens it signed are still valid: they stop working.
        #[arg(long)]
        force: bool,
    },
}

pub async fn token(cli: &Cli, command: &TokenCommand) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    match command {
        TokenCommand::Issue(args) => issue(&api, cli.json, args).await,
        TokenCommand::List { role, subject, all } => {
            let mut query = vec![format!("all={all}")];
            if let Some(role) = role {
                query.push(format!("role={role}"));
            }
            if let Some(subject) = subject {
                query.push(format!("subject={}", path_segment(subject)));
            }
            let tokens: Vec<TokenInfo> = api.get(&format!("/tokens?{}", query.join("&"))).await?;
            print_tokens(&tokens, cli.json)
        }
        TokenCommand::Revoke(RevokeArgs {
            id: Some(jti),
            client_id: _,
        }) => {
            let info: TokenInfo = api
                .delete(&format!("/tokens/{}", path_segment(jti)))
                .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "revoked token {} ({} {})",
                    info.jti,
                    info.role,
                    printable(&info.subject)
                );
            }
            Ok(true)
        }
        TokenCommand::Revoke(RevokeArgs {
            client_id: Some(client_id),
            id: None,
        }) => revoke_client(&api, cli.json, client_id).await,
        // clap's group makes exactly one of them present.
        TokenCommand::Revoke(_) => anyhow::bail!("give --client-id or --id"),
    }
}

async fn issue(api: &Api, json: bool, args: &IssueArgs) -> anyhow::Result<bool> {
    let (role, subject) = match &args.client_id {
        Some(id) => (Role::Agent, id.clone()),
        None if args.admin => (Role::Admin, args.name.clone()),
        None => (Role::Operator, args.name.clone()),
    };
    let issued: IssuedToken = api
        .post_json(
            "/tokens",
            &IssueTokenRequest {
                role,
                subject,
                ttl_secs: args.ttl_secs,
            },
        )
        .await
        .context("the server did not issue the token")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&issued)?);
    } else {
        println!("{}", issued.token);
    }
    Ok(true)
}

fn print_tokens(tokens: &[TokenInfo], json: bool) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(tokens)?);
        return Ok(true);
    }
    if tokens.is_empty() {
        println!("no tokens");
        return Ok(true);
    }
    println!(
        "{:<36} {:<8} {:<24} {:<16} {:<16} {:<24} REVOKED",
        "ID", "ROLE", "SUBJECT", "ISSUED BY", "KEY", "EXPIRES"
    );
    for t in tokens {
        println!(
            "{:<36} {:<8} {:<24} {:<16} {:<16} {:<24} {}",
            t.jti,
            t.role,
            printable(&t.subject),
            printable(&t.issued_by),
            t.kid,
            t.expires_at,
            t.revoked_at.as_deref().unwrap_or("-")
        );
    }
    Ok(true)
}

/// `token revoke --client-id`.
async fn revoke_client(api: &Api, json: bool, client_id: &str) -> anyhow::Result<bool> {
    let resp: RevocationResponse = api
        .post(&format!("/revocations/{}", path_segment(client_id)))
        .await?;
    if json {
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

pub async fn keys(cli: &Cli, command: &KeysCommand) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let keys: Vec<SigningKeyInfo> = match command {
        KeysCommand::List => api.get("/keys").await?,
        KeysCommand::Rotate => api.post("/keys/rotate").await?,
        KeysCommand::Retire { kid, force } => {
            api.delete(&format!("/keys/{}?force={force}", path_segment(kid)))
                .await?
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(true);
    }
    println!(
        "{:<16} {:<7} {:<6} {:<24} {:<12} {:<24} AGENTS",
        "KEY", "ALG", "ACTIVE", "CREATED", "VALID TOKENS", "LAST EXPIRY"
    );
    for k in keys {
        println!(
            "{:<16} {:<7} {:<6} {:<24} {:<12} {:<24} {}",
            k.kid,
            k.algorithm,
            if k.active { "yes" } else { "" },
            k.created_at,
            k.tokens_outstanding,
            k.last_expiry.as_deref().unwrap_or("-"),
            k.agents_connected
        );
    }
    Ok(true)
}
