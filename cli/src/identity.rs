//! `key generate`: an age X25519 identity for encrypted shares, made and kept on the operator's
//! side. The identity file never leaves this machine; its recipient (`age1...`) goes into the
//! agents' configuration (`ENCRYPT_TO`, or a share's `encrypt_to=`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use shared::sealed::Identities;

use crate::Cli;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new identity file (mode 0600; an existing file is never overwritten) and print
    /// its recipient on stdout.
    Generate {
        /// The identity file to create.
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn key(cli: &Cli, command: &KeyCommand) -> anyhow::Result<bool> {
    let KeyCommand::Generate { output } = command;
    let (identity, recipient) = Identities::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("creating the identity file {}", output.display()))?;
    write!(
        file,
        "# Backhaul identity: opens the shares encrypted to its recipient. Keep it secret.\n# recipient: {recipient}\n{identity}\n"
    )
    .and_then(|()| file.sync_all())
    .with_context(|| format!("writing {}", output.display()))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({ "identity_file": output, "recipient": recipient.as_str() })
        );
    } else {
        println!("{recipient}");
    }
    Ok(true)
}
