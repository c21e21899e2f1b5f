//! Socket.IO at `/socket.io/` (Engine.IO v4: long-polling, WebSocket, and the upgrade from
//! one to the other), for the seed app's live clients:
//!
//! ```js
//! const socket = io('http://pollcast:8080');
//! socket.on('poll-stats', ({ pollId, optionId, newCount }) => { … });
//! ```
//!
//! A client that does nothing else gets `poll-stats` for every option that changed in every
//! flush of every poll (`socketio.broadcast_all`), ids as strings, as the seed sent them;
//! hidden results only once the poll closes. A client that narrows to chosen polls
//! (`socket.emit('subscribe', {pollId})`, or `?pollId=1,2` in the handshake query) gets only
//! those, first a `snapshot` `{pollId, seq, poll}` of each, and `seq` in every `poll-stats`
//! so it can drop stale ones. Both are fed from the [`BroadcastHub`], as the plain WebSocket
//! is: a slow client is coalesced to the newest counts, never queued for without bound.
//!
//! The JSON of these events is encoded here, at the edge that sends it.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pollcast_actors::domain::{CountsUpdate, now_millis};
use pollcast_actors::{AllPolls, AllPollsUpdate, BroadcastHub, PollId, Subscription};
use serde::Serialize;
use serde_json::Value;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::{SendError, SocketError, SocketIo};
use tokio_util::sync::CancellationToken;
use warp::Reply;
use warp::reply::Response;

use super::ApiContext;
use super::connection::ConnectionHold;
use super::models::PollView;
use super::ws::Allowance;

/// Where Socket.IO is served (the client's default path).
pub const PATH: &str = "/socket.io/";
/// Packets waiting for one client at most (socketioxide's buffer); past it, the client is
/// behind and gets the newest counts once it has taken these.
const CLIENT_BUFFER: usize = 256;
/// How long a client whose buffer is full is left alone before it is caught up.
const RETRY_FULL: Duration = Duration::from_millis(250);
/// Polls one client may narrow to at once.
const MAX_SUBSCRIPTIONS: usize = 64;
/// Bytes of the WebSocket read buffer of a client (clients send little).
const READ_BUFFER: usize = 4 * 1024;

/// The Socket.IO endpoint: socketioxide's service, with pollcast's CORS rule and connection
/// caps in front. Cloning is cheap.
#[derive(Clone)]
pub struct Endpoint {
    service: Serve,
    io: SocketIo,
    cors_origins: Arc<[crate::config::Origin]>,
    limits: super::rate_limit::RateLimits,
}

/// socketioxide's service, its answers turned into warp's. Why a closure: the service's
/// type names a crate (engineioxide) pollcast does not otherwise depend on.
type Serve = Arc<dyn Fn(Request<Incoming>) -> ResponseFuture + Send + Sync>;
type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What every client's handlers share.
struct Shared {
    polls: pollcast_actors::service::PollService,
    hub: BroadcastHub,
    broadcast_all: bool,
    shutdown: CancellationToken,
}

impl Endpoint {
    /// Whether a request is for Socket.IO.
    pub fn handles(path: &str) -> bool {
        path.starts_with(PATH)
    }

    /// The endpoint for the server that `ctx` describes; its clients end with
    /// `ctx.shutdown`.
    pub fn new(ctx: &ApiContext) -> Self {
        let (service, io) = SocketIo::builder()
            .max_payload(ctx.settings.max_body_bytes)
            .max_buffer_size(CLIENT_BUFFER)
            .ws_read_buffer_size(READ_BUFFER)
            .build_svc();
        let shared = Arc::new(Shared {
            polls: ctx.polls.clone(),
            hub: ctx.hub.clone(),
            broadcast_all: ctx.settings.socketio.broadcast_all,
            shutdown: ctx.shutdown.clone(),
        });
        io.ns("/", move |socket: SocketRef| {
            on_connect(socket, shared.clone())
        });
        let service: Serve = Arc::new(move |req| {
            let answer = hyper::service::Service::call(&service, req);
            Box::pin(async move {
                let resp = match answer.await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                };
                let (parts, body) = resp.into_parts();
                // Why whole: Engine.IO answers are small and complete once the service
                // answers (a long-poll waits before it answers, not while it streams).
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut resp = Response::new(body.into());
                *resp.status_mut() = parts.status;
                *resp.headers_mut() = parts.headers;
                resp
            })
        });
        Self {
            service,
            io,
            cors_origins: ctx.settings.cors_origins.clone().into(),
            limits: ctx.limits.clone(),
        }
    }

    /// Disconnects every client (at shutdown): pending long-polls are answered at once.
    pub async fn close(&self) {
        self.io.close().await;
    }

    /// Serves one request, counted against its client's `rate_limit.per_ip_*` as every API
    /// request is. The connection's `hold` goes into the request, so the Engine.IO
    /// session made from it (which keeps the request's parts) holds the connection's place
    /// under `max_connections` and `max_connections_per_ip` for as long as it lives, over
    /// WebSocket as over long-polling.
    pub fn call(
        &self,
        mut req: Request<Incoming>,
        hold: &ConnectionHold,
    ) -> Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> {
        let peer = req.extensions().get::<super::PeerAddr>().copied();
        let limited = self.limits.check_ip(peer, req.headers());
        let allowed = self.cross_origin(&req);
        req.extensions_mut().insert(hold.clone());
        let service = self.service.clone();
        Box::pin(async move {
            if let Err(e) = limited {
                return super::error::recover(warp::reject::custom(e)).await;
            }
            let allow_origin = match allowed {
                Ok(allow) => allow,
                Err(()) => {
                    return Ok(super::error::error_reply(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "cross-origin requests are not allowed (see http.cors_origins)",
                    ));
                }
            };
            let mut resp = if req.method() == Method::OPTIONS {
                let mut resp = warp::reply::with_status("", StatusCode::NO_CONTENT).into_response();
                let headers = resp.headers_mut();
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, POST"),
                );
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("content-type"),
                );
                headers.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
                resp
            } else {
                service(req).await
            };
            if let Some(origin) = allow_origin {
                let headers = resp.headers_mut();
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
                headers.append(header::VARY, HeaderValue::from_static("origin"));
            }
            Ok(resp)
        })
    }

    /// `Ok(None)`: same-origin, or no Origin (not a browser); `Ok(Some(origin))`: an origin
    /// of `http.cors_origins`, to be echoed; `Err`: another site's page.
    fn cross_origin(&self, req: &Request<Incoming>) -> Result<Option<HeaderValue>, ()> {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return Ok(None);
        };
        let given = origin.to_str().map_err(|_| ())?;
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok());
        if super::is_same_origin(given, host) {
            return Ok(None);
        }
        if self.cors_origins.iter().any(|o| o == given) {
            return Ok(Some(origin.clone()));
        }
        Err(())
    }
}

/// One `poll-stats` event: the seed's `{pollId, optionId, newCount}`, ids as strings, plus
/// `seq` for a client that narrowed to chosen polls.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollStats {
    poll_id: String,
    option_id: String,
    new_count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
}

/// The `snapshot` event (and the answer to `subscribe`): the poll as it is now.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotEvent {
    poll_id: String,
    seq: i64,
    poll: PollView,
}

/// The answer to a `subscribe` that failed.
#[derive(Debug, Serialize)]
struct ErrorEvent {
    error: &'static str,
    message: String,
}

/// One connected client.
struct Client {
    socket: SocketRef,
    state: Mutex<State>,
    /// Cancelled when the client disconnects.
    gone: CancellationToken,
    _counted: crate::metrics::Held,
}

struct State {
    /// `None`: every poll (until the client narrows).
    narrowed: Option<HashMap<PollId, CancellationToken>>,
    /// Ends the every-poll feed once the client narrows (or goes).
    all_feed: CancellationToken,
    /// The `seq` of the last update sent, per poll.
    last: HashMap<PollId, i64>,
    /// `subscribe` and `unsubscribe` a client may send.
    allowance: Allowance,
}

/// Why an update could not be sent.
enum Unsent {
    /// The client's buffer is full: try again later with the newest counts.
    Full,
    /// The client is gone.
    Gone,
}

fn on_connect(socket: SocketRef, shared: Arc<Shared>) {
    let requested = query_polls(socket.req_parts().uri.query());
    let gone = CancellationToken::new();
    let client = Arc::new(Client {
        socket: socket.clone(),
        state: Mutex::new(State {
            narrowed: None,
            all_feed: gone.child_token(),
            last: HashMap::new(),
            allowance: Allowance::new(),
        }),
        gone,
        _counted: crate::metrics::Held::new("pollcast_socketio_clients"),
    });
    tracing::debug!(sid = %socket.id, "Socket.IO client connected");
    let gone = client.gone.clone();
    socket.on_disconnect(move |socket: SocketRef| {
        tracing::debug!(sid = %socket.id, "Socket.IO client disconnected");
        gone.cancel();
    });
    // Why weak: the socket keeps its handlers until it is dropped, and the client holds the
    // socket; a strong reference would keep both (and the connection's place) for ever.
    // The client lives until it goes (or the server stops) instead.
    let weak = Arc::downgrade(&client);
    {
        let (client, shutdown) = (client.clone(), shared.shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = client.gone.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    {
        let (weak, shared) = (weak.clone(), shared.clone());
        socket.on(
            "subscribe",
            move |Data(value): Data<Value>, ack: AckSender| {
                let (weak, shared) = (weak.clone(), shared.clone());
                async move {
                    let Some(client) = weak.upgrade() else { return };
                    let Some(ids) = poll_ids(&value) else {
                        let why = "expected {\"pollId\": <id>}".to_owned();
                        let _ = ack.send(&error_event("invalid_request", why));
                        return;
                    };
                    let mut answers = Vec::with_capacity(ids.len());
                    for id in ids {
                        if !client.allowed() {
                            return;
                        }
                        let answer = match subscribe(&client, &shared, id).await {
                            Ok(snapshot) => serde_json::to_value(&snapshot),
                            Err(e) => serde_json::to_value(&e),
                        };
                        answers.push(answer.expect("events serialize"));
                    }
                    let _ = match answers.as_slice() {
                        [one] => ack.send(one),
                        many => ack.send(many),
                    };
                }
            },
        );
    }
    socket.on("unsubscribe", move |Data(value): Data<Value>| {
        let weak = weak.clone();
        async move {
            let Some(client) = weak.upgrade() else { return };
            let Some(ids) = poll_ids(&value) else { return };
            if !client.allowed() {
                return;
            }
            let mut state = client.state.lock().expect("not poisoned");
            if let Some(narrowed) = &mut state.narrowed {
                for id in ids {
                    if let Some(stop) = narrowed.remove(&id) {
                        stop.cancel();
                    }
                }
            }
        }
    });
    match requested {
        Some(ids) => {
            client.narrow();
            tokio::spawn(async move {
                for id in ids {
                    if let Err(e) = subscribe(&client, &shared, id).await {
                        let _ = client.socket.emit("subscribe-error", &e);
                    }
                }
            });
        }
        None if shared.broadcast_all => {
            let feed = shared.hub.subscribe_all();
            let stop = client.state.lock().expect("not poisoned").all_feed.clone();
            tokio::spawn(forward_all(client, feed, stop, shared.shutdown.clone()));
        }
        None => client.narrow(),
    }
}

impl Client {
    /// Whether the client may send one more request (else it is disconnected).
    fn allowed(&self) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        if state.allowance.take(tokio::time::Instant::now()) {
            return true;
        }
        drop(state);
        tracing::debug!(sid = %self.socket.id, "disconnecting a Socket.IO client that sends too much");
        let _ = self.socket.clone().disconnect();
        false
    }

    /// From now on only the polls subscribed to (the every-poll feed ends).
    fn narrow(&self) {
        let mut state = self.state.lock().expect("not poisoned");
        if state.narrowed.is_none() {
            state.all_feed.cancel();
            state.narrowed = Some(HashMap::new());
            state.last.clear();
        }
    }

    /// Sends the options of `update` that the client has not seen: those the update changed
    /// when the client saw the one before it (or, watching every poll and not
    /// `catching_up`, none of the poll's: the seed's behaviour), else every option.
    fn deliver(&self, update: &CountsUpdate, catching_up: bool) -> Result<(), Unsent> {
        let mut state = self.state.lock().expect("not poisoned");
        let narrowed = match &state.narrowed {
            None => false,
            Some(polls) if polls.contains_key(&update.poll_id) => true,
            Some(_) => return Ok(()),
        };
        let last = state.last.get(&update.poll_id).copied();
        if last.is_some_and(|last| update.seq <= last) {
            return Ok(());
        }
        // A client catching up may have missed any update of a poll it never heard of.
        let missed = last.map_or(catching_up, |last| update.seq > last + 1);
        if missed {
            metrics::counter!("pollcast_socketio_updates_coalesced_total").increment(1);
        }
        let counts = if missed || update.closed_at.is_some() {
            &update.all
        } else {
            &update.changed
        };
        let poll_id = update.poll_id.to_string();
        for count in counts {
            let stats = PollStats {
                poll_id: poll_id.clone(),
                option_id: count.option_id.to_string(),
                new_count: count.new_count,
                seq: narrowed.then_some(update.seq),
            };
            match self.socket.emit("poll-stats", &stats) {
                Ok(()) => {}
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                    return Err(Unsent::Full);
                }
                Err(SendError::Socket(SocketError::Closed)) => return Err(Unsent::Gone),
                Err(e) => {
                    tracing::warn!(error = %e, "encoding poll-stats failed");
                    return Err(Unsent::Gone);
                }
            }
        }
        state.last.insert(update.poll_id, update.seq);
        Ok(())
    }
}

/// Narrows `client` to `poll_id` too: a `snapshot` (also the answer), then the poll's
/// updates newer than it.
async fn subscribe(
    client: &Arc<Client>,
    shared: &Shared,
    poll_id: PollId,
) -> Result<SnapshotEvent, ErrorEvent> {
    client.narrow();
    let already = {
        let state = client.state.lock().expect("not poisoned");
        let polls = state.narrowed.as_ref().expect("narrowed above");
        if !polls.contains_key(&poll_id) && polls.len() >= MAX_SUBSCRIPTIONS {
            let why = format!("at most {MAX_SUBSCRIPTIONS} polls per client");
            return Err(error_event("too_many_subscriptions", why));
        }
        polls.contains_key(&poll_id)
    };
    // Subscribe before reading the snapshot: an update flushed in between is then delivered
    // (and dropped if the snapshot already includes it) instead of lost.
    let updates = (!already).then(|| shared.hub.subscribe(poll_id));
    let poll = match shared.polls.get(poll_id).await {
        Ok(Some(poll)) => poll,
        Ok(None) => {
            let why = format!("poll {poll_id} does not exist");
            return Err(error_event("poll_not_found", why));
        }
        Err(e) => {
            tracing::warn!(poll_id, error = %e, "reading a poll for a Socket.IO client failed");
            let why = "the poll store did not answer".to_owned();
            return Err(error_event("unavailable", why));
        }
    };
    let snapshot = SnapshotEvent {
        poll_id: poll_id.to_string(),
        seq: poll.seq,
        poll: PollView::at(poll, now_millis()),
    };
    let stop = {
        let mut state = client.state.lock().expect("not poisoned");
        let state = &mut *state;
        let Some(polls) = &mut state.narrowed else {
            return Ok(snapshot);
        };
        let stop = match polls.get(&poll_id) {
            // Another `subscribe` of the same poll got there first: it feeds the client.
            Some(_) => None,
            None => {
                let stop = client.gone.child_token();
                polls.insert(poll_id, stop.clone());
                Some(stop)
            }
        };
        // Under the lock, so that no update of the poll goes out between the two.
        let _ = client.socket.emit("snapshot", &snapshot);
        let last = state.last.entry(poll_id).or_insert(snapshot.seq);
        *last = (*last).max(snapshot.seq);
        stop
    };
    if let (Some(updates), Some(stop)) = (updates, stop) {
        tokio::spawn(forward_poll(
            client.clone(),
            updates,
            stop,
            shared.shutdown.clone(),
        ));
    }
    Ok(snapshot)
}

/// Feeds one poll's updates to a client that narrowed to it, until it unsubscribes or goes.
async fn forward_poll(
    client: Arc<Client>,
    mut updates: Subscription,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    // Biased, updates first, with the cancellations made once: a flush's wake then polls
    // the updates alone. Making or polling `shutdown.cancelled()` takes the lock that every
    // session shares, and a flush wakes every subscriber of the poll at once.
    let (stopped, shutting_down) = (stop.cancelled(), shutdown.cancelled());
    tokio::pin!(stopped, shutting_down);
    loop {
        tokio::select! {
            biased;
            changed = updates.changed() => if changed.is_err() { return },
            _ = &mut stopped => return,
            _ = &mut shutting_down => return,
        }
        // Why retry with the newest: while the client's buffer is full the poll may move on;
        // it then gets the newest counts, every option of them.
        loop {
            let frame = updates.borrow_and_update().clone();
            let Some(frame) = frame else { break };
            match client.deliver(&frame.update, false) {
                Ok(()) => break,
                Err(Unsent::Gone) => return,
                Err(Unsent::Full) => tokio::select! {
                    _ = &mut stopped => return,
                    _ = &mut shutting_down => return,
                    _ = tokio::time::sleep(RETRY_FULL) => {}
                },
            }
        }
    }
}

/// Feeds every poll's updates to a client that has not narrowed, until it does or goes.
async fn forward_all(
    client: Arc<Client>,
    mut feed: AllPolls,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    // As in `forward_poll`.
    let (stopped, shutting_down) = (stop.cancelled(), shutdown.cancelled());
    tokio::pin!(stopped, shutting_down);
    loop {
        let next = tokio::select! {
            biased;
            next = feed.recv() => next,
            _ = &mut stopped => return,
            _ = &mut shutting_down => return,
        };
        let mut next = match next {
            Some(next) => next,
            None => return,
        };
        loop {
            let sent = match &next {
                AllPollsUpdate::One(update) => client.deliver(update, false),
                AllPollsUpdate::CatchUp(updates) => updates
                    .iter()
                    .try_for_each(|update| client.deliver(update, true)),
            };
            match sent {
                Ok(()) => break,
                Err(Unsent::Gone) => return,
                Err(Unsent::Full) => {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = &mut shutting_down => return,
                        _ = tokio::time::sleep(RETRY_FULL) => {}
                    }
                    // What was queued meanwhile is skipped: the newest of every poll instead.
                    next = feed.catch_up();
                }
            }
        }
    }
}

fn error_event(error: &'static str, message: String) -> ErrorEvent {
    ErrorEvent { error, message }
}

/// A poll id as a number or a numeric string (the seed's clients send strings).
fn poll_id(value: &Value) -> Option<PollId> {
    pollcast_actors::domain::flexible_id(value)
        .ok()
        .filter(|id| *id > 0)
}

/// The polls of a `subscribe` / `unsubscribe`: `{pollId}`, `{pollIds: [..]}`, an id, or a
/// list of ids.
fn poll_ids(value: &Value) -> Option<Vec<PollId>> {
    let ids = match value {
        Value::Object(o) => match (o.get("pollId"), o.get("pollIds")) {
            (Some(id), None) => vec![poll_id(id)?],
            (None, Some(Value::Array(ids))) => ids.iter().map(poll_id).collect::<Option<_>>()?,
            _ => return None,
        },
        Value::Array(ids) => ids.iter().map(poll_id).collect::<Option<_>>()?,
        id => vec![poll_id(id)?],
    };
    (!ids.is_empty() && ids.len() <= MAX_SUBSCRIPTIONS).then_some(ids)
}

/// The polls named in the handshake's query (`pollId=1,2` or `pollId=1&pollId=2`), if any.
fn query_polls(query: Option<&str>) -> Option<Vec<PollId>> {
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    for (key, value) in serde_urlencoded::from_str::<Vec<(String, String)>>(query?).ok()? {
        if key != "pollId" && key != "pollIds" {
            continue;
        }
        for id in value
            .split(',')
            .filter_map(|id| id.trim().parse::<PollId>().ok())
        {
            if id > 0 && seen.insert(id) && ids.len() < MAX_SUBSCRIPTIONS {
                ids.push(id);
            }
        }
    }
    (!ids.is_empty()).then_some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_ids_take_numbers_and_numeric_strings() {
        assert_eq!(poll_ids(&serde_json::json!({"pollId": "7"})), Some(vec![7]));
        assert_eq!(poll_ids(&serde_json::json!({"pollId": 7})), Some(vec![7]));
        assert_eq!(
            poll_ids(&serde_json::json!({"pollIds": [1, "2"]})),
            Some(vec![1, 2])
        );
        assert_eq!(poll_ids(&serde_json::json!("3")), Some(vec![3]));
        assert_eq!(poll_ids(&serde_json::json!({"pollId": "x"})), None);
        assert_eq!(poll_ids(&serde_json::json!({"pollId": 0})), None);
        assert_eq!(poll_ids(&serde_json::json!({})), None);
    }

    #[test]
    fn the_handshake_query_names_polls() {
        assert_eq!(query_polls(Some("EIO=4&transport=polling")), None);
        assert_eq!(
            query_polls(Some("pollId=1,2&EIO=4&pollId=2&pollId=3")),
            Some(vec![1, 2, 3])
        );
        assert_eq!(query_polls(None), None);
    }
}
