//! WebSocket subscribers that time every counts message from the server's flush.
//!
//! Why so frugal: the subscribers run on the same cores as the server, and every update
//! reaches all of them at once, so what each one spends per message is added to the delay
//! it measures. A profile of the load generator with 10,000 subscribers found 65 % of their
//! CPU zero-filling tungstenite's 128 KiB read buffer on every read, the rest mostly in
//! parsing each message into a `serde_json::Value` and in two locks shared by all of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    ready: tokio::sync::mpsc::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut tally = Tally::default();
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let Ok((mut socket, _)) =
        tokio_tungstenite::connect_async_with_config(&url, Some(config), false).await
    else {
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
    /// Connects `count` subscribers to `ws_url` (a few at a time, so the server's accept
    /// queue is not flooded) and waits until each has its snapshot.
    pub async fn connect(ws_url: &str, count: usize) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(count.max(1));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let task = subscribe(ws_url.to_owned(), ready_tx.clone(), stopped.clone());
            tasks.push(tokio::spawn(task));
            if i % 256 == 255 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(ready_tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut connected = 0;
        for _ in 0..count {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(true)) => connected += 1,
                Ok(Some(false)) => {}
                _ => break,
            }
        }
        Ok(Self {
            count,
            connected,
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
            delay: Latency::of(&delays),
            missed_updates: missed,
            messages,
        }
    }
}
