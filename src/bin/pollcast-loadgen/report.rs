//! What a run measured, as a table for people or JSON for scripts.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cpu::CpuUse;

/// Percentiles of a latency histogram recorded in microseconds, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub samples: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            samples: h.len(),
        }
    }
}

/// A new histogram of microseconds up to an hour.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The result of `--verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Sum of the final counts of the polls voted in.
    pub counted: i64,
    /// Votes that got a 202.
    pub accepted: u64,
    pub exact: bool,
    /// From the end of the load until the counts stopped moving.
    pub settle_ms: u64,
}

/// What the subscribers saw.
#[derive(Debug, Clone, Serialize)]
pub struct Fanout {
    pub subscribers: usize,
    /// Subscribers that connected and got their snapshot.
    pub connected: usize,
    /// Delay from the server's flush to receipt, per message and subscriber.
    pub delay: Latency,
    /// Updates a subscriber never received (gaps in seq), over all subscribers.
    pub missed_updates: u64,
    /// Counts messages received, over all subscribers.
    pub messages: u64,
}

/// Everything a votes run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: usize,
    pub polls: usize,
    pub seconds: f64,
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// Other answers by status code ("error" for transport failures).
    pub errors: BTreeMap<String, u64>,
    pub accepted_per_sec: f64,
    pub latency: Latency,
    /// CPU used while the votes were sent (not during set-up or verification).
    pub cpu: CpuUse,
    pub verification: Option<Verification>,
    pub fanout: Option<Fanout>,
    /// From sending a probe vote to a subscriber seeing it counted (`--probe`).
    pub visibility: Option<Latency>,
    #[serde(skip)]
    pub json: bool,
}

impl Report {
    /// `Some(true/false)` when verified.
    pub fn verified_exact(&self) -> Option<bool> {
        self.verification.as_ref().map(|v| v.exact)
    }

    pub fn print(&self) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(self).expect("report serializes")
            );
            return;
        }
        let l = &self.latency;
        println!(
            "target       {} ({} connections, {} polls)",
            self.url, self.connections, self.polls
        );
        println!("duration     {:.1} s", self.seconds);
        println!(
            "votes        {} sent, {} accepted (202), {} duplicates (409), errors {:?}",
            self.sent, self.accepted, self.duplicates, self.errors
        );
        println!("throughput   {:.0} accepted votes/s", self.accepted_per_sec);
        println!(
            "latency      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
        let c = &self.cpu;
        let figure =
            |x: Option<f64>, unit: &str| x.map_or("n/a".into(), |x| format!("{x:.1}{unit}"));
        println!(
            "cpu          load generator {} per vote, server {} per vote, machine idle {} ({} cores)",
            figure(c.loadgen_us_per_vote, " us"),
            figure(c.server_us_per_vote, " us"),
            figure(c.machine_idle.map(|i| i * 100.0), " %"),
            c.cores
        );
        if let Some(v) = &self.verification {
            println!(
                "verify       counted {} of {} accepted: {} (settled {} ms after the load)",
                v.counted,
                v.accepted,
                if v.exact { "exact" } else { "MISMATCH" },
                v.settle_ms
            );
        }
        if let Some(f) = &self.fanout {
            println!(
                "fan-out      {}/{} subscribers, {} messages, flush→receipt p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, missed {}",
                f.connected,
                f.subscribers,
                f.messages,
                f.delay.p50_ms,
                f.delay.p99_ms,
                f.delay.max_ms,
                f.missed_updates
            );
        }
        if let Some(v) = &self.visibility {
            println!(
                "vote→screen {} probes, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                v.samples, v.p50_ms, v.p99_ms, v.max_ms
            );
        }
    }
}
