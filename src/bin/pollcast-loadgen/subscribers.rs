//! WebSocket subscribers that time every counts message from the server's flush, keep the
//! counts as a viewer's screen would, and (`--reconnect`) come back when their server goes
//! away, as the live page does.
//!
//! Why so frugal: the subscribers run on the same cores as the server, and every update
//! reaches all of them at once, so what each one spends per message is added to the delay
//! it measures. A profile of the load generator with 10,000 subscribers found most of their
//! CPU zero-filling tungstenite's 128 KiB read buffer on every read, the rest mostly in
//! parsing each message into a `serde_json::Value` and in two locks shared by all of them
//! (docs/BENCHMARKS.md, "Fast paths").

//!
//! Why the counts are kept: a viewer must never see a count go down. The server's `seq`
//! makes that possible (a client ignores anything older than what it has), and a snapshot
//! after a reconnect, possibly from another process, must not show less than the screen
//! already did. Each subscriber checks both, and reports any step back.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::net::{Target, pick_at};
use hdrhistogram::Histogram;

use crate::report::{Fanout, FinalCounts, Latency, histogram};
use crate::retry::Backoff;
use crate::stalls::Stalls;

/// tungstenite's read buffer, which it zero-fills at every read: the server's messages
/// are a few hundred bytes, and a longer one is still read whole.
const READ_BUFFER: usize = 4 * 1024;

/// Each watched poll's final counts, by option.
pub type Finals = BTreeMap<i64, BTreeMap<i64, i64>>;

/// Which polls the subscribers watch (`--watch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Watch {
    /// Every subscriber on the first poll.
    First,
    /// Spread over every poll, each poll watched from every `--url` in turn: what the
    /// longest stand-still of any poll needs.
    All,
}

/// The fields of a server message a subscriber looks at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<i64>,
    #[serde(rename = "flushedAt")]
    flushed_at: Option<i64>,
    /// A counts message's changed options.
    #[serde(default)]
    counts: Vec<Count>,
    /// A snapshot's poll.
    poll: Option<PollFrame>,
}

#[derive(Deserialize)]
struct Count {
    #[serde(rename = "optionId")]
    option: i64,
    #[serde(rename = "newCount")]
    count: Option<i64>,
}

#[derive(Deserialize)]
struct PollFrame {
    options: Vec<OptionFrame>,
}

#[derive(Deserialize)]
struct OptionFrame {
    id: i64,
    votes: Option<i64>,
}

/// What a viewer's screen shows of one poll: the counts by option and the `seq` they are at.
#[derive(Debug, Default)]
struct Screen {
    seq: Option<i64>,
    counts: BTreeMap<i64, i64>,
}

impl Screen {
    /// Shows `option` at `count`; whether that is less than it showed (a step back).
    fn set(&mut self, option: i64, count: i64) -> bool {
        let before = self.counts.insert(option, count);
        before.is_some_and(|before| count < before)
    }

    /// A snapshot is the whole truth at its seq, whatever was shown before a reconnect; but
    /// it must not show less than the screen did. Returns whether it did.
    fn snapshot(&mut self, seq: Option<i64>, poll: &PollFrame) -> bool {
        self.seq = seq;
        let mut back = false;
        for option in &poll.options {
            if let Some(votes) = option.votes {
                back |= self.set(option.id, votes);
            }
        }
        back
    }

    /// Applies a counts message unless it is older than the screen (a client ignores those);
    /// `None` if ignored, else whether an option went back.
    fn counts(&mut self, seq: Option<i64>, counts: &[Count]) -> Option<bool> {
        if let (Some(seq), Some(shown)) = (seq, self.seq)
            && seq <= shown
        {
            return None;
        }
        self.seq = seq.or(self.seq);
        let mut back = false;
        for c in counts {
            if let Some(count) = c.count {
                back |= self.set(c.option, count);
            }
        }
        Some(back)
    }

    fn total(&self) -> i64 {
        self.counts.values().sum()
    }
}

/// What one subscriber saw, kept by itself and added up at the end.
#[derive(Default)]
struct Tally {
    /// Delay from the server's flush to receipt of each counts message, in milliseconds,
    /// with the target (its index) it came from.
    delays_ms: Vec<(usize, u64)>,
    missed: u64,
    /// Messages or snapshots that showed an option lower than the screen had.
    backwards: u64,
    /// Times its socket ended while it watched, and times it got a snapshot again after.
    disconnects: u64,
    reconnects: u64,
    /// From losing its socket until the next snapshot, per reconnect.
    reconnect_ms: Vec<u64>,
    /// Whether it still had its socket when told to stop.
    live: bool,
    /// Its poll, and what its screen showed of it at the end.
    poll: i64,
    screen: BTreeMap<i64, i64>,
}

impl Tally {
    fn counts(&mut self, frame: &Frame, last_seq: &mut Option<i64>, target: usize) {
        let delay_ms = now_ms() - frame.flushed_at.unwrap_or(0);
        self.delays_ms.push((target, delay_ms.max(0) as u64));
        let seq = frame.seq.unwrap_or(0);
        if let Some(last) = *last_seq
            && seq > last + 1
        {
            self.missed += (seq - last - 1) as u64;
        }
        *last_seq = Some(seq);
    }
}

/// Subscribers, running until [`Subscribers::finish`].
pub struct Subscribers {
    count: usize,
    connected: usize,
    /// From the first connect until the last subscriber had its snapshot (or gave up).
    connect_time: Duration,
    /// The targets' `host:port`, by index.
    hosts: Vec<String>,
    /// Subscribers that got their snapshot, by target (`host:port`) and by source address.
    by_target: BTreeMap<String, usize>,
    by_source: BTreeMap<String, usize>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Tally>>,
    stalls: Arc<Stalls>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The target a subscriber whose server went away tries next: another one at random, as
/// behind a load balancer. Why not the next in turn: all of a dead process's viewers would
/// land on one survivor at once, which a real audience does not do, and which could take
/// more sockets than that one process may open.
fn next_target(at: usize, targets: usize) -> usize {
    if targets < 2 {
        return at;
    }
    (at + 1 + rand::random_range(0..targets - 1)) % targets
}

/// One subscriber's poll and servers.
struct Subscriber {
    targets: Arc<[Target]>,
    /// The target it connects to next.
    at: usize,
    source: Option<IpAddr>,
    poll: i64,
    /// The poll's place in `stalls`.
    index: usize,
    reconnect: bool,
    stalls: Arc<Stalls>,
}

type Socket = WebSocketStream<TcpStream>;

async fn open(url: &str, addr: SocketAddr, source: Option<IpAddr>) -> Option<Socket> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let stream = crate::net::connect(addr, source).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .ok()?;
    Some(socket)
}

/// One subscriber: tells `ready` which target gave it its first snapshot (`None`: none did),
/// then tallies counts messages until told to stop, or until its socket ends; with
/// `reconnect`, it then connects to the next target after a backoff, as the live page does,
/// and carries on from that one's snapshot.
async fn subscribe(
    mut s: Subscriber,
    ready: mpsc::Sender<Option<usize>>,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut tally = Tally {
        poll: s.poll,
        ..Tally::default()
    };
    let mut ready = Some(ready);
    let mut screen = Screen::default();
    let mut last_seq = None;
    let (mut retry, mut lost_at) = (0, None::<Instant>);
    loop {
        let target = &s.targets[s.at];
        let url = format!("ws://{}/ws/polls/{}", target.host, s.poll);
        let mut live = false;
        if let Some(mut socket) = open(&url, target.addr, s.source).await {
            // Made once per connection and polled after the socket: a `changed()` made per
            // message registered with, and left, the stop signal that all of this process's
            // viewers share, and that list's lock was 9 % of a viewer load generator's CPU
            // under 16,667 viewers. Biased: a message's wake then polls the socket alone.
            let stopped = stop.changed();
            tokio::pin!(stopped);
            loop {
                let msg = tokio::select! {
                    biased;
                    msg = socket.next() => msg,
                    _ = &mut stopped => {
                        tally.live = live;
                        tally.screen = screen.counts;
                        return tally;
                    }
                };
                let Some(Ok(msg)) = msg else { break };
                let Message::Text(text) = msg else { continue };
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    continue;
                };
                match frame.kind {
                    "snapshot" => {
                        live = true;
                        retry = 0;
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Some(s.at)).await;
                        } else if let Some(lost) = lost_at.take() {
                            tally.reconnects += 1;
                            tally.reconnect_ms.push(lost.elapsed().as_millis() as u64);
                        }
                        last_seq = frame.seq;
                        if let Some(poll) = &frame.poll
                            && screen.snapshot(frame.seq, poll)
                        {
                            tally.backwards += 1;
                        }
                        if let Some(seq) = frame.seq {
                            s.stalls.seen(s.index, seq, Some(screen.total()));
                        }
                    }
                    "counts" => {
                        tally.counts(&frame, &mut last_seq, s.at);
                        // An older message than the screen's is ignored, as a client does.
                        if let Some(back) = screen.counts(frame.seq, &frame.counts) {
                            tally.backwards += u64::from(back);
                            if let Some(seq) = frame.seq {
                                s.stalls.seen(s.index, seq, Some(screen.total()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // The socket ended, or never opened.
        if !s.reconnect || *stop.borrow() {
            if let Some(ready) = ready.take() {
                let _ = ready.send(None).await;
            }
            tally.screen = screen.counts;
            return tally;
        }
        if live {
            tally.disconnects += 1;
            lost_at.get_or_insert_with(Instant::now);
        }
        tokio::select! {
            _ = tokio::time::sleep(Backoff::SUBSCRIBERS.delay(retry)) => {}
            _ = stop.changed() => {
                tally.screen = screen.counts;
                return tally;
            }
        }
        retry += 1;
        s.at = next_target(s.at, s.targets.len());
    }
}

impl Subscribers {
    /// Connects `count` subscribers, spread over every (target, source) pair in turn (a few
    /// at a time, so the servers' accept queues are not flooded), and waits until each has
    /// its snapshot. With [`Watch::All`] the `i`-th watches poll `i % polls` and takes the
    /// pair of `i / polls`, so that each poll is watched from every target.
    pub async fn connect(
        targets: &[Target],
        sources: &[IpAddr],
        polls: &[i64],
        count: usize,
        watch: Watch,
        reconnect: bool,
        stalls: Arc<Stalls>,
    ) -> anyhow::Result<Self> {
        let watched = match watch {
            Watch::First => &polls[..1],
            Watch::All => polls,
        };
        let began = Instant::now();
        let shared: Arc<[Target]> = targets.to_vec().into();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::with_capacity(count);
        let mut waiting = Vec::with_capacity(count);
        for i in 0..count {
            let poll = watched[i % watched.len()];
            let (at, source) = pick_at(i / watched.len(), targets.len(), sources);
            // Why a channel each: the tally by target and source needs to know whose
            // snapshot came.
            let (ready_tx, ready_rx) = mpsc::channel::<Option<usize>>(1);
            let subscriber = Subscriber {
                targets: shared.clone(),
                at,
                source,
                poll,
                index: stalls.index_of(poll).expect("a poll of the run"),
                reconnect,
                stalls: stalls.clone(),
            };
            tasks.push(tokio::spawn(subscribe(
                subscriber,
                ready_tx,
                stopped.clone(),
            )));
            let source = source.map_or_else(|| "any".to_owned(), |s| s.to_string());
            waiting.push((source, ready_rx));
            if i % 256 == 255 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Why it grows with the count: tens of thousands of handshakes and snapshots take
        // the servers a while on a small machine.
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(60)
            + Duration::from_millis(count as u64);
        let mut connected = 0;
        let (mut by_target, mut by_source) = (BTreeMap::new(), BTreeMap::new());
        for (source, mut ready) in waiting {
            match tokio::time::timeout_at(deadline, ready.recv()).await {
                Ok(Some(Some(at))) => {
                    connected += 1;
                    *by_target.entry(targets[at].host.clone()).or_default() += 1;
                    *by_source.entry(source).or_default() += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(Self {
            count,
            connected,
            connect_time: began.elapsed(),
            hosts: targets.iter().map(|t| t.host.clone()).collect(),
            by_target,
            by_source,
            stop,
            tasks,
            stalls,
        })
    }

    /// Subscribers that got their first snapshot.
    pub fn connected(&self) -> usize {
        self.connected
    }

    /// From the first connect until the last subscriber had its snapshot (or gave up).
    pub fn connect_time(&self) -> Duration {
        self.connect_time
    }

    /// Lets the last updates arrive, disconnects, and reports. With `finals` (each watched
    /// poll's final counts by option, read once they settled), also how many subscribers'
    /// screens ended showing them.
    pub async fn finish(self, linger: Duration, finals: Option<&Finals>) -> Fanout {
        tokio::time::sleep(linger).await;
        let _ = self.stop.send(true);
        let (mut delays, mut reconnect_delays) = (histogram(), histogram());
        let mut by_target: Vec<Histogram<u64>> = self.hosts.iter().map(|_| histogram()).collect();
        let mut shown = finals.map(|_| FinalCounts::default());
        let (mut messages, mut missed, mut backwards) = (0, 0, 0);
        let (mut disconnects, mut reconnects, mut live) = (0, 0, 0);
        for task in self.tasks {
            // A subscriber that panicked reports nothing; the connected count shows it.
            let Ok(tally) = task.await else { continue };
            messages += tally.delays_ms.len() as u64;
            missed += tally.missed;
            backwards += tally.backwards;
            disconnects += tally.disconnects;
            reconnects += tally.reconnects;
            live += usize::from(tally.live);
            if let (Some(shown), Some(finals)) = (shown.as_mut(), finals) {
                shown.tally(&tally.screen, finals.get(&tally.poll));
            }
            for (target, ms) in tally.delays_ms {
                let _ = delays.record(ms * 1000);
                let _ = by_target[target].record(ms * 1000);
            }
            for ms in tally.reconnect_ms {
                let _ = reconnect_delays.record(ms.max(1) * 1000);
            }
        }
        let delay_by_target = self
            .hosts
            .into_iter()
            .zip(&by_target)
            .filter(|(_, h)| !h.is_empty())
            .map(|(host, h)| (host, Latency::of(h)))
            .collect();
        Fanout {
            subscribers: self.count,
            connected: self.connected,
            connect_ms: Some(self.connect_time.as_millis() as u64),
            by_target: self.by_target,
            by_source: self.by_source,
            delay: Latency::of(&delays),
            delay_by_target,
            final_counts: shown,
            missed_updates: missed,
            messages,
            backwards,
            disconnects,
            reconnects,
            reconnect_delay: (reconnects > 0).then(|| Latency::of(&reconnect_delays)),
            live_at_end: Some(live),
            stall: self.stalls.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::SinkExt;
    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;

    /// A fake pollcast WebSocket: to every subscriber, sends `script`, then closes (as a
    /// stopping process does) or keeps it open. Counts the subscribers it took.
    async fn fake(script: Vec<serde_json::Value>, then_close: bool) -> (Target, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                    for message in script {
                        ws.send(Message::text(message.to_string())).await.unwrap();
                    }
                    if then_close {
                        let _ = ws.close(None).await;
                    } else {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                });
            }
        });
        let target = Target {
            addr,
            host: addr.to_string(),
        };
        (target, taken)
    }

    fn snapshot(seq: i64, votes: [i64; 2]) -> serde_json::Value {
        json!({"type": "snapshot", "seq": seq, "poll": {"id": 5, "question": "q",
            "options": [{"id": 1, "text": "a", "votes": votes[0]}, {"id": 2, "text": "b", "votes": votes[1]}]}})
    }

    fn counts(seq: i64, option: i64, count: i64) -> serde_json::Value {
        json!({"type": "counts", "pollId": 5, "seq": seq, "flushedAt": now_ms(),
            "counts": [{"optionId": option, "newCount": count}]})
    }

    /// One subscriber of poll 5 on `targets` (the first one first), for long enough to
    /// reconnect once.
    async fn watch(targets: &[Target], reconnect: bool) -> Fanout {
        let stalls = Arc::new(Stalls::new(&[5]));
        let subscribers =
            Subscribers::connect(targets, &[], &[5], 1, Watch::First, reconnect, stalls)
                .await
                .unwrap();
        // The first reconnect waits 250 to 500 ms.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        subscribers.finish(Duration::ZERO, None).await
    }

    #[test]
    fn a_subscriber_that_lost_its_server_tries_any_other_one() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let next = next_target(2, 4);
            assert_ne!(next, 2);
            seen.insert(next);
        }
        assert_eq!(
            seen,
            [0, 1, 3].into(),
            "every other server, not only the next"
        );
        assert_eq!(next_target(0, 1), 0);
    }

    #[tokio::test]
    async fn a_subscriber_whose_server_went_away_carries_on_from_the_next_ones_snapshot() {
        let (stopping, _) = fake(vec![snapshot(1, [1, 0]), counts(2, 1, 3)], true).await;
        let (next, taken) = fake(vec![snapshot(2, [3, 0]), counts(3, 2, 1)], false).await;
        let fanout = watch(&[stopping.clone(), next], true).await;
        assert_eq!(fanout.connected, 1);
        assert_eq!(fanout.by_target[&stopping.host], 1, "{fanout:?}");
        assert_eq!(
            (fanout.disconnects, fanout.reconnects),
            (1, 1),
            "{fanout:?}"
        );
        assert_eq!(
            taken.load(Ordering::SeqCst),
            1,
            "it went to the next server"
        );
        assert_eq!(fanout.live_at_end, Some(1));
        assert_eq!(fanout.messages, 2, "a counts message from each");
        assert_eq!(
            (fanout.backwards, fanout.missed_updates),
            (0, 0),
            "{fanout:?}"
        );
        assert!(fanout.reconnect_delay.unwrap().max_ms >= 250.0);
    }

    #[tokio::test]
    async fn counts_lower_than_the_screen_showed_are_reported_and_older_ones_ignored() {
        let (stopping, _) = fake(vec![snapshot(1, [1, 0]), counts(2, 1, 3)], true).await;
        // Its snapshot shows option 1 lower than the last counts did (a step back); then an
        // older message, which a client ignores; then a newer one that is fine.
        let (next, _) = fake(
            vec![snapshot(2, [2, 0]), counts(1, 1, 0), counts(3, 1, 4)],
            false,
        )
        .await;
        let fanout = watch(&[stopping, next], true).await;
        assert_eq!(fanout.reconnects, 1);
        assert_eq!(fanout.backwards, 1, "{fanout:?}");
    }

    #[tokio::test]
    async fn without_reconnect_a_subscriber_whose_server_went_away_stops() {
        let (stopping, _) = fake(vec![snapshot(1, [1, 0]), counts(2, 1, 3)], true).await;
        let (next, taken) = fake(vec![snapshot(2, [3, 0])], false).await;
        let fanout = watch(&[stopping, next], false).await;
        assert_eq!(fanout.connected, 1);
        assert_eq!((fanout.disconnects, fanout.reconnects), (0, 0));
        assert_eq!(taken.load(Ordering::SeqCst), 0);
        assert_eq!(fanout.live_at_end, Some(0));
    }

    #[tokio::test]
    async fn a_subscriber_that_cannot_connect_tries_the_next_server_with_reconnect() {
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let down = Target {
            addr: down,
            host: down.to_string(),
        };
        let (up, _) = fake(vec![snapshot(1, [0, 0])], false).await;
        let fanout = watch(&[down, up.clone()], true).await;
        assert_eq!(fanout.connected, 1);
        assert_eq!(
            fanout.by_target[&up.host], 1,
            "counted where its snapshot came from"
        );
        assert_eq!((fanout.disconnects, fanout.reconnects), (0, 0));
    }
}
