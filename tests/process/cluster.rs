//! Two pollcast processes on one Kafka, Postgres and Redis (one consumer group).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::api::socketio::NodeClient;
use crate::helpers::{Api, Backend, ServerProcess, TestEnv};

const PARTITIONS: i32 = 6;

/// The partition librdkafka's default partitioner (consistent_random: CRC32 of the key)
/// puts a poll's votes in.
fn partition_of(poll: i64) -> i32 {
    (crc32fast::hash(poll.to_string().as_bytes()) % PARTITIONS as u32) as i32
}

async fn partitions(api: &Api) -> Option<Vec<i32>> {
    let (status, body) = api.get("/readyz").await;
    if status != 200 {
        return None;
    }
    let owned: Vec<i32> = serde_json::from_value(body["partitions"].clone()).ok()?;
    Some(owned)
}

/// Waits until the processes between them own every partition, each owning some.
async fn wait_for_split(apis: &[&Api]) -> Vec<Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = Vec::new();
        for api in apis {
            owned.push(partitions(api).await.unwrap_or_default());
        }
        let all: BTreeSet<i32> = owned.iter().flatten().copied().collect();
        if all.len() == PARTITIONS as usize && owned.iter().all(|p| !p.is_empty()) {
            return owned;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never split: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn next_counts(
    socket: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("an update within 30 s")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = msg {
            let json: Value = serde_json::from_str(&text).unwrap();
            if json["type"] == "counts" {
                return json;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_partitions_and_each_shows_the_others_polls() {
    let env = TestEnv::new(Backend::Production).await;
    let a = ServerProcess::start(&env, &[]);
    let b = ServerProcess::start(&env, &[]);
    let owned = wait_for_split(&[&a.api, &b.api]).await;

    // Polls until each process owns at least one of them.
    let mut polls = Vec::new();
    while !(polls.iter().any(|p| owned[0].contains(&partition_of(*p)))
        && polls.iter().any(|p| owned[1].contains(&partition_of(*p))))
    {
        polls.push(a.api.create_poll(&["A", "B"]).await);
    }
    let of_a = *polls
        .iter()
        .find(|p| owned[0].contains(&partition_of(**p)))
        .unwrap();
    let of_b = *polls
        .iter()
        .find(|p| owned[1].contains(&partition_of(**p)))
        .unwrap();

    // The seed's Socket.IO client on each process hears both polls, whichever counts them.
    let mut seed_on_a = NodeClient::start_at(a.api.addr, serde_json::json!({}));
    let websocket_only = serde_json::json!({ "io": { "transports": ["websocket"] } });
    let mut seed_on_b = NodeClient::start_at(b.api.addr, websocket_only);
    seed_on_a.next_event("connect").await;
    seed_on_b.next_event("connect").await;

    // A subscriber on each process watches the poll the *other* process counts.
    let (mut on_b, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/polls/{of_a}", b.api.addr))
            .await
            .unwrap();
    let (mut on_a, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/polls/{of_b}", a.api.addr))
            .await
            .unwrap();
    assert_eq!(a.api.vote(of_a, 2, "x").await.0, 202);
    assert_eq!(b.api.vote(of_b, 1, "y").await.0, 202);
    let seen_on_b = next_counts(&mut on_b).await;
    assert_eq!(
        (seen_on_b["pollId"].as_i64(), seen_on_b["seq"].as_i64()),
        (Some(of_a), Some(1))
    );
    let seen_on_a = next_counts(&mut on_a).await;
    assert_eq!(
        (seen_on_a["pollId"].as_i64(), seen_on_a["seq"].as_i64()),
        (Some(of_b), Some(1))
    );
    for seed in [&mut seed_on_a, &mut seed_on_b] {
        let mut heard = BTreeSet::new();
        while heard.len() < 2 {
            let stats = seed.next_event("poll-stats").await;
            let id = |key: &str| stats[key].as_str().unwrap().to_owned();
            heard.insert((id("pollId"), id("optionId")));
        }
        let expected = [(of_a, "2"), (of_b, "1")].map(|(p, o)| (p.to_string(), o.to_owned()));
        assert_eq!(heard, BTreeSet::from(expected));
    }
}

#[derive(Default)]
struct Outcome {
    accepted: BTreeSet<(i64, String)>,
    attempted: BTreeSet<(i64, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_processes_under_load_loses_and_double_counts_nothing() {
    let env = TestEnv::new(Backend::Production).await;
    let victim = ServerProcess::start(&env, &[]);
    let survivor = ServerProcess::start(&env, &[]);
    wait_for_split(&[&victim.api, &survivor.api]).await;
    let polls: Vec<i64> = {
        let mut polls = Vec::new();
        for _ in 0..6 {
            polls.push(survivor.api.create_poll(&["A", "B"]).await);
        }
        polls
    };

    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let stop_at = Instant::now() + Duration::from_secs(6);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let api = if w % 2 == 0 {
                victim.api.clone()
            } else {
                survivor.api.clone()
            };
            let (outcome, polls) = (outcome.clone(), polls.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop_at {
                    let poll = polls[i % polls.len()];
                    let user = format!("w{w}-{i}");
                    outcome
                        .lock()
                        .unwrap()
                        .attempted
                        .insert((poll, user.clone()));
                    let sent = api
                        .post("/vote")
                        .json(&serde_json::json!({ "pollId": poll, "optionId": 1, "userId": user }))
                        .send()
                        .await;
                    match sent.map(|r| r.status().as_u16()) {
                        Ok(202) => {
                            outcome.lock().unwrap().accepted.insert((poll, user));
                        }
                        Ok(status) => panic!("unexpected {status}"),
                        Err(_) => return, // the victim is gone
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    victim.signal(Signal::SIGKILL);
    let killed = Instant::now();

    // Failover: the survivor takes every partition (a broker property; reported, not judged).
    loop {
        if partitions(&survivor.api)
            .await
            .is_some_and(|p| p.len() == PARTITIONS as usize)
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the survivor never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "failover: the survivor owned every partition {:?} after the SIGKILL",
        killed.elapsed()
    );
    for w in workers {
        w.await.unwrap();
    }
    drop(victim);

    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    assert!(
        outcome.accepted.len() > 100,
        "load ran: {}",
        outcome.accepted.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for poll in polls {
        let accepted: BTreeSet<&String> = outcome
            .accepted
            .iter()
            .filter(|(p, _)| *p == poll)
            .map(|(_, u)| u)
            .collect();
        let attempted: BTreeSet<&String> = outcome
            .attempted
            .iter()
            .filter(|(p, _)| *p == poll)
            .map(|(_, u)| u)
            .collect();
        let counted = loop {
            let counted: BTreeSet<String> = env.ledger(poll).await.into_iter().collect();
            if accepted.iter().all(|u| counted.contains(*u)) {
                break counted;
            }
            assert!(
                Instant::now() < deadline,
                "poll {poll}: accepted votes missing after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let phantom: Vec<_> = counted.iter().filter(|u| !attempted.contains(u)).collect();
        assert!(
            phantom.is_empty(),
            "poll {poll}: counted but never sent: {phantom:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let total = survivor.api.poll(poll).await["totalVotes"]
            .as_i64()
            .unwrap();
        assert_eq!(
            total,
            env.ledger(poll).await.len() as i64,
            "poll {poll}: counters equal the ledger"
        );
    }
}
