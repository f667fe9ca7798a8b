//! Fleet load generator: holds many simulated agents on one Backhaul server or on several
//! replicas, with real WebSockets and real agent JWTs, spread over several 127.x source
//! addresses, and measures:
//!
//! - server memory per idle agent (the servers' RSS before and after, from /proc, summed);
//! - trigger-to-command latency: from `POST /trigger-download` sent to `describe_file` received
//!   by the simulated agent, one trigger at a time; with several replicas, each trigger goes to
//!   a replica other than the one holding the agent;
//! - a burst of concurrent triggers to distinct agents: time until every command arrived;
//! - a reconnect storm: every agent drops at once and comes back after a jittered delay, as real
//!   agents do; time until all are connected again, and how many attempts failed, and why.
//!
//! A fleet too big for one process (the open-file limit is per process) is held by several:
//! each takes a range of agent numbers (`--first-agent`, `--agents`); all but one only hold
//! theirs (`--hold`) and drop them on SIGUSR1; the measuring one counts the whole fleet
//! (`--fleet`) through the replicas' `/metrics`, and signals the others (`--peer-pid`) for the
//! storm. `--group name=pid` reports the CPU and memory of an engine (PostgreSQL, NATS) per phase.
//!
//! A simulated agent answers `describe_file` with `upload_failed` (FILE_NOT_FOUND), so the server
//! frees it for the next trigger and no storage is involved.
//!
//! With `--collect 50,200` it measures collections instead: every simulated agent really uploads
//! a file of `--file-bytes` (one part, through its presigned URL and completion, speaking
//! protocol 2), and one collection over the whole fleet runs per `max_concurrent` given. It
//! reports the time until every store is verified, and the server's CPU seconds and peak RSS
//! over the collection.

mod agent;
mod collect;
mod procs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rand::Rng;
use shared::auth::{Role, TokenKeys};
use tokio::sync::{Semaphore, mpsc, watch};

use agent::{Event, StoreFile, client_id, holder};
use collect::{Collected, collect, list_stores};
use procs::{Group, Sample, rss_kib};

#[derive(Debug, Parser)]
struct Args {
    /// The servers' HTTP addresses, such as 127.0.0.1:8080; agent number i connects to the
    /// (i mod N)th.
    #[arg(long, value_delimiter = ',', required = true)]
    server: Vec<SocketAddr>,
    /// The servers' JWT_SECRET, to mint agent and operator tokens.
    #[arg(long, env = "JWT_SECRET")]
    jwt_secret: String,
    /// Process ids of the servers, to read their RSS and CPU time.
    #[arg(long, value_delimiter = ',', required = true)]
    server_pid: Vec<u32>,
    /// The servers' summed RSS before any agent connected, when other load generators may have
    /// connected theirs before this one starts; read at start when not given.
    #[arg(long)]
    baseline_rss_kib: Option<u64>,
    /// Agents this process holds.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// The number of this process's first agent.
    #[arg(long, default_value_t = 0)]
    first_agent: usize,
    /// Agents across every load generator; the measuring one waits for them all.
    #[arg(long)]
    fleet: Option<usize>,
    /// Only connect and hold the agents; drop them all on SIGUSR1 (a storm), until killed.
    #[arg(long)]
    hold: bool,
    /// Load generators that `--hold`: each gets SIGUSR1 when the storm starts.
    #[arg(long, value_delimiter = ',')]
    peer_pid: Vec<u32>,
    /// A group of processes to report per phase, as name=pid[,pid]: the CPU and memory of each
    /// pid and of the processes it forked.
    #[arg(long = "group", value_parser = Group::parse)]
    groups: Vec<Group>,
    /// Connections opened at the same time while the fleet comes up.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Agents per source address (127.B.0.2, 127.B.0.3, ...); each address has about 28,000
    /// ephemeral ports per server. 0: no binding, the kernel's choice at connect (one address,
    /// about 28,000 ports per server).
    #[arg(long, default_value_t = 10_000)]
    agents_per_address: usize,
    /// B of the source addresses; drawn at random when not given, so a run never meets the
    /// TIME_WAIT ports of the last. Load generators running together each need their own.
    #[arg(long)]
    address_base: Option<u8>,
    /// Sequential triggers for the latency percentiles.
    #[arg(long, default_value_t = 500)]
    triggers: usize,
    #[arg(long, default_value_t = 1_000)]
    burst: usize,
    /// Reconnect storms, one after the other (a second one tells a leak from a high-water mark).
    #[arg(long, default_value_t = 1)]
    storms: u32,
    /// Largest reconnect delay in the storm; each agent waits a uniform random time up to it.
    #[arg(long, default_value_t = 10_000)]
    storm_spread_ms: u64,
    /// Run one collection over the fleet per value given (its `max_concurrent`), instead of the
    /// latency, burst and storm phases.
    #[arg(long, value_delimiter = ',')]
    collect: Vec<u32>,
    /// The size of every simulated store's file in a collection.
    #[arg(long, default_value_t = 1 << 20)]
    file_bytes: usize,
    /// Collections per `max_concurrent`, interleaved; the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Time this many requests of each kind to `GET /stores` (the operator page's store list)
    /// over the fleet, instead of the latency, burst and storm phases. The agents declare a
    /// `region` label, one of four.
    #[arg(long, default_value_t = 0)]
    list_stores: usize,
}

struct Shared {
    args: Args,
    keys: TokenKeys,
    events: mpsc::UnboundedSender<Event>,
    connected: AtomicUsize,
    /// Failed connection attempts, by what went wrong.
    failures: Mutex<HashMap<String, u64>>,
    /// Bumped to make every agent drop its connection and reconnect.
    storm: watch::Receiver<u64>,
    /// Second octet of this run's source addresses.
    address_base: u8,
    /// With `--collect`: what a store uploads, and the client it uploads with.
    file: Option<StoreFile>,
    storage: reqwest::Client,
}

impl Shared {
    fn failed(&self, e: &anyhow::Error) {
        let what: String = format!("{e:#}").chars().take(120).collect();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *failures.entry(what).or_default() += 1;
    }

    /// The failures since the last call, the most frequent first.
    fn failures_taken(&self) -> Vec<(String, u64)> {
        let taken = std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        let mut v: Vec<(String, u64)> = taken.into_iter().collect();
        v.sort_by_key(|(_, k)| std::cmp::Reverse(*k));
        v
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Triggers agent `i` through a replica that does not hold it (with one server, through it).
async fn trigger(http: &reqwest::Client, args: &Args, token: &str, i: usize) -> u16 {
    let via = args.server[(holder(args, i) + 1) % args.server.len()];
    let url = format!("http://{via}/trigger-download/{}", client_id(i));
    match http.post(url).bearer_auth(token).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Agents connected to all the servers, from their `/metrics`.
async fn fleet_connected(
    http: &reqwest::Client,
    args: &Args,
    token: &str,
) -> anyhow::Result<usize> {
    let mut total = 0;
    for server in &args.server {
        let text = http
            .get(format!("http://{server}/metrics"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("backhaul_connected_agents "))
            .and_then(|v| v.parse::<f64>().ok())
            .context("no backhaul_connected_agents in /metrics")? as usize;
    }
    Ok(total)
}

/// Prints what each group used between two samples.
fn report(phase: &str, groups: &[Group], before: &[Sample]) -> Vec<Sample> {
    let after: Vec<Sample> = groups.iter().map(Group::sample).collect();
    for ((g, b), a) in groups.iter().zip(before).zip(&after) {
        println!(
            "  {phase}: {} used {:.1} CPU-s; now {} processes, {} threads, PSS {} MiB, RSS {} MiB",
            g.name,
            a.cpu_secs - b.cpu_secs,
            a.processes,
            a.threads,
            a.pss_kib / 1024,
            a.rss_kib / 1024,
        );
    }
    after
}

fn sum_rss_kib(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    if (limit as usize) < args.agents + 1024 {
        bail!(
            "the file-descriptor limit is {limit}, too low for {} agents",
            args.agents
        );
    }
    let keys = TokenKeys::new(args.jwt_secret.as_bytes())?;
    let operator = keys.issue("loadgen", Role::Operator, Duration::from_secs(24 * 3600))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (storm_tx, storm_rx) = watch::channel(0u64);
    let rss_before = match args.baseline_rss_kib {
        Some(kib) => kib,
        None => sum_rss_kib(&args.server_pid)?,
    };
    let n = args.agents;
    let fleet = args.fleet.unwrap_or(n).max(n);
    let file = (!args.collect.is_empty()).then(|| {
        use md5::Digest as _;
        let body: Vec<u8> = (0..args.file_bytes).map(|i| (i * 31 % 251) as u8).collect();
        StoreFile {
            md5_base64: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                md5::Md5::digest(&body),
            ),
            sha256_hex: hex::encode(sha2::Sha256::digest(&body)),
            body: body.into(),
        }
    });
    let address_base = args
        .address_base
        .unwrap_or_else(|| rand::thread_rng().gen_range(1..=254));
    let shared = Arc::new(Shared {
        args,
        keys,
        events: events_tx,
        connected: AtomicUsize::new(0),
        failures: Mutex::default(),
        storm: storm_rx,
        address_base,
        file,
        storage: reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .build()?,
    });
    let args = &shared.args;
    let mut groups = vec![Group {
        name: "replicas".into(),
        roots: args.server_pid.clone(),
    }];
    groups.extend(args.groups.iter().cloned());
    // The load generators share the machine with what they measure.
    groups.push(Group {
        name: "load generators".into(),
        roots: [std::process::id()]
            .into_iter()
            .chain(args.peer_pid.iter().copied())
            .collect(),
    });
    let mut usage: Vec<Sample> = groups.iter().map(Group::sample).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;

    // The fleet comes up.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mine = args.first_agent..args.first_agent + n;
    for i in mine.clone() {
        tokio::spawn(agent::agent(shared.clone(), i, gate.clone()));
    }
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if shared.connected.load(Ordering::Relaxed) == n
            && (args.hold || fleet_connected(&http, args, &operator).await? >= fleet)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!(
                "only {} of {n} agents connected after 900 s",
                shared.connected.load(Ordering::Relaxed)
            );
        }
    }
    let connect_time = started.elapsed();
    if args.hold {
        println!(
            "holding agents {}..{} after {:.1} s",
            mine.start,
            mine.end,
            connect_time.as_secs_f64()
        );
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        while usr1.recv().await.is_some() {
            storm_tx.send_modify(|n| *n += 1);
        }
        return Ok(());
    }
    println!(
        "agents: {fleet} connected to {} servers in {:.1} s ({n} from this process)",
        args.server.len(),
        connect_time.as_secs_f64()
    );
    report("connect", &groups, &usage);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_idle = sum_rss_kib(&args.server_pid)?;
    let per_agent = (rss_idle.saturating_sub(rss_before)) as f64 * 1024.0 / fleet as f64;
    println!(
        "server RSS (summed): {rss_before} KiB before, {rss_idle} KiB with {fleet} idle agents: {per_agent:.0} bytes per agent"
    );

    if !args.collect.is_empty() {
        let mut runs: Vec<Vec<Collected>> = vec![Vec::new(); args.collect.len()];
        for _ in 0..args.rounds.max(1) {
            for (k, &max) in args.collect.iter().enumerate() {
                runs[k].push(collect(&http, args, &operator, n, max).await?);
            }
        }
        for (k, &max) in args.collect.iter().enumerate() {
            let r = &runs[k];
            println!(
                "median of {} collections, max_concurrent {max}: all {n} verified in {:.2} s, server CPU {:.2} s, peak RSS {:.0} KiB",
                r.len(),
                median(r.iter().map(|c| c.secs).collect()),
                median(r.iter().map(|c| c.cpu_secs).collect()),
                median(r.iter().map(|c| c.peak_rss_kib as f64).collect()),
            );
        }
        return Ok(());
    }

    if args.list_stores > 0 {
        return list_stores(&http, args, &operator, n).await;
    }

    // Trigger-to-command latency, one at a time.
    usage = groups.iter().map(Group::sample).collect::<Vec<_>>();
    let mut lat = Vec::with_capacity(args.triggers);
    let mut rng = rand::thread_rng();
    for _ in 0..args.triggers {
        let i = rng.gen_range(mine.clone());
        let t0 = Instant::now();
        let status = trigger(&http, args, &operator, i).await;
        if status != 202 {
            bail!("trigger for agent {i} answered {status}");
        }
        loop {
            let Some(Event::Command { agent, at }) = events.recv().await else {
                bail!("event channel closed");
            };
            if agent == i {
                lat.push(at.duration_since(t0));
                break;
            }
        }
        // Let the agent's failure report free it before it could be picked again.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    lat.sort();
    let across = if args.server.len() > 1 {
        ", each through a replica that does not hold the agent"
    } else {
        ""
    };
    println!(
        "trigger-to-command latency over {} triggers{across}: p50 {} ms, p99 {} ms, max {} ms",
        lat.len(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO))
    );
    usage = report("latency", &groups, &usage);

    // A burst to distinct agents.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let burst = args.burst.min(n);
    let offset = rng.gen_range(0..n);
    let chosen: Vec<usize> = (0..burst).map(|k| mine.start + (offset + k) % n).collect();
    let t0 = Instant::now();
    let sends =
        futures::future::join_all(chosen.iter().map(|&i| trigger(&http, args, &operator, i)));
    let statuses = sends.await;
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let mut got = 0;
    while got < accepted {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some(Event::Command { .. })) => got += 1,
            _ => break,
        }
    }
    let burst_time = t0.elapsed();
    println!(
        "burst: {burst} triggers, {accepted} accepted, {got} commands received within {} ms",
        ms(burst_time)
    );
    usage = report("burst", &groups, &usage);

    // The reconnect storms, over every load generator.
    for storm in 1..=args.storms.max(1) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        shared.failures_taken();
        let t0 = Instant::now();
        for pid in &args.peer_pid {
            let sent = std::process::Command::new("kill")
                .args(["-USR1", &pid.to_string()])
                .status()?;
            if !sent.success() {
                bail!("could not signal load generator {pid}");
            }
        }
        storm_tx.send_modify(|n| *n += 1);
        // Wait for the drop to register, then for everyone to be back.
        while fleet_connected(&http, args, &operator).await? > fleet / 2
            && t0.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut back = 0;
        while t0.elapsed() < Duration::from_secs(300) {
            back = fleet_connected(&http, args, &operator).await?;
            if back >= fleet && shared.connected.load(Ordering::Relaxed) == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let failures = shared.failures_taken();
        println!(
            "reconnect storm {storm}: {back} of {fleet} back in {:.1} s (delays spread over {} ms), {} connection attempts of this process's {n} failed",
            t0.elapsed().as_secs_f64(),
            args.storm_spread_ms,
            failures.iter().map(|(_, k)| k).sum::<u64>()
        );
        for (what, k) in failures.iter().take(5) {
            println!("  {k} failed: {what}");
        }
        usage = report("storm", &groups, &usage);
        println!(
            "server RSS after storm {storm} (summed): {} KiB",
            sum_rss_kib(&args.server_pid)?
        );
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    println!(
        "server RSS 30 s later (summed): {} KiB",
        sum_rss_kib(&args.server_pid)?
    );
    Ok(())
}
