//! Interoperability with the seed app and operator tooling on the production backends.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Connection;

use crate::helpers::{Api, Backend, SETTLE, TestApp, TestEnv, run_to_exit_in};

/// Writes a vote to `raw-votes` as the seed app's producer does: string ids, keyed by
/// pollId, no timestamp.
async fn send_seed_vote(app: &TestApp, poll: i64, option: i64, user: &str) {
    let production = app.env.production.clone().unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &production.brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let value = format!(r#"{{"pollId":"{poll}","optionId":"{option}","userId":"{user}"}}"#);
    let key = poll.to_string();
    producer
        .send(
            FutureRecord::to(&production.raw_votes_topic)
                .key(&key)
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_votes_written_by_the_seed_app_are_counted() {
    let app = TestApp::spawn(Backend::Production).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    send_seed_vote(&app, poll, 2, "seed-user").await;
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 2), 1);
    assert_eq!(app.env.ledger(poll).await, ["seed-user"]);
}

/// Why the seed's producer: pollcast itself refuses votes once a poll is closed, and a vote
/// counted after the final result is one another producer wrote (or one whose append
/// outlasted the grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_counted_after_a_hidden_polls_final_result_reaches_subscribers() {
    let app = TestApp::spawn(Backend::Production).await;
    let poll = app
        .api
        .create_poll_with(serde_json::json!({
            "question": "Secret?", "options": ["A", "B"], "hideResults": true
        }))
        .await["id"]
        .as_i64()
        .unwrap();
    let mut socket = crate::api::ws::subscribe(&app, poll).await;
    assert_eq!(
        crate::api::ws::next_json(&mut socket).await["type"],
        "snapshot"
    );
    app.api.close_poll(poll).await;
    loop {
        if crate::api::ws::next_json(&mut socket).await["type"] == "closed" {
            break;
        }
    }
    send_seed_vote(&app, poll, 2, "after-the-close").await;
    let late = crate::api::ws::next_json(&mut socket).await;
    assert_eq!(late["type"], "counts", "{late}");
    assert_eq!(late["counts"][0]["optionId"], 2, "{late}");
    assert_eq!(late["counts"][0]["newCount"], 1, "{late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_postgres_schema_and_exits() {
    let env = TestEnv::new(Backend::Production).await;
    let (status, output) = run_to_exit_in(&env, &["migrate"]);
    assert_eq!(status.code(), Some(0), "{output}");
    let url = &env.production.as_ref().unwrap().database_url;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::TEXT FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name IN ('polls', 'poll_options', 'votes') \
         ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, ["poll_options", "polls", "votes"]);
    let (again, output) = run_to_exit_in(&env, &["migrate"]);
    assert_eq!(again.code(), Some(0), "idempotent: {output}");
}

/// The vote topic is created with `log.kafka.partitions`, the counts topic with
/// `log.kafka.poll_updates_partitions` (one unless set: every process reads all of the
/// counts, so more partitions would only add to every fetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vote_topic_and_the_counts_topic_are_created_with_their_own_partitions() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let env = TestEnv::new(Backend::Production).await;
    let production = env.production.clone().unwrap();
    // Neither the helper's 3 nor the default 1: the setting itself is used.
    let _app = TestApp::start(env, |s| s.log.kafka.poll_updates_partitions = 2).await;
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &production.brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let partitions = |topic: &str| {
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0].partitions().len()
    };
    // The helper sets `log.kafka.partitions` to 3.
    assert_eq!(partitions(&production.raw_votes_topic), 3);
    assert_eq!(partitions(&production.poll_updates_topic), 2);
}

/// With `log.kafka.seed_poll_updates_topic` set, each flush is also written there as the
/// seed's `poll-updates` records (string ids, keyed by pollId), after pollcast's rules: a
/// poll hiding its results is written only at its close, every option then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_poll_updates_records_are_written_when_configured() {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};

    let env = TestEnv::new(Backend::Production).await;
    let production = env.production.clone().unwrap();
    let topic = format!("{}-seed", production.poll_updates_topic);
    let seed_topic = topic.clone();
    let app = TestApp::start(env, move |s| {
        s.log.kafka.seed_poll_updates_topic = Some(seed_topic);
    })
    .await;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &production.brokers)
        .set("broker.address.family", "v4")
        .set("group.id", format!("{}-seed-reader", production.group_id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // Why assigned partitions and not a group: joining one takes the broker seconds.
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        partitions
            .add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&partitions).unwrap();

    let open = app.api.create_poll(&["A", "B"]).await;
    let hidden = app
        .api
        .create_poll_with(serde_json::json!({
            "question": "Secret?", "options": ["A", "B"], "hideResults": true
        }))
        .await["id"]
        .as_i64()
        .unwrap();
    assert_eq!(app.api.vote(open, 2, "u1").await.0, 202);
    assert_eq!(app.api.vote(hidden, 2, "u1").await.0, 202);
    app.api.wait_for_total(open, 1, SETTLE).await;
    app.api.close_poll(hidden).await;

    // Records in order; the hidden poll's two come last (its close), and once each.
    let mut of_open = Vec::new();
    let mut of_hidden = Vec::new();
    while of_open.is_empty() || of_hidden.len() < 2 {
        let message = tokio::time::timeout(SETTLE, consumer.recv())
            .await
            .expect("a seed record in time")
            .unwrap();
        let key = std::str::from_utf8(message.key().unwrap())
            .unwrap()
            .to_owned();
        let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(value["pollId"], key, "keyed by pollId");
        if key == open.to_string() {
            of_open.push(value);
        } else {
            assert_eq!(key, hidden.to_string());
            of_hidden.push(value);
        }
    }
    assert_eq!(
        of_open,
        [serde_json::json!({ "optionId": "2", "pollId": open.to_string(), "newCount": 1 })]
    );
    of_hidden.sort_by_key(|v| v["optionId"].as_str().unwrap().to_owned());
    assert_eq!(
        of_hidden,
        [
            serde_json::json!({ "optionId": "1", "pollId": hidden.to_string(), "newCount": 0 }),
            serde_json::json!({ "optionId": "2", "pollId": hidden.to_string(), "newCount": 1 }),
        ]
    );
}
