//! Webhooks: a poll created with a webhook URL gets signed events at a real local receiver.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use pollcast::RawSettings;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::{Backend, SETTLE, TestApp};

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    headers: http::HeaderMap,
    body: Bytes,
    status: u16,
    at: Instant,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

/// A webhook receiver on 127.0.0.1: records every request, answers 500 to the first
/// `fail_first` and 200 to the others.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/pollcast-events", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let failures_left = Arc::new(AtomicUsize::new(fail_first));
        let log = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let failures_left = failures_left.clone();
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let log = log.clone();
                    let failures_left = failures_left.clone();
                    async move {
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let fail = failures_left
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let status = if fail { 500 } else { 200 };
                        log.lock().unwrap().push(Received {
                            headers,
                            body,
                            status,
                            at: Instant::now(),
                        });
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Self { url, requests }
    }

    fn all(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests answered 200, in arrival order.
    fn accepted(&self) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.status == 200).collect()
    }

    /// Waits for an accepted event of `poll` of type `kind` that satisfies `check`.
    async fn wait_for(&self, poll: i64, kind: &str, check: impl Fn(&Value) -> bool) -> Received {
        let deadline = Instant::now() + SETTLE;
        loop {
            let found = self.accepted().into_iter().find(|r| {
                let body = r.json();
                body["pollId"] == poll && body["type"] == kind && check(&body)
            });
            if let Some(found) = found {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} of poll {poll} as expected; received: {:#?}",
                self.all().iter().map(Received::json).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Types of the accepted events of `poll`, in arrival order.
    fn kinds_of(&self, poll: i64) -> Vec<String> {
        self.accepted()
            .iter()
            .filter(|r| r.json()["pollId"] == poll)
            .map(Received::kind)
            .collect()
    }
}

/// Retries within milliseconds, so a receiver that fails a few times is not waited for long.
fn fast_retries(settings: &mut RawSettings) {
    settings.webhooks.initial_backoff_ms = 20;
    settings.webhooks.max_backoff_ms = 200;
    settings.webhooks.timeout_ms = 5000;
}

/// Creates a poll whose webhook is `webhook` (merged with `extra` fields of the body);
/// returns its id and the webhook's signing secret.
async fn create_hooked_poll(app: &TestApp, webhook: Value, extra: Value) -> (i64, String) {
    let mut body = json!({ "question": "Tabs or spaces?", "options": ["Tabs", "Spaces"] });
    body["webhook"] = webhook;
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let resp = app.api.post("/polls").json(&body).send().await.unwrap();
    assert_eq!(
        resp.status().as_u16(),
        201,
        "creating a poll with a webhook"
    );
    let created: Value = resp.json().await.unwrap();
    let secret = created["webhookSecret"]
        .as_str()
        .expect("the 201 shows the webhook secret")
        .to_owned();
    (created["id"].as_i64().unwrap(), secret)
}

/// Checks `X-Pollcast-Signature` as a receiver would: HMAC-SHA256 of "<t>.<raw body>" with
/// the poll's secret, and `t` close to now.
fn assert_signed(received: &Received, secret: &str) {
    let header = received.header("x-pollcast-signature");
    let (t, v1) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .unwrap_or_else(|| panic!("signature header {header:?} is not t=…,v1=…"));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&received.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "signature of {}", received.json()["id"]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t: u64 = t.parse().unwrap();
    assert!(now.abs_diff(t) < 60, "signed at {t}, now is {now}");
    assert_eq!(received.header("content-type"), "application/json");
    assert!(
        received
            .header("user-agent")
            .starts_with("pollcast-webhooks/")
    );
    let body = received.json();
    assert_eq!(received.header("x-pollcast-event"), body["type"]);
    assert_eq!(received.header("x-pollcast-delivery"), body["id"]);
}

async fn opened_and_closed_events_are_delivered_signed(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(backend, fast_retries).await;
    let (poll, secret) = create_hooked_poll(&app, json!({ "url": receiver.url }), json!({})).await;

    let opened = receiver.wait_for(poll, "poll.opened", |_| true).await;
    assert_signed(&opened, &secret);
    let body = opened.json();
    assert_eq!(body["id"], format!("{poll}-poll.opened-0"));
    assert_eq!(body["seq"], 0);
    assert_eq!(body["closedAt"], Value::Null);
    assert_eq!(body["poll"]["question"], "Tabs or spaces?");
    assert_eq!(
        body["poll"]["options"],
        json!([{ "id": 1, "text": "Tabs" }, { "id": 2, "text": "Spaces" }])
    );
    assert!(
        !String::from_utf8_lossy(&opened.body).contains(&secret),
        "the secret is never sent"
    );

    for (option, user) in [(1, "u1"), (2, "u2"), (2, "u3")] {
        assert_eq!(app.api.vote(poll, option, user).await.0, 202);
    }
    app.api.wait_for_total(poll, 3, SETTLE).await;
    app.api.close_poll(poll).await;

    let closed = receiver.wait_for(poll, "poll.closed", |_| true).await;
    assert_signed(&closed, &secret);
    let body = closed.json();
    assert_eq!(
        body["counts"],
        json!([{ "optionId": 1, "newCount": 1 }, { "optionId": 2, "newCount": 2 }])
    );
    assert!(
        body["closedAt"].is_string(),
        "closedAt: {}",
        body["closedAt"]
    );
    assert_eq!(
        body["id"],
        format!("{poll}-poll.closed-{}", body["seq"].as_i64().unwrap())
    );
    assert_eq!(
        receiver.kinds_of(poll),
        ["poll.opened", "poll.closed"],
        "no periodic results unless asked for"
    );
}

async fn a_failing_receiver_is_retried_until_it_accepts(backend: Backend) {
    let receiver = Receiver::start(2).await;
    let app = TestApp::spawn_with(backend, fast_retries).await;
    let (poll, secret) = create_hooked_poll(&app, json!({ "url": receiver.url }), json!({})).await;

    let opened = receiver.wait_for(poll, "poll.opened", |_| true).await;
    let attempts = receiver.all();
    assert_eq!(
        attempts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 200],
        "two refusals, then the delivery"
    );
    for attempt in &attempts {
        // Each attempt is signed afresh, and is the same event for the receiver to dedupe.
        assert_signed(attempt, &secret);
        assert_eq!(attempt.body, opened.body);
        assert_eq!(
            attempt.header("x-pollcast-delivery"),
            format!("{poll}-poll.opened-0")
        );
    }
}

async fn periodic_results_are_sent_while_open_but_not_for_hidden_polls(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let app = TestApp::spawn_with(backend, fast_retries).await;
    let hook = json!({ "url": receiver.url, "resultsEverySecs": 1 });
    let (open, secret) = create_hooked_poll(&app, hook.clone(), json!({})).await;
    let (hidden, hidden_secret) =
        create_hooked_poll(&app, hook, json!({ "hideResults": true })).await;

    assert_eq!(app.api.vote(open, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(hidden, 1, "u1").await.0, 202);
    let first = receiver
        .wait_for(open, "poll.results", |b| {
            b["counts"]
                == json!([{ "optionId": 1, "newCount": 1 }, { "optionId": 2, "newCount": 0 }])
        })
        .await;
    assert_signed(&first, &secret);

    // More flushes soon after: they are coalesced, so the results that follow carry the
    // newest counts, each no sooner than a second after the one before.
    assert_eq!(app.api.vote(open, 2, "u2").await.0, 202);
    app.api.wait_for_total(open, 2, SETTLE).await;
    assert_eq!(app.api.vote(open, 2, "u3").await.0, 202);
    let latest = receiver
        .wait_for(open, "poll.results", |b| {
            b["counts"]
                == json!([{ "optionId": 1, "newCount": 1 }, { "optionId": 2, "newCount": 2 }])
        })
        .await;
    assert!(latest.json()["seq"].as_i64() > first.json()["seq"].as_i64());
    let results: Vec<Received> = receiver
        .accepted()
        .into_iter()
        .filter(|r| r.json()["pollId"] == open && r.kind() == "poll.results")
        .collect();
    for pair in results.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(900),
            "results of one poll {gap:?} apart, not at most one a second"
        );
    }

    // The hidden poll's counts stay secret until it closes, then come in poll.closed.
    let resp = app
        .api
        .post(&format!("/polls/{hidden}/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let closed = receiver.wait_for(hidden, "poll.closed", |_| true).await;
    assert_signed(&closed, &hidden_secret);
    assert_eq!(
        closed.json()["counts"],
        json!([{ "optionId": 1, "newCount": 1 }, { "optionId": 2, "newCount": 0 }])
    );
    assert_eq!(receiver.kinds_of(hidden), ["poll.opened", "poll.closed"]);
}

crate::contract_tests!(
    opened_and_closed_events_are_delivered_signed,
    a_failing_receiver_is_retried_until_it_accepts,
    periodic_results_are_sent_while_open_but_not_for_hidden_polls,
);
