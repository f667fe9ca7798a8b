//! What /proc says about the processes measured: the replicas, PostgreSQL and NATS.

use anyhow::Context;

/// The resident set of `pid`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:").with_context(|| format!("no VmRSS for {pid}"))
}

/// The server's CPU time so far (user and system), from /proc.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let f = stat_fields(pid).with_context(|| format!("no /proc/{pid}/stat"))?;
    // utime and stime, the 14th and 15th fields, in USER_HZ (100 on Linux).
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / 100.0)
}

/// The server's peak RSS since it was last reset.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:").with_context(|| format!("no VmHWM for {pid}"))
}

/// A number field of /proc/{pid}/status (a `kB` one in KiB).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The fields of /proc/{pid}/stat after the command name (so field 3, the state, is [0]).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Proportional set size: shared pages split among the processes that map them, so a sum over
/// PostgreSQL's backends does not count its shared buffers once per backend.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Processes measured together: the replicas, or an engine with the processes it forked
/// (PostgreSQL's backends).
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub roots: Vec<u32>,
}

/// What a [`Group`] had used by one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User and system CPU seconds, the reaped children's included.
    pub cpu_secs: f64,
    pub pss_kib: u64,
    pub rss_kib: u64,
    pub processes: usize,
    pub threads: u64,
}

impl Group {
    /// `name=pid[,pid...]`.
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let (name, pids) = arg.split_once('=').context("expected name=pid[,pid]")?;
        let roots = pids
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("a pid is not a number")?;
        Ok(Self {
            name: name.to_owned(),
            roots,
        })
    }

    pub fn sample(&self) -> Sample {
        let mut members: Vec<u32> = self.roots.clone();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                let parent = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok());
                if parent.is_some_and(|p| self.roots.contains(&p)) {
                    members.push(pid);
                }
            }
        }
        let mut s = Sample::default();
        for &pid in &members {
            let Some(f) = stat_fields(pid) else { continue };
            let ticks = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime, stime; for a root also cutime and cstime, its reaped children's.
            let mut t = ticks(11) + ticks(12);
            if self.roots.contains(&pid) {
                t += ticks(13) + ticks(14);
            }
            s.cpu_secs += t / 100.0;
            s.pss_kib += pss_kib(pid).unwrap_or(0);
            s.rss_kib += status_kib(pid, "VmRSS:").unwrap_or(0);
            s.threads += status_kib(pid, "Threads:").unwrap_or(0);
            s.processes += 1;
        }
        s
    }
}
