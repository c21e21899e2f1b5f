//! `GET /ws/polls/{id}`: a snapshot of the poll, then its counts after every flush.

use std::sync::Arc;

use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use pollcast_actors::{PollId, Subscription};
use tokio_util::sync::CancellationToken;
use warp::filters::BoxedFilter;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::error::ApiError;
use super::models::{PollView, Snapshot};
use super::{ApiContext, with_ctx};

/// Clients only send pings and close frames; anything big is abuse.
const MAX_INCOMING: usize = 4 * 1024;
/// A client that cannot take a message for this long is dropped, so it holds no memory.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    warp::path!("ws" / "polls" / PollId)
        .and(warp::get())
        .and(warp::ws())
        .and(with_ctx(ctx))
        .and_then(upgrade)
        .boxed()
}

async fn upgrade(poll_id: PollId, ws: Ws, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    // Subscribe before reading the snapshot: an update flushed in between is then delivered
    // (and dropped if the snapshot already includes it) instead of lost.
    let subscription = ctx.hub.subscribe(poll_id);
    let poll = ctx
        .store
        .get_poll(poll_id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(poll_id))?;
    let snapshot = Snapshot {
        r#type: "snapshot",
        seq: poll.seq,
        poll: PollView::at(poll, pollcast_actors::domain::now_millis()),
    };
    let first = serde_json::to_string(&snapshot).expect("snapshot serializes");
    let session_state = Session {
        poll_id,
        snapshot: first,
        last_seq: snapshot.seq,
        updates: subscription,
        shutdown: ctx.shutdown.clone(),
        keepalive: ctx.keepalive,
    };
    let sessions = ctx.sessions.clone();
    Ok(ws
        .max_message_size(MAX_INCOMING)
        .on_upgrade(move |socket| sessions.track_future(session(socket, session_state)))
        .into_response())
}

/// How a session keeps its client alive, and when it gives up on a silent one.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// A ping is sent this often; browsers and WebSocket libraries answer it by themselves.
    pub ping_every: Duration,
    /// A client that sends nothing (not even a pong) for this long is disconnected.
    pub idle_timeout: Duration,
}

struct Session {
    poll_id: PollId,
    snapshot: String,
    last_seq: i64,
    updates: Subscription,
    shutdown: CancellationToken,
    keepalive: Keepalive,
}

async fn session(socket: WebSocket, mut s: Session) {
    let poll_id = s.poll_id;
    let (mut tx, mut rx) = socket.split();
    tracing::debug!(poll_id, "subscriber connected");
    let _counted = SubscriberGauge::open();
    if !send(&mut tx, Message::text(std::mem::take(&mut s.snapshot))).await {
        return;
    }
    let mut ping = tokio::time::interval(s.keepalive.ping_every);
    ping.tick().await;
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => {
                send(&mut tx, Message::close_with(1001u16, "server shutting down")).await;
                break;
            }
            _ = ping.tick() => {
                if heard.elapsed() >= s.keepalive.idle_timeout {
                    tracing::debug!(poll_id, "closing a silent subscriber");
                    send(&mut tx, Message::close_with(1001u16, "idle")).await;
                    break;
                }
                if !send(&mut tx, Message::ping(Vec::new())).await {
                    break;
                }
            }
            changed = s.updates.changed() => {
                if changed.is_err() {
                    break;
                }
                let next = s
                    .updates
                    .borrow_and_update()
                    .as_ref()
                    .and_then(|frame| frame.json_after(s.last_seq).map(|json| (frame.seq, json.to_owned())));
                if let Some((seq, json)) = next {
                    if seq > s.last_seq + 1 {
                        metrics::counter!("pollcast_websocket_updates_coalesced_total")
                            .increment((seq - s.last_seq - 1) as u64);
                    }
                    if !send(&mut tx, Message::text(json)).await {
                        tracing::debug!(poll_id, "dropping a subscriber that does not keep up");
                        metrics::counter!("pollcast_websocket_clients_dropped_total").increment(1);
                        break;
                    }
                    s.last_seq = seq;
                }
            }
            incoming = rx.next() => match incoming {
                Some(Ok(msg)) if msg.is_close() => break,
                Some(Ok(_)) => heard = tokio::time::Instant::now(),
                Some(Err(_)) | None => break,
            }
        }
    }
    tracing::debug!(poll_id, "subscriber disconnected");
}

/// Sends one message; `false` if the client is gone or did not take it in time.
async fn send(tx: &mut SplitSink<WebSocket, Message>, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Counts a subscriber in the gauge for as long as it lives, however its session ends.
struct SubscriberGauge;

impl SubscriberGauge {
    fn open() -> Self {
        metrics::gauge!("pollcast_websocket_subscribers").increment(1.0);
        Self
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::gauge!("pollcast_websocket_subscribers").decrement(1.0);
    }
}
