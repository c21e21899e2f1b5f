//! Multiple choice, safe retries (idempotency keys) and vote changes: each still counted
//! exactly once per (poll, user).

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Api, Backend, SETTLE, TestApp};

async fn create(api: &Api, body: Value) -> i64 {
    api.create_poll_with(body).await["id"].as_i64().unwrap()
}

async fn vote_with_key(api: &Api, body: Value, key: &str) -> u16 {
    let resp = api
        .post("/vote")
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

fn counts(poll: &Value) -> Vec<i64> {
    poll["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["votes"].as_i64().unwrap())
        .collect()
}

async fn ledger(api: &Api, poll: i64) -> Vec<Value> {
    let url = api.url(&format!("/polls/{poll}/export?format=json&data=ledger"));
    let resp = api
        .http
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json::<Vec<Value>>().await.unwrap()
}

async fn a_multiple_choice_ballot_counts_each_chosen_option_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = create(
        &app.api,
        json!({ "question": "Pick two", "options": ["A", "B", "C"], "maxChoices": 2 }),
    )
    .await;
    let (status, _) = app
        .api
        .vote_body(json!({ "pollId": poll, "optionIds": [1, 3], "userId": "u1" }))
        .await;
    assert_eq!(status, 202);
    let (status, _) = app
        .api
        .vote_body(json!({ "pollId": poll, "optionId": 2, "userId": "u2" }))
        .await;
    assert_eq!(status, 202, "a single choice is a ballot too");
    let (status, _) = app
        .api
        .vote_body(json!({ "pollId": poll, "optionIds": [2], "userId": "u1" }))
        .await;
    assert_eq!(status, 409, "one ballot per voter");
    let counted = app.api.wait_for_total(poll, 3, SETTLE).await;
    assert_eq!(counts(&counted), [1, 1, 1]);
    assert_eq!(counted["voters"], 2);
    assert_eq!(counted["maxChoices"], 2);
}

async fn a_ballot_with_too_many_repeated_or_unknown_choices_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = create(
        &app.api,
        json!({ "question": "Pick two", "options": ["A", "B", "C"], "maxChoices": 2 }),
    )
    .await;
    for (choices, status) in [
        (json!([1, 2, 3]), 422),
        (json!([1, 1]), 422),
        (json!([]), 422),
        (json!([1, 9]), 404),
    ] {
        let body = json!({ "pollId": poll, "optionIds": choices, "userId": "u" });
        assert_eq!(app.api.vote_body(body).await.0, status, "{choices}");
    }
    let both = json!({ "pollId": poll, "optionId": 1, "optionIds": [2], "userId": "u" });
    assert_eq!(app.api.vote_body(both).await.0, 422);
    let resp = app
        .api
        .post("/polls")
        .json(&json!({ "question": "Q", "options": ["A", "B"], "maxChoices": 3 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422, "more choices than options");
}

async fn a_retried_vote_is_accepted_again_and_counted_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let body = json!({ "pollId": poll, "optionId": 1, "userId": "flaky" });
    assert_eq!(vote_with_key(&app.api, body.clone(), "key-1").await, 202);
    assert_eq!(
        vote_with_key(&app.api, body.clone(), "key-1").await,
        202,
        "the retry"
    );
    let in_body = json!({ "pollId": poll, "optionId": 1, "userId": "flaky", "voteId": "key-1" });
    assert_eq!(
        app.api.vote_body(in_body).await.0,
        202,
        "the key may be in the body"
    );
    assert_eq!(
        vote_with_key(&app.api, body.clone(), "key-2").await,
        409,
        "another vote"
    );
    assert_eq!(app.api.vote_body(body).await.0, 409, "a vote without a key");
    app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(ledger(&app.api, poll).await.len(), 1);
    let mismatch = json!({ "pollId": poll, "optionId": 1, "userId": "x", "voteId": "a" });
    assert_eq!(vote_with_key(&app.api, mismatch, "b").await, 422);
}

async fn a_voter_may_change_their_vote_where_the_poll_allows_it(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.aggregator.flush_interval_ms = 100).await;
    let poll = create(
        &app.api,
        json!({ "question": "Changeable", "options": ["A", "B"], "allowChange": true }),
    )
    .await;
    assert_eq!(app.api.vote(poll, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(poll, 1, "u2").await.0, 202);
    app.api.wait_for_total(poll, 2, SETTLE).await;
    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 202, "a change");
    let deadline = std::time::Instant::now() + SETTLE;
    let moved = loop {
        let poll = app.api.poll(poll).await;
        if counts(&poll) == [1, 1] {
            break poll;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "change never counted: {poll}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(moved["voters"], 2);
    assert_eq!(moved["totalVotes"], 2);
    let rows = ledger(&app.api, poll).await;
    let of_u1: Vec<&Value> = rows.iter().filter(|r| r["userId"] == "u1").collect();
    assert_eq!(of_u1.len(), 2, "the ledger keeps the history: {rows:?}");
    assert_eq!(of_u1[0]["current"], false);
    assert_eq!(of_u1[1]["current"], true);
    assert_eq!(of_u1[1]["optionIds"], json!([2]));
    app.api
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        app.api.vote(poll, 1, "u1").await.0,
        410,
        "no changes once closed"
    );
}

async fn without_allow_change_a_second_vote_is_still_409(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 409);
}

/// A vote with `Idempotency-Key: key`: the status and the body.
async fn vote_with_key_answer(api: &Api, body: Value, key: &str) -> (u16, Value) {
    let resp = api
        .post("/vote")
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn a_vote_id_reused_for_another_ballot_is_refused_with_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B", "C"]).await;
    let first = json!({ "pollId": poll, "optionId": 1, "userId": "u" });
    let other = json!({ "pollId": poll, "optionId": 3, "userId": "u" });
    assert_eq!(vote_with_key(&app.api, first.clone(), "k").await, 202);
    let (status, body) = vote_with_key_answer(&app.api, other.clone(), "k").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "idempotency_key_reused");
    let in_body = json!({ "pollId": poll, "optionIds": [3], "userId": "u", "voteId": "k" });
    let (status, body) = app.api.vote_body(in_body).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(
        vote_with_key(&app.api, first, "k").await,
        202,
        "the first ballot's retry still is one"
    );
    assert_eq!(
        vote_with_key(&app.api, other, "k2").await,
        409,
        "a new key: a second vote"
    );
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(counts(&counted), [1, 0, 0]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(counts(&app.api.poll(poll).await), [1, 0, 0]);
    assert_eq!(ledger(&app.api, poll).await.len(), 1);
}

async fn parallel_votes_with_one_key_are_answered_as_they_are_counted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B", "C"]).await;
    let attempts = (0..10).map(|i| {
        let api = app.api.clone();
        let option = if i % 2 == 0 { 1 } else { 3 };
        tokio::spawn(async move {
            let body = json!({ "pollId": poll, "optionId": option, "userId": "u" });
            (option, vote_with_key_answer(&api, body, "same-key").await)
        })
    });
    let mut answers = Vec::new();
    for attempt in attempts {
        answers.push(attempt.await.unwrap());
    }
    let accepted: std::collections::HashSet<i64> = answers
        .iter()
        .filter(|(_, (status, _))| *status == 202)
        .map(|(option, _)| *option)
        .collect();
    assert_eq!(accepted.len(), 1, "one ballot is accepted: {answers:?}");
    let winner = *accepted.iter().next().unwrap();
    for (option, (status, body)) in &answers {
        if *option == winner {
            assert_eq!(
                *status, 202,
                "every request of the accepted ballot: {answers:?}"
            );
        } else {
            assert_eq!(
                (*status, body["error"].as_str()),
                (422, Some("idempotency_key_reused")),
                "{answers:?}"
            );
        }
    }
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut expected = vec![0, 0, 0];
    expected[winner as usize - 1] = 1;
    assert_eq!(counts(&counted), expected);
    assert_eq!(counts(&app.api.poll(poll).await), expected);
    assert_eq!(ledger(&app.api, poll).await.len(), 1);
}

/// The value of the `/metrics` sample whose line starts with `prefix`.
async fn metric(api: &Api, prefix: &str) -> Option<f64> {
    let text = api.http.get(api.url("/metrics")).send().await.unwrap();
    let text = text.text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn a_vote_id_reused_past_an_expired_claim_is_reported_by_the_ledger(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.dedup.ttl_secs = 1).await;
    let poll = app.api.create_poll(&["A", "B", "C"]).await;
    let first = json!({ "pollId": poll, "optionId": 1, "userId": "u" });
    assert_eq!(vote_with_key(&app.api, first, "k").await, 202);
    app.api.wait_for_total(poll, 1, SETTLE).await;
    // Past the claim's lifetime the guard no longer knows the key: only the ledger does.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let other = json!({ "pollId": poll, "optionId": 3, "userId": "u" });
    assert_eq!(vote_with_key(&app.api, other, "k").await, 202);
    let deadline = std::time::Instant::now() + SETTLE;
    while metric(&app.api, "pollcast_vote_id_reused_total").await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the reused vote id was never reported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(counts(&app.api.poll(poll).await), [1, 0, 0]);
    assert_eq!(ledger(&app.api, poll).await.len(), 1);
}

crate::contract_tests!(
    a_vote_id_reused_for_another_ballot_is_refused_with_422,
    parallel_votes_with_one_key_are_answered_as_they_are_counted,
    a_vote_id_reused_past_an_expired_claim_is_reported_by_the_ledger,
    a_multiple_choice_ballot_counts_each_chosen_option_once,
    a_ballot_with_too_many_repeated_or_unknown_choices_is_refused,
    a_retried_vote_is_accepted_again_and_counted_once,
    a_voter_may_change_their_vote_where_the_poll_allows_it,
    without_allow_change_a_second_vote_is_still_409,
);
