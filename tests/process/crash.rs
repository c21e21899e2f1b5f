use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Api, Backend, ServerProcess, TestEnv};

/// Votes sent by the load: which got a 202, and which were sent at all.
#[derive(Default)]
struct Outcome {
    accepted: BTreeSet<(i64, String)>,
    attempted: BTreeSet<(i64, String)>,
}

async fn sigkill_under_load_loses_and_double_counts_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let server = ServerProcess::start(&env, &[]);
    server.api.wait_ready().await;
    let api = server.api.clone();
    let polls = [
        api.create_poll(&["A", "B"]).await,
        api.create_poll(&["A", "B", "C"]).await,
    ];

    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let load: Vec<_> = (0..16)
        .map(|worker| {
            let api = api.clone();
            let outcome = outcome.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let poll = polls[i % 2];
                    let user = format!("w{worker}-{i}");
                    outcome
                        .lock()
                        .unwrap()
                        .attempted
                        .insert((poll, user.clone()));
                    match api.vote(poll, (i % 2 + 1) as i64, &user).await {
                        (202, _) => {
                            outcome.lock().unwrap().accepted.insert((poll, user));
                        }
                        (status, body) => panic!("unexpected {status}: {body}"),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.signal(Signal::SIGKILL);
    for worker in load {
        // Each worker ends when its request fails against the dead server.
        assert!(worker.await.is_err(), "a worker stopped only by the kill");
    }
    drop(server);

    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    assert!(
        outcome.accepted.len() > 100,
        "load ran: {} accepted",
        outcome.accepted.len()
    );

    let restarted = ServerProcess::start(&env, &[]);
    restarted.api.wait_ready().await;
    for poll in polls {
        let accepted: BTreeSet<String> = outcome
            .accepted
            .iter()
            .filter(|(p, _)| *p == poll)
            .map(|(_, u)| u.clone())
            .collect();
        let attempted: BTreeSet<String> = outcome
            .attempted
            .iter()
            .filter(|(p, _)| *p == poll)
            .map(|(_, u)| u.clone())
            .collect();
        let settled = settle(&restarted.api, poll, accepted.len() as i64).await;
        let counted: BTreeSet<String> = env.ledger(poll).await.into_iter().collect();
        let missing: Vec<_> = accepted.difference(&counted).collect();
        assert!(
            missing.is_empty(),
            "poll {poll}: accepted but not counted: {missing:?}"
        );
        let phantom: Vec<_> = counted.difference(&attempted).collect();
        assert!(
            phantom.is_empty(),
            "poll {poll}: counted but never sent: {phantom:?}"
        );
        assert_eq!(
            settled,
            counted.len() as i64,
            "poll {poll}: counters equal the ledger"
        );
    }
    let (poll, user) = outcome.accepted.iter().next().unwrap();
    assert_eq!(
        restarted.api.vote(*poll, 1, user).await.0,
        409,
        "a counted voter stays a duplicate"
    );
}

/// Waits until a poll has at least `at_least` votes and its total stops moving.
async fn settle(api: &Api, poll: i64, at_least: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = -1;
    loop {
        let total = api.poll(poll).await["totalVotes"].as_i64().unwrap();
        if total >= at_least && total == last {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "poll {poll} stuck at {total} (< {at_least})"
        );
        last = total;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

async fn sigterm_flushes_commits_and_exits_zero(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut server = ServerProcess::start(
        &env,
        &[("POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS", "60000")],
    );
    server.api.wait_ready().await;
    let poll = server.api.create_poll(&["A", "B"]).await;
    for i in 0..25 {
        assert_eq!(server.api.vote(poll, 2, &format!("u{i}")).await.0, 202);
    }
    // Until the votes wait in their aggregator: only the shutdown's flush can count them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while crate::api::metrics::sample_of(&server.api, "pollcast_votes_pending_flush").await
        != Some(25.0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "votes never reached the aggregator"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", server.output());
    assert!(
        server.output().contains("stopped cleanly"),
        "{}",
        server.output()
    );
    assert_eq!(env.ledger(poll).await.len(), 25, "flushed before exiting");
}

/// Why these settings: no flush before the kill, so every vote waits in the log.
const HOLD_IN_THE_LOG: [(&str, &str); 2] = [
    ("POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS", "60000"),
    ("POLLCAST__AGGREGATOR__FLUSH_MAX_VOTES", "1000000"),
];

/// A backlog many times the read window waits in the log after a crash: the restarted
/// process reads no more than the window at a time, counts every vote once, and a viewer
/// watching meanwhile sees the counts only move forward.
async fn a_backlog_larger_than_the_read_window_is_counted_exactly_while_a_viewer_watches(
    backend: Backend,
) {
    const VOTES: usize = 2_400;
    const WINDOW: usize = 150;
    const _: () = assert!(VOTES % WINDOW == 0);
    let env = TestEnv::new(backend).await;
    let server = ServerProcess::start(&env, &HOLD_IN_THE_LOG);
    server.api.wait_ready().await;
    let poll = server.api.create_poll(&["A", "B", "C"]).await;
    let sends: Vec<_> = (0..16)
        .map(|worker| {
            let api = server.api.clone();
            tokio::spawn(async move {
                for i in (worker..VOTES).step_by(16) {
                    let (status, body) = api.vote(poll, (i % 3 + 1) as i64, &format!("u{i}")).await;
                    assert_eq!(status, 202, "{body}");
                }
            })
        })
        .collect();
    for send in sends {
        send.await.unwrap();
    }
    server.signal(Signal::SIGKILL);
    drop(server);
    assert!(env.ledger(poll).await.is_empty(), "killed before any flush");

    // Why the interval stays at 60 s: then only full windows can flush the backlog (each a
    // whole window, VOTES being a multiple of it), and the test sees them do it.
    let window = WINDOW.to_string();
    let restarted = ServerProcess::start(
        &env,
        &[
            ("POLLCAST__AGGREGATOR__MAX_UNFLUSHED_VOTES", &window),
            HOLD_IN_THE_LOG[0],
        ],
    );
    restarted.api.wait_ready().await;
    let url = format!("ws://{}/ws/polls/{poll}", restarted.api.addr);
    let (mut viewer, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");

    // Until the viewer sees every vote; meanwhile, what waits for a flush stays within the
    // window, and no count ever goes down.
    let (mut shown, mut seq) = (std::collections::BTreeMap::<i64, i64>::new(), -1);
    let (mut updates, mut most_waiting) = (0, 0.0_f64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while shown.values().sum::<i64>() < VOTES as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the viewer saw {} of {VOTES} votes",
            shown.values().sum::<i64>()
        );
        let waiting =
            crate::api::metrics::sample_of(&restarted.api, "pollcast_votes_pending_flush").await;
        most_waiting = most_waiting.max(waiting.unwrap_or(0.0));
        let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(50), viewer.next()).await
        else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        let at = frame["seq"].as_i64().unwrap();
        assert!(at > seq, "seq {at} after {seq}: {frame}");
        seq = at;
        let counts: Vec<(i64, i64)> = match frame["type"].as_str() {
            Some("snapshot") => frame["poll"]["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| (o["id"].as_i64().unwrap(), o["votes"].as_i64().unwrap()))
                .collect(),
            Some("counts") => frame["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["optionId"].as_i64().unwrap(),
                        c["newCount"].as_i64().unwrap(),
                    )
                })
                .collect(),
            _ => continue,
        };
        updates += 1;
        for (option, count) in counts {
            let before = shown.insert(option, count).unwrap_or(0);
            assert!(
                count >= before,
                "option {option} went from {before} to {count}"
            );
        }
    }
    assert!(
        most_waiting <= WINDOW as f64,
        "{most_waiting} votes waited for a flush with a window of {WINDOW}"
    );
    let counted = env.ledger(poll).await;
    assert_eq!(counted.len(), VOTES, "each vote counted once");
    let expected: std::collections::BTreeMap<i64, i64> =
        (1..=3).map(|o| (o, (VOTES / 3) as i64)).collect();
    assert_eq!(shown, expected, "after {updates} updates");
}

crate::contract_tests!(
    sigkill_under_load_loses_and_double_counts_nothing,
    sigterm_flushes_commits_and_exits_zero,
    a_backlog_larger_than_the_read_window_is_counted_exactly_while_a_viewer_watches,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_votes_not_yet_counted_still_refuse_duplicates() {
    let env = TestEnv::new(Backend::Embedded).await;
    let slow_flush = [("POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS", "60000")];
    let server = ServerProcess::start(&env, &slow_flush);
    server.api.wait_ready().await;
    let poll = server.api.create_poll(&["A", "B"]).await;
    assert_eq!(server.api.vote(poll, 1, "early-bird").await.0, 202);
    server.signal(Signal::SIGKILL);
    drop(server);
    assert!(env.ledger(poll).await.is_empty(), "killed before any flush");

    let restarted = ServerProcess::start(&env, &slow_flush);
    restarted.api.wait_ready().await;
    let (status, body) = restarted.api.vote(poll, 2, "early-bird").await;
    assert_eq!(
        status, 409,
        "the vote in the log still claims its voter: {body}"
    );
}
