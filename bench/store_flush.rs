//! The embedded store's flush path on its own, for instruction counts: many polls, a few
//! votes each, flushed concurrently so that the store commits them in groups, as it does
//! with thousands of active polls. No clock decides anything here (one thread, a fixed
//! load), so under callgrind the count is the same from run to run and two builds can be
//! compared; the 10,000-poll scenario of `scripts/bench` cannot be (docs/BENCHMARKS.md).
//!
//! ```sh
//! cargo build --release --example store_flush
//! valgrind --tool=callgrind target/release/examples/store_flush 2000 10 5
//! ```
//!
//! Arguments: polls (2000), rounds (10), votes per poll per round (5).

use std::sync::Arc;

use pollcast::adapters::SqliteStore;
use pollcast_actors::ports::PollStore;
use pollcast_actors::{NewPoll, PollSettings, Vote};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map_or(default, |a| a.parse().expect("a whole number"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (polls, rounds, per_poll) = (arg(1, 2000), arg(2, 10), arg(3, 5));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("flush.db").display());
    let store = Arc::new(
        SqliteStore::open(&url, &pollcast::background::Background::new())
            .await
            .expect("the store opens"),
    );
    let mut ids = Vec::with_capacity(polls);
    for i in 0..polls {
        let poll = NewPoll {
            question: format!("poll {i}"),
            options: (1..=4).map(|o| format!("option {o}")).collect(),
            settings: PollSettings::default(),
        };
        ids.push(
            store
                .create_poll(poll)
                .await
                .expect("the poll is created")
                .id,
        );
    }
    let mut counted = 0;
    for round in 0..rounds {
        // Every poll's flush is queued before the store's writer runs: groups of the
        // largest size, as under load.
        let mut flushes = tokio::task::JoinSet::new();
        for (n, &poll) in ids.iter().enumerate() {
            let votes: Arc<[Vote]> = (0..per_poll)
                .map(|k| Vote::single(poll, ((k + n) % 4 + 1) as i64, format!("u{round}-{k}")))
                .collect();
            let store = store.clone();
            flushes.spawn(async move { store.apply_votes(poll, false, votes).await });
        }
        while let Some(flushed) = flushes.join_next().await {
            counted += flushed
                .expect("no panic")
                .expect("the flush commits")
                .inserted;
        }
    }
    assert_eq!(
        counted,
        (polls * rounds * per_poll) as u64,
        "every vote counted once"
    );
    println!(
        "{polls} polls, {rounds} rounds, {per_poll} votes per poll a round: {counted} votes counted"
    );
}
