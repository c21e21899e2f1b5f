use std::time::{Duration, Instant};

use crate::helpers::{Api, Backend, SETTLE, TestApp};

/// The value of the first sample of `/metrics` whose line starts with `prefix`.
pub async fn sample(app: &TestApp, prefix: &str) -> Option<f64> {
    sample_of(&app.api, prefix).await
}

/// The same, of any server.
pub async fn sample_of(api: &Api, prefix: &str) -> Option<f64> {
    api.metrics()
        .await
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn eventually(app: &TestApp, prefix: &str, check: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(value) = sample(app, prefix).await
            && check(value)
        {
            return value;
        }
        assert!(Instant::now() < deadline, "no sample {prefix} as expected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metrics_count_votes_requests_flushes_lag_and_subscribers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app
        .api
        .http
        .get(app.api.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    // Why deltas: a counter that moved by more than this test's requests would hide a
    // double count; the metrics are the process's, and each test runs in its own process.
    let counters = [
        r#"pollcast_votes_total{result="accepted"}"#,
        r#"pollcast_votes_total{result="already_voted"}"#,
        r#"pollcast_votes_total{result="malformed_json"}"#,
        "pollcast_votes_counted_total",
    ];
    let mut before = Vec::new();
    for prefix in counters {
        before.push(sample(&app, prefix).await.unwrap_or(0.0));
    }
    let poll = app.api.create_poll(&["A", "B"]).await;
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/polls/{poll}", app.api.addr))
            .await
            .unwrap();
    app.api.vote(poll, 1, "u1").await;
    app.api.vote(poll, 1, "u1").await;
    app.api.post("/vote").body("{oops").send().await.unwrap();
    app.api.wait_for_total(poll, 1, SETTLE).await;

    for (prefix, at_least) in [
        (r#"pollcast_votes_total{result="accepted"}"#, 1.0),
        (r#"pollcast_votes_total{result="already_voted"}"#, 1.0),
        (r#"pollcast_votes_total{result="malformed_json"}"#, 1.0),
        ("pollcast_votes_counted_total", 1.0),
        (
            r#"pollcast_http_request_duration_seconds_count{method="POST",route="/vote",status="202"}"#,
            1.0,
        ),
        ("pollcast_flush_duration_seconds_count", 1.0),
        ("pollcast_flush_batch_size_count", 1.0),
        ("pollcast_websocket_subscribers", 1.0),
    ] {
        eventually(&app, prefix, |v| v >= at_least).await;
    }
    for (prefix, before) in counters.into_iter().zip(before) {
        eventually(&app, prefix, |v| v == before + 1.0).await;
    }
    eventually(&app, "pollcast_votes_pending_flush", |v| v == 0.0).await;
    eventually(&app, "pollcast_consumer_lag{", |v| v == 0.0).await;
    drop(socket);
    eventually(&app, "pollcast_websocket_subscribers", |v| v == 0.0).await;
}

crate::contract_tests!(metrics_count_votes_requests_flushes_lag_and_subscribers);
