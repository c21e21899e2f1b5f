//! The votes load: connections sending unique (or duplicate) votes as fast as answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::client::Connection;
use crate::cpu::{CpuSample, Watched};
use crate::net::{Target, check_capacity, pick_at};
use crate::probe::Probe;
use crate::report::{Latency, Report, Retries, Verification, histogram};
use crate::retry::{Answer, Backoff, Failure, Route, Sent, send_vote};
use crate::stalls::Stalls;
use crate::subscribers::{Finals, Subscribers, Watch};

/// Options of `pollcast-loadgen votes`.
#[derive(Debug, clap::Args)]
pub struct VoteArgs {
    /// Base URL of the pollcast under test (http only). Repeat it (or separate URLs with
    /// commas) to spread the vote connections and the subscribers over several processes of
    /// one cluster; polls are created, probed and verified on the first.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    url: Vec<String>,
    /// Loopback source addresses to spread connections over: a count N (127.0.0.1 to
    /// 127.0.0.N) or a list (`127.0.0.2,127.0.0.3`). Each holds ~28,000 ports per target and
    /// is one peer under the server's per-address cap. Unset: the system's choice.
    #[arg(long)]
    source_addrs: Option<String>,
    /// Admin token, to create the polls.
    #[arg(long, env = "POLLCAST_ADMIN_TOKEN")]
    token: Option<String>,
    /// Concurrent HTTP/1.1 keep-alive connections, one request in flight on each. 0: no
    /// votes, only `--subscribers`, who watch for `--duration` or until SIGINT or SIGTERM
    /// (one of several load generators holding an audience while another votes).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Votes per second over all connections, evenly paced (unset: each connection sends
    /// its next vote as soon as the last is answered).
    #[arg(long)]
    rate: Option<f64>,
    /// Once every subscriber has its snapshot, write this file (JSON: `connected`,
    /// `connect_ms`): for a script that starts the votes when a large audience is in.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// How long to send (ignored with --count).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Send exactly this many votes instead.
    #[arg(long)]
    count: Option<u64>,
    /// Polls to create and spread the votes over.
    #[arg(long, default_value_t = 1)]
    polls: usize,
    /// Vote in these existing polls instead of creating some.
    #[arg(long, value_delimiter = ',')]
    poll_ids: Vec<i64>,
    /// Options per created poll.
    #[arg(long, default_value_t = 4)]
    options: i64,
    /// Share of votes that repeat an earlier voter of the same poll (expect 409s).
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// WebSocket subscribers, timing every update (on the first poll unless `--watch all`).
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// Which polls the subscribers watch: `first`, or `all` (spread over every poll, each
    /// watched from every --url in turn, for the longest stand-still of any poll).
    #[arg(long, value_enum, default_value = "first")]
    watch: Watch,
    /// Subscribers whose socket ends (their server stopped) reconnect, as the live page
    /// does: after a backoff with jitter, to the next --url, from a fresh snapshot.
    #[arg(long)]
    reconnect: bool,
    /// Send each vote with a voteId, and retry one answered 5xx or left unanswered up to
    /// this many times, with the same voteId, after a short backoff, on the next --url.
    /// 0: every answer counts as it came, and no voteId is sent.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Also time single votes, in a poll of their own, from sending to seeing them counted
    /// on a WebSocket (needs --token).
    #[arg(long)]
    probe: bool,
    /// After the load, wait for the counts to settle and compare them with the 202s.
    #[arg(long)]
    verify: bool,
    /// The server's process id, when it runs on this machine: its CPU time during the load
    /// is reported beside the load generator's (Linux).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Other processes on this machine whose CPU per vote to report, `NAME=PID[,PID...]`
    /// (repeatable; the PIDs of one name add up): the server's dependencies, say
    /// `redis=812` or `postgres=900,901,902`.
    #[arg(long = "watch-pid", value_name = "NAME=PID[,PID...]")]
    watch_pids: Vec<Watched>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

struct Shared {
    next: AtomicU64,
    accepted: AtomicU64,
    limit: Option<u64>,
    deadline: Instant,
    polls: Vec<i64>,
    options: i64,
    duplicate_ratio: f64,
    run: String,
    /// `--retries`: with any, votes carry a voteId and fail over to the next target.
    retries: u32,
    /// `--rate`: the time between two votes of one connection.
    pace: Option<Duration>,
    stalls: Arc<Stalls>,
}

#[derive(Default)]
struct WorkerStats {
    /// Votes, each counted once however many attempts it took.
    sent: u64,
    accepted: u64,
    duplicates: u64,
    /// Votes refused, or (with retries) still failing after the last attempt, by status.
    errors: BTreeMap<String, u64>,
    retry: Retries,
}

impl WorkerStats {
    fn add(&mut self, other: WorkerStats) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.retry.add(&other.retry);
    }

    /// Tallies how a vote ended, over its attempts.
    fn vote(&mut self, sent: &Sent, retrying: bool) {
        self.sent += 1;
        match sent.answer {
            Answer::Accepted => self.accepted += 1,
            Answer::Duplicate => self.duplicates += 1,
            Answer::Refused(status) => {
                *self.errors.entry(status.as_u16().to_string()).or_default() += 1
            }
            Answer::Failed(failure) => *self.errors.entry(failure.key()).or_default() += 1,
        }
        if !retrying {
            return;
        }
        let r = &mut self.retry;
        match sent.failures.first() {
            None => {}
            Some(Failure::Status(_)) => r.first_5xx += 1,
            Some(Failure::Transport) => r.first_errors += 1,
            Some(Failure::NotSent) => r.first_not_sent += 1,
            Some(Failure::Unreachable) => r.first_unreachable += 1,
        }
        if !sent.failures.is_empty() {
            match sent.answer {
                Answer::Failed(_) => r.unresolved += 1,
                _ => r.resolved += 1,
            }
        }
        r.retries += sent.retries() as u64;
        for failure in &sent.failures {
            *r.failures.entry(failure.key()).or_default() += 1;
        }
    }
}

async fn worker(mut route: Route, shared: Arc<Shared>) -> (WorkerStats, Histogram<u64>) {
    let mut stats = WorkerStats::default();
    stats.retry.limit = shared.retries;
    let mut latencies = histogram();
    if route.connection().await.is_none() {
        *stats.errors.entry("connect".into()).or_default() += 1;
        return (stats, latencies);
    }
    let p = shared.polls.len() as u64;
    // Why a random start: connections that all began at once would send in bursts.
    let mut next_at = shared
        .pace
        .map(|pace| Instant::now() + pace.mul_f64(rand::random::<f64>()));
    loop {
        if let (Some(at), Some(pace)) = (next_at.as_mut(), shared.pace) {
            tokio::time::sleep_until((*at).into()).await;
            // A connection that fell behind catches up by one vote at most, not in a burst.
            *at = (*at + pace).max(Instant::now());
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if shared.limit.is_some_and(|l| n >= l) || Instant::now() >= shared.deadline {
            break;
        }
        let index = (n % p) as usize;
        let poll = shared.polls[index];
        let option = ((n / p) as i64 % shared.options) + 1;
        // A duplicate repeats the voter of the vote sent p earlier, which went to this poll.
        let voter = if n >= p && rand::random::<f64>() < shared.duplicate_ratio {
            n - p
        } else {
            n
        };
        let run = &shared.run;
        // The voteId is the vote's own (a duplicate has another than its voter's first
        // vote, so it still gets 409), the same in every attempt of it.
        let body = if shared.retries > 0 {
            format!(
                r#"{{"pollId":{poll},"optionId":{option},"userId":"{run}-{voter}","voteId":"{run}-v{n}"}}"#
            )
        } else {
            format!(r#"{{"pollId":{poll},"optionId":{option},"userId":"{run}-{voter}"}}"#)
        };
        let started = Instant::now();
        let sent = send_vote(
            &mut route,
            &Bytes::from(body),
            shared.retries,
            Backoff::VOTES,
        )
        .await;
        let _ = latencies.record(started.elapsed().as_micros().max(1) as u64);
        stats.vote(&sent, shared.retries > 0);
        if sent.answer == Answer::Accepted {
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            shared.stalls.accepted(index);
        }
        // Without retries a connection that failed is opened again to the same server, and
        // a worker whose server is gone stops.
        if shared.retries == 0
            && matches!(
                sent.answer,
                Answer::Failed(Failure::Transport | Failure::NotSent)
            )
            && route.connection().await.is_none()
        {
            break;
        }
    }
    stats.retry.connect_failures = route.connect_failures;
    (stats, latencies)
}

/// Connections the verifier reads polls over at once. Why several: read one by one, the
/// 10,000 polls of a many-poll run took seconds a pass, which the settle time then measured
/// instead of the server.
const VERIFY_CONNECTIONS: usize = 16;

/// Connections for reading the totals of `polls`, each with its share of them.
struct Readers {
    shares: Vec<(Connection, Vec<i64>)>,
}

impl Readers {
    async fn open(setup: &Connection, polls: &[i64]) -> anyhow::Result<Self> {
        let per = polls.len().div_ceil(VERIFY_CONNECTIONS).max(1);
        let mut shares = Vec::new();
        for share in polls.chunks(per) {
            shares.push((setup.reopen().await?, share.to_vec()));
        }
        Ok(Self { shares })
    }

    /// Each poll's `totalVotes`, in the order given, read concurrently over the connections.
    async fn totals(&mut self) -> anyhow::Result<Vec<i64>> {
        let reads = self.shares.iter_mut().map(|(conn, polls)| async move {
            let mut totals = Vec::with_capacity(polls.len());
            for &poll in polls.iter() {
                let body = read_poll(conn, poll).await?;
                totals.push(body["totalVotes"].as_i64().unwrap_or(0));
            }
            anyhow::Ok(totals)
        });
        futures_util::future::try_join_all(reads)
            .await
            .map(|shares| shares.concat())
    }
}

/// Waits until the totals stop moving (three equal reads 250 ms apart, or 60 s). Returns
/// each poll's and how long after `started` the first of the equal reads ended: when the
/// counts were seen final, not when that was confirmed.
async fn settle(
    readers: &mut Readers,
    at_least: i64,
    started: Instant,
) -> anyhow::Result<(Vec<i64>, Duration)> {
    let (mut last, mut same, mut final_at) = (Vec::new(), 0, started.elapsed());
    loop {
        let now = readers.totals().await?;
        if now == last && now.iter().sum::<i64>() >= at_least {
            same += 1;
        } else {
            (same, final_at) = (0, started.elapsed());
        }
        if same >= 2 {
            return Ok((now, final_at));
        }
        if started.elapsed() > Duration::from_secs(60) {
            // Never seen final: report the whole wait, not the last change.
            return Ok((now, started.elapsed()));
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `GET /polls/{poll}`, which must answer 200.
async fn read_poll(conn: &mut Connection, poll: i64) -> anyhow::Result<Value> {
    let (status, body) = conn
        .json(Method::GET, &format!("/polls/{poll}"), None, Value::Null)
        .await?;
    if status != StatusCode::OK {
        bail!("GET /polls/{poll} answered {status}");
    }
    Ok(body)
}

/// Each poll's counts by option, as the server shows them now.
async fn read_finals(setup: &Connection, polls: &[i64]) -> anyhow::Result<Finals> {
    let mut conn = setup.reopen().await?;
    let mut finals = Finals::new();
    for &poll in polls {
        let body = read_poll(&mut conn, poll).await?;
        let options = body["options"].as_array().context("a poll's options")?;
        let counts = options
            .iter()
            .filter_map(|o| Some((o["id"].as_i64()?, o["votes"].as_i64()?)))
            .collect();
        finals.insert(poll, counts);
    }
    Ok(finals)
}

/// SIGINT and SIGTERM, caught from when it is made. Why made before the subscribers
/// connect: a script may signal as soon as the ready file appears, and a signal not yet
/// caught would end the process without its report.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    async fn received(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Writes `path` whole or not at all (a script waits for it to appear).
fn write_ready(path: &std::path::Path, subscribers: &Subscribers) -> anyhow::Result<()> {
    let text = json!({
        "connected": subscribers.connected(),
        "connect_ms": subscribers.connect_time().as_millis() as u64,
    });
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text.to_string())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

pub async fn run(args: VoteArgs) -> anyhow::Result<Report> {
    if args.connections == 0 && args.subscribers == 0 {
        bail!("--connections 0 sends no votes: it needs --subscribers to watch");
    }
    let pace = match args.rate {
        None => None,
        Some(rate) => match Duration::try_from_secs_f64(args.connections as f64 / rate) {
            Ok(pace) if rate > 0.0 && args.connections > 0 => Some(pace),
            _ => bail!(
                "--rate {rate}: a rate is votes per second above 0, over at least one connection"
            ),
        },
    };
    let mut stop_signals = match args.connections {
        0 => Some(StopSignals::catch()?),
        _ => None,
    };
    let mut targets = Vec::with_capacity(args.url.len());
    for url in &args.url {
        targets.push(Target::resolve(url).await?);
    }
    let sources = match &args.source_addrs {
        Some(text) => crate::net::parse_sources(text).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    check_capacity(args.connections + args.subscribers, &targets, &sources)?;
    let mut setup =
        Connection::open(targets[0].addr, &targets[0].host, sources.first().copied()).await?;
    let polls = if args.poll_ids.is_empty() {
        let mut polls = Vec::with_capacity(args.polls);
        let options: Vec<String> = (1..=args.options).map(|i| format!("option {i}")).collect();
        for i in 0..args.polls.max(1) {
            let body = json!({ "question": format!("load {i}"), "options": options });
            let (status, poll) = setup
                .json(Method::POST, "/polls", args.token.as_deref(), body)
                .await?;
            if status != StatusCode::CREATED {
                bail!("creating a poll answered {status}: {poll} (is --token right?)");
            }
            polls.push(poll["id"].as_i64().context("poll id")?);
        }
        polls
    } else {
        args.poll_ids.clone()
    };
    let baseline = if args.verify {
        Readers::open(&setup, &polls).await?.totals().await?
    } else {
        vec![0; polls.len()]
    };
    let probe = match args.probe {
        true => Some(Probe::start(&mut setup, args.token.as_deref()).await?),
        false => None,
    };
    let stalls = Arc::new(Stalls::new(&polls));
    let subscribers = match args.subscribers {
        0 => None,
        n => Some(
            Subscribers::connect(
                &targets,
                &sources,
                &polls,
                n,
                args.watch,
                args.reconnect,
                stalls.clone(),
            )
            .await?,
        ),
    };
    if let (Some(path), Some(subscribers)) = (&args.ready_file, &subscribers) {
        write_ready(path, subscribers)?;
    }

    let started = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        limit: args.count,
        deadline: if args.count.is_some() {
            started + Duration::from_secs(3600)
        } else {
            started + args.duration
        },
        polls: polls.clone(),
        options: if args.poll_ids.is_empty() {
            args.options
        } else {
            2
        },
        duplicate_ratio: args.duplicate_ratio,
        run: format!("lg{:x}", rand::random::<u32>()),
        retries: args.retries,
        pace,
        stalls: stalls.clone(),
    });
    stalls.start();
    let progress = (!args.quiet && !args.json).then(|| {
        let bar = ProgressBar::new(args.count.unwrap_or(args.duration.as_secs()));
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
                .expect("valid template"),
        );
        let (bar2, shared2) = (bar.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let accepted = shared2.accepted.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                bar2.set_position(
                    shared2
                        .limit
                        .map_or(secs as u64, |_| shared2.next.load(Ordering::Relaxed)),
                );
                bar2.set_message(format!(
                    "{accepted} accepted, {:.0}/s",
                    accepted as f64 / secs.max(0.001)
                ));
            }
        });
        bar
    });
    let cpu_before = CpuSample::now(args.server_pid, &args.watch_pids);
    let shared_targets: Arc<[Target]> = targets.clone().into();
    // A load generator that only watches: until its time is up or it is told to stop.
    if let Some(signals) = stop_signals.as_mut() {
        tokio::select! {
            _ = tokio::time::sleep(args.duration) => {}
            _ = signals.received() => {}
        }
    }
    let workers: Vec<_> = (0..args.connections)
        .map(|i| {
            let (home, source) = pick_at(i, targets.len(), &sources);
            let route = Route::new(shared_targets.clone(), home, source, args.retries > 0);
            tokio::spawn(worker(route, shared.clone()))
        })
        .collect();
    let mut total = WorkerStats::default();
    let mut latencies = histogram();
    for w in workers {
        let (stats, h) = w.await?;
        total.add(stats);
        latencies.add(&h).expect("same bounds");
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_before.until(
        &CpuSample::now(args.server_pid, &args.watch_pids),
        total.accepted,
    );
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    // A load generator that only watched has no 202s to compare the counts with: its
    // `--verify` is the screens' check below.
    let verification = if args.verify && args.connections > 0 {
        let started = Instant::now();
        // Why new connections: the server closes keep-alive connections left idle.
        let mut readers = Readers::open(&setup, &polls).await?;
        let at_least = baseline.iter().sum::<i64>() + total.accepted as i64;
        let (counted, took) = settle(&mut readers, at_least, started).await?;
        let (mut lost, mut doubled) = (0, 0);
        for ((counted, base), accepted) in
            counted.iter().zip(&baseline).zip(stalls.accepted_by_poll())
        {
            let counted = (counted - base).max(0) as u64;
            lost += accepted.saturating_sub(counted);
            doubled += counted.saturating_sub(accepted);
        }
        let counted = counted.iter().sum::<i64>() - baseline.iter().sum::<i64>();
        Some(Verification {
            counted,
            accepted: total.accepted,
            exact: lost == 0 && doubled == 0,
            settle_ms: took.as_millis() as u64,
            lost,
            doubled,
        })
    } else {
        None
    };
    let fanout = match subscribers {
        Some(s) => {
            let finals = if args.verify {
                // A watcher that sent no votes has not yet waited for the counts to settle.
                if verification.is_none() {
                    let mut readers = Readers::open(&setup, &polls).await?;
                    settle(&mut readers, 0, Instant::now()).await?;
                }
                let watched = match args.watch {
                    Watch::First => &polls[..1],
                    Watch::All => &polls[..],
                };
                Some(read_finals(&setup, watched).await?)
            } else {
                None
            };
            Some(s.finish(Duration::from_secs(3), finals.as_ref()).await)
        }
        None => None,
    };
    let visibility = match probe {
        Some(p) => Some(p.finish().await?),
        None => None,
    };
    Ok(Report {
        url: args.url.join(","),
        processes: 1,
        connections: args.connections,
        polls: polls.len(),
        started_unix_ms,
        seconds,
        sent: total.sent,
        accepted: total.accepted,
        duplicates: total.duplicates,
        errors: total.errors,
        accepted_per_sec: total.accepted as f64 / seconds,
        latency: Latency::of(&latencies),
        cpu,
        verification,
        retry: (args.retries > 0).then_some(total.retry),
        fanout,
        visibility,
        json: args.json,
    })
}
