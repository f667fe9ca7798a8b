//! `GET /metrics`: Prometheus text exposition, from plain atomics (no metrics framework).
//!
//! Counters only ever grow; gauges (connected agents, open uploads by state) are read from the
//! registry and the upload table when scraped, so they cannot drift.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the trigger-to-dispatch latency buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

#[derive(Debug, Default)]
pub struct Metrics {
    pub triggers: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Bytes (as stored, so compressed) and parts of verified uploads.
    pub bytes_uploaded: AtomicU64,
    /// Bytes of verified uploads that compression kept off the wire.
    pub bytes_saved: AtomicU64,
    pub parts_uploaded: AtomicU64,
    /// Parts, and their stored bytes, that storage copied from a share's previous object
    /// instead of an agent sending them.
    pub parts_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Part attempts that failed and were retried, as agents report them.
    pub part_retries: AtomicU64,
    pub resumes: AtomicU64,
    pub orphans_aborted: AtomicU64,
    /// Agent connections that completed the handshake.
    pub agent_connections: AtomicU64,
    latency: Histogram,
}

/// What `/metrics` reads at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges<'a> {
    /// Agents with an open WebSocket.
    pub connected: usize,
    /// Connected agents whose token expires within 7 days.
    pub expiring: usize,
    /// Unfinished uploads per state name.
    pub open: &'a [(&'a str, usize)],
    /// Collections per state name.
    pub collections: &'a [(String, u64)],
    /// Stores of open collections not asked yet.
    pub stores_pending: usize,
}

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`].
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Metrics {
    /// Time from an operator's trigger request arriving to its `describe_file` being queued for
    /// the agent's connection.
    pub fn observe_dispatch(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency.count.fetch_add(1, Ordering::Relaxed);
        self.latency
            .sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Renders every metric, with the gauges read at scrape time.
    pub fn render(&self, gauges: &Gauges<'_>) -> String {
        let Gauges {
            connected,
            expiring,
            open,
            collections,
            stores_pending,
        } = *gauges;
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        one(
            "backhaul_connected_agents",
            "gauge",
            "Agents with an open WebSocket.",
            &[(String::new(), connected as f64)],
        );
        one(
            "backhaul_agent_tokens_expiring_soon",
            "gauge",
            "Connected agents whose token expires within 7 days.",
            &[(String::new(), expiring as f64)],
        );
        one(
            "backhaul_uploads_open",
            "gauge",
            "Unfinished uploads by state.",
            &open
                .iter()
                .map(|(s, n)| (format!("{{state=\"{s}\"}}"), *n as f64))
                .collect::<Vec<_>>(),
        );
        one(
            "backhaul_collections",
            "gauge",
            "Collections by state.",
            &collections
                .iter()
                .map(|(s, n)| (format!("{{state=\"{s}\"}}"), *n as f64))
                .collect::<Vec<_>>(),
        );
        one(
            "backhaul_collection_stores_pending",
            "gauge",
            "Stores of open collections not asked yet (offline, queued or busy).",
            &[(String::new(), stores_pending as f64)],
        );
        one(
            "backhaul_uploads_triggered_total",
            "counter",
            "Downloads triggered by operators.",
            &[(String::new(), load(&self.triggers) as f64)],
        );
        one(
            "backhaul_uploads_finished_total",
            "counter",
            "Uploads that reached a terminal state, by state.",
            &[
                ("{state=\"completed\"}".into(), load(&self.completed) as f64),
                ("{state=\"failed\"}".into(), load(&self.failed) as f64),
                ("{state=\"cancelled\"}".into(), load(&self.cancelled) as f64),
            ],
        );
        one(
            "backhaul_bytes_uploaded_total",
            "counter",
            "Bytes of verified uploads, as stored (compressed where the agent compressed).",
            &[(String::new(), load(&self.bytes_uploaded) as f64)],
        );
        one(
            "backhaul_bytes_saved_total",
            "counter",
            "Bytes of verified uploads that compression kept off the wire: file size minus stored size.",
            &[(String::new(), load(&self.bytes_saved) as f64)],
        );
        one(
            "backhaul_bytes_copied_total",
            "counter",
            "Stored bytes copied inside storage from a share's previous object (unchanged parts) instead of sent by agents.",
            &[(String::new(), load(&self.bytes_copied) as f64)],
        );
        one(
            "backhaul_parts_copied_total",
            "counter",
            "Unchanged parts copied inside storage from a share's previous object instead of sent by agents.",
            &[(String::new(), load(&self.parts_copied) as f64)],
        );
        one(
            "backhaul_parts_uploaded_total",
            "counter",
            "Parts of verified uploads.",
            &[(String::new(), load(&self.parts_uploaded) as f64)],
        );
        one(
            "backhaul_part_retries_total",
            "counter",
            "Part attempts that failed and were retried, as reported by agents.",
            &[(String::new(), load(&self.part_retries) as f64)],
        );
        one(
            "backhaul_agent_connections_total",
            "counter",
            "Agent connections accepted (handshake done); a fast rise means agents flapping.",
            &[(String::new(), load(&self.agent_connections) as f64)],
        );
        one(
            "backhaul_upload_resumes_total",
            "counter",
            "Plans sent again after a reconnect, a restart or expired URLs.",
            &[(String::new(), load(&self.resumes) as f64)],
        );
        one(
            "backhaul_orphans_aborted_total",
            "counter",
            "Multipart uploads aborted by the orphan sweep.",
            &[(String::new(), load(&self.orphans_aborted) as f64)],
        );
        let h = &self.latency;
        let mut samples: Vec<(String, f64)> = LATENCY_BUCKETS
            .iter()
            .zip(&h.buckets)
            .map(|(b, c)| (format!("_bucket{{le=\"{b}\"}}"), load(c) as f64))
            .collect();
        samples.push(("_bucket{le=\"+Inf\"}".into(), load(&h.count) as f64));
        samples.push(("_sum".into(), load(&h.sum_nanos) as f64 / 1e9));
        samples.push(("_count".into(), load(&h.count) as f64));
        one(
            "backhaul_trigger_dispatch_seconds",
            "histogram",
            "From a trigger request arriving to describe_file queued for the agent.",
            &samples,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.triggers.fetch_add(2, Ordering::Relaxed);
        m.observe_dispatch(Duration::from_micros(300));
        m.observe_dispatch(Duration::from_millis(30));
        let text = m.render(&Gauges {
            connected: 5,
            expiring: 2,
            open: &[("uploading", 1)],
            collections: &[("open".into(), 3)],
            stores_pending: 7,
        });
        assert!(text.contains("backhaul_connected_agents 5\n"), "{text}");
        assert!(text.contains("backhaul_agent_tokens_expiring_soon 2\n"));
        assert!(text.contains("backhaul_uploads_open{state=\"uploading\"} 1\n"));
        assert!(text.contains("backhaul_uploads_triggered_total 2\n"));
        assert!(text.contains("backhaul_collections{state=\"open\"} 3\n"));
        assert!(text.contains("backhaul_collection_stores_pending 7\n"));
        // Cumulative buckets: 300 µs is under 0.0005 s, 30 ms only under 0.05 s.
        assert!(text.contains("backhaul_trigger_dispatch_seconds_bucket{le=\"0.00025\"} 0\n"));
        assert!(text.contains("backhaul_trigger_dispatch_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("backhaul_trigger_dispatch_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("backhaul_trigger_dispatch_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("backhaul_trigger_dispatch_seconds_count 2\n"));
    }
}
