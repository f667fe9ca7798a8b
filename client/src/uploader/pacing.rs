//! Pacing: one byte rate for every upload of the agent together (`MAX_UPLOAD_BYTES_PER_SEC`),
//! and one for the disk reads of hashing (`HASH_READ_BYTES_PER_SEC`), so that hashing a large
//! file does not take the disk from the point-of-sale software.

use std::time::Duration;

/// Paces bytes so that all uploads together stay under a rate: each chunk is given the next
/// free slot on a shared timeline, so there is no burst beyond one chunk.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next_free: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: std::sync::Mutex::new(None),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// The blocking twin of [`RateLimiter`], for the hashing threads: each read is given the next
/// free slot on a timeline shared by every hashing thread.
#[derive(Debug)]
pub struct DiskPacer {
    bytes_per_sec: f64,
    next_free: std::sync::Mutex<Option<std::time::Instant>>,
}

impl DiskPacer {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: std::sync::Mutex::new(None),
        }
    }

    /// Blocks until `n` more bytes may be read.
    pub fn acquire(&self, n: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec));
            start
        };
        std::thread::sleep(start.saturating_duration_since(std::time::Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_paces_all_callers_together() {
        let limiter = Arc::new(RateLimiter::new(1024 * 1024));
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move {
                    for _ in 0..16 {
                        l.acquire(64 * 1024).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 4 MiB at 1 MiB/s: the last chunk may start after 3 s plus all but one chunk.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(3900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4000), "{elapsed:?}");
    }

    #[test]
    fn the_disk_pacer_spaces_reads() {
        let pacer = DiskPacer::new(10 * 1024 * 1024);
        let start = std::time::Instant::now();
        // 3 MiB at 10 MiB/s: the fourth read may start after 0.3 s, not before.
        for _ in 0..4 {
            pacer.acquire(1024 * 1024);
        }
        assert!(start.elapsed() >= Duration::from_millis(290));
    }
}
