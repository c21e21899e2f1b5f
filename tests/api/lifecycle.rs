//! Closing polls (by hand and on schedule) and hidden results.

use std::time::Duration;

use pollcast_actors::domain::{now_millis, rfc3339};
use serde_json::{Value, json};

use super::ws::{next_json, subscribe};
use crate::helpers::{Backend, SETTLE, TestApp};

/// Reads messages until one of type `kind` arrives.
async fn next_of_type(socket: &mut super::ws::Socket, kind: &str) -> Value {
    loop {
        let msg = next_json(socket).await;
        if msg["type"] == kind {
            return msg;
        }
    }
}

fn count_of(message: &Value, option: i64) -> i64 {
    message["counts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["optionId"] == option)
        .map(|c| c["newCount"].as_i64().unwrap())
        .unwrap()
}

async fn closing_a_poll_publishes_its_final_counts_after_its_last_votes(backend: Backend) {
    // Only the close can trigger a flush this slow: the closed message proves the votes
    // before the close were flushed first.
    let app = TestApp::spawn_with(backend, |s| s.aggregator.flush_interval_ms = 60_000).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;
    next_json(&mut socket).await;
    for i in 0..5 {
        assert_eq!(app.api.vote(poll, 2, &format!("u{i}")).await.0, 202);
    }
    app.api.close_poll(poll).await;
    let closed = next_of_type(&mut socket, "closed").await;
    assert_eq!(closed["pollId"], poll);
    assert_eq!(count_of(&closed, 2), 5);
    assert_eq!(count_of(&closed, 1), 0);
    assert!(closed["closedAt"].as_str().is_some());
    assert_eq!(app.api.vote(poll, 1, "late").await.0, 410);
    assert_eq!(app.api.poll(poll).await["totalVotes"], 5);

    // Closing again changes nothing and publishes nothing more.
    app.api.close_poll(poll).await;
    let more = tokio::time::timeout(Duration::from_secs(2), next_json(&mut socket)).await;
    assert!(more.is_err(), "a second closed message: {more:?}");
}

async fn a_poll_closes_by_itself_at_its_closing_time(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.aggregator.flush_interval_ms = 100).await;
    let closes_at = now_millis() + 2500;
    let poll = app.api.create_poll_with(
        json!({ "question": "Quick?", "options": ["Yes", "No"], "closesAt": rfc3339(closes_at) }),
    )
    .await;
    let id = poll["id"].as_i64().unwrap();
    assert_eq!(poll["closesAt"], rfc3339(closes_at));
    let mut socket = subscribe(&app, id).await;
    next_json(&mut socket).await;
    assert_eq!(app.api.vote(id, 1, "in-time").await.0, 202);
    let closed = next_of_type(&mut socket, "closed").await;
    // The final counts wait the grace (300 ms in tests) after the closing time, for votes
    // other processes took just before it.
    let published = now_millis();
    assert!(
        published >= closes_at + 300,
        "final counts {} ms after the closing time, before the grace was up",
        published - closes_at
    );
    assert_eq!(closed["closedAt"], rfc3339(closes_at));
    assert_eq!(count_of(&closed, 1), 1);
    assert_eq!(app.api.vote(id, 2, "too-late").await.0, 410);
    let shown = app.api.poll(id).await;
    assert_eq!(shown["closed"], true);
    assert_eq!(shown["closedAt"], rfc3339(closes_at));
}

async fn a_closing_time_in_the_past_or_malformed_is_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for closes_at in [json!("2001-01-01T00:00:00Z"), json!("tomorrow"), json!(5)] {
        let body = json!({ "question": "Q?", "options": ["A", "B"], "closesAt": closes_at });
        let resp = app.api.post("/polls").json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 422, "{closes_at}");
    }
}

async fn hidden_results_show_no_counts_until_the_poll_closes(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.aggregator.flush_interval_ms = 100).await;
    let poll = app
        .api
        .create_poll_with(
            json!({ "question": "Secret?", "options": ["A", "B"], "hideResults": true }),
        )
        .await;
    let id = poll["id"].as_i64().unwrap();
    assert_eq!(poll["hideResults"], true);
    let mut socket = subscribe(&app, id).await;
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["poll"]["options"][0]["votes"], Value::Null);
    assert_eq!(app.api.vote(id, 1, "u1").await.0, 202);
    // Wait until the vote is surely counted (the admin export sees it), then check that
    // nothing reached the public.
    let export = format!("/polls/{id}/export?format=json");
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let resp = app
            .api
            .http
            .get(app.api.url(&export))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        if body["totalVotes"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "vote never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let public = app.api.poll(id).await;
    assert_eq!(public["totalVotes"], Value::Null);
    assert_eq!(public["options"][0]["votes"], Value::Null);
    let (status, body) = app.api.get(&export).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "results_hidden");

    app.api
        .post(&format!("/polls/{id}/close"))
        .send()
        .await
        .unwrap();
    let first = next_json(&mut socket).await;
    assert_eq!(
        first["type"], "closed",
        "no counts before the final ones: {first}"
    );
    assert_eq!(count_of(&first, 1), 1);
    assert_eq!(app.api.poll(id).await["totalVotes"], 1);
}
async fn a_poll_closed_by_another_process_soon_refuses_votes_here(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (open, closing) = (
        app.api.create_poll(&["A", "B"]).await,
        app.api.create_poll(&["A", "B"]).await,
    );
    for poll in [open, closing] {
        assert_eq!(app.api.vote(poll, 1, "before").await.0, 202);
    }
    // Another process's close reaches this one only through the store.
    let settings = pollcast::Settings::parse(app.env.settings()).unwrap();
    let store = pollcast::startup::open_store(&settings, &pollcast::background::Background::new())
        .await
        .unwrap();
    store.close_poll(closing, now_millis()).await.unwrap();
    assert_eq!(
        store
            .closed_among(&[open, closing, closing + 1000])
            .await
            .unwrap(),
        [closing],
        "only the closed poll, and no unknown one"
    );
    let closed_at = std::time::Instant::now();
    let mut voter = 0;
    loop {
        voter += 1;
        let status = app.api.vote(closing, 1, &format!("after-{voter}")).await.0;
        if status == 410 {
            break;
        }
        assert_eq!(status, 202);
        assert!(
            closed_at.elapsed() < Duration::from_secs(3),
            "votes still taken {:?} after the close",
            closed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.api.vote(open, 1, "after").await.0, 202, "the open poll");
}

crate::contract_tests!(
    a_poll_closed_by_another_process_soon_refuses_votes_here,
    closing_a_poll_publishes_its_final_counts_after_its_last_votes,
    a_poll_closes_by_itself_at_its_closing_time,
    a_closing_time_in_the_past_or_malformed_is_422,
    hidden_results_show_no_counts_until_the_poll_closes,
);
