//! The dispatcher end to end: a fake store, a real local receiver, and the fixtures the
//! other modules' tests share.

use pollcast_actors::service::PollCatalog;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::background::{Background, Stage};
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use pollcast_actors::domain::UnixMillis;
use pollcast_actors::{
    CountsUpdate, FlushOutcome, LedgerRow, NewPoll, OptionCount, Poll, PollEvents, PollId,
    PollOption, PollSettings, PollStore, StoreError, Voter, WebhookTarget,
};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use super::WebhookDispatcher;
use super::delivery::USER_AGENT;
use super::signing::{hmac_key, signature};
use super::worker::SHUTDOWN_GRACE;
use crate::config::WebhookSettings;

fn counts(pairs: &[(i64, i64)]) -> Vec<OptionCount> {
    pairs
        .iter()
        .map(|&(option_id, new_count)| OptionCount {
            option_id,
            new_count,
        })
        .collect()
}

pub(super) fn update(poll_id: PollId, seq: i64, closed_at: Option<UnixMillis>) -> CountsUpdate {
    CountsUpdate {
        poll_id,
        seq,
        changed: counts(&[(1, seq)]),
        all: counts(&[(1, seq), (2, 0)]),
        flushed_at: 1_700_000_000_000 + seq,
        closed_at,
        hide_results: false,
    }
}

pub(super) fn target(url: &str, results_every_secs: Option<u32>) -> WebhookTarget {
    WebhookTarget {
        url: url.into(),
        secret: "whsec-test".into(),
        results_every_secs,
    }
}

pub(super) fn poll(id: PollId, webhook: Option<WebhookTarget>, hide_results: bool) -> Poll {
    Poll {
        id,
        question: "Tabs or spaces?".into(),
        options: vec![
            PollOption {
                id: 1,
                text: "Tabs".into(),
                votes: 0,
            },
            PollOption {
                id: 2,
                text: "Spaces".into(),
                votes: 0,
            },
        ],
        closed: false,
        created_at: 1_700_000_000_000,
        closed_at: None,
        seq: 0,
        voters: 0,
        settings: PollSettings {
            closes_at: Some(1_700_000_060_000),
            hide_results,
            webhook,
            ..PollSettings::default()
        },
    }
}

/// A store that knows a few polls, counts its lookups and can fail the first ones.
#[derive(Default)]
struct FakeStore {
    polls: Mutex<HashMap<PollId, Poll>>,
    lookups: AtomicUsize,
    fail_lookups: AtomicUsize,
}

fn unused(what: &'static str) -> StoreError {
    StoreError::new(what, "not used by the webhook dispatcher")
}

#[async_trait]
impl PollStore for FakeStore {
    async fn create_poll(&self, _poll: NewPoll) -> Result<Poll, StoreError> {
        Err(unused("create_poll"))
    }
    async fn list_polls(&self, _: pollcast_actors::PollPage) -> Result<Vec<Poll>, StoreError> {
        Err(unused("list_polls"))
    }
    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_lookups
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::new("get_poll", "store unreachable"));
        }
        Ok(self.polls.lock().unwrap().get(&id).cloned())
    }
    async fn is_closed(&self, _id: PollId) -> Result<Option<bool>, StoreError> {
        Err(unused("is_closed"))
    }
    async fn close_poll(
        &self,
        _id: PollId,
        _at: UnixMillis,
    ) -> Result<Option<(Poll, bool)>, StoreError> {
        Err(unused("close_poll"))
    }
    async fn polls_to_seal(
        &self,
        _now: UnixMillis,
        _unsealed_before: UnixMillis,
    ) -> Result<Vec<(PollId, UnixMillis)>, StoreError> {
        Err(unused("polls_to_seal"))
    }
    async fn apply_votes(
        &self,
        _poll: PollId,
        _allow_change: bool,
        _votes: Arc<[pollcast_actors::Vote]>,
    ) -> Result<FlushOutcome, StoreError> {
        Err(unused("apply_votes"))
    }
    async fn seal_poll(&self, _poll: PollId) -> Result<Option<FlushOutcome>, StoreError> {
        Err(unused("seal_poll"))
    }
    async fn ledger(
        &self,
        _poll: PollId,
        _after: i64,
        _limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        Err(unused("ledger"))
    }
    async fn voters_since(&self, _since: UnixMillis) -> Result<Vec<Voter>, StoreError> {
        Err(unused("voters_since"))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

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
        self.headers[name].to_str().unwrap()
    }
}

/// A local webhook receiver that records every request and answers 500 to the first
/// `fail_first` of them.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let failures_left = Arc::new(AtomicUsize::new(fail_first));
        let log = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
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
                        let status = if fail { 500 } else { 204 };
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

    fn accepted(&self) -> Vec<Received> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.status < 300)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `n` requests were accepted and returns them.
    async fn wait_accepted(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n {
                return accepted;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} webhook requests accepted: {:?}",
                accepted.len(),
                self.all()
            );
            sleep(Duration::from_millis(10)).await;
        }
    }
}

fn settings() -> WebhookSettings {
    WebhookSettings {
        timeout: Duration::from_millis(2000),
        max_attempts: 6.try_into().unwrap(),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        queue_capacity: 100.try_into().unwrap(),
        max_in_flight: 4.try_into().unwrap(),
    }
}

/// A dispatcher over a store that knows no poll, never shut down.
fn dispatcher(settings: WebhookSettings) -> Arc<WebhookDispatcher> {
    WebhookDispatcher::start(
        PollCatalog::unrefreshed(Arc::new(FakeStore::default())),
        &settings,
        &Background::new(),
    )
}

fn types(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_signed(received: &Received, secret: &str) {
    let header = received.header("x-pollcast-signature");
    let t: u64 = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t) < 60, "timestamp {t} is now");
    assert_eq!(header, signature(&hmac_key(secret), t, &received.body));
}

#[tokio::test]
async fn opened_and_closed_are_posted_signed_and_in_order() {
    let receiver = Receiver::start(0).await;
    let hooks = dispatcher(settings());
    hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));
    hooks.flushed(&update(1, 1, None));
    hooks.flushed(&update(1, 2, Some(1_700_000_100_000)));

    let received = receiver.wait_accepted(2).await;
    assert_eq!(types(&received), ["poll.opened", "poll.closed"]);
    for r in &received {
        assert_signed(r, "whsec-test");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("user-agent"), USER_AGENT);
        assert_eq!(r.header("x-pollcast-event"), r.json()["type"]);
        assert_eq!(r.header("x-pollcast-delivery"), r.json()["id"]);
    }
    assert_eq!(
        received[1].json()["counts"],
        json!([{"optionId": 1, "newCount": 2}, {"optionId": 2, "newCount": 0}])
    );
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        receiver.all().len(),
        2,
        "no results without resultsEverySecs"
    );
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_the_same_event_until_it_accepts() {
    let receiver = Receiver::start(3).await;
    let hooks = dispatcher(settings());
    hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));

    let accepted = receiver.wait_accepted(1).await;
    let all = receiver.all();
    assert_eq!(all.len(), 4, "three refusals, then the delivery");
    assert!(
        all.iter().all(|r| r.body == accepted[0].body),
        "every attempt sends the same event"
    );
    for r in &all {
        assert_signed(r, "whsec-test");
    }
}

#[tokio::test]
async fn delivery_is_given_up_after_max_attempts() {
    let receiver = Receiver::start(usize::MAX).await;
    let hooks = dispatcher(WebhookSettings {
        max_attempts: 3.try_into().unwrap(),
        ..settings()
    });
    hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));
    sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.all().len(), 3);
}

#[tokio::test]
async fn a_closed_event_drops_older_results_still_retrying() {
    // The receiver refuses the opened event's first attempts; meanwhile results and the
    // close come: the results must not arrive after the close, nor at all once it exists.
    let receiver = Receiver::start(3).await;
    let hooks = dispatcher(settings());
    hooks.opened(&poll(1, Some(target(&receiver.url, Some(1))), false));
    hooks.flushed(&update(1, 1, None));
    hooks.flushed(&update(1, 2, Some(1_700_000_100_000)));

    let accepted = receiver.wait_accepted(2).await;
    assert_eq!(types(&accepted), ["poll.opened", "poll.closed"]);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(types(&receiver.accepted()), ["poll.opened", "poll.closed"]);
}

#[tokio::test]
async fn results_are_throttled_and_coalesced_but_never_sent_for_hidden_polls() {
    let receiver = Receiver::start(0).await;
    let hooks = dispatcher(settings());
    hooks.opened(&poll(1, Some(target(&receiver.url, Some(1))), false));
    hooks.opened(&poll(2, Some(target(&receiver.url, Some(1))), true));
    for seq in 1..=3 {
        hooks.flushed(&update(1, seq, None));
        hooks.flushed(&CountsUpdate {
            hide_results: true,
            ..update(2, seq, None)
        });
    }

    let received = receiver.wait_accepted(4).await;
    let of = |poll: i64| -> Vec<(String, i64)> {
        received
            .iter()
            .map(Received::json)
            .filter(|b| b["pollId"] == poll)
            .map(|b| {
                (
                    b["type"].as_str().unwrap().to_owned(),
                    b["seq"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    // seq 1 at once; 2 and 3 coalesced into 3, a second later.
    assert_eq!(
        of(1),
        [
            ("poll.opened".to_owned(), 0),
            ("poll.results".to_owned(), 1),
            ("poll.results".to_owned(), 3)
        ]
    );
    let sent_at = |id: &str| received.iter().find(|r| r.json()["id"] == id).unwrap().at;
    let gap = sent_at("1-poll.results-3") - sent_at("1-poll.results-1");
    assert!(
        gap >= Duration::from_millis(900),
        "results 1 s apart, not {gap:?}"
    );
    assert_eq!(of(2), [("poll.opened".to_owned(), 0)]);

    hooks.flushed(&CountsUpdate {
        hide_results: true,
        ..update(2, 4, Some(1_700_000_100_000))
    });
    let received = receiver.wait_accepted(5).await;
    assert_eq!(received[4].json()["id"], "2-poll.closed-4");
}

#[tokio::test]
async fn a_polls_webhook_is_looked_up_once_and_the_answer_kept() {
    let receiver = Receiver::start(0).await;
    let store = Arc::new(FakeStore::default());
    store.fail_lookups.store(1, Ordering::SeqCst);
    store.polls.lock().unwrap().extend([
        (1, poll(1, Some(target(&receiver.url, Some(60))), false)),
        (2, poll(2, None, false)),
    ]);
    let catalog = PollCatalog::unrefreshed(store.clone());
    let hooks = WebhookDispatcher::start(catalog.clone(), &settings(), &Background::new());
    for seq in 1..=3 {
        hooks.flushed(&update(1, seq, None));
        hooks.flushed(&update(2, seq, None));
    }
    // The first lookup fails and is retried; updates meanwhile wait for its answer.
    let received = receiver.wait_accepted(1).await;
    assert_eq!(received[0].json()["type"], "poll.results");
    for seq in 4..=6 {
        hooks.flushed(&update(1, seq, None));
        hooks.flushed(&update(2, seq, None));
    }
    hooks.flushed(&update(1, 7, Some(1_700_000_100_000)));
    let received = receiver.wait_accepted(2).await;
    assert_eq!(received[1].json()["id"], "1-poll.closed-7");
    let deadline = Instant::now() + Duration::from_secs(5);
    while catalog.known(2).is_none() {
        assert!(
            Instant::now() < deadline,
            "poll 2 never known to have no webhook"
        );
        sleep(Duration::from_millis(10)).await;
    }
    // One failed and one good lookup per poll, whatever the number of updates.
    assert_eq!(store.lookups.load(Ordering::SeqCst), 3);
    assert_eq!(types(&receiver.all()), ["poll.results", "poll.closed"]);
}

#[tokio::test]
async fn an_update_that_raced_ahead_of_opened_follows_it() {
    let receiver = Receiver::start(0).await;
    // The store does not know the poll yet: only `opened` can tell its webhook.
    let hooks = dispatcher(settings());
    hooks.flushed(&update(1, 1, None));
    hooks.opened(&poll(1, Some(target(&receiver.url, Some(60))), false));
    let received = receiver.wait_accepted(2).await;
    assert_eq!(types(&received), ["poll.opened", "poll.results"]);
    hooks.flushed(&update(1, 2, Some(1_700_000_100_000)));
    let received = receiver.wait_accepted(3).await;
    assert_eq!(received[2].json()["id"], "1-poll.closed-2");
}

#[tokio::test]
async fn a_full_queue_drops_events_without_waiting() {
    let receiver = Receiver::start(0).await;
    let hooks = dispatcher(WebhookSettings {
        queue_capacity: 2.try_into().unwrap(),
        ..settings()
    });
    // A current-thread runtime: the worker cannot run before this test yields, so the
    // queue is full after two events and the other three must be dropped at once.
    for id in 1..=5 {
        hooks.opened(&poll(id, Some(target(&receiver.url, None)), false));
    }
    receiver.wait_accepted(2).await;
    sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.all().len(), 2);
}

#[tokio::test]
async fn shutdown_sends_what_was_queued_then_stops() {
    let receiver = Receiver::start(1).await;
    let background = Background::new();
    let hooks = WebhookDispatcher::start(
        PollCatalog::unrefreshed(Arc::new(FakeStore::default())),
        &settings(),
        &background,
    );
    hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));
    let stopped = background.stop(Stage::Delivery);
    tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), stopped)
        .await
        .expect("stops within the grace");
    // Queued before the shutdown, and retried within the grace.
    assert_eq!(types(&receiver.accepted()), ["poll.opened"]);
    hooks.opened(&poll(2, Some(target(&receiver.url, None)), false));
    sleep(Duration::from_millis(100)).await;
    assert_eq!(receiver.all().len(), 2, "nothing taken after shutdown");
}
