//! `cli collect`, `cli collections` and `cli collection`: one file from many stores.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use shared::api::collections::{
    CollectionList, CollectionPreview, CollectionRow, CollectionRows, CollectionState,
    CollectionSummary, CollectionTemplate, CreateCollection, CreateSchedule, Manifest, RowState,
    ScheduleInfo, ScheduleList, Target,
};
use shared::encoding::Compression;
use shared::labels::Label;
use shared::{ClientId, CollectionId};

use crate::Cli;
use crate::api::{Api, path_segment};
use crate::fetch::{self, Output};

/// How often `collect --wait` reads the summary.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Files `--output-dir` fetches at once.
const PARALLEL_FETCHES: usize = 4;

/// What a collection asks of whom: `collect`, and the template of `schedule create`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// Every store.
    #[arg(long, conflicts_with_all = ["client_ids", "labels"])]
    all: bool,
    /// A store id, or a glob over ids such as `restaurant-*`; repeat for several ids.
    #[arg(long = "client-id", value_name = "ID_OR_GLOB")]
    client_ids: Vec<String>,
    /// Stores with this label (`key=value`); repeat for several, all of which must hold.
    #[arg(
        long = "label",
        value_name = "KEY=VALUE",
        conflicts_with = "client_ids"
    )]
    labels: Vec<Label>,
    /// Name of the agents' shared file.
    #[arg(long, default_value = "default")]
    file: String,
    /// Stores not reached within this many seconds are reported `not_reached` (default 24 h).
    #[arg(long)]
    expires_in_secs: Option<u64>,
    /// How many stores upload at once (default 50).
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// `auto` (each store's share decides; by default a file that shrinks is compressed),
    /// `zstd` or `none`.
    #[arg(long, default_value = "auto")]
    encoding: Compression,
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    #[command(flatten)]
    template: TemplateArgs,
    /// Follow it until nothing is left to run, or the expiry; the exit code says whether every
    /// store reached completed.
    #[arg(long)]
    wait: bool,
    /// Fetch every completed file to DIR/<client_id>/<file> as stores finish, checking each
    /// SHA-256 (implies --wait).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Only say how many stores would be asked (connected now, and offline); create nothing.
    #[arg(long, conflicts_with_all = ["wait", "output_dir"])]
    dry_run: bool,
}

impl TemplateArgs {
    fn template(&self) -> anyhow::Result<CollectionTemplate> {
        Ok(CollectionTemplate {
            target: self.target()?,
            file: Some(self.file.clone()),
            expires_in_secs: self.expires_in_secs,
            max_concurrent: self.max_concurrent,
            encoding: Some(self.encoding),
        })
    }

    fn target(&self) -> anyhow::Result<Target> {
        let globby = |s: &str| s.contains(['*', '?', '[']);
        Ok(match (&self.client_ids[..], &self.labels[..]) {
            ([], []) if self.all => Target::All,
            ([], []) => bail!("say which stores: --all, --client-id or --label"),
            ([one], []) if globby(one) => Target::Glob {
                pattern: one.clone(),
            },
            (ids, []) => {
                if ids.iter().any(|i| globby(i)) {
                    bail!("give one glob, or ids without glob characters");
                }
                Target::Ids {
                    client_ids: ids
                        .iter()
                        .map(|i| ClientId::parse(i).with_context(|| format!("client id {i:?}")))
                        .collect::<anyhow::Result<_>>()?,
                }
            }
            ([], labels) => Target::Labels {
                labels: labels
                    .iter()
                    .map(|l| format!("{}={}", l.key, l.value))
                    .collect(),
            },
            _ => bail!("give --client-id or --label, not both"),
        })
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CollectionArgs {
    /// The collection to show: its summary and every store's row.
    id: Option<String>,
    /// Only the stores in this state (pending_offline, queued, running, completed, failed,
    /// cancelled, not_reached).
    #[arg(long)]
    state: Option<String>,
    /// Only the stores that failed with this error code.
    #[arg(long)]
    code: Option<String>,
    #[command(subcommand)]
    command: Option<CollectionCommand>,
}

#[derive(Debug, Subcommand)]
pub enum CollectionCommand {
    /// Cancel what is unfinished: stores not asked yet, and uploads running.
    Cancel { id: String },
    /// Every completed store with a presigned GET URL of its file.
    Manifest {
        id: String,
        /// CSV instead of JSON.
        #[arg(long)]
        csv: bool,
    },
}

/// `collect`.
pub async fn collect(cli: &Cli, args: &CollectArgs) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let t = args.template.template()?;
    let req = CreateCollection {
        target: t.target,
        file: t.file,
        expires_at: None,
        expires_in_secs: t.expires_in_secs,
        max_concurrent: t.max_concurrent,
        encoding: t.encoding,
    };
    if args.dry_run {
        let p: CollectionPreview = api.post_json("/collections/preview", &req).await?;
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            println!(
                "{} stores would be asked: {} connected now, {} offline",
                p.matched, p.connected, p.offline
            );
        }
        return Ok(true);
    }
    let created: CollectionSummary = api.post_json("/collections", &req).await?;
    if !args.wait && args.output_dir.is_none() {
        print_summary(&created, cli.json)?;
        return Ok(true);
    }
    let how = fetch::Decode::new(false, cli.identity.as_deref());
    let output = args.output_dir.as_deref().map(|dir| (dir, &how));
    follow(&api, created, output, cli.json).await
}

/// Follows a collection until nothing is left to run or it expires, fetching completed files
/// into `output_dir` as they come.
async fn follow(
    api: &Api,
    created: CollectionSummary,
    output: Option<(&Path, &fetch::Decode)>,
    json: bool,
) -> anyhow::Result<bool> {
    let id = created.collection_id;
    let live = !json && std::io::stderr().is_terminal();
    let bar = if live {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    if !live && !json {
        eprintln!("collection {id}: {} stores matched", created.counts.matched);
    }
    let mut fetched = HashSet::new();
    let mut fetch_failures = Vec::new();
    let mut summary = created;
    loop {
        if let Some((dir, how)) = output {
            let rows = all_rows(api, id).await?;
            let due: Vec<CollectionRow> = rows
                .into_iter()
                .filter(|r| r.state == RowState::Completed && !fetched.contains(&r.client_id))
                .collect();
            let file = summary.file.clone();
            let results: Vec<_> = futures::stream::iter(due)
                .map(|row| {
                    let file = file.clone();
                    async move {
                        let result = fetch_row(api, dir, &row, &file, how).await;
                        (row.client_id, result)
                    }
                })
                .buffer_unordered(PARALLEL_FETCHES)
                .collect()
                .await;
            for (client, result) in results {
                match result {
                    Ok(path) => {
                        bar.suspend(|| {
                            if !json {
                                eprintln!("fetched {client} to {}", path.display())
                            }
                        });
                    }
                    Err(e) => {
                        bar.suspend(|| eprintln!("fetching {client}'s file failed: {e:#}"));
                        fetch_failures.push(client.clone());
                    }
                }
                fetched.insert(client);
            }
        }
        bar.set_message(line(&summary));
        let expired = summary.state != CollectionState::Open;
        // The rows were read after the summary, so every store it counts as completed has
        // been fetched by now.
        if summary.settled || expired {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        summary = api.get(&format!("/collections/{id}")).await?;
    }
    bar.finish_and_clear();
    print_summary(&summary, json)?;
    let c = &summary.counts;
    let ok = c.failed == 0
        && c.cancelled == 0
        && c.running == 0
        && c.queued == 0
        && fetch_failures.is_empty();
    if !json && !ok {
        eprintln!(
            "not every store reached completed: {} failed, {} cancelled, {} still running or queued{}",
            c.failed,
            c.cancelled,
            c.running + c.queued,
            if fetch_failures.is_empty() {
                String::new()
            } else {
                format!(", {} fetches failed", fetch_failures.len())
            }
        );
    }
    Ok(ok)
}

/// Fetches one completed store's file to `dir/<client_id>/<file>`, checking its bytes.
async fn fetch_row(
    api: &Api,
    dir: &Path,
    row: &CollectionRow,
    file: &str,
    how: &fetch::Decode,
) -> anyhow::Result<PathBuf> {
    let upload = row
        .upload_id
        .context("a completed store without an upload")?;
    // Client ids and share names are plain path segments (checked by the server).
    let store_dir = dir.join(row.client_id.as_str());
    tokio::fs::create_dir_all(&store_dir)
        .await
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let path = store_dir.join(file);
    fetch::fetch(api, upload, &Output::File(path.clone()), how, true).await?;
    Ok(path)
}

/// Every row of a collection, page by page.
async fn all_rows(api: &Api, id: CollectionId) -> anyhow::Result<Vec<CollectionRow>> {
    rows_where(api, id, "").await
}

/// The rows of a collection that `filter` (a query string, such as `&state=failed`) keeps,
/// page by page.
async fn rows_where(
    api: &Api,
    id: CollectionId,
    filter: &str,
) -> anyhow::Result<Vec<CollectionRow>> {
    let mut rows = Vec::new();
    let mut after: Option<ClientId> = None;
    loop {
        let path = match &after {
            Some(a) => format!(
                "/collections/{id}/uploads?after={}{filter}",
                path_segment(a.as_str())
            ),
            None => format!("/collections/{id}/uploads?{filter}"),
        };
        let page: CollectionRows = api.get(&path).await?;
        rows.extend(page.rows);
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(rows),
        }
    }
}

/// One line: where the stores stand.
fn line(s: &CollectionSummary) -> String {
    let c = &s.counts;
    format!(
        "{} stores: {} completed, {} running, {} queued, {} offline, {} failed, {} cancelled, {} not reached; {} of {} bytes",
        c.matched,
        c.completed,
        c.running,
        c.queued,
        c.pending_offline,
        c.failed,
        c.cancelled,
        c.not_reached,
        s.bytes_done,
        s.bytes_total
    )
}

fn print_summary(s: &CollectionSummary, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(s)?)?;
        return Ok(());
    }
    writeln!(out, "collection {} ({})", s.collection_id, s.state)?;
    writeln!(
        out,
        "  target {}, file {} (encoding {}), at most {} at once, expires {}",
        s.target, s.file, s.encoding, s.max_concurrent, s.expires_at
    )?;
    writeln!(out, "  {}", line(s))?;
    for (code, n) in &s.failed_by_code {
        writeln!(out, "  failed with {code}: {n}")?;
    }
    Ok(())
}

/// `collections`: the newest first.
pub async fn list(cli: &Cli) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let list: CollectionList = api.get("/collections").await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(true);
    }
    if list.collections.is_empty() {
        println!("no collections");
    }
    for s in &list.collections {
        let c = &s.counts;
        println!(
            "{}  {:<9} {:<24} {:<16} {}/{} completed  created {}",
            s.collection_id,
            s.state,
            s.target.to_string(),
            s.file,
            c.completed,
            c.matched,
            s.created_at
        );
    }
    Ok(true)
}

/// `collection <id>`, `collection cancel <id>`, `collection manifest <id>`.
pub async fn collection(cli: &Cli, args: &CollectionArgs) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    match (&args.command, &args.id) {
        (Some(CollectionCommand::Cancel { id }), _) => {
            let s: CollectionSummary = api
                .delete(&format!("/collections/{}", path_segment(id)))
                .await?;
            print_summary(&s, cli.json)?;
            Ok(true)
        }
        (Some(CollectionCommand::Manifest { id, csv }), _) => {
            let path = format!("/collections/{}/manifest", path_segment(id));
            if *csv {
                print!("{}", api.get_text(&path, "text/csv").await?);
            } else {
                let m: Manifest = api.get(&path).await?;
                println!("{}", serde_json::to_string_pretty(&m)?);
            }
            Ok(true)
        }
        (None, Some(id)) => {
            let s: CollectionSummary = api
                .get(&format!("/collections/{}", path_segment(id)))
                .await?;
            let mut filter = String::new();
            if let Some(state) = &args.state {
                filter.push_str(&format!("&state={}", path_segment(state)));
            }
            if let Some(code) = &args.code {
                filter.push_str(&format!("&code={}", path_segment(code)));
            }
            let rows = rows_where(&api, s.collection_id, &filter).await?;
            if cli.json {
                let both = serde_json::json!({ "summary": s, "rows": rows });
                println!("{}", serde_json::to_string_pretty(&both)?);
                return Ok(true);
            }
            print_summary(&s, false)?;
            for r in &rows {
                let detail = match (&r.error, r.size) {
                    (Some(e), _) => format!("{}: {}", e.code, e.message),
                    (None, Some(size)) => format!("{} of {size} bytes", r.bytes_done),
                    (None, None) => String::new(),
                };
                println!(
                    "  {:<24} {:<15} {detail}",
                    r.client_id.as_str(),
                    r.state.as_str()
                );
            }
            Ok(true)
        }
        (None, None) => bail!("give a collection id, or `cancel <id>` or `manifest <id>`"),
    }
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// A schedule: each time the cron pattern fires, in the time zone, a collection starts.
    Create {
        /// Five fields (minute hour day-of-month month weekday), or six with seconds first;
        /// `@daily` and the other nicknames.
        #[arg(long)]
        cron: String,
        /// The IANA time zone the pattern is read in, such as `Europe/Berlin`.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[command(flatten)]
        template: TemplateArgs,
    },
    /// Every schedule, with its next firing.
    List,
    /// No more firings; the collections it created go on.
    Delete { id: String },
}

/// `schedule create|list|delete`.
pub async fn schedule(cli: &Cli, command: &ScheduleCommand) -> anyhow::Result<bool> {
    let api = Api::new(cli)?;
    let print = |s: &ScheduleInfo| {
        println!(
            "{}  {:<16} {:<16} {:<24} {:<12} next {}",
            s.schedule_id,
            s.cron,
            s.time_zone,
            s.template.target.to_string(),
            s.template.file.as_deref().unwrap_or("default"),
            s.next_fire_at.as_deref().unwrap_or("never"),
        )
    };
    match command {
        ScheduleCommand::Create {
            cron,
            time_zone,
            template,
        } => {
            let req = CreateSchedule {
                cron: cron.clone(),
                time_zone: Some(time_zone.clone()),
                template: template.template()?,
            };
            let s: ScheduleInfo = api.post_json("/schedules", &req).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print(&s);
            }
        }
        ScheduleCommand::List => {
            let list: ScheduleList = api.get("/schedules").await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.schedules.is_empty() {
                println!("no schedules");
            } else {
                list.schedules.iter().for_each(print);
            }
        }
        ScheduleCommand::Delete { id } => {
            let s: ScheduleInfo = api
                .delete(&format!("/schedules/{}", path_segment(id)))
                .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("schedule {} deleted", s.schedule_id);
            }
        }
    }
    Ok(true)
}
