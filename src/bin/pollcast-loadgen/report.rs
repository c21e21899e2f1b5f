//! What a run measured, as a table for people or JSON for scripts.

use std::collections::BTreeMap;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cpu::CpuUse;
use crate::stalls::Stall;

/// Percentiles of a latency histogram recorded in microseconds, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub samples: u64,
    /// The histogram itself, each recorded bucket as `<microseconds>x<count>`, separated by
    /// spaces (one string, so that the pretty JSON stays readable). Why in the report:
    /// percentiles of several runs cannot be merged, their histograms can
    /// (`pollcast-loadgen merge`).
    #[serde(default, with = "compact")]
    pub histogram_us: Vec<(u64, u64)>,
}

/// `[(1000, 3), (1010, 5)]` as `"1000x3 1010x5"`.
mod compact {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(buckets: &[(u64, u64)], s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = buckets.iter().map(|(us, n)| format!("{us}x{n}")).collect();
        s.serialize_str(&text.join(" "))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, u64)>, D::Error> {
        let text = String::deserialize(d)?;
        text.split_whitespace()
            .map(|bucket| {
                let parsed = bucket
                    .split_once('x')
                    .and_then(|(us, n)| Some((us.parse().ok()?, n.parse().ok()?)));
                parsed.ok_or_else(|| D::Error::custom(format!("bad histogram bucket {bucket}")))
            })
            .collect()
    }
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
            histogram_us: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    /// The latencies of several runs together.
    pub fn merge<'a>(all: impl IntoIterator<Item = &'a Latency>) -> anyhow::Result<Self> {
        let mut h = histogram();
        for latency in all {
            if latency.samples > 0 && latency.histogram_us.is_empty() {
                anyhow::bail!("a report without its histogram (from an older load generator)");
            }
            for &(us, count) in &latency.histogram_us {
                h.record_n(us, count).context("a latency out of range")?;
            }
        }
        Ok(Self::of(&h))
    }
}

/// A new histogram of microseconds up to an hour.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The result of `--verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    /// Sum of the final counts of the polls voted in.
    pub counted: i64,
    /// Votes that got a 202.
    pub accepted: u64,
    /// Every poll counted exactly the votes it accepted.
    pub exact: bool,
    /// From the end of the load until the counts stopped moving.
    pub settle_ms: u64,
    /// Compared poll by poll, votes accepted but not counted, and votes counted beyond
    /// those accepted (a sum over polls could hide one poll's loss behind another's excess).
    #[serde(default)]
    pub lost: u64,
    #[serde(default)]
    pub doubled: u64,
}

/// What `--retries` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Retries {
    /// Most retries of one vote.
    pub limit: u32,
    /// Votes whose first attempt was answered 5xx.
    pub first_5xx: u64,
    /// Votes whose first attempt got no answer (its connection closed).
    pub first_errors: u64,
    /// Votes whose first attempt never went out: the server had closed the keep-alive
    /// connection (as a stopping process does with idle ones). Not seen by the server.
    #[serde(default)]
    pub first_not_sent: u64,
    /// Votes whose first attempt found no server that took a connection.
    pub first_unreachable: u64,
    /// Attempts after the first, over all votes.
    pub retries: u64,
    /// Votes that failed first and were then decided (202, or a definite 4xx).
    pub resolved: u64,
    /// Votes still failing after every retry: their fate is unknown (also in `errors`).
    pub unresolved: u64,
    /// Failed attempts, first or not, by status code, `error` (no answer), `closed` (not
    /// sent: the connection had closed) or `connect`.
    pub failures: BTreeMap<String, u64>,
    /// Connections a server refused; the vote went to the next server instead.
    pub connect_failures: u64,
}

impl Retries {
    /// Adds `other` into this one.
    pub fn add(&mut self, other: &Retries) {
        self.limit = self.limit.max(other.limit);
        self.first_5xx += other.first_5xx;
        self.first_errors += other.first_errors;
        self.first_not_sent += other.first_not_sent;
        self.first_unreachable += other.first_unreachable;
        self.retries += other.retries;
        self.resolved += other.resolved;
        self.unresolved += other.unresolved;
        for (k, n) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += n;
        }
        self.connect_failures += other.connect_failures;
    }
}

/// How many subscribers' screens ended showing their poll's final counts (`--verify`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalCounts {
    /// Subscribers compared (every one started, live at the end or not).
    pub checked: usize,
    /// Those whose screen showed every option at its final count.
    pub shown: usize,
}

impl FinalCounts {
    /// Compares one subscriber's screen with its poll's final counts (`None`: unknown, so
    /// not shown).
    pub fn tally(&mut self, screen: &BTreeMap<i64, i64>, finals: Option<&BTreeMap<i64, i64>>) {
        self.checked += 1;
        let shows = finals.is_some_and(|finals| {
            finals
                .iter()
                .all(|(option, count)| screen.get(option).copied().unwrap_or(0) == *count)
        });
        self.shown += usize::from(shows);
    }
}

/// What the subscribers saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fanout {
    pub subscribers: usize,
    /// Subscribers that connected and got their snapshot.
    pub connected: usize,
    /// From the first connect until every subscriber had its snapshot (or gave up).
    #[serde(default)]
    pub connect_ms: Option<u64>,
    /// Of those, by target (`host:port`) and by source address (`any` without
    /// `--source-addrs`).
    #[serde(default)]
    pub by_target: BTreeMap<String, usize>,
    #[serde(default)]
    pub by_source: BTreeMap<String, usize>,
    /// Delay from the server's flush to receipt, per message and subscriber.
    pub delay: Latency,
    /// The same, by the target (`host:port`) the message came from.
    #[serde(default)]
    pub delay_by_target: BTreeMap<String, Latency>,
    /// With `--verify`: subscribers whose screen ended at the final counts.
    #[serde(default)]
    pub final_counts: Option<FinalCounts>,
    /// Updates a subscriber never received (gaps in seq), over all subscribers.
    pub missed_updates: u64,
    /// Counts messages received, over all subscribers.
    pub messages: u64,
    /// Messages or snapshots that showed a subscriber an option lower than it had shown.
    #[serde(default)]
    pub backwards: u64,
    /// Times a subscriber's socket ended while it watched (`--reconnect`), and times it got
    /// a snapshot again after.
    #[serde(default)]
    pub disconnects: u64,
    #[serde(default)]
    pub reconnects: u64,
    /// From losing a socket until the next snapshot.
    #[serde(default)]
    pub reconnect_delay: Option<Latency>,
    /// Subscribers that had their socket at the end.
    #[serde(default)]
    pub live_at_end: Option<usize>,
    /// The longest any watched poll's counts stood still while it was given votes.
    #[serde(default)]
    pub stall: Option<Stall>,
}

/// Everything a votes run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The target URLs, comma-separated.
    pub url: String,
    /// Load generator processes whose reports this is (see [`Report::merge`]).
    #[serde(default = "one")]
    pub processes: usize,
    pub connections: usize,
    pub polls: usize,
    /// When the load started, in milliseconds since the Unix epoch: to line the report up
    /// with what happened to the servers meanwhile (a restart's time, say).
    #[serde(default)]
    pub started_unix_ms: u64,
    pub seconds: f64,
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// Other answers by status code ("error" for a request left unanswered, "closed" for
    /// one whose keep-alive connection the server closed before it went out, "connect" when
    /// no connection could be opened).
    pub errors: BTreeMap<String, u64>,
    pub accepted_per_sec: f64,
    pub latency: Latency,
    /// CPU used while the votes were sent (not during set-up or verification).
    pub cpu: CpuUse,
    pub verification: Option<Verification>,
    /// With `--retries`.
    #[serde(default)]
    pub retry: Option<Retries>,
    pub fanout: Option<Fanout>,
    /// From sending a probe vote to a subscriber seeing it counted (`--probe`).
    pub visibility: Option<Latency>,
    #[serde(skip)]
    pub json: bool,
}

fn one() -> usize {
    1
}

/// Adds `from` into `into`, key by key.
fn add_counts<K: Ord + Clone>(into: &mut BTreeMap<K, usize>, from: &BTreeMap<K, usize>) {
    for (k, n) in from {
        *into.entry(k.clone()).or_default() += n;
    }
}

impl Report {
    /// One report of several load generators run at the same time (each with its share of
    /// the connections and subscribers): counts add up, latencies are merged from their
    /// histograms, the duration is the longest, so the rate is all accepted votes over it.
    /// Verification adds up too, which is right when each process voted in its own polls.
    pub fn merge(reports: &[Report]) -> anyhow::Result<Report> {
        let first = reports.first().context("no report to merge")?;
        let mut urls: Vec<&str> = Vec::new();
        for r in reports {
            for url in r.url.split(',') {
                if !urls.contains(&url) {
                    urls.push(url);
                }
            }
        }
        let seconds = reports.iter().map(|r| r.seconds).fold(0.0, f64::max);
        let accepted = reports.iter().map(|r| r.accepted).sum();
        let mut errors = BTreeMap::new();
        for r in reports {
            for (k, n) in &r.errors {
                *errors.entry(k.clone()).or_default() += n;
            }
        }
        let verification = reports
            .iter()
            .map(|r| r.verification.clone())
            .collect::<Option<Vec<_>>>()
            .map(|all| Verification {
                counted: all.iter().map(|v| v.counted).sum(),
                accepted: all.iter().map(|v| v.accepted).sum(),
                exact: all.iter().all(|v| v.exact),
                settle_ms: all.iter().map(|v| v.settle_ms).max().unwrap_or(0),
                lost: all.iter().map(|v| v.lost).sum(),
                doubled: all.iter().map(|v| v.doubled).sum(),
            });
        let retry = reports.iter().filter_map(|r| r.retry.as_ref()).fold(
            None,
            |sum: Option<Retries>, r| {
                let mut sum = sum.unwrap_or_default();
                sum.add(r);
                Some(sum)
            },
        );
        let fanouts: Vec<&Fanout> = reports.iter().filter_map(|r| r.fanout.as_ref()).collect();
        let fanout = if fanouts.is_empty() {
            None
        } else {
            let (mut by_target, mut by_source) = (BTreeMap::new(), BTreeMap::new());
            for f in &fanouts {
                add_counts(&mut by_target, &f.by_target);
                add_counts(&mut by_source, &f.by_source);
            }
            let reconnect_delays: Vec<&Latency> = fanouts
                .iter()
                .filter_map(|f| f.reconnect_delay.as_ref())
                .collect();
            let live: Option<Vec<usize>> = fanouts.iter().map(|f| f.live_at_end).collect();
            let mut delay_by_target = BTreeMap::new();
            let hosts: std::collections::BTreeSet<&String> = fanouts
                .iter()
                .flat_map(|f| f.delay_by_target.keys())
                .collect();
            for host in hosts {
                let of_host = fanouts.iter().filter_map(|f| f.delay_by_target.get(host));
                delay_by_target.insert(host.clone(), Latency::merge(of_host)?);
            }
            let finals: Option<Vec<&FinalCounts>> =
                fanouts.iter().map(|f| f.final_counts.as_ref()).collect();
            Some(Fanout {
                subscribers: fanouts.iter().map(|f| f.subscribers).sum(),
                connected: fanouts.iter().map(|f| f.connected).sum(),
                // They connected at the same time: all were in once the slowest was.
                connect_ms: fanouts.iter().filter_map(|f| f.connect_ms).max(),
                by_target,
                by_source,
                delay: Latency::merge(fanouts.iter().map(|f| &f.delay))?,
                delay_by_target,
                final_counts: finals.map(|all| FinalCounts {
                    checked: all.iter().map(|f| f.checked).sum(),
                    shown: all.iter().map(|f| f.shown).sum(),
                }),
                missed_updates: fanouts.iter().map(|f| f.missed_updates).sum(),
                messages: fanouts.iter().map(|f| f.messages).sum(),
                backwards: fanouts.iter().map(|f| f.backwards).sum(),
                disconnects: fanouts.iter().map(|f| f.disconnects).sum(),
                reconnects: fanouts.iter().map(|f| f.reconnects).sum(),
                reconnect_delay: if reconnect_delays.is_empty() {
                    None
                } else {
                    Some(Latency::merge(reconnect_delays)?)
                },
                live_at_end: live.map(|l| l.iter().sum()),
                // Each load generator watched its own polls: the longest of all is theirs.
                stall: fanouts
                    .iter()
                    .filter_map(|f| f.stall.clone())
                    .max_by_key(|s| s.longest_ms),
            })
        };
        let probes: Vec<&Latency> = reports
            .iter()
            .filter_map(|r| r.visibility.as_ref())
            .collect();
        let cpus: Vec<&CpuUse> = reports.iter().map(|r| &r.cpu).collect();
        Ok(Report {
            url: urls.join(","),
            processes: reports.iter().map(|r| r.processes).sum(),
            connections: reports.iter().map(|r| r.connections).sum(),
            polls: reports.iter().map(|r| r.polls).max().unwrap_or(first.polls),
            started_unix_ms: reports.iter().map(|r| r.started_unix_ms).min().unwrap_or(0),
            seconds,
            sent: reports.iter().map(|r| r.sent).sum(),
            accepted,
            duplicates: reports.iter().map(|r| r.duplicates).sum(),
            errors,
            accepted_per_sec: if seconds > 0.0 {
                accepted as f64 / seconds
            } else {
                0.0
            },
            latency: Latency::merge(reports.iter().map(|r| &r.latency))?,
            cpu: CpuUse::merge(&cpus, accepted),
            verification,
            retry,
            fanout,
            visibility: if probes.is_empty() {
                None
            } else {
                Some(Latency::merge(probes)?)
            },
            json: first.json,
        })
    }
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
            "target       {} ({} connections, {} polls{})",
            self.url,
            self.connections,
            self.polls,
            if self.processes > 1 {
                format!(", {} load generators", self.processes)
            } else {
                String::new()
            }
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
        for (name, us) in &c.watched_us_per_vote {
            println!("cpu          {name} {us:.1} us per vote");
        }
        if let Some(r) = &self.retry {
            println!(
                "retries      first attempts failed: {} 5xx, {} unanswered, {} not sent (connection \
                 closed), {} unreachable; {} retries, {} resolved, {} unresolved; failed attempts \
                 {:?}; {} connections refused",
                r.first_5xx,
                r.first_errors,
                r.first_not_sent,
                r.first_unreachable,
                r.retries,
                r.resolved,
                r.unresolved,
                r.failures,
                r.connect_failures
            );
        }
        if let Some(v) = &self.verification {
            println!(
                "verify       counted {} of {} accepted: {} (settled {} ms after the load); \
                 by poll {} lost, {} doubled",
                v.counted,
                v.accepted,
                if v.exact { "exact" } else { "MISMATCH" },
                v.settle_ms,
                v.lost,
                v.doubled
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
            if let Some(ms) = f.connect_ms {
                println!("             all connected in {:.1} s", ms as f64 / 1000.0);
            }
            for (host, l) in &f.delay_by_target {
                println!(
                    "             from {host}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} messages)",
                    l.p50_ms, l.p99_ms, l.max_ms, l.samples
                );
            }
            if let Some(c) = &f.final_counts {
                println!(
                    "             {} of {} subscribers ended showing the final counts",
                    c.shown, c.checked
                );
            }
            if f.backwards > 0 || f.disconnects > 0 {
                println!(
                    "             {} went backwards; {} disconnects, {} reconnects (p99 {} ms), {} live at the end",
                    f.backwards,
                    f.disconnects,
                    f.reconnects,
                    f.reconnect_delay
                        .as_ref()
                        .map_or("n/a".into(), |l| format!("{:.0}", l.p99_ms)),
                    f.live_at_end.map_or("n/a".into(), |l| l.to_string())
                );
            }
            if let Some(s) = &f.stall {
                println!(
                    "stall        longest {} ms (poll {}, ended {:.1} s into the load), median of {} polls {} ms",
                    s.longest_ms, s.poll, s.ended_at_s, s.polls_watched, s.median_ms
                );
            }
        }
        if let Some(v) = &self.visibility {
            println!(
                "vote→screen {} probes, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                v.samples, v.p50_ms, v.p99_ms, v.max_ms
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_screen_shows_the_final_counts_only_when_every_option_is_at_its_count() {
        let finals: BTreeMap<i64, i64> = [(1, 3), (2, 0)].into();
        let mut counts = FinalCounts::default();
        counts.tally(&[(1, 3), (2, 0)].into(), Some(&finals));
        // An option the screen never heard of is shown as 0.
        counts.tally(&[(1, 3)].into(), Some(&finals));
        counts.tally(&[(1, 2), (2, 0)].into(), Some(&finals));
        counts.tally(&[(1, 3), (2, 0)].into(), None);
        assert_eq!(
            counts,
            FinalCounts {
                checked: 4,
                shown: 2
            }
        );
    }

    #[test]
    fn latencies_merge_exactly_through_their_json() {
        let (mut a, mut b, mut both) = (histogram(), histogram(), histogram());
        for us in [150, 900, 1_200, 35_000] {
            a.record(us).unwrap();
            both.record(us).unwrap();
        }
        for us in [80, 2_500, 2_500, 1_000_000] {
            b.record(us).unwrap();
            both.record(us).unwrap();
        }
        let through_json = |h: &Histogram<u64>| -> Latency {
            serde_json::from_str(&serde_json::to_string(&Latency::of(h)).unwrap()).unwrap()
        };
        let merged = Latency::merge([&through_json(&a), &through_json(&b)]).unwrap();
        let expected = Latency::of(&both);
        assert_eq!(merged.samples, 8);
        assert_eq!(merged.histogram_us, expected.histogram_us);
        assert_eq!(
            (merged.p50_ms, merged.p99_ms, merged.max_ms),
            (expected.p50_ms, expected.p99_ms, expected.max_ms)
        );
    }
}
