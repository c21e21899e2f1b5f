use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp};

use crate::helpers::SETTLE;

async fn vote_is_accepted_with_202_and_counted_after_a_flush(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let (status, body) = app.api.vote(poll, 2, "u-17").await;
    assert_eq!(status, 202);
    assert_eq!(body, json!({ "status": "Vote queued" }));
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 2), 1);
    assert_eq!(Api::votes_of(&counted, 1), 0);
    assert_eq!(counted["seq"], 1);
}

async fn seed_clients_string_ids_are_accepted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let (status, _) = app
        .api
        .vote_body(json!({ "pollId": poll.to_string(), "optionId": "1", "userId": "u-1" }))
        .await;
    assert_eq!(status, 202);
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 1), 1);
}

async fn duplicate_vote_is_rejected_with_409(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "same-user").await.0, 202);
    let (status, body) = app.api.vote(poll, 2, "same-user").await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "already_voted");
    let other_poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(
        app.api.vote(other_poll, 1, "same-user").await.0,
        202,
        "one vote per poll"
    );
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 1), 1);
}

async fn vote_for_an_unknown_poll_or_option_is_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let (status, body) = app.api.vote(poll + 100, 1, "u").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("poll_not_found"))
    );
    let (status, body) = app.api.vote(poll, 3, "u").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("option_not_found"))
    );
    assert_eq!(
        app.api.vote(poll, 1, "u").await.0,
        202,
        "a refused vote does not hold the voter"
    );
}

async fn vote_in_a_closed_poll_is_rejected_with_410(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "early").await.0, 202);
    app.api
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap();
    let (status, body) = app.api.vote(poll, 1, "late").await;
    assert_eq!(status, 410);
    assert_eq!(body["error"], "poll_closed");
    app.api.wait_for_total(poll, 1, SETTLE).await;
}

async fn malformed_votes_are_400_or_422_never_500(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let cases: Vec<(Value, u16)> = vec![
        (json!({ "pollId": poll, "optionId": 1 }), 422),
        (json!({ "pollId": poll, "userId": "u" }), 422),
        (json!({ "pollId": true, "optionId": 1, "userId": "u" }), 422),
        (
            json!({ "pollId": "abc", "optionId": 1, "userId": "u" }),
            422,
        ),
        (json!({ "pollId": 1.5, "optionId": 1, "userId": "u" }), 422),
        (json!({ "pollId": poll, "optionId": 1, "userId": 7 }), 422),
        (json!({ "pollId": poll, "optionId": 1, "userId": "" }), 422),
        (
            json!({ "pollId": poll, "optionId": 1, "userId": "x".repeat(129) }),
            422,
        ),
        (
            json!({ "pollId": poll, "optionId": 1, "userId": "tab\there" }),
            422,
        ),
        (json!([1, 2, 3]), 422),
    ];
    for (body, expected) in cases {
        let (status, err) = app.api.vote_body(body.clone()).await;
        assert_eq!(status, expected, "{body} -> {err}");
        assert!(err["message"].is_string(), "{body} has a JSON error");
    }
    for raw in ["", "{", "nul", "{\"pollId\":1,}"] {
        let resp = app.api.post("/vote").body(raw).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{raw:?}");
    }
    let huge = json!({ "pollId": poll, "optionId": 1, "userId": "u", "pad": "p".repeat(20_000) });
    assert_eq!(app.api.vote_body(huge).await.0, 413);
    let get = app.api.http.get(app.api.url("/vote")).send().await.unwrap();
    assert_eq!(get.status().as_u16(), 405);
}

async fn hundred_concurrent_identical_votes_yield_exactly_one_202(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let attempts = (0..100).map(|_| {
        let api = app.api.clone();
        tokio::spawn(async move { api.vote(poll, 1, "eager").await.0 })
    });
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        99,
        "{statuses:?}"
    );
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.api.poll(poll).await["totalVotes"],
        counted["totalVotes"]
    );
}

async fn a_flood_of_unique_votes_is_counted_exactly(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let polls = [
        app.api.create_poll(&["A", "B", "C"]).await,
        app.api.create_poll(&["A", "B"]).await,
    ];
    let workers = (0..8).map(|w| {
        let api = app.api.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let poll = polls[i % 2];
                let option = (i % 2 + 1) as i64;
                assert_eq!(api.vote(poll, option, &format!("w{w}-u{i}")).await.0, 202);
            }
        })
    });
    for w in workers {
        w.await.unwrap();
    }
    app.api.wait_for_total(polls[0], 200, SETTLE).await;
    let second = app.api.wait_for_total(polls[1], 200, SETTLE).await;
    assert_eq!(Api::votes_of(&second, 2), 200);
}

async fn votes_accepted_before_a_graceful_shutdown_are_counted_after_restart(backend: Backend) {
    // Long enough that only the shutdown flush can write the votes.
    let slow_flush = |s: &mut pollcast::RawSettings| s.aggregator.flush_interval_ms = 60_000;
    let app = TestApp::spawn_with(backend, slow_flush).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    for i in 0..20 {
        assert_eq!(app.api.vote(poll, 1, &format!("u{i}")).await.0, 202);
    }
    // Until the votes wait in their aggregator (read from the log, not yet flushed): only
    // the shutdown's flush can then write them, on either log.
    let deadline = std::time::Instant::now() + SETTLE;
    while super::metrics::sample(&app, "pollcast_votes_pending_flush").await != Some(20.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the votes never reached the aggregator"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let env = app.shutdown().await;
    assert_eq!(env.ledger(poll).await.len(), 20, "flushed at shutdown");
    let app = TestApp::start(env, |_| {}).await;
    app.api.wait_for_total(poll, 20, SETTLE).await;
    assert_eq!(
        app.api.vote(poll, 2, "u3").await.0,
        409,
        "duplicates still refused after restart"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.api.poll(poll).await["totalVotes"], 20);
    app.shutdown().await;
}

async fn a_poll_with_flush_max_votes_waiting_is_flushed_before_its_interval(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.aggregator.flush_interval_ms = 60_000;
        s.aggregator.flush_max_votes = 10;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    for i in 0..10 {
        assert_eq!(app.api.vote(poll, 1, &format!("u{i}")).await.0, 202);
    }
    // Well before the 60 s interval: only the size cap can have flushed them.
    app.api.wait_for_total(poll, 10, SETTLE).await;
    assert_eq!(app.api.vote(poll, 2, "below-the-cap").await.0, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.api.poll(poll).await["totalVotes"],
        10,
        "one vote waits for the interval"
    );
}

/// A backlog over many polls (after an outage, a restart) fills the read window while each
/// poll holds less than `flush_max_votes`: they are flushed at once, not at their interval.
async fn a_full_read_window_flushes_its_polls_before_their_interval(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.aggregator.flush_interval_ms = 60_000;
        s.aggregator.flush_max_votes = 1_000;
        s.aggregator.max_unflushed_votes = 20;
    })
    .await;
    let polls = [
        app.api.create_poll(&["A", "B"]).await,
        app.api.create_poll(&["A", "B"]).await,
    ];
    for i in 0..20 {
        let poll = polls[i % 2];
        assert_eq!(app.api.vote(poll, 1, &format!("u{i}")).await.0, 202);
    }
    // Well before the 60 s interval, and each poll far below its size cap: only the full
    // window can have flushed them.
    for poll in polls {
        app.api.wait_for_total(poll, 10, SETTLE).await;
    }
    assert_eq!(app.api.vote(polls[0], 2, "window-not-full").await.0, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.api.poll(polls[0]).await["totalVotes"],
        10,
        "one vote waits for the interval"
    );
}

async fn an_idle_polls_aggregator_is_retired_and_its_next_votes_still_count(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.aggregator.idle_timeout_secs = 1).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(app.api.vote(poll, 1, "first").await.0, 202);
    app.api.wait_for_total(poll, 1, SETTLE).await;
    // Idle for longer than the timeout (retirement runs on the 500 ms commit tick).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(app.api.vote(poll, 2, "second").await.0, 202);
    assert_eq!(app.api.vote(poll, 1, "first").await.0, 409);
    let counted = app.api.wait_for_total(poll, 2, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 2), 1);
    assert_eq!(
        counted["seq"], 2,
        "the new aggregator continued from the stored version"
    );
}

async fn chunked_bodies_are_read_and_limited_like_any_other(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let chunked = |text: String| {
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(text)]);
        reqwest::Body::wrap_stream(stream)
    };
    let vote = format!(r#"{{"pollId":{poll},"optionId":1,"userId":"chunky"}}"#);
    let resp = app
        .api
        .post("/vote")
        .body(chunked(vote))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let huge = format!(
        r#"{{"pollId":{poll},"optionId":1,"userId":"{}"}}"#,
        "u".repeat(20_000)
    );
    let resp = app
        .api
        .post("/vote")
        .body(chunked(huge))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}

/// `POST /vote` is answered around warp's route tree (`FastPath`); a query string sends the
/// same request through the tree. Both must give every answer alike.
async fn votes_answered_around_the_route_tree_get_the_route_trees_answers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let own_origin = format!("http://{}", app.api.addr);
    // (what, Origin, body for the fast path, body for the tree)
    let cases: Vec<(&str, Option<String>, String, String)> = vec![
        (
            "a first vote",
            None,
            vote_json("fast", poll),
            vote_json("tree", poll),
        ),
        (
            "the same voter again",
            None,
            vote_json("fast", poll),
            vote_json("tree", poll),
        ),
        (
            "from the server's own origin",
            Some(own_origin),
            vote_json("fast-o", poll),
            vote_json("tree-o", poll),
        ),
        (
            "from another origin",
            Some("http://elsewhere.example".into()),
            vote_json("fast-x", poll),
            vote_json("tree-x", poll),
        ),
        (
            "no such poll",
            None,
            vote_json("u", poll + 100),
            vote_json("u", poll + 100),
        ),
        ("not JSON", None, "{".into(), "{".into()),
        (
            "not a vote",
            None,
            json!({ "pollId": poll }).to_string(),
            json!({ "pollId": poll }).to_string(),
        ),
        ("too large", None, "x".repeat(20_000), "x".repeat(20_000)),
    ];
    for (what, origin, fast_body, tree_body) in cases {
        let fast = answer_of(&app.api, "/vote", origin.clone(), fast_body).await;
        let tree = answer_of(&app.api, "/vote?via=routes", origin, tree_body).await;
        assert_eq!(fast, tree, "{what}: around the tree, then through it");
    }
    // Counted alike: fast, tree, fast-o and tree-o.
    let counted = app.api.wait_for_total(poll, 4, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 1), 4);

    // Over the per-address limit, refused alike.
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 1;
        s.rate_limit.per_ip_burst = 2;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await; // the burst's first request
    let first = answer_of(&app.api, "/vote", None, vote_json("a", poll)).await;
    assert_eq!(first.0.0, 202, "{first:?}");
    let fast = answer_of(&app.api, "/vote", None, vote_json("b", poll)).await;
    let tree = answer_of(&app.api, "/vote?via=routes", None, vote_json("c", poll)).await;
    assert_eq!(fast.0.0, 429, "{fast:?}");
    assert_eq!(
        fast, tree,
        "over the limit: around the tree, then through it"
    );
}

fn vote_json(user: &str, poll: i64) -> String {
    json!({ "pollId": poll, "optionId": 1, "userId": user }).to_string()
}

/// A vote's answer: (status, content type, whether it has a Retry-After and a request id),
/// and the body.
async fn answer_of(
    api: &Api,
    path: &str,
    origin: Option<String>,
    body: String,
) -> ((u16, Option<String>, bool, bool), Value) {
    let mut req = api
        .http
        .post(api.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    let resp = req.send().await.unwrap();
    let header = |name: &str| (resp.headers().get(name)).map(|v| v.to_str().unwrap().to_owned());
    let seen = (
        resp.status().as_u16(),
        header("content-type"),
        header("retry-after").is_some(),
        header("x-request-id").is_some(),
    );
    (seen, resp.json::<Value>().await.unwrap_or(Value::Null))
}

crate::contract_tests!(
    votes_answered_around_the_route_tree_get_the_route_trees_answers,
    vote_is_accepted_with_202_and_counted_after_a_flush,
    seed_clients_string_ids_are_accepted,
    duplicate_vote_is_rejected_with_409,
    vote_for_an_unknown_poll_or_option_is_404,
    vote_in_a_closed_poll_is_rejected_with_410,
    malformed_votes_are_400_or_422_never_500,
    hundred_concurrent_identical_votes_yield_exactly_one_202,
    a_flood_of_unique_votes_is_counted_exactly,
    chunked_bodies_are_read_and_limited_like_any_other,
    an_idle_polls_aggregator_is_retired_and_its_next_votes_still_count,
    a_poll_with_flush_max_votes_waiting_is_flushed_before_its_interval,
    a_full_read_window_flushes_its_polls_before_their_interval,
    votes_accepted_before_a_graceful_shutdown_are_counted_after_restart,
);
