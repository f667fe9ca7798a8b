//! The collection and store-list phases: a collection over the whole fleet, timed, and the
//! operator page's `GET /stores` queries, timed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::agent::client_id;
use crate::procs::{cpu_secs, peak_rss_kib};
use crate::{Args, percentile};

/// One collection's figures.
#[derive(Debug, Clone, Copy)]
pub struct Collected {
    pub secs: f64,
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
}

/// One collection over the whole fleet with `max_concurrent`: time to all verified, and the
/// server's CPU seconds and peak RSS meanwhile.
pub async fn collect(
    http: &reqwest::Client,
    args: &Args,
    token: &str,
    n: usize,
    max_concurrent: u32,
) -> anyhow::Result<Collected> {
    // Peak RSS from here on (as root, writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write(format!("/proc/{}/clear_refs", args.server_pid[0]), "5");
    let cpu0 = cpu_secs(args.server_pid[0])?;
    let t0 = Instant::now();
    let body = serde_json::json!({
        "target": {"kind": "glob", "pattern": "loadgen-*"},
        "max_concurrent": max_concurrent,
        "expires_in_secs": 3600,
    });
    let resp = http
        .post(format!("http://{}/collections", args.server[0]))
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
    let url = format!("http://{}/collections/{id}", args.server[0]);
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
    let cpu = cpu_secs(args.server_pid[0])? - cpu0;
    let peak = peak_rss_kib(args.server_pid[0])?;
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
pub async fn list_stores(
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
                .get(format!("http://{}/stores?{query}", args.server[0]))
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
