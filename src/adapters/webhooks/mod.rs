//! Webhooks: a poll may name an operator's URL that receives signed JSON events:
//! `poll.opened`, `poll.closed` (with the final counts) and, when the poll asks for them,
//! `poll.results` at most once per `resultsEverySecs` while it is open.
//!
//! The vote pipeline's actors only push onto a bounded queue ([`WebhookDispatcher`]'s
//! [`PollEvents`] calls never wait; a full queue drops the event and counts it). One worker
//! task decides what to send; each delivery runs in its own task, retried with exponential
//! backoff and jitter, so a slow or failing receiver holds up only its own poll's later
//! events.
//!
//! What a receiver gets, as a `POST`:
//!
//! - Body: `{"id", "type", "pollId", "seq", "occurredAt", "counts": [{"optionId",
//!   "newCount"}], "closedAt"}`; `poll.opened` adds `"poll": {"id", "question", "options":
//!   [{"id", "text"}], "closesAt", "maxChoices"}`. `counts` lists every option.
//! - Headers: `X-Pollcast-Event: <type>`, `X-Pollcast-Delivery: <id>`, and
//!   `X-Pollcast-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
//!   signed with the secret shown when the poll was created. A receiver recomputes the HMAC
//!   over the raw body and rejects a `t` too far from its clock (a replay).
//! - Delivery is at least once: a 2xx answer is success; anything else, a timeout or a
//!   connection error is retried (redirects are not followed). The `id` is the same in every
//!   attempt, so receivers drop duplicates by it. A process makes a poll's deliveries one
//!   after the other (with several processes, `seq` orders them); a `poll.results` still
//!   waiting or retrying is dropped once a newer one or the poll's `poll.closed` exists.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashSet;
use hmac::{Hmac, Mac};
use pollcast_actors::domain::{OptionId, UnixMillis, now_millis, rfc3339};
use pollcast_actors::{
    CountsUpdate, OptionCount, Poll, PollEvents, PollId, PollStore, StoreError, WebhookTarget,
};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{WebhookSettings, redact_url};

type HmacSha256 = Hmac<Sha256>;

/// Sent as `User-Agent`, so receivers can tell pollcast's requests (and its version) apart.
pub const USER_AGENT: &str = concat!("pollcast-webhooks/", env!("CARGO_PKG_VERSION"));

/// How long deliveries still under way get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A full queue drops events by the thousand under overload; one warning this often says so.
const DROP_WARNING_EVERY_MS: i64 = 10_000;

/// The kind of a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The poll was created.
    Opened,
    /// Periodic counts of an open poll.
    Results,
    /// The poll closed; carries its final counts.
    Closed,
}

impl EventKind {
    /// The event's `type`, as in the body and `X-Pollcast-Event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Opened => "poll.opened",
            EventKind::Results => "poll.results",
            EventKind::Closed => "poll.closed",
        }
    }

    /// The event a count update would become, if any is sent.
    pub fn of_update(update: &CountsUpdate) -> Self {
        if update.closed_at.is_some() {
            EventKind::Closed
        } else {
            EventKind::Results
        }
    }
}

/// One event ready to send: its id and JSON body. The body is fixed; the signature is made
/// at each attempt, since it covers the time of sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// The poll.
    pub poll_id: PollId,
    /// What happened.
    pub kind: EventKind,
    /// `<pollId>-<type>-<seq>`: the same for every attempt, for receivers to deduplicate.
    pub id: String,
    /// The JSON body.
    pub body: Bytes,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    poll_id: PollId,
    seq: i64,
    occurred_at: String,
    counts: &'a [OptionCount],
    closed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    poll: Option<PollBody<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollBody<'a> {
    id: PollId,
    question: &'a str,
    options: Vec<OptionBody<'a>>,
    closes_at: Option<String>,
    max_choices: u32,
}

#[derive(Serialize)]
struct OptionBody<'a> {
    id: OptionId,
    text: &'a str,
}

impl WebhookEvent {
    /// `poll.opened` for a poll just created.
    pub fn opened(poll: &Poll) -> Self {
        let counts: Vec<OptionCount> = poll
            .options
            .iter()
            .map(|o| OptionCount {
                option_id: o.id,
                new_count: o.votes,
            })
            .collect();
        let summary = PollBody {
            id: poll.id,
            question: &poll.question,
            options: poll
                .options
                .iter()
                .map(|o| OptionBody {
                    id: o.id,
                    text: &o.text,
                })
                .collect(),
            closes_at: poll.settings.closes_at.map(rfc3339),
            max_choices: poll.settings.max_choices,
        };
        Self::build(
            poll.id,
            EventKind::Opened,
            poll.seq,
            poll.created_at,
            &counts,
            poll.closed_at,
            Some(summary),
        )
    }

    /// `poll.results` or `poll.closed` (by `update.closed_at`) with every option's count.
    pub fn of_update(update: &CountsUpdate) -> Self {
        Self::build(
            update.poll_id,
            EventKind::of_update(update),
            update.seq,
            update.flushed_at,
            &update.all,
            update.closed_at,
            None,
        )
    }

    fn build(
        poll_id: PollId,
        kind: EventKind,
        seq: i64,
        occurred_at: UnixMillis,
        counts: &[OptionCount],
        closed_at: Option<UnixMillis>,
        poll: Option<PollBody<'_>>,
    ) -> Self {
        let id = format!("{poll_id}-{}-{seq}", kind.as_str());
        let body = Body {
            id: &id,
            kind: kind.as_str(),
            poll_id,
            seq,
            occurred_at: rfc3339(occurred_at),
            counts,
            closed_at: closed_at.map(rfc3339),
            poll,
        };
        // Integers and strings only: serializing cannot fail.
        let body = Bytes::from(serde_json::to_vec(&body).expect("webhook body serializes"));
        Self {
            poll_id,
            kind,
            id,
            body,
        }
    }
}

/// The `X-Pollcast-Signature` value of `body` sent at `timestamp` (unix seconds):
/// `t=<timestamp>,v1=<lowercase hex HMAC-SHA256(key, "<timestamp>.<body>")>`.
fn signature(key: &HmacSha256, timestamp: u64, body: &[u8]) -> String {
    let mut mac = key.clone();
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut header = format!("t={timestamp},v1=");
    for byte in digest {
        let _ = write!(header, "{byte:02x}");
    }
    header
}

fn hmac_key(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length")
}

/// How deliveries are attempted and retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// Step before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Largest step.
    pub max_backoff: Duration,
}

impl From<&WebhookSettings> for RetryPolicy {
    fn from(s: &WebhookSettings) -> Self {
        Self {
            timeout: s.timeout,
            max_attempts: s.max_attempts.get(),
            initial_backoff: s.initial_backoff,
            max_backoff: s.max_backoff,
        }
    }
}

impl RetryPolicy {
    /// The wait after `failed` failed attempts (1 after the first), for `jitter` drawn
    /// uniformly from [0, 1): between half and all of `initial_backoff · 2^(failed-1)`,
    /// capped at `max_backoff`. The jitter spreads the retries of many polls whose receiver
    /// failed at the same moment, so it is not hit by all of them at once when it returns.
    pub fn backoff(&self, failed: u32, jitter: f64) -> Duration {
        let backoff = pollcast_actors::Backoff {
            initial: self.initial_backoff,
            max: self.max_backoff,
        };
        backoff.jittered(failed, jitter)
    }
}

/// What [`ResultsThrottle::offer`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Send this update now.
    Send(CountsUpdate),
    /// Held until then: call [`ResultsThrottle::take_due`] at that time.
    HeldUntil(Instant),
    /// Replaced the update already held; its time is already set.
    Coalesced,
    /// Not newer than an update already sent or held: ignored.
    Stale,
}

/// Paces a poll's `poll.results`: at most one per interval. Updates that come sooner are
/// coalesced, and the newest goes out as soon as the interval has passed, so a receiver
/// always ends up with the latest counts.
#[derive(Debug)]
pub struct ResultsThrottle {
    every: Duration,
    last_sent: Option<Instant>,
    newest_seq: Option<i64>,
    held: Option<CountsUpdate>,
}

impl ResultsThrottle {
    /// At most one update per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last_sent: None,
            newest_seq: None,
            held: None,
        }
    }

    /// Takes an update that arrived at `now`.
    pub fn offer(&mut self, update: CountsUpdate, now: Instant) -> Offer {
        if self.newest_seq.is_some_and(|seq| update.seq <= seq) {
            return Offer::Stale;
        }
        self.newest_seq = Some(update.seq);
        if self.held.is_some() {
            self.held = Some(update);
            return Offer::Coalesced;
        }
        match self.last_sent {
            Some(sent) if now < sent + self.every => {
                self.held = Some(update);
                Offer::HeldUntil(sent + self.every)
            }
            _ => {
                self.last_sent = Some(now);
                Offer::Send(update)
            }
        }
    }

    /// The held update, if its interval has passed at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<CountsUpdate> {
        let due = self.last_sent? + self.every;
        if now < due {
            return None;
        }
        let update = self.held.take()?;
        self.last_sent = Some(now);
        Some(update)
    }

    /// Forgets the held update (the poll closed: its final counts supersede it).
    pub fn clear(&mut self) {
        self.held = None;
    }
}

/// What the dispatcher is told by the pipeline.
enum Notice {
    Opened(Box<Poll>),
    Flushed(CountsUpdate),
}

impl Notice {
    fn kind(&self) -> EventKind {
        match self {
            Notice::Opened(_) => EventKind::Opened,
            Notice::Flushed(update) => EventKind::of_update(update),
        }
    }
}

/// A receiver: where to post and how to sign. Deliberately not `Debug`: it holds the key.
struct Endpoint {
    url: String,
    /// The URL with any password masked, for logs.
    shown_url: String,
    key: HmacSha256,
}

impl Endpoint {
    fn new(target: &WebhookTarget) -> Self {
        Self {
            url: target.url.clone(),
            shown_url: redact_url(&target.url),
            key: hmac_key(&target.secret),
        }
    }
}

/// Sends poll events to each poll's webhook (see the module documentation): the
/// [`PollEvents`] of a process with webhooks.
pub struct WebhookDispatcher {
    queue: mpsc::Sender<Notice>,
    /// Polls known to have no webhook (settings never change): their updates are not even
    /// queued. A poll leaves the set when it closes.
    no_hook: Arc<DashSet<PollId>>,
    dropped_since_warning: AtomicU64,
    last_drop_warning: AtomicI64,
    done: CancellationToken,
}

impl WebhookDispatcher {
    /// Starts the dispatcher's worker. Polls' webhooks not learnt from
    /// [`PollEvents::opened`] are looked up in `store` once. Cancelling `shutdown` stops
    /// taking events; deliveries under way then get a few seconds to finish.
    pub fn start(
        store: Arc<dyn PollStore>,
        settings: &WebhookSettings,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let policy = RetryPolicy::from(settings);
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(policy.timeout)
            // Why not follow redirects: the operator named this URL; a redirect elsewhere
            // would carry signed counts to a host nobody chose.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Fails only if the TLS backend cannot initialise: bundled roots, no system state.
            .expect("the webhook HTTP client builds");
        let (queue, notices) = mpsc::channel(settings.queue_capacity.get());
        let (resolved_tx, resolved) = mpsc::unbounded_channel();
        let no_hook = Arc::new(DashSet::new());
        let done = CancellationToken::new();
        let worker = Worker {
            store,
            shared: Arc::new(Shared {
                client,
                policy,
                in_flight: Semaphore::new(settings.max_in_flight.get()),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
            polls: HashMap::new(),
            timers: BinaryHeap::new(),
            resolved_tx,
            no_hook: no_hook.clone(),
        };
        tokio::spawn(worker.run(notices, resolved, shutdown, done.clone()));
        Arc::new(Self {
            queue,
            no_hook,
            dropped_since_warning: AtomicU64::new(0),
            last_drop_warning: AtomicI64::new(0),
            done,
        })
    }

    /// Resolves once the dispatcher has stopped: shutdown was requested and the deliveries
    /// under way finished or their grace ran out.
    pub async fn stopped(&self) {
        self.done.cancelled().await;
    }

    fn enqueue(&self, notice: Notice) {
        let kind = notice.kind();
        match self.queue.try_send(notice) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                count_delivery(kind, "dropped");
                self.warn_dropped();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                count_delivery(kind, "dropped");
                tracing::debug!(
                    event = kind.as_str(),
                    "webhook event after shutdown dropped"
                );
            }
        }
    }

    fn warn_dropped(&self) {
        self.dropped_since_warning.fetch_add(1, Ordering::Relaxed);
        let now = now_millis();
        let last = self.last_drop_warning.load(Ordering::Relaxed);
        if now - last >= DROP_WARNING_EVERY_MS
            && self
                .last_drop_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let dropped = self.dropped_since_warning.swap(0, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "webhook queue full: events dropped (receivers too slow, or \
                 webhooks.queue_capacity too small)"
            );
        }
    }
}

impl PollEvents for WebhookDispatcher {
    fn opened(&self, poll: &Poll) {
        if poll.settings.webhook.is_none() {
            self.no_hook.insert(poll.id);
            return;
        }
        self.enqueue(Notice::Opened(Box::new(poll.clone())));
    }

    fn flushed(&self, update: &CountsUpdate) {
        if self.no_hook.contains(&update.poll_id) {
            if update.closed_at.is_some() {
                self.no_hook.remove(&update.poll_id);
            }
            return;
        }
        self.enqueue(Notice::Flushed(update.clone()));
    }
}

/// What every delivery task shares.
struct Shared {
    client: reqwest::Client,
    policy: RetryPolicy,
    in_flight: Semaphore,
    tracker: TaskTracker,
    /// Cancelled when the shutdown grace runs out: every task stops at once.
    stop: CancellationToken,
}

/// Why an attempt failed, for the give-up log line.
enum Failure {
    /// Worth another attempt.
    Retry(String),
    /// No attempt can succeed (the URL is unusable).
    Permanent(String),
}

impl Shared {
    async fn attempt(&self, endpoint: &Endpoint, event: &WebhookEvent) -> Result<(), Failure> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let started = Instant::now();
        let sent = self
            .client
            .post(&endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("X-Pollcast-Event", event.kind.as_str())
            .header("X-Pollcast-Delivery", &event.id)
            .header(
                "X-Pollcast-Signature",
                signature(&endpoint.key, timestamp, &event.body),
            )
            .body(event.body.clone())
            .send()
            .await;
        metrics::histogram!("pollcast_webhook_delivery_seconds")
            .record(started.elapsed().as_secs_f64());
        let (label, outcome) = match sent {
            Ok(response) if response.status().is_success() => ("delivered", Ok(())),
            Ok(response) => (
                "rejected",
                Err(Failure::Retry(format!(
                    "HTTP {}",
                    response.status().as_u16()
                ))),
            ),
            Err(err) if err.is_builder() => (
                "error",
                Err(Failure::Permanent(error_chain(&err.without_url()))),
            ),
            Err(err) if err.is_timeout() => (
                "timeout",
                Err(Failure::Retry(format!(
                    "timed out after {:?}",
                    self.policy.timeout
                ))),
            ),
            Err(err) => (
                "error",
                Err(Failure::Retry(error_chain(&err.without_url()))),
            ),
        };
        metrics::counter!("pollcast_webhook_attempts_total", "result" => label).increment(1);
        outcome
    }
}

/// An error and its sources, `outer: inner: …` (reqwest's own message alone is vague).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn count_delivery(kind: EventKind, result: &'static str) {
    metrics::counter!(
        "pollcast_webhook_deliveries_total",
        "event" => kind.as_str(),
        "result" => result,
    )
    .increment(1);
}

/// Delivers one event: after the poll's previous delivery is over (`previous`), so a poll's
/// events arrive in order, then attempt after attempt until one succeeds, the attempts run
/// out, `superseded` is cancelled (a newer `poll.results`, or the poll's `poll.closed`) or
/// the shutdown grace ends.
async fn deliver(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    event: WebhookEvent,
    previous: Option<JoinHandle<()>>,
    superseded: CancellationToken,
) {
    if let Some(previous) = previous {
        // Why ignore the result: a panicked predecessor is over all the same.
        let _ = previous.await;
    }
    let policy = shared.policy;
    let mut last_failure = String::new();
    for attempt in 1..=policy.max_attempts {
        if superseded.is_cancelled() {
            count_delivery(event.kind, "dropped");
            tracing::debug!(
                poll_id = event.poll_id,
                delivery = %event.id,
                "webhook event superseded before delivery"
            );
            return;
        }
        let outcome = tokio::select! {
            biased;
            () = shared.stop.cancelled() => {
                count_delivery(event.kind, "dropped");
                tracing::warn!(
                    poll_id = event.poll_id,
                    event = event.kind.as_str(),
                    url = %endpoint.shown_url,
                    "webhook delivery abandoned at shutdown"
                );
                return;
            }
            outcome = shared.attempt(&endpoint, &event) => outcome,
        };
        match outcome {
            Ok(()) => {
                count_delivery(event.kind, "delivered");
                tracing::debug!(
                    poll_id = event.poll_id,
                    delivery = %event.id,
                    attempt,
                    "webhook delivered"
                );
                return;
            }
            Err(Failure::Permanent(why)) => {
                last_failure = why;
                break;
            }
            Err(Failure::Retry(why)) => last_failure = why,
        }
        if attempt == policy.max_attempts {
            break;
        }
        let delay = policy.backoff(attempt, rand::random::<f64>());
        tracing::debug!(
            poll_id = event.poll_id,
            delivery = %event.id,
            attempt,
            failure = %last_failure,
            retry_in_ms = delay.as_millis() as u64,
            "webhook attempt failed; will retry"
        );
        tokio::select! {
            () = sleep(delay) => {}
            () = superseded.cancelled() => {}
            () = shared.stop.cancelled() => {}
        }
    }
    if shared.stop.is_cancelled() || superseded.is_cancelled() {
        // The loop's checks report these on the next turn; after the last attempt they
        // still were not delivered.
        count_delivery(event.kind, "dropped");
        return;
    }
    count_delivery(event.kind, "failed");
    tracing::error!(
        poll_id = event.poll_id,
        event = event.kind.as_str(),
        delivery = %event.id,
        url = %endpoint.shown_url,
        attempts = policy.max_attempts,
        last_failure = %last_failure,
        "webhook delivery failed; giving up"
    );
}

/// A poll with a webhook, as the worker tracks it.
struct Hooked {
    endpoint: Arc<Endpoint>,
    /// `None`: the poll wants no periodic results.
    throttle: Option<ResultsThrottle>,
    /// Already closed when it was looked up: its results are no longer sent.
    closed: bool,
    /// The poll's latest delivery; the next one waits for it.
    tail: Option<JoinHandle<()>>,
    /// Cancels the poll's latest `poll.results` delivery if it is still waiting or retrying.
    results: CancellationToken,
}

impl Hooked {
    fn new(target: &WebhookTarget, closed: bool) -> Self {
        Self {
            endpoint: Arc::new(Endpoint::new(target)),
            throttle: target
                .results_every_secs
                .map(|secs| ResultsThrottle::new(Duration::from_secs(u64::from(secs.max(1))))),
            closed,
            tail: None,
            results: CancellationToken::new(),
        }
    }

    fn dispatch(
        &mut self,
        shared: &Arc<Shared>,
        event: WebhookEvent,
        superseded: CancellationToken,
    ) {
        let previous = self.tail.take();
        self.tail = Some(shared.tracker.spawn(deliver(
            shared.clone(),
            self.endpoint.clone(),
            event,
            previous,
            superseded,
        )));
    }

    fn dispatch_results(&mut self, shared: &Arc<Shared>, update: &CountsUpdate) {
        self.results.cancel();
        self.results = CancellationToken::new();
        let superseded = self.results.clone();
        self.dispatch(shared, WebhookEvent::of_update(update), superseded);
    }

    /// Acts on a count update of this poll; returns whether the poll is done (closed).
    fn on_update(
        &mut self,
        shared: &Arc<Shared>,
        timers: &mut BinaryHeap<Reverse<(Instant, PollId)>>,
        update: CountsUpdate,
        now: Instant,
    ) -> bool {
        if update.closed_at.is_some() {
            self.results.cancel();
            if let Some(throttle) = &mut self.throttle {
                throttle.clear();
            }
            self.dispatch(
                shared,
                WebhookEvent::of_update(&update),
                CancellationToken::new(),
            );
            return true;
        }
        // Hidden counts are secret until the poll closes.
        if update.hide_results || self.closed {
            return false;
        }
        let Some(throttle) = &mut self.throttle else {
            return false;
        };
        let poll_id = update.poll_id;
        match throttle.offer(update, now) {
            Offer::Send(update) => self.dispatch_results(shared, &update),
            Offer::HeldUntil(at) => timers.push(Reverse((at, poll_id))),
            Offer::Coalesced | Offer::Stale => {}
        }
        false
    }
}

enum PollState {
    /// Its webhook is being looked up; updates that came meanwhile (coalesced).
    Resolving(Vec<CountsUpdate>),
    Hooked(Hooked),
}

type Lookup = (PollId, Result<Option<Poll>, StoreError>);

/// The single task that turns notices into deliveries.
struct Worker {
    store: Arc<dyn PollStore>,
    shared: Arc<Shared>,
    /// Open polls with a webhook, and polls being looked up.
    polls: HashMap<PollId, PollState>,
    /// When held `poll.results` are due; entries whose update went otherwise are skipped.
    timers: BinaryHeap<Reverse<(Instant, PollId)>>,
    resolved_tx: mpsc::UnboundedSender<Lookup>,
    no_hook: Arc<DashSet<PollId>>,
}

impl Worker {
    async fn run(
        mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut resolved: mpsc::UnboundedReceiver<Lookup>,
        shutdown: CancellationToken,
        done: CancellationToken,
    ) {
        loop {
            let wake = self.timers.peek().map(|Reverse((at, _))| *at);
            // Why this order: timers before notices, so a busy queue cannot starve the
            // periodic results.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.on_timers(Instant::now());
                }
                Some((poll_id, found)) = resolved.recv() => self.on_resolved(poll_id, found),
                notice = notices.recv() => match notice {
                    Some(notice) => self.on_notice(notice),
                    None => break,
                },
            }
        }
        self.drain(notices, resolved).await;
        done.cancel();
    }

    /// Shutdown: takes no more notices, sends what was already queued, and gives the
    /// deliveries under way [`SHUTDOWN_GRACE`].
    async fn drain(
        &mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut resolved: mpsc::UnboundedReceiver<Lookup>,
    ) {
        notices.close();
        while let Ok(notice) = notices.try_recv() {
            self.on_notice(notice);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        self.shared.tracker.close();
        loop {
            tokio::select! {
                biased;
                Some((poll_id, found)) = resolved.recv() => self.on_resolved(poll_id, found),
                () = self.shared.tracker.wait() => break,
                () = sleep_until(deadline) => {
                    tracing::warn!(
                        pending = self.shared.tracker.len(),
                        "webhook deliveries still under way after the shutdown grace are abandoned"
                    );
                    self.shared.stop.cancel();
                    self.shared.tracker.wait().await;
                    break;
                }
            }
        }
    }

    fn on_notice(&mut self, notice: Notice) {
        let now = Instant::now();
        match notice {
            Notice::Opened(poll) => {
                let Some(target) = &poll.settings.webhook else {
                    self.no_hook.insert(poll.id);
                    return;
                };
                let mut hooked = Hooked::new(target, poll.closed);
                hooked.dispatch(
                    &self.shared,
                    WebhookEvent::opened(&poll),
                    CancellationToken::new(),
                );
                // Why look for a lookup under way: a flush that raced ahead of `opened`
                // started one; its updates follow the opened event, and its answer is moot.
                let waiting = match self.polls.remove(&poll.id) {
                    Some(PollState::Resolving(waiting)) => waiting,
                    _ => Vec::new(),
                };
                for update in waiting {
                    if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                        return;
                    }
                }
                self.polls.insert(poll.id, PollState::Hooked(hooked));
            }
            Notice::Flushed(update) => {
                let poll_id = update.poll_id;
                match self.polls.get_mut(&poll_id) {
                    Some(PollState::Hooked(hooked)) => {
                        if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                            self.polls.remove(&poll_id);
                        }
                    }
                    Some(PollState::Resolving(waiting)) => hold(waiting, update),
                    None if self.no_hook.contains(&poll_id) => {
                        if update.closed_at.is_some() {
                            self.no_hook.remove(&poll_id);
                        }
                    }
                    None => {
                        self.polls
                            .insert(poll_id, PollState::Resolving(vec![update]));
                        self.spawn_lookup(poll_id);
                    }
                }
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, poll_id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(PollState::Hooked(hooked)) = self.polls.get_mut(&poll_id)
                && let Some(update) = hooked.throttle.as_mut().and_then(|t| t.take_due(now))
            {
                hooked.dispatch_results(&self.shared, &update);
            }
        }
    }

    /// Looks a poll's webhook up in the store, retrying failures like deliveries, and hands
    /// the answer back to the worker.
    fn spawn_lookup(&self, poll_id: PollId) {
        let store = self.store.clone();
        let shared = self.shared.clone();
        let answer = self.resolved_tx.clone();
        self.shared.tracker.spawn(async move {
            let mut failed = 0;
            let found = loop {
                let result = tokio::select! {
                    result = store.get_poll(poll_id) => result,
                    () = shared.stop.cancelled() => return,
                };
                match result {
                    Ok(poll) => break Ok(poll),
                    Err(err) => {
                        failed += 1;
                        if failed >= shared.policy.max_attempts {
                            break Err(err);
                        }
                        tracing::warn!(
                            poll_id,
                            error = %err,
                            "looking up a poll's webhook failed; will retry"
                        );
                        tokio::select! {
                            () = sleep(shared.policy.backoff(failed, rand::random::<f64>())) => {}
                            () = shared.stop.cancelled() => return,
                        }
                    }
                }
            };
            // Why ignore the error: the worker is gone only after shutdown.
            let _ = answer.send((poll_id, found));
        });
    }

    fn on_resolved(&mut self, poll_id: PollId, found: Result<Option<Poll>, StoreError>) {
        // Why check: `opened` may have told the webhook while the lookup ran.
        if !matches!(self.polls.get(&poll_id), Some(PollState::Resolving(_))) {
            return;
        }
        let Some(PollState::Resolving(waiting)) = self.polls.remove(&poll_id) else {
            return;
        };
        let poll = match found {
            Ok(poll) => poll,
            Err(err) => {
                for update in &waiting {
                    count_delivery(EventKind::of_update(update), "dropped");
                }
                tracing::error!(
                    poll_id,
                    error = %err,
                    dropped = waiting.len(),
                    "could not look up the poll's webhook; its events are dropped"
                );
                return;
            }
        };
        let Some((target, closed)) = poll.and_then(|p| p.settings.webhook.map(|w| (w, p.closed)))
        else {
            if !waiting.iter().any(|u| u.closed_at.is_some()) {
                self.no_hook.insert(poll_id);
            }
            return;
        };
        let mut hooked = Hooked::new(&target, closed);
        let now = Instant::now();
        for update in waiting {
            if hooked.on_update(&self.shared, &mut self.timers, update, now) {
                return;
            }
        }
        self.polls.insert(poll_id, PollState::Hooked(hooked));
    }
}

/// Keeps an update that came while its poll's webhook is looked up: only the newest of the
/// open poll's counts matter, and a final one is always kept.
fn hold(waiting: &mut Vec<CountsUpdate>, update: CountsUpdate) {
    if update.closed_at.is_none() {
        waiting.retain(|u| u.closed_at.is_some());
    }
    waiting.push(update);
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use pollcast_actors::{FlushOutcome, LedgerRow, Voter};
    use pollcast_actors::{NewPoll, PollOption, PollSettings};
    use serde_json::{Value, json};

    use super::*;

    fn counts(pairs: &[(i64, i64)]) -> Vec<OptionCount> {
        pairs
            .iter()
            .map(|&(option_id, new_count)| OptionCount {
                option_id,
                new_count,
            })
            .collect()
    }

    fn update(poll_id: PollId, seq: i64, closed_at: Option<UnixMillis>) -> CountsUpdate {
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

    fn target(url: &str, results_every_secs: Option<u32>) -> WebhookTarget {
        WebhookTarget {
            url: url.into(),
            secret: "whsec-test".into(),
            results_every_secs,
        }
    }

    fn poll(id: PollId, webhook: Option<WebhookTarget>, hide_results: bool) -> Poll {
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

    #[test]
    fn signature_matches_an_independent_hmac() {
        // python3 -c 'import hmac; print(hmac.new(b"whsec-test",
        //   b"1700000000.{\"id\":\"1-poll.closed-7\"}", "sha256").hexdigest())'
        let body = br#"{"id":"1-poll.closed-7"}"#;
        assert_eq!(
            signature(&hmac_key("whsec-test"), 1_700_000_000, body),
            "t=1700000000,v1=618d7d3daea20a3d123ccc7ffc64b270f74e12e2c693662673162be578a46ede"
        );
        // The timestamp is signed too: a replay cannot move it.
        assert_eq!(
            signature(&hmac_key("whsec-test"), 1_700_000_001, body),
            "t=1700000001,v1=12672ad4c6b5345d3f1cd9c6ba6467c4b943f788dd29c1df64f696a04e523f9e"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = RetryPolicy {
            timeout: Duration::from_secs(5),
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        };
        let ms = |failed, jitter| policy.backoff(failed, jitter).as_millis();
        // Without jitter's upper half: half of each step; with all of it: the whole step.
        assert_eq!(
            (1..=9).map(|n| ms(n, 0.0)).collect::<Vec<_>>(),
            [250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]
        );
        assert_eq!(
            (1..=9).map(|n| ms(n, 1.0)).collect::<Vec<_>>(),
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(ms(3, 0.5), 1500);
        // Far past the cap, nothing overflows.
        assert_eq!(ms(u32::MAX, 1.0), 60_000);
    }

    #[test]
    fn results_go_at_most_once_per_interval_carrying_the_newest_counts() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut throttle = ResultsThrottle::new(every);
        assert_eq!(
            throttle.offer(update(1, 1, None), t0),
            Offer::Send(update(1, 1, None))
        );
        assert_eq!(
            throttle.offer(update(1, 2, None), t0 + Duration::from_secs(1)),
            Offer::HeldUntil(t0 + every)
        );
        assert_eq!(
            throttle.offer(update(1, 3, None), t0 + Duration::from_secs(2)),
            Offer::Coalesced
        );
        assert_eq!(
            throttle.offer(update(1, 2, None), t0 + Duration::from_secs(3)),
            Offer::Stale
        );
        assert_eq!(throttle.take_due(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.take_due(t0 + every), Some(update(1, 3, None)));
        assert_eq!(throttle.take_due(t0 + every), None);
        // The next interval starts when the held update went.
        assert_eq!(
            throttle.offer(update(1, 4, None), t0 + Duration::from_secs(15)),
            Offer::HeldUntil(t0 + Duration::from_secs(20))
        );
        throttle.clear();
        assert_eq!(throttle.take_due(t0 + Duration::from_secs(20)), None);
        // After a quiet interval, the next update goes at once.
        assert_eq!(
            throttle.offer(update(1, 5, None), t0 + Duration::from_secs(31)),
            Offer::Send(update(1, 5, None))
        );
    }

    #[test]
    fn updates_held_during_a_lookup_keep_the_newest_and_the_final_one() {
        let mut waiting = vec![update(1, 1, None)];
        hold(&mut waiting, update(1, 2, None));
        assert_eq!(waiting, vec![update(1, 2, None)]);
        hold(&mut waiting, update(1, 3, Some(5)));
        hold(&mut waiting, update(1, 4, None));
        assert_eq!(waiting, vec![update(1, 3, Some(5)), update(1, 4, None)]);
    }

    #[test]
    fn event_bodies_carry_ids_receivers_can_deduplicate_by() {
        let closed = WebhookEvent::of_update(&update(1, 7, Some(1_700_000_100_000)));
        assert_eq!(closed.kind, EventKind::Closed);
        assert_eq!(closed.id, "1-poll.closed-7");
        let body: Value = serde_json::from_slice(&closed.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "1-poll.closed-7",
                "type": "poll.closed",
                "pollId": 1,
                "seq": 7,
                "occurredAt": "2023-11-14T22:13:20.007Z",
                "counts": [{"optionId": 1, "newCount": 7}, {"optionId": 2, "newCount": 0}],
                "closedAt": "2023-11-14T22:15:00.000Z",
            })
        );

        let results = WebhookEvent::of_update(&update(1, 3, None));
        assert_eq!(results.id, "1-poll.results-3");
        let body: Value = serde_json::from_slice(&results.body).unwrap();
        assert_eq!(body["type"], "poll.results");
        assert_eq!(body["closedAt"], Value::Null);

        let opened = WebhookEvent::opened(&poll(4, Some(target("http://x", None)), false));
        assert_eq!(opened.id, "4-poll.opened-0");
        let body: Value = serde_json::from_slice(&opened.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "4-poll.opened-0",
                "type": "poll.opened",
                "pollId": 4,
                "seq": 0,
                "occurredAt": "2023-11-14T22:13:20.000Z",
                "counts": [{"optionId": 1, "newCount": 0}, {"optionId": 2, "newCount": 0}],
                "closedAt": null,
                "poll": {
                    "id": 4,
                    "question": "Tabs or spaces?",
                    "options": [{"id": 1, "text": "Tabs"}, {"id": 2, "text": "Spaces"}],
                    "closesAt": "2023-11-14T22:14:20.000Z",
                    "maxChoices": 1,
                },
            })
        );
        assert!(
            !String::from_utf8_lossy(&opened.body).contains("whsec-test"),
            "the secret never goes on the wire"
        );
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
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let log = log.clone();
                            let failures_left = failures_left.clone();
                            async move {
                                let headers = req.headers().clone();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let fail = failures_left
                                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                        n.checked_sub(1)
                                    })
                                    .is_ok();
                                let status = if fail { 500 } else { 204 };
                                log.lock().unwrap().push(Received {
                                    headers,
                                    body,
                                    status,
                                    at: Instant::now(),
                                });
                                let mut response = http::Response::new(Full::new(Bytes::new()));
                                *response.status_mut() =
                                    http::StatusCode::from_u16(status).unwrap();
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
        let shutdown = CancellationToken::new();
        let hooks = WebhookDispatcher::start(Arc::new(FakeStore::default()), &settings(), shutdown);
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
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &settings(),
            CancellationToken::new(),
        );
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
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &WebhookSettings {
                max_attempts: 3.try_into().unwrap(),
                ..settings()
            },
            CancellationToken::new(),
        );
        hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));
        sleep(Duration::from_millis(800)).await;
        assert_eq!(receiver.all().len(), 3);
    }

    #[tokio::test]
    async fn a_closed_event_drops_older_results_still_retrying() {
        // The receiver refuses the opened event's first attempts; meanwhile results and the
        // close come: the results must not arrive after the close, nor at all once it exists.
        let receiver = Receiver::start(3).await;
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &settings(),
            CancellationToken::new(),
        );
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
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &settings(),
            CancellationToken::new(),
        );
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
        let hooks = WebhookDispatcher::start(store.clone(), &settings(), CancellationToken::new());
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
        while !hooks.no_hook.contains(&2) {
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
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &settings(),
            CancellationToken::new(),
        );
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
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &WebhookSettings {
                queue_capacity: 2.try_into().unwrap(),
                ..settings()
            },
            CancellationToken::new(),
        );
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
        let shutdown = CancellationToken::new();
        let hooks = WebhookDispatcher::start(
            Arc::new(FakeStore::default()),
            &settings(),
            shutdown.clone(),
        );
        hooks.opened(&poll(1, Some(target(&receiver.url, None)), false));
        shutdown.cancel();
        tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), hooks.stopped())
            .await
            .expect("stops within the grace");
        // Queued before the shutdown, and retried within the grace.
        assert_eq!(types(&receiver.accepted()), ["poll.opened"]);
        hooks.opened(&poll(2, Some(target(&receiver.url, None)), false));
        sleep(Duration::from_millis(100)).await;
        assert_eq!(receiver.all().len(), 2, "nothing taken after shutdown");
    }
}
