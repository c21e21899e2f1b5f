//! WebSocket subscribers that time every counts message from the server's flush.
//!
//! Why so frugal: the subscribers run on the same cores as the server, and every update
//! reaches all of them at once, so what each one spends per message is added to the delay
//! it measures. A profile of the load generator with 10,000 subscribers found most of their
//! CPU zero-filling tungstenite's 128 KiB read buffer on every read, the rest mostly in
//! parsing each message into a `serde_json::Value` and in two locks shared by all of them
//! (docs/BENCHMARKS.md, "Fast paths").

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::net::{Target, pick};
use crate::report::{Fanout, Latency, histogram};

/// tungstenite's read buffer, which it zero-fills at every read: the server's messages
/// are a few hundred bytes, and a longer one is still read whole.
const READ_BUFFER: usize = 4 * 1024;

/// The fields of a server message a subscriber looks at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<i64>,
    #[serde(rename = "flushedAt")]
    flushed_at: Option<i64>,
}

/// What one subscriber saw, kept by itself and added up at the end.
#[derive(Default)]
struct Tally {
    /// Delay from the server's flush to receipt of each counts message, in milliseconds.
    delays_ms: Vec<u64>,
    missed: u64,
}

impl Tally {
    fn counts(&mut self, frame: &Frame, last_seq: &mut Option<i64>) {
        let delay_ms = now_ms() - frame.flushed_at.unwrap_or(0);
        self.delays_ms.push(delay_ms.max(0) as u64);
        let seq = frame.seq.unwrap_or(0);
        if let Some(last) = *last_seq
            && seq > last + 1
        {
            self.missed += (seq - last - 1) as u64;
        }
        *last_seq = Some(seq);
    }
}

/// Subscribers of one poll, running until [`Subscribers::finish`].
pub struct Subscribers {
    count: usize,
    connected: usize,
    /// Subscribers that got their snapshot, by target (`host:port`) and by source address.
    by_target: BTreeMap<String, usize>,
    by_source: BTreeMap<String, usize>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Tally>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One subscriber: tells `ready` whether it got its snapshot, then tallies counts messages
/// until told to stop or disconnected.
async fn subscribe(
    url: String,
    addr: SocketAddr,
    source: Option<IpAddr>,
    ready: tokio::sync::mpsc::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut tally = Tally::default();
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let socket = match crate::net::connect(addr, source).await {
        Ok(stream) => {
            let _ = stream.set_nodelay(true);
            tokio_tungstenite::client_async_with_config(&url, stream, Some(config)).await
        }
        Err(e) => Err(e.into()),
    };
    let Ok((mut socket, _)) = socket else {
        let _ = ready.send(false).await;
        return tally;
    };
    let mut last_seq = None;
    loop {
        let msg = tokio::select! {
            msg = socket.next() => msg,
            _ = stop.changed() => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame.kind {
            "snapshot" => {
                last_seq = frame.seq;
                let _ = ready.send(true).await;
            }
            "counts" => tally.counts(&frame, &mut last_seq),
            _ => {}
        }
    }
    tally
}

impl Subscribers {
    /// Connects `count` subscribers of `poll`, spread over every (target, source) pair in
    /// turn (a few at a time, so the servers' accept queues are not flooded), and waits
    /// until each has its snapshot.
    pub async fn connect(
        targets: &[Target],
        sources: &[IpAddr],
        poll: i64,
        count: usize,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::with_capacity(count);
        let mut waiting = Vec::with_capacity(count);
        for i in 0..count {
            let (target, source) = pick(i, targets, sources);
            // Why a channel each: the tally by target and source needs to know whose
            // snapshot came.
            let (ready_tx, ready_rx) = tokio::sync::mpsc::channel::<bool>(1);
            let url = format!("ws://{}/ws/polls/{poll}", target.host);
            let task = subscribe(url, target.addr, source, ready_tx, stopped.clone());
            tasks.push(tokio::spawn(task));
            let source = source.map_or_else(|| "any".to_owned(), |s| s.to_string());
            waiting.push((target.host.clone(), source, ready_rx));
            if i % 256 == 255 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut connected = 0;
        let (mut by_target, mut by_source) = (BTreeMap::new(), BTreeMap::new());
        for (target, source, mut ready) in waiting {
            match tokio::time::timeout_at(deadline, ready.recv()).await {
                Ok(Some(true)) => {
                    connected += 1;
                    *by_target.entry(target).or_default() += 1;
                    *by_source.entry(source).or_default() += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(Self {
            count,
            connected,
            by_target,
            by_source,
            stop,
            tasks,
        })
    }

    /// Lets the last updates arrive, disconnects, and reports.
    pub async fn finish(self, linger: Duration) -> Fanout {
        tokio::time::sleep(linger).await;
        let _ = self.stop.send(true);
        let mut delays = histogram();
        let (mut messages, mut missed) = (0, 0);
        for task in self.tasks {
            // A subscriber that panicked reports nothing; the connected count shows it.
            let Ok(tally) = task.await else { continue };
            messages += tally.delays_ms.len() as u64;
            missed += tally.missed;
            for ms in tally.delays_ms {
                let _ = delays.record(ms * 1000);
            }
        }
        Fanout {
            subscribers: self.count,
            connected: self.connected,
            by_target: self.by_target,
            by_source: self.by_source,
            delay: Latency::of(&delays),
            missed_updates: missed,
            messages,
        }
    }
}
