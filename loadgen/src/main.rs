//! Fleet load generator: holds many simulated agents on one Backhaul server, with real
//! WebSockets and real agent JWTs, spread over several 127.0.0.x source addresses, and measures:
//!
//! - server memory per idle agent (the server's RSS before and after, from /proc);
//! - trigger-to-command latency: from `POST /trigger-download` sent to `describe_file` received
//!   by the simulated agent, one trigger at a time;
//! - a burst of concurrent triggers to distinct agents: time until every command arrived;
//! - a reconnect storm: every agent drops at once and comes back after a jittered delay, as real
//!   agents do; time until all are connected again, and how many attempts the server refused.
//!
//! A simulated agent answers `describe_file` with `upload_failed` (FILE_NOT_FOUND), so the server
//! frees it for the next trigger and no storage is involved.
//!
//! With `--collect 50,200` it measures collections instead: every simulated agent really uploads
//! a file of `--file-bytes` (one part, through its presigned URL and completion, speaking
//! protocol 2), and one collection over the whole fleet runs per `max_concurrent` given. It
//! reports the time until every store is verified, and the server's CPU seconds and peak RSS
//! over the collection.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use rand::Rng;
use shared::auth::{Role, TokenKeys};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, Parser)]
struct Args {
    /// The server's HTTP address, such as 127.0.0.1:8080.
    #[arg(long)]
    server: SocketAddr,
    /// The server's JWT_SECRET, to mint agent and operator tokens.
    #[arg(long, env = "JWT_SECRET")]
    jwt_secret: String,
    /// Process id of the server, to read its RSS.
    #[arg(long)]
    server_pid: u32,
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Connections opened at the same time while the fleet comes up.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Agents per source address (127.B.0.2, 127.B.0.3, ...); each address has about 28,000
    /// ephemeral ports. B is drawn per run, so a run never meets the TIME_WAIT ports of the last.
    #[arg(long, default_value_t = 10_000)]
    agents_per_address: usize,
    /// Sequential triggers for the latency percentiles.
    #[arg(long, default_value_t = 500)]
    triggers: usize,
    #[arg(long, default_value_t = 1_000)]
    burst: usize,
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

/// One collection's figures.
#[derive(Debug, Clone, Copy)]
struct Collected {
    secs: f64,
    cpu_secs: f64,
    peak_rss_kib: u64,
}

/// The file every simulated store uploads, and its digests (protocol 2: per-part MD5, SHA-256).
struct StoreFile {
    body: bytes::Bytes,
    md5_base64: String,
    sha256_hex: String,
}

/// What a simulated agent tells the coordinator.
enum Event {
    Command { agent: usize, at: Instant },
}

struct Shared {
    args: Args,
    keys: TokenKeys,
    events: mpsc::UnboundedSender<Event>,
    connected: AtomicUsize,
    refused: AtomicU64,
    /// Bumped to make every agent drop its connection and reconnect.
    storm: watch::Receiver<u64>,
    /// Second octet of this run's source addresses.
    address_base: u8,
    /// With `--collect`: what a store uploads, and the client it uploads with.
    file: Option<StoreFile>,
    storage: reqwest::Client,
}

/// The `region` labels of `--list-stores` fleets.
const REGIONS: [&str; 4] = ["north", "south", "east", "west"];

fn client_id(i: usize) -> String {
    format!("loadgen-{i:06}")
}

fn source_ip(args: &Args, base: u8, i: usize) -> Ipv4Addr {
    let n = (i / args.agents_per_address.max(1)) as u32 + 2;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, base, 0, 0)) + n)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(shared: &Shared, i: usize) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        source_ip(&shared.args, shared.address_base, i).into(),
        0,
    ))?;
    let stream = socket.connect(shared.args.server).await?;
    let token = shared
        .keys
        .issue(&client_id(i), Role::Agent, Duration::from_secs(24 * 3600))?;
    let mut req = format!("ws://{}/ws/connect", shared.args.server).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    // Storing agents speak protocol 2 (the previous one, which the server still serves): its
    // one-part upload is a plain PUT with Content-MD5.
    let protocol = if shared.file.is_some() {
        shared::protocol::OLDEST_PROTOCOL_VERSION
    } else {
        shared::protocol::PROTOCOL_VERSION
    };
    let mut hello = serde_json::json!({
        "type": "hello",
        "protocol_version": protocol,
        "agent_version": "loadgen",
    });
    if shared.args.list_stores > 0 {
        hello["labels"] = serde_json::json!({ "region": REGIONS[i % REGIONS.len()] });
    }
    ws.send(Message::Text(hello.to_string().into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) => bail!("expected welcome, got {t}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before welcome"),
        }
    }
}

/// One simulated agent: connects (retrying), then serves commands until a storm drops it.
async fn agent(shared: Arc<Shared>, i: usize, gate: Arc<Semaphore>) {
    let mut storm = shared.storm.clone();
    let mut first = true;
    loop {
        let ws = {
            let _permit = if first {
                Some(gate.acquire().await)
            } else {
                None
            };
            let mut attempt = 0u32;
            loop {
                match connect(&shared, i).await {
                    Ok(ws) => break ws,
                    Err(_) => {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        attempt += 1;
                        let cap = 100u64 << attempt.min(6);
                        let d = rand::thread_rng().gen_range(cap / 2..=cap);
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                }
            }
        };
        first = false;
        shared.connected.fetch_add(1, Ordering::Relaxed);
        let dropped = serve(&shared, i, ws, &mut storm).await;
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if dropped {
            let spread = shared.args.storm_spread_ms.max(1);
            let d = rand::thread_rng().gen_range(0..spread);
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
    }
}

/// Returns true when a storm dropped the connection.
async fn serve(shared: &Shared, i: usize, mut ws: Ws, storm: &mut watch::Receiver<u64>) -> bool {
    loop {
        tokio::select! {
            _ = storm.changed() => return true,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if t.contains("\"describe_file\"") => {
                    let at = Instant::now();
                    let _ = shared.events.send(Event::Command { agent: i, at });
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if let Some(file) = &shared.file {
                        if let Err(e) = upload(shared, &mut ws, &v, file).await {
                            eprintln!("agent {i}: upload failed: {e:#}");
                            return false;
                        }
                        continue;
                    }
                    let reply = serde_json::json!({
                        "type": "upload_failed",
                        "upload_id": v["upload_id"],
                        "code": "FILE_NOT_FOUND",
                        "message": "simulated agent",
                    });
                    if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
                        return false;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            },
        }
    }
}

/// Serves one `describe_file` with a real one-part upload: `file_info`, the plan, the part PUT
/// and the completion through their presigned URLs, then `upload_completed`.
async fn upload(
    shared: &Shared,
    ws: &mut Ws,
    describe: &serde_json::Value,
    file: &StoreFile,
) -> anyhow::Result<()> {
    let upload_id = describe["upload_id"].clone();
    let info = serde_json::json!({
        "type": "file_info",
        "upload_id": upload_id,
        "file_name": "z-report.csv",
        "size": file.body.len(),
        "modified_ms": 1,
        "sha256": file.sha256_hex,
        "part_size": describe["min_part_size"],
        "part_md5": [file.md5_base64],
    });
    ws.send(Message::Text(info.to_string().into())).await?;
    let plan: serde_json::Value = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"start_upload\"") => {
                break serde_json::from_str(t.as_str())?;
            }
            Some(Ok(Message::Text(t)))
                if t.contains("\"upload_failed\"") || t.contains("\"error\"") =>
            {
                bail!("the server refused the file: {t}")
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before the plan"),
        }
    };
    let part = &plan["parts"][0];
    let url = part["url"].as_str().context("no part URL")?;
    let resp = shared
        .storage
        .put(url)
        .header("content-md5", part["content_md5"].as_str().unwrap_or(""))
        .body(file.body.clone())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("part PUT answered {}", resp.status());
    }
    let etag = resp
        .headers()
        .get("etag")
        .context("no ETag")?
        .to_str()?
        .to_owned();
    let body = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
    );
    let url = plan["complete_url"].as_str().context("no completion URL")?;
    let resp = shared.storage.post(url).body(body).send().await?;
    if !resp.status().is_success() {
        bail!("completion answered {}", resp.status());
    }
    let done = serde_json::json!({
        "type": "upload_completed",
        "upload_id": upload_id,
        "parts": [{"part_number": 1, "etag": etag}],
    });
    ws.send(Message::Text(done.to_string().into())).await?;
    Ok(())
}

/// The server's CPU time so far (user and system), from /proc.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// The server's peak RSS since it was last reset.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

/// One collection over the whole fleet with `max_concurrent`: time to all verified, and the
/// server's CPU seconds and peak RSS meanwhile.
async fn collect(
    http: &reqwest::Client,
    args: &Args,
    token: &str,
    n: usize,
    max_concurrent: u32,
) -> anyhow::Result<Collected> {
    // Peak RSS from here on (as root, writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write(format!("/proc/{}/clear_refs", args.server_pid), "5");
    let cpu0 = cpu_secs(args.server_pid)?;
    let t0 = Instant::now();
    let body = serde_json::json!({
        "target": {"kind": "glob", "pattern": "loadgen-*"},
        "max_concurrent": max_concurrent,
        "expires_in_secs": 3600,
    });
    let resp = http
        .post(format!("http://{}/collections", args.server))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    if resp.status().as_u16() != 201 {
        bail!(
            "POST /collections answered {}: {}",
            resp.status(),
            resp.text().await?
        );
    }
    let created: serde_json::Value = resp.json().await?;
    let id = created["collection_id"]
        .as_str()
        .context("no id")?
        .to_owned();
    let matched = created["counts"]["matched"].as_u64().unwrap_or(0);
    let url = format!("http://{}/collections/{id}", args.server);
    let summary = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s: serde_json::Value = http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if s["settled"].as_bool() == Some(true) && s["counts"]["matched"].as_u64() >= Some(n as u64)
        {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the collection did not settle in 600 s: {}", s["counts"]);
        }
    };
    let took = t0.elapsed();
    let cpu = cpu_secs(args.server_pid)? - cpu0;
    let peak = peak_rss_kib(args.server_pid)?;
    println!(
        "collection over {n} stores ({matched} matched at creation), {} bytes each, max_concurrent {max_concurrent}: \
         {} completed, {} failed in {:.2} s; server CPU {:.2} s, peak RSS {} KiB",
        args.file_bytes,
        summary["counts"]["completed"],
        summary["counts"]["failed"],
        took.as_secs_f64(),
        cpu,
        peak
    );
    if summary["counts"]["completed"].as_u64() != Some(n as u64) {
        bail!("not every store completed: {}", summary["counts"]);
    }
    Ok(Collected {
        secs: took.as_secs_f64(),
        cpu_secs: cpu,
        peak_rss_kib: peak,
    })
}

/// Times `GET /stores` pages as the operator page asks for them: the first page, one in the
/// middle, a search, a label filter and a glob, each `args.list_stores` times in turn.
async fn list_stores(
    http: &reqwest::Client,
    args: &Args,
    token: &str,
    n: usize,
) -> anyhow::Result<()> {
    let middle = client_id(n / 2);
    let queries = [
        ("first page", "limit=50".to_owned()),
        ("a page in the middle", format!("limit=50&after={middle}")),
        (
            "search",
            format!("limit=50&q={}", &middle[..middle.len() - 1]),
        ),
        ("label filter", "limit=50&label=region=north".to_owned()),
        ("id glob", "limit=50&glob=loadgen-0012*".to_owned()),
        ("offline only", "limit=50&connected=false".to_owned()),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); queries.len()];
    let mut sizes = vec![(0usize, 0u64); queries.len()];
    for _ in 0..args.list_stores {
        for (k, (_, query)) in queries.iter().enumerate() {
            let t0 = Instant::now();
            let resp = http
                .get(format!("http://{}/stores?{query}", args.server))
                .bearer_auth(token)
                .send()
                .await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            times[k].push(t0.elapsed());
            if !status.is_success() {
                bail!("GET /stores?{query} answered {status}");
            }
            let page: serde_json::Value = serde_json::from_slice(&body)?;
            sizes[k] = (body.len(), page["total"].as_u64().unwrap_or_default());
        }
    }
    for (k, (name, query)) in queries.iter().enumerate() {
        let t = &mut times[k];
        t.sort();
        println!(
            "GET /stores?{query} ({name}): {} of {n} stores match, {} bytes; over {} requests p50 {:.1} ms, p99 {:.1} ms",
            sizes[k].1,
            sizes[k].0,
            t.len(),
            percentile(t, 0.50).as_secs_f64() * 1000.0,
            percentile(t, 0.99).as_secs_f64() * 1000.0,
        );
    }
    Ok(())
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

async fn trigger(http: &reqwest::Client, args: &Args, token: &str, i: usize) -> u16 {
    let url = format!("http://{}/trigger-download/{}", args.server, client_id(i));
    match http.post(url).bearer_auth(token).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
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
    let rss_before = rss_kib(args.server_pid)?;
    let n = args.agents;
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
    let shared = Arc::new(Shared {
        args,
        keys,
        events: events_tx,
        connected: AtomicUsize::new(0),
        refused: AtomicU64::new(0),
        storm: storm_rx,
        address_base: rand::thread_rng().gen_range(1..=254),
        file,
        storage: reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .build()?,
    });
    let args = &shared.args;

    // The fleet comes up.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    for i in 0..n {
        tokio::spawn(agent(shared.clone(), i, gate.clone()));
    }
    while shared.connected.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {n} agents connected after 600 s",
                shared.connected.load(Ordering::Relaxed)
            );
        }
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_idle = rss_kib(args.server_pid)?;
    let per_agent = (rss_idle.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64;
    println!(
        "agents: {n} connected in {:.1} s",
        connect_time.as_secs_f64()
    );
    println!(
        "server RSS: {rss_before} KiB before, {rss_idle} KiB with {n} idle agents: {per_agent:.0} bytes per agent"
    );

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
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
    let mut lat = Vec::with_capacity(args.triggers);
    let mut rng = rand::thread_rng();
    for _ in 0..args.triggers {
        let i = rng.gen_range(0..n);
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
    println!(
        "trigger-to-command latency over {} triggers: p50 {} ms, p99 {} ms, max {} ms",
        lat.len(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO))
    );

    // A burst to distinct agents.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let burst = args.burst.min(n);
    let offset = rng.gen_range(0..n);
    let chosen: Vec<usize> = (0..burst).map(|k| (offset + k) % n).collect();
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

    // The reconnect storm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shared.refused.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    storm_tx.send(1)?;
    // Wait for the drop to register, then for everyone to be back.
    while shared.connected.load(Ordering::Relaxed) > n / 2 && t0.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while shared.connected.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if t0.elapsed() > Duration::from_secs(300) {
            break;
        }
    }
    println!(
        "reconnect storm: {} of {n} back in {:.1} s (delays spread over {} ms), {} connection attempts failed",
        shared.connected.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        args.storm_spread_ms,
        shared.refused.load(Ordering::Relaxed)
    );
    println!(
        "server RSS after the storm: {} KiB",
        rss_kib(args.server_pid)?
    );
    Ok(())
}
