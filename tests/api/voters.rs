use pollcast::config::VoterIdentity;
use pollcast::voter_token::VoterTokens;
use serde_json::json;

use crate::helpers::{Backend, SETTLE, TestApp};

const SECRET: &str = "the-operators-backend-shares-this-secret";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn signed_app(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.voters.identity = VoterIdentity::Signed;
        s.voters.secret = Some(SECRET.into());
    })
    .await
}

async fn vote_with(
    app: &TestApp,
    poll: i64,
    token: Option<&str>,
    body_user: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut body = json!({ "pollId": poll, "optionId": 1 });
    if let Some(user) = body_user {
        body["userId"] = json!(user);
    }
    let mut req = app.api.http.post(app.api.url("/vote")).json(&body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

async fn in_signed_mode_the_voter_is_whoever_the_token_names(backend: Backend) {
    let app = signed_app(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let alice = VoterTokens::new(SECRET.as_bytes()).issue("alice", now() + 600);
    assert_eq!(vote_with(&app, poll, Some(&alice), None).await.0, 202);
    let (status, body) = vote_with(&app, poll, Some(&alice), Some("mallory")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("already_voted")),
        "still alice"
    );
    app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(app.env.ledger(poll).await, ["alice"]);
}

async fn forged_expired_or_missing_voter_tokens_get_401(backend: Backend) {
    let app = signed_app(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let forged =
        VoterTokens::new(b"not-the-secret-at-all-not-the-secret").issue("bob", now() + 600);
    let expired = VoterTokens::new(SECRET.as_bytes()).issue("bob", now() - 1);
    for token in [
        Some(forged.as_str()),
        Some(expired.as_str()),
        Some("v1.junk"),
        None,
    ] {
        let (status, body) = vote_with(&app, poll, token, Some("bob")).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"], "invalid_voter_token");
    }
}

crate::contract_tests!(
    in_signed_mode_the_voter_is_whoever_the_token_names,
    forged_expired_or_missing_voter_tokens_get_401,
);
