//! Interoperability with the seed app and operator tooling on the production backends.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Connection;

use crate::helpers::{Api, Backend, SETTLE, TestApp, TestEnv, run_to_exit_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_votes_written_by_the_seed_app_are_counted() {
    let app = TestApp::spawn(Backend::Production).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let production = app.env.production.clone().unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &production.brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    // The seed's record: string ids, keyed by pollId, no timestamp.
    let value = format!(r#"{{"pollId":"{poll}","optionId":"2","userId":"seed-user"}}"#);
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
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 2), 1);
    assert_eq!(app.env.ledger(poll).await, ["seed-user"]);
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
