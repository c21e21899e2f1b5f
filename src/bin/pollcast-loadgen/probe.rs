//! The vote-to-screen probe: how long from sending a vote until a WebSocket subscriber sees
//! it counted. Each prober votes, one at a time, in a poll of its own (so `--verify` is untouched)
//! while the load runs, and times each vote until a counts message includes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Connection;
use crate::report::{Latency, histogram};

/// Longest wait for one probe vote to show; past it the sample is recorded as this long.
const GIVE_UP: Duration = Duration::from_secs(30);

/// Probes running at once, each with its own poll and subscriber: one probe takes about
/// a flush interval, so a single one would give too few samples for a p99.
const PROBERS: usize = 4;

/// A running probe; [`Probe::finish`] stops it and reports.
pub struct Probe {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<anyhow::Result<Histogram<u64>>>>,
}

impl Probe {
    /// Creates the probes' polls, subscribes to them, and starts voting.
    pub async fn start(conn: &mut Connection, token: Option<&str>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::with_capacity(PROBERS);
        for _ in 0..PROBERS {
            tasks.push(Self::prober(conn, token, stop.clone()).await?);
        }
        Ok(Self { stop, tasks })
    }

    /// One prober: its poll, its subscriber, its votes one at a time.
    async fn prober(
        conn: &mut Connection,
        token: Option<&str>,
        stopping: Arc<AtomicBool>,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<Histogram<u64>>>> {
        let body = json!({ "question": "loadgen probe", "options": ["seen", "unused"] });
        let (status, poll) = conn.json(Method::POST, "/polls", token, body).await?;
        if status != StatusCode::CREATED {
            bail!("creating the probe poll answered {status}: {poll}");
        }
        let poll = poll["id"].as_i64().context("probe poll id")?;
        let url = format!("ws://{}/ws/polls/{poll}", conn.host());
        let (mut socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .context("subscribing the probe")?;
        let mut voter = conn.reopen().await?;
        Ok(tokio::spawn(async move {
            let mut delays = histogram();
            let mut sent = 0i64;
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let vote =
                    json!({ "pollId": poll, "optionId": 1, "userId": format!("probe-{sent}") });
                let (status, answer) =
                    match voter.json(Method::POST, "/vote", None, vote.clone()).await {
                        Ok(answer) => answer,
                        // Why once more on a new connection: the server closes a keep-alive
                        // connection that sends no request for its header read timeout (10 s by
                        // default), and a prober idles for as long as its last vote took to show.
                        Err(_) => {
                            voter = voter.reopen().await?;
                            let (status, answer) =
                                voter.json(Method::POST, "/vote", None, vote).await?;
                            // 409: the first attempt got in before its connection went.
                            let status = match status {
                                StatusCode::CONFLICT => StatusCode::ACCEPTED,
                                other => other,
                            };
                            (status, answer)
                        }
                    };
                if status != StatusCode::ACCEPTED {
                    bail!("a probe vote answered {status}: {answer}");
                }
                sent += 1;
                let seen = tokio::time::timeout(GIVE_UP, async {
                    while let Some(Ok(msg)) = socket.next().await {
                        let Message::Text(text) = msg else { continue };
                        let Ok(json) = serde_json::from_str::<Value>(&text) else {
                            continue;
                        };
                        if counted_seen(&json) >= sent {
                            return true;
                        }
                    }
                    false
                })
                .await;
                if seen == Ok(false) {
                    bail!("the probe's WebSocket closed");
                }
                let delay = started.elapsed().min(GIVE_UP);
                let _ = delays.record(delay.as_micros() as u64);
                // Why a pause of varying length: votes should land at every point of the
                // flush cycle, not in step with it.
                let pause = 50 + rand::random::<u64>() % 400;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Ok(delays)
        }))
    }

    /// Stops voting and reports the vote-to-screen delays of every prober.
    pub async fn finish(self) -> anyhow::Result<Latency> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = histogram();
        for task in self.tasks {
            all.add(task.await??).expect("same bounds");
        }
        Ok(Latency::of(&all))
    }
}

/// The count of the probe's option in a counts (or snapshot) message; 0 if absent.
fn counted_seen(message: &Value) -> i64 {
    match message["type"].as_str() {
        Some("counts") | Some("closed") => message["counts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["optionId"] == 1)
            .and_then(|c| c["newCount"].as_i64())
            .unwrap_or(0),
        _ => 0,
    }
}
