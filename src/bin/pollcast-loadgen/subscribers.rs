//! WebSocket subscribers that time every counts message from the server's flush.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{Fanout, Latency, histogram};

#[derive(Default)]
struct Seen {
    connected: usize,
    messages: u64,
    missed: u64,
}

/// Subscribers of one poll, running until [`Subscribers::finish`].
pub struct Subscribers {
    count: usize,
    delays: Arc<Mutex<Histogram<u64>>>,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Subscribers {
    /// Connects `count` subscribers to `ws_url` (a few at a time, so the server's accept
    /// queue is not flooded) and waits until each has its snapshot.
    pub async fn connect(ws_url: &str, count: usize) -> anyhow::Result<Self> {
        let delays = Arc::new(Mutex::new(histogram()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(count.max(1));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let (url, delays, seen, ready) = (
                ws_url.to_owned(),
                delays.clone(),
                seen.clone(),
                ready_tx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let Ok((mut socket, _)) = tokio_tungstenite::connect_async(&url).await else {
                    let _ = ready.send(false).await;
                    return;
                };
                let mut last_seq = None;
                while let Some(Ok(msg)) = socket.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(json) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    match json["type"].as_str() {
                        Some("snapshot") => {
                            last_seq = json["seq"].as_i64();
                            seen.lock().unwrap().connected += 1;
                            let _ = ready.send(true).await;
                        }
                        Some("counts") => {
                            let delay_ms = now_ms() - json["flushedAt"].as_i64().unwrap_or(0);
                            let _ = delays
                                .lock()
                                .unwrap()
                                .record((delay_ms.max(0) as u64) * 1000);
                            let seq = json["seq"].as_i64().unwrap_or(0);
                            let mut seen = seen.lock().unwrap();
                            seen.messages += 1;
                            if let Some(last) = last_seq
                                && seq > last + 1
                            {
                                seen.missed += (seq - last - 1) as u64;
                            }
                            last_seq = Some(seq);
                        }
                        _ => {}
                    }
                }
            }));
            if i % 256 == 255 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(ready_tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for _ in 0..count {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        Ok(Self {
            count,
            delays,
            seen,
            tasks,
        })
    }

    /// Lets the last updates arrive, disconnects, and reports.
    pub async fn finish(self, linger: Duration) -> Fanout {
        tokio::time::sleep(linger).await;
        for task in &self.tasks {
            task.abort();
        }
        let seen = self.seen.lock().unwrap();
        Fanout {
            subscribers: self.count,
            connected: seen.connected,
            delay: Latency::of(&self.delays.lock().unwrap()),
            missed_updates: seen.missed,
            messages: seen.messages,
        }
    }
}
