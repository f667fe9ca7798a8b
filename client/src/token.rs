//! The agent's token: where it comes from, and how a renewed one is kept.
//!
//! A store runs for years, and its token must outlive every restart of the agent and of the
//! server. The server sends a fresh token over the WebSocket once the current one is past half
//! its lifetime (protocol 4); the agent writes it to `AGENT_TOKEN_FILE` atomically (a temporary
//! file in the same directory, mode 0600, fsync, rename, fsync of the directory), so a crash or
//! a full disk leaves either the old token or the new one, never a torn file. If the file cannot
//! be written, the agent says so loudly and keeps the new token in memory: it still reconnects
//! until it restarts.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use shared::auth::Secret;

use crate::config::Config;

/// The token this agent connects with. One owner: the reconnect loop.
#[derive(Debug)]
pub struct AgentToken {
    current: Secret,
    file: Option<PathBuf>,
}

impl AgentToken {
    /// The token file's content if the file exists (it holds the newest token), else
    /// `AGENT_TOKEN`.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let from_file = match &config.token_file {
            Some(path) => read_token_file(path)?,
            None => None,
        };
        let current = match (from_file, &config.token) {
            (Some(token), _) => token,
            (None, Some(token)) => token.clone(),
            (None, None) => match &config.token_file {
                Some(path) => bail!(
                    "AGENT_TOKEN_FILE {} does not exist and AGENT_TOKEN is not set: install the store's token there",
                    path.display()
                ),
                None => bail!("no token: set AGENT_TOKEN_FILE (or AGENT_TOKEN)"),
            },
        };
        if config.token_file.is_none() {
            tracing::warn!(
                "AGENT_TOKEN_FILE is not set: renewed tokens are kept in memory only, and the agent will be locked out once AGENT_TOKEN expires"
            );
        }
        Ok(Self {
            current,
            file: config.token_file.clone(),
        })
    }

    pub fn current(&self) -> &Secret {
        &self.current
    }

    /// Keeps a token the server sent: from the next connection on it is the one used.
    pub fn replace(&mut self, token: String, expires_at: u64) {
        self.current = Secret::new(token);
        let Some(path) = &self.file else {
            tracing::info!(expires_at, "token renewed (in memory only)");
            return;
        };
        match write_atomically(path, self.current.expose()) {
            Ok(()) => tracing::info!(expires_at, file = %path.display(), "token renewed"),
            Err(e) => tracing::error!(
                expires_at,
                file = %path.display(),
                error = format!("{e:#}"),
                "TOKEN RENEWED BUT NOT SAVED: the agent keeps it in memory, and a restart will fall back to the old token in the file; fix the file's directory or permissions"
            ),
        }
    }
}

/// `Ok(None)` if the file does not exist.
fn read_token_file(path: &Path) -> anyhow::Result<Option<Secret>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading AGENT_TOKEN_FILE {}", path.display()));
        }
    };
    let token = text.trim();
    if token.is_empty() {
        bail!("AGENT_TOKEN_FILE {} is empty", path.display());
    }
    Ok(Some(Secret::new(token)))
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one.
fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".agent-token.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(contents.as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(token: Option<&str>, file: Option<&Path>) -> Config {
        let mut args = vec!["client".to_owned()];
        if let Some(t) = token {
            args.extend(["--token".to_owned(), t.to_owned()]);
        }
        if let Some(f) = file {
            args.extend(["--token-file".to_owned(), f.display().to_string()]);
        }
        <Config as clap::Parser>::try_parse_from(args).unwrap()
    }

    #[test]
    fn the_file_wins_and_a_renewal_replaces_it_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        // No file yet: the install token from the environment.
        let mut token = AgentToken::load(&config(Some("install"), Some(&path))).unwrap();
        assert_eq!(token.current().expose(), "install");
        token.replace("second".into(), 1);
        assert_eq!(token.current().expose(), "second");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart reads the renewed token, not the stale environment.
        let token = AgentToken::load(&config(Some("install"), Some(&path))).unwrap();
        assert_eq!(token.current().expose(), "second");
        // Nothing but the token file is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn an_unwritable_file_keeps_the_token_in_memory() {
        // Nothing can be created in /proc, not even by root.
        let path = Path::new("/proc/backhaul-test-agent.token");
        let mut token = AgentToken::load(&config(Some("install"), Some(path))).unwrap();
        token.replace("second".into(), 1);
        assert_eq!(token.current().expose(), "second");
        assert!(!path.exists());
    }

    #[test]
    fn no_token_at_all_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.token");
        let err = AgentToken::load(&config(None, Some(&path))).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = AgentToken::load(&config(None, None)).unwrap_err();
        assert!(err.to_string().contains("AGENT_TOKEN_FILE"), "{err}");
        std::fs::write(&path, "  \n").unwrap();
        let err = AgentToken::load(&config(None, Some(&path))).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
