//! `GET /ws/polls/{id}`: a snapshot of the poll, then its counts after every flush.
//!
//! The rooms: this file upgrades the request and runs one session per subscriber (its
//! snapshot, pings, what the client sends, its end); [`audience`] hands each update of a
//! poll to all its subscribers in this process; [`outlet`] is one subscriber's way out, where
//! frames wait for a socket that is full; [`frame`] encodes what a server sends.

mod audience;
mod frame;
mod outlet;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use pollcast_actors::domain::{UnixMillis, rfc3339};
use pollcast_actors::{CountsUpdate, OptionCount, PollId, Subscription};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use audience::Audiences;
use outlet::{Closed, Flushed, Outlet};

use super::connection::ConnectionHold;
use super::error::ApiError;
use super::models::{PollView, Snapshot};
use super::{ApiContext, with_ctx};

/// Clients only send pings and close frames; anything big is abuse.
const MAX_INCOMING: usize = 4 * 1024;
/// A client that has not taken what waits for it this long after its socket filled is
/// dropped, so it holds no memory.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite's read buffer. Why so small: its default (128 KiB) is zero-filled on the first
/// read, which made 10,000 idle subscribers cost over a gigabyte; clients send only pongs.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes waiting for a client that does not read, at most; beyond it the session ends. Why
/// a bound at all: every ping a client sends queues a pong, and one client that pinged and
/// never read took gigabytes (tungstenite's default was unbounded). It holds the largest
/// snapshot (32 options of 200 characters, a 500-character question) several times.
pub const WRITE_BUDGET: usize = 128 * 1024;
/// Messages a client may send in a burst, and per second sustained; more closes the
/// session (1008). Clients send pongs (one per server ping) and now and then a ping.
const INCOMING_BURST: f64 = 20.0;
const INCOMING_PER_SEC: f64 = 2.0;

/// The connection upgrade of a request, set aside by the server before routing (warp keeps
/// its own out of reach). Cloneable so that a filter can take it from the extensions.
/// It carries the connection's place under the connection caps too: hyper ends the
/// connection's own task at the upgrade, and the session must go on holding that place.
#[derive(Clone)]
pub struct PendingUpgrade(Arc<Mutex<Option<(OnUpgrade, ConnectionHold)>>>);

impl PendingUpgrade {
    /// Holds `upgrade`, and the connection's `hold`, until the WebSocket route takes them.
    pub fn new(upgrade: OnUpgrade, hold: ConnectionHold) -> Self {
        Self(Arc::new(Mutex::new(Some((upgrade, hold)))))
    }

    fn take(&self) -> Option<(OnUpgrade, ConnectionHold)> {
        self.0.lock().expect("not poisoned").take()
    }
}

/// The route; its sessions' fan-out tasks run until `ctx.shutdown`.
pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    let audiences = Audiences::new(ctx.hub.clone(), ctx.shutdown.clone(), ctx.sessions.clone());
    warp::path!("ws" / "polls" / PollId)
        .and(warp::get())
        .and(websocket_key())
        .and(warp::ext::optional::<PendingUpgrade>())
        .and(with_ctx(ctx))
        .and(warp::any().map(move || audiences.clone()))
        .and_then(upgrade)
        .boxed()
}

/// The handshake's key, once the request is a WebSocket upgrade (RFC 6455 §4.2.1).
fn websocket_key() -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    warp::header::<String>("connection")
        .and_then(|connection: String| async move {
            let upgrade = connection
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
            if upgrade {
                Ok(())
            } else {
                Err(Rejection::from(ApiError::BadRequest(
                    "a WebSocket needs `Connection: upgrade`".into(),
                )))
            }
        })
        .untuple_one()
        .and(warp::header::exact_ignore_case("upgrade", "websocket"))
        .and(warp::header::exact("sec-websocket-version", "13"))
        .and(warp::header::<String>("sec-websocket-key"))
}

#[utoipa::path(get, path = "/ws/polls/{id}", tag = "live",
    params(("id" = i64, Path, description = "The poll")),
    responses(
        (status = 101, description = "A WebSocket: a `snapshot`, then `counts` after each flush that changed the poll, and `closed` once (see the README)"),
        (status = 400, description = "Not a WebSocket upgrade", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such poll", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn upgrade(
    poll_id: PollId,
    key: String,
    pending: Option<PendingUpgrade>,
    ctx: Arc<ApiContext>,
    audiences: Audiences,
) -> Result<Response, Rejection> {
    // Subscribe before reading the snapshot: an update flushed in between is then delivered
    // (and dropped if the snapshot already includes it) instead of lost.
    let subscription = ctx.hub.subscribe(poll_id);
    let poll = ctx
        .polls
        .get(poll_id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(poll_id))?;
    let Some((on_upgrade, hold)) = pending.and_then(|p| p.take()) else {
        return Err(ApiError::BadRequest("this connection cannot be upgraded".into()).into());
    };
    let snapshot = Snapshot {
        r#type: "snapshot",
        seq: poll.seq,
        poll: PollView::at(poll, pollcast_actors::domain::now_millis()),
    };
    let first = serde_json::to_vec(&snapshot).expect("snapshot serializes");
    let session_state = Session {
        poll_id,
        snapshot: first,
        last_seq: snapshot.seq,
        updates: subscription,
        shutdown: ctx.shutdown.clone(),
        keepalive: ctx.settings.keepalive,
    };
    ctx.sessions.spawn(async move {
        let _counted_under_the_caps = hold;
        match on_upgrade.await {
            Ok(upgraded) => session(upgraded, session_state, audiences).await,
            Err(e) => tracing::debug!(poll_id, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut reply = warp::reply::with_status("", StatusCode::SWITCHING_PROTOCOLS).into_response();
    let headers = reply.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(reply)
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
    snapshot: Vec<u8>,
    last_seq: i64,
    updates: Subscription,
    shutdown: CancellationToken,
    keepalive: Keepalive,
}

async fn session(upgraded: Upgraded, mut s: Session, audiences: Audiences) {
    let poll_id = s.poll_id;
    let (client, mut writer, outlet) = match super::connection::plain_tcp(upgraded) {
        Ok((tcp, read_ahead)) => {
            let (read, write) = tcp.into_split();
            // Why copied, or dropped when empty: hyper's slice of what it read ahead holds
            // its whole read buffer (8 KiB and more) for as long as the session lasts.
            let read: ClientReader = if read_ahead.is_empty() {
                Box::new(read)
            } else {
                Box::new(std::io::Cursor::new(read_ahead.to_vec()).chain(read))
            };
            (read, Writer::Direct, Outlet::new(Some(write), s.last_seq))
        }
        // TLS: frames wait in the outlet and the session writes them through the stream.
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            let read: ClientReader = Box::new(read);
            (read, Writer::Stream(write), Outlet::new(None, s.last_seq))
        }
    };
    tracing::debug!(poll_id, "subscriber connected");
    let _counted = crate::metrics::Held::new("pollcast_websocket_subscribers");
    // Taken, so that the session does not hold a second copy of the poll for its whole life.
    let snapshot = frame::text(&std::mem::take(&mut s.snapshot));
    if !outlet.send(snapshot) || drain(&outlet, &mut writer).await.is_err() {
        return;
    }
    let seat = audiences.join(poll_id, outlet.clone());
    // An update published after the snapshot was read and before the audience had this
    // subscriber: offered now (the outlet drops it if the snapshot already has it).
    let published = s.updates.borrow().clone();
    if let Some(frame) = published {
        outlet.offer(&frame);
    }
    drop(s.updates);
    // Why the client's messages are read by a task of their own: the session waits in
    // `drain` for a full socket to take its frames, and a client's pong must be read (and
    // its idle timer reset) meanwhile. The reader wakes only when the client sends
    // something, and ends with why. Its replies (pongs, a close) go out through the outlet.
    // Aborted if the session is dropped first (the runtime shutting down).
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(WRITE_BUDGET)
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING));
    let socket = WebSocketStream::from_raw_socket(
        ClientSide {
            read: client,
            outlet: outlet.clone(),
        },
        Role::Server,
        Some(config),
    )
    .await;
    let mut reader =
        AbortOnDropHandle::new(tokio::spawn(read_client(socket, s.keepalive.idle_timeout)));
    let mut reader_ended = false;
    // A token of the session's own, cancelled with the server's: polling the server's one
    // would take the lock that every session shares.
    let shutdown = s.shutdown.child_token();
    let stopping = shutdown.cancelled();
    tokio::pin!(stopping);
    let mut ping = tokio::time::interval(s.keepalive.ping_every);
    ping.tick().await;
    loop {
        // Biased, the outlet first: what waits for the client goes before a ping.
        tokio::select! {
            biased;
            _ = outlet.wanted() => {
                if let Err(dropped) = drain(&outlet, &mut writer).await {
                    if dropped != Dropped::Gone {
                        tracing::debug!(poll_id, ?dropped, "dropping a subscriber that does not keep up");
                        metrics::counter!("pollcast_websocket_clients_dropped_total").increment(1);
                    }
                    break;
                }
            }
            _ = &mut stopping => {
                outlet.send(frame::close(frame::GOING_AWAY, "server shutting down"));
                let _ = drain(&outlet, &mut writer).await;
                break;
            }
            ended = &mut reader => {
                reader_ended = true;
                match ended {
                    Ok(ClientEnded::Silent) => {
                        tracing::debug!(poll_id, "closing a silent subscriber");
                        outlet.send(frame::close(frame::GOING_AWAY, "idle"));
                    }
                    Ok(ClientEnded::TooMuch) => {
                        tracing::debug!(poll_id, "closing a subscriber that sends too much");
                        metrics::counter!("pollcast_websocket_clients_dropped_total").increment(1);
                        outlet.send(frame::close(frame::POLICY, "too many messages"));
                    }
                    Ok(ClientEnded::Gone) | Err(_) => {}
                }
                let _ = drain(&outlet, &mut writer).await;
                break;
            }
            _ = ping.tick() => {
                if !outlet.send(frame::ping()) {
                    break;
                }
            }
        }
    }
    outlet.close(Closed::Ended);
    audiences.leave(seat);
    if !reader_ended {
        // Waited for, so that the socket is closed once the session is over: the server's
        // shutdown waits for sessions, not for their readers.
        reader.abort();
        let _ = (&mut reader).await;
    }
    tracing::debug!(poll_id, "subscriber disconnected");
}

/// What reads the client's side of the connection.
type ClientReader = Box<dyn AsyncRead + Send + Unpin>;

/// How the session writes what waits in its outlet.
enum Writer {
    /// The outlet writes to the socket itself; the session waits for room.
    Direct,
    /// The session writes to the stream (under TLS).
    Stream(WriteHalf<TokioIo<Upgraded>>),
}

/// Why a session stopped writing to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// The connection failed or closed.
    Gone,
    /// It did not take what waited for it within [`SEND_TIMEOUT`].
    Slow,
    /// More than [`WRITE_BUDGET`] waited for it.
    OverBudget,
}

impl From<Closed> for Dropped {
    fn from(closed: Closed) -> Self {
        match closed {
            Closed::OverBudget => Dropped::OverBudget,
            Closed::Gone | Closed::Ended => Dropped::Gone,
        }
    }
}

/// Writes what waits in `outlet` until nothing does. A client whose socket stays full for
/// [`SEND_TIMEOUT`] from the first time it did, however little it takes meanwhile, is
/// dropped, as is one whose outlet closes meanwhile (over its budget, say).
async fn drain(outlet: &Outlet, writer: &mut Writer) -> Result<(), Dropped> {
    let deadline = tokio::time::Instant::now() + SEND_TIMEOUT;
    loop {
        match writer {
            Writer::Direct => match outlet.flush() {
                Flushed::All => return Ok(()),
                Flushed::Closed(why) => return Err(why.into()),
                Flushed::Blocked => {
                    tokio::select! {
                        room = outlet.writable() => {
                            if room.is_err() {
                                return Err(Dropped::Gone);
                            }
                        }
                        // Closed meanwhile, or more to write: the next flush says which.
                        _ = outlet.wanted() => {}
                        _ = tokio::time::sleep_until(deadline) => return Err(Dropped::Slow),
                    }
                }
            },
            Writer::Stream(stream) => {
                let frames = outlet.take()?;
                if frames.is_empty() {
                    return Ok(());
                }
                let write = async {
                    for frame in &frames {
                        stream.write_all(frame).await?;
                    }
                    stream.flush().await
                };
                match tokio::time::timeout_at(deadline, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(Dropped::Gone),
                    Err(_) => return Err(Dropped::Slow),
                }
            }
        }
    }
}

/// The connection as tungstenite sees it: it reads the client, and what it writes (pongs, the
/// reply to a close) joins the outlet's queue, whole frames at a time. Why never a partial
/// write: tungstenite hands over each frame whole when a write takes all it is given, so no
/// frame of the fan-out can land inside one of its frames.
struct ClientSide {
    read: ClientReader,
    outlet: Arc<Outlet>,
}

impl AsyncRead for ClientSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.outlet.send(Bytes::copy_from_slice(buf)) {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Why a client's side of a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientEnded {
    /// It closed, or its connection failed (a full write budget included: it sent and did
    /// not read).
    Gone,
    /// It sent nothing, not even a pong, for the idle timeout.
    Silent,
    /// It sent more than its allowance.
    TooMuch,
}

/// Reads what a client sends (pongs, pings, a close; tungstenite answers pings itself)
/// until it goes, falls silent for `idle_timeout`, or sends too much.
async fn read_client(mut rx: WebSocketStream<ClientSide>, idle_timeout: Duration) -> ClientEnded {
    let mut allowance = Allowance::new();
    loop {
        match tokio::time::timeout(idle_timeout, rx.next()).await {
            Err(_) => return ClientEnded::Silent,
            Ok(Some(Ok(msg))) if msg.is_close() => return ClientEnded::Gone,
            Ok(Some(Ok(_))) => {
                if !allowance.take(tokio::time::Instant::now()) {
                    return ClientEnded::TooMuch;
                }
            }
            Ok(Some(Err(_)) | None) => return ClientEnded::Gone,
        }
    }
}

/// A token bucket of the messages a client may send.
pub(super) struct Allowance {
    tokens: f64,
    at: tokio::time::Instant,
}

impl Allowance {
    pub(super) fn new() -> Self {
        Self {
            tokens: INCOMING_BURST,
            at: tokio::time::Instant::now(),
        }
    }

    /// Spends one message; `false` when the client is over its allowance.
    pub(super) fn take(&mut self, now: tokio::time::Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * INCOMING_PER_SEC;
        self.tokens = (self.tokens + refill).min(INCOMING_BURST);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A `counts` (or, for the poll's final update, `closed`) message: the WebSocket's wire
/// format of a [`CountsUpdate`], encoded here and nowhere else.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CountsMessage<'a> {
    r#type: &'static str,
    poll_id: PollId,
    seq: i64,
    counts: &'a [OptionCount],
    flushed_at: UnixMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed_at: Option<String>,
}

/// The message for a subscriber that saw the previous update (`delta`) or missed some;
/// made once per update and form, and shared by every subscriber (see
/// [`pollcast_actors::CountsFrame::encoded_after`]).
fn counts_frame(update: &CountsUpdate, delta: bool) -> Bytes {
    frame::text(&counts_json(update, delta))
}

/// The JSON of a [`counts_frame`].
fn counts_json(update: &CountsUpdate, delta: bool) -> Vec<u8> {
    let message = CountsMessage {
        r#type: if update.is_final() {
            "closed"
        } else {
            "counts"
        },
        poll_id: update.poll_id,
        seq: update.seq,
        counts: update.counts(delta),
        flushed_at: update.flushed_at,
        closed_at: update.closed_at.map(rfc3339),
    };
    serde_json::to_vec(&message).expect("counts message serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(seq: i64, closed_at: Option<UnixMillis>) -> CountsUpdate {
        let count = |option_id, new_count| OptionCount {
            option_id,
            new_count,
        };
        CountsUpdate {
            poll_id: 7,
            seq,
            changed: vec![count(2, 5)],
            all: vec![count(1, 3), count(2, 5)],
            flushed_at: 1,
            closed_at,
            hide_results: false,
        }
    }

    fn json(update: &CountsUpdate, delta: bool) -> serde_json::Value {
        serde_json::from_slice(&counts_json(update, delta)).unwrap()
    }

    #[test]
    fn an_update_is_a_counts_message_with_the_changed_or_every_count() {
        let delta = json(&update(4, None), true);
        assert_eq!(delta["type"], "counts");
        assert_eq!(delta["pollId"], 7);
        assert_eq!(delta["seq"], 4);
        assert_eq!(delta["flushedAt"], 1);
        assert_eq!(
            delta["counts"],
            serde_json::json!([{"optionId": 2, "newCount": 5}])
        );
        assert!(delta.get("closedAt").is_none());
        assert_eq!(
            json(&update(4, None), false)["counts"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_polls_final_update_is_a_closed_message_with_every_count() {
        let closed = json(&update(9, Some(1_764_000_000_000)), true);
        assert_eq!(closed["type"], "closed");
        assert_eq!(closed["counts"].as_array().unwrap().len(), 2);
        assert_eq!(closed["closedAt"], "2025-11-24T16:00:00.000Z");
    }
}
