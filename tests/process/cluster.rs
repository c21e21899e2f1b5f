//! Two pollcast processes on one Kafka, Postgres and Redis (one consumer group).
//!
//! The failover tests run the processes with the shipped consumer settings (the helper's
//! shorter test sessions left out), and print how long a takeover took: from the SIGKILL or
//! SIGTERM until the survivor owned every partition, and until a vote for a poll the stopped
//! process counted was counted and pushed to a subscriber by the survivor. Those times
//! depend on the broker (and on this machine); they are reported, not asserted.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::api::socketio::NodeClient;
use crate::helpers::services::TcpProxy;
use crate::helpers::{Api, Backend, SETTLE, ServerProcess, TestEnv};

const PARTITIONS: i32 = 6;

/// The helper's group settings for tests, which these tests leave out to run as shipped.
const TEST_GROUP_SETTINGS: [&str; 3] = [
    "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__SESSION_TIMEOUT_MS",
    "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__HEARTBEAT_INTERVAL_MS",
    "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__MAX_POLL_INTERVAL_MS",
];

/// A process with the shipped consumer settings.
fn start_as_shipped(env: &TestEnv) -> ServerProcess {
    ServerProcess::start_without(env, &[], &TEST_GROUP_SETTINGS)
}

/// The log lines of a process that tell what happened to its partitions.
fn notable(output: &str) -> String {
    output
        .lines()
        .filter(|l| l.contains("partitions") || l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long a takeover took, from `since` (the signal).
struct Takeover {
    /// Until the survivor owned every partition.
    owned_all: Duration,
    /// Until a vote for the stopped process's poll, sent to the survivor, was counted and
    /// pushed to the survivor's subscriber of that poll.
    counted_and_pushed: Duration,
}

/// Sends a probe vote (option 2, which no other vote in these tests takes) for `poll` to the
/// survivor every 250 ms and watches the poll on the survivor's WebSocket, until a counts
/// message shows option 2 counted and the survivor owns every partition.
async fn takeover(survivor: &Api, poll: i64, since: Instant) -> Takeover {
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/polls/{poll}", survivor.addr))
            .await
            .unwrap();
    let (mut owned_all, mut counted_and_pushed) = (None, None);
    let mut probe = 0;
    while owned_all.is_none() || counted_and_pushed.is_none() {
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "no takeover within 120 s (owned every partition: {owned_all:?}, counted: {counted_and_pushed:?})"
        );
        if owned_all.is_none()
            && partitions(survivor)
                .await
                .is_some_and(|p| p.len() == PARTITIONS as usize)
        {
            owned_all = Some(since.elapsed());
        }
        if counted_and_pushed.is_none() {
            let (status, body) = survivor.vote(poll, 2, &format!("probe-{probe}")).await;
            assert_eq!(status, 202, "{body}");
            probe += 1;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(250);
        while let Ok(Some(msg)) = tokio::time::timeout_at(until, socket.next()).await {
            let Ok(Message::Text(text)) = msg else {
                continue;
            };
            let json: Value = serde_json::from_str(&text).unwrap();
            let probe_counted = json["type"] == "counts"
                && json["counts"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|o| o["optionId"] == 2));
            if probe_counted && counted_and_pushed.is_none() {
                counted_and_pushed = Some(since.elapsed());
            }
        }
    }
    Takeover {
        owned_all: owned_all.unwrap(),
        counted_and_pushed: counted_and_pushed.unwrap(),
    }
}

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
    let victim = start_as_shipped(&env);
    let survivor = start_as_shipped(&env);
    let owned = wait_for_split(&[&victim.api, &survivor.api]).await;
    // Six polls at least, one of them counted by the victim.
    let mut polls: Vec<i64> = Vec::new();
    while polls.len() < 6 || !polls.iter().any(|p| owned[0].contains(&partition_of(*p))) {
        polls.push(survivor.api.create_poll(&["A", "B"]).await);
    }
    let of_victim = *polls
        .iter()
        .find(|p| owned[0].contains(&partition_of(**p)))
        .unwrap();

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

    // Failover with the shipped settings (broker-dependent; reported, not judged).
    let failover = takeover(&survivor.api, of_victim, killed).await;
    println!(
        "failover after SIGKILL: the survivor owned every partition after {:.1} s; a new vote \
         for the victim's poll was counted and pushed after {:.1} s",
        failover.owned_all.as_secs_f64(),
        failover.counted_and_pushed.as_secs_f64()
    );
    for w in workers {
        w.await.unwrap();
    }
    let victim_output = victim.output();
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
            if Instant::now() >= deadline {
                let missing: Vec<_> = accepted.iter().filter(|u| !counted.contains(**u)).collect();
                panic!(
                    "poll {poll} (partition {}; the victim owned {:?}): {} of {} accepted votes \
                     missing after 60 s, e.g. {:?}\nsurvivor's rebalances and warnings:\n{}\n\
                     victim's:\n{}",
                    partition_of(poll),
                    owned[0],
                    missing.len(),
                    accepted.len(),
                    &missing[..missing.len().min(10)],
                    notable(&survivor.output()),
                    notable(&victim_output),
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let phantom: Vec<_> = counted
            .iter()
            .filter(|u| !attempted.contains(u) && !u.starts_with("probe-"))
            .collect();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_process_hands_its_polls_over_at_once_and_loses_nothing() {
    let env = TestEnv::new(Backend::Production).await;
    let mut leaver = start_as_shipped(&env);
    // A flush interval this long leaves only the flush at takeover to count the votes that
    // waited for it within the test.
    let stayer = ServerProcess::start_without(
        &env,
        &[("POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS", "60000")],
        &TEST_GROUP_SETTINGS,
    );
    let owned = wait_for_split(&[&leaver.api, &stayer.api]).await;
    let mut polls = Vec::new();
    while !polls.iter().any(|p| owned[0].contains(&partition_of(*p))) {
        polls.push(stayer.api.create_poll(&["A", "B"]).await);
    }
    let of_leaver = *polls.last().unwrap();

    // Votes for the leaver's poll, accepted by it just before it stops, must all be counted.
    let mut accepted = BTreeSet::new();
    for i in 0..50 {
        let user = format!("before-{i}");
        assert_eq!(leaver.api.vote(of_leaver, 1, &user).await.0, 202);
        accepted.insert(user);
    }
    leaver.signal(Signal::SIGTERM);
    let stopped = Instant::now();
    let status = leaver.wait_exit(Duration::from_secs(60));
    let exited = stopped.elapsed();
    assert!(status.success(), "{}", leaver.output());
    assert!(
        leaver.output().contains("left the Kafka consumer group"),
        "left the group explicitly: {}",
        leaver.output()
    );
    assert!(
        !leaver.output().contains(r#""level":"ERROR""#),
        "a graceful stop logs no error: {}",
        leaver.output()
    );

    let handover = takeover(&stayer.api, of_leaver, stopped).await;
    println!(
        "handover after SIGTERM: the process exited after {:.1} s; the other owned every \
         partition after {:.1} s; a new vote for the stopped process's poll was counted and \
         pushed after {:.1} s",
        exited.as_secs_f64(),
        handover.owned_all.as_secs_f64(),
        handover.counted_and_pushed.as_secs_f64()
    );
    assert!(
        handover.counted_and_pushed < Duration::from_secs(40),
        "the polls taken over were flushed at once, not at the next 60 s interval"
    );
    let counted: BTreeSet<String> = env
        .ledger(of_leaver)
        .await
        .into_iter()
        .filter(|u| !u.starts_with("probe-"))
        .collect();
    assert_eq!(
        counted, accepted,
        "the final flush counted every accepted vote"
    );
    // The second half of a rolling restart's step: a replacement joins and takes its share.
    let started = Instant::now();
    let replacement = start_as_shipped(&env);
    replacement.api.wait_ready().await;
    let ready = started.elapsed();
    wait_for_split(&[&stayer.api, &replacement.api]).await;
    println!(
        "rolling restart: the replacement was ready {:.1} s after its start and the two \
         shared the partitions after {:.1} s",
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let total = stayer.api.poll(of_leaver).await["totalVotes"]
        .as_i64()
        .unwrap();
    assert_eq!(
        total,
        env.ledger(of_leaver).await.len() as i64,
        "counters equal the ledger"
    );
}

/// A Socket.IO client behind a load balancer (a proxy here) whose process is killed: the
/// client reconnects by itself, lands on the other process, subscribes again, and goes on
/// from a snapshot, never backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socketio_client_behind_a_killed_process_reconnects_to_another_and_catches_up() {
    let env = TestEnv::new(Backend::Production).await;
    let victim = start_as_shipped(&env);
    let survivor = start_as_shipped(&env);
    wait_for_split(&[&victim.api, &survivor.api]).await;
    let poll = survivor.api.create_poll(&["A", "B"]).await;
    let balancer = TcpProxy::start(victim.api.addr).await;
    let options = serde_json::json!({
        "subscribe": { "pollId": poll.to_string() },
        "io": { "transports": ["websocket"], "reconnectionDelay": 200, "reconnectionDelayMax": 1000 },
        "lifetimeMs": 60000,
    });
    let mut client = NodeClient::start_at(balancer.addr, options);
    assert_eq!(client.next_event("snapshot").await["seq"], 0);
    assert_eq!(survivor.api.vote(poll, 1, "before").await.0, 202);
    let first = client.next_event("poll-stats").await;
    assert_eq!(
        (first["newCount"].as_i64(), first["seq"].as_i64()),
        (Some(1), Some(1))
    );

    victim.signal(nix::sys::signal::Signal::SIGKILL);
    balancer.retarget(survivor.api.addr);
    // Counted meanwhile, while the client is away: the snapshot brings it.
    assert_eq!(survivor.api.vote(poll, 2, "while-away").await.0, 202);
    survivor.api.wait_for_total(poll, 2, SETTLE).await;
    client.next_event("disconnect").await;
    let back = client.next_event("snapshot").await;
    let mut seq = back["seq"].as_i64().unwrap();
    assert!(
        seq >= 1,
        "resumed from a snapshot no older than what it saw: {back}"
    );
    let mut counts: Vec<i64> = back["poll"]["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["votes"].as_i64().unwrap())
        .collect();
    assert_eq!(survivor.api.vote(poll, 1, "after").await.0, 202);
    // The snapshot may predate the vote counted while the client was away: the updates
    // that follow bring it, and every vote since, each newer than the last.
    while counts != [2, 1] {
        let stats = client.next_event("poll-stats").await;
        let next = stats["seq"].as_i64().unwrap();
        assert!(next > seq, "never backwards: {stats} after seq {seq}");
        seq = next;
        let option: usize = stats["optionId"].as_str().unwrap().parse().unwrap();
        counts[option - 1] = stats["newCount"].as_i64().unwrap();
    }
}
