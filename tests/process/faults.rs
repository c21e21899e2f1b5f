//! Dependencies failing under a running pollcast (production backends): each is cut with a
//! TCP proxy of the test suite, then restored; the shared services are never stopped.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::services::{PrivateBroker, TcpProxy, url_addr, with_addr};
use crate::helpers::{Api, Backend, SETTLE, TestApp, TestEnv};

/// Votes until one is accepted (a dependency that just came back may need a moment).
async fn vote_until_accepted(api: &Api, poll: i64, user: &str) {
    vote_until_accepted_with(api, poll, user, None).await
}

/// A vote for option 1, with `Idempotency-Key: key` if given.
async fn vote_with(api: &Api, poll: i64, user: &str, key: Option<&str>) -> (u16, Value) {
    let body = serde_json::json!({ "pollId": poll, "optionId": 1, "userId": user });
    let mut request = api.post("/vote").json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// [`vote_until_accepted`], with `Idempotency-Key: key` if given.
async fn vote_until_accepted_with(api: &Api, poll: i64, user: &str, key: Option<&str>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, body) = vote_with(api, poll, user, key).await;
        if status == 202 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "votes still refused after {SETTLE:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readiness(api: &Api) -> (u16, Value) {
    api.get("/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_503_with_nothing_appended_and_votes_resume_when_it_returns() {
    let env = TestEnv::new(Backend::Production).await;
    let redis = env.production.as_ref().unwrap().redis_url.clone();
    let proxy = TcpProxy::start(url_addr(&redis)).await;
    let app = TestApp::start(env, |s| s.dedup.redis_url = with_addr(&redis, proxy.addr)).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "before").await.0, 202);

    proxy.cut();
    let started = Instant::now();
    let (status, body) = app.api.vote(poll, 1, "during").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable");
    // What Redis or its client said stays in the log: it names hosts, and helps no client.
    assert_eq!(body["message"], "service unavailable; retry later");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered promptly: {:?}",
        started.elapsed()
    );
    let (status, ready) = readiness(&app.api).await;
    assert_eq!(status, 503);
    assert_eq!(ready["failing"], serde_json::json!(["dedup"]));
    assert_eq!(app.api.get("/healthz").await.0, 200, "still alive");

    proxy.restore();
    vote_until_accepted(&app.api, poll, "after").await;
    app.api.wait_for_total(poll, 2, SETTLE).await;
    assert_eq!(
        app.env.ledger(poll).await,
        ["after", "before"],
        "the refused vote was not appended"
    );
    vote_until_accepted(&app.api, poll, "during").await;
    app.api.wait_for_total(poll, 3, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_means_503_after_a_bounded_wait_and_the_claim_is_kept_for_a_retry() {
    let broker = PrivateBroker::start().await;
    let env = TestEnv::new(Backend::Production).await;
    let production = env.production.clone().unwrap();
    let app = TestApp::start(env, |s| {
        s.log.kafka.brokers = broker.brokers();
        s.log.kafka.produce_timeout_ms = 2000;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "before").await.0, 202);
    app.api.wait_for_total(poll, 1, SETTLE).await;

    broker.proxy.cut();
    let started = Instant::now();
    let (status, body) = vote_with(&app.api, poll, "during", Some("k-during")).await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable");
    assert!(
        waited < Duration::from_secs(8),
        "bounded by the produce timeout: {waited:?}"
    );
    // The producer timed out: the vote may still be delivered, so its claim stays, and
    // only its retry (same key) is accepted.
    assert!(
        production.claimed(poll, "during").await,
        "claim kept while the vote's outcome is unknown"
    );
    let (status, body) = vote_with(&app.api, poll, "during", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("already_voted"))
    );

    broker.proxy.restore();
    vote_until_accepted_with(&app.api, poll, "during", Some("k-during")).await;
    app.api.wait_for_total(poll, 2, SETTLE).await;
    // Whether or not the timed-out attempt was delivered after all, it is counted once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.api.poll(poll).await["totalVotes"], 2);
    assert_eq!(app.env.ledger(poll).await, ["before", "during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_during_flushes_loses_nothing_and_counts_catch_up() {
    // Also a poll whose first votes come while the store is down: its aggregator starts
    // without its poll and reads it once the store is back.
    let env = TestEnv::new(Backend::Production).await;
    let database = env.production.as_ref().unwrap().database_url.clone();
    let proxy = TcpProxy::start(url_addr(&database)).await;
    let app = TestApp::start(env, |s| {
        s.store.url = with_addr(&database, proxy.addr);
        s.store.acquire_timeout_ms = 1000;
        s.aggregator.flush_interval_ms = 300;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let first_voted_while_down = app.api.create_poll(&["A", "B"]).await;
    for i in 0..10 {
        assert_eq!(app.api.vote(poll, 1, &format!("early-{i}")).await.0, 202);
    }

    proxy.cut();
    for i in 0..10 {
        let (status, body) = app.api.vote(poll, 2, &format!("late-{i}")).await;
        assert_eq!(status, 202, "votes need only the log and the guard: {body}");
    }
    for i in 0..3 {
        let (status, body) = app
            .api
            .vote(first_voted_while_down, 1, &format!("new-{i}"))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.api.get("/healthz").await.0, 200, "still alive");
    let (status, ready) = readiness(&app.api).await;
    assert_eq!(status, 503);
    assert_eq!(ready["failing"], serde_json::json!(["store"]));
    let (status, body) = app.api.get(&format!("/polls/{poll}")).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));

    proxy.restore();
    let counted = app.api.wait_for_total(poll, 20, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 2), 10);
    assert_eq!(app.env.ledger(poll).await.len(), 20);
    let counted = app
        .api
        .wait_for_total(first_voted_while_down, 3, SETTLE)
        .await;
    assert_eq!(Api::votes_of(&counted, 1), 3);
}
