//! One subscriber's way out: the frames waiting for its socket, written at once by whoever has
//! one to send when nothing waits before it.
//!
//! Why the poll's fan-out writes to the socket itself instead of waking the subscriber's
//! session: one flush reaches every subscriber of the poll at once, and a task woken per
//! subscriber to send one frame (the wake, its `select!`, the channel's lock, tungstenite's
//! framing and copy, the connection's wrappers) cost more than the write it made: 17 µs of CPU
//! per message against 10 µs for a bare loop of writes (docs/BENCHMARKS.md, "Large audience").
//! Now a write that the socket takes whole is all an update costs; anything it does not take
//! waits here, in order, and the session writes it when the socket has room.
//!
//! The invariants, all kept under the one lock:
//! - bytes reach the socket in the order they were handed in, and only whole frames are
//!   handed in, so two writers never interleave inside a frame;
//! - nothing is written directly while anything waits (it would overtake it);
//! - at most [`super::WRITE_BUDGET`] bytes wait: beyond it the subscriber is dropped;
//! - of the poll's updates only the newest waits unencoded (`owed`): a subscriber whose socket
//!   is full skips to it (coalescing, as the viewer loses nothing: an update carries every
//!   count it missed).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use pollcast_actors::CountsFrame;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::WRITE_BUDGET;

pub(super) struct Outlet {
    /// The socket, when the connection is plain TCP: written at once by any sender that finds
    /// nothing waiting. `None` (TLS, say): every frame waits and the session writes it.
    direct: Option<OwnedWriteHalf>,
    queue: Mutex<Queue>,
    /// Wakes the session: bytes wait, an update is owed, or the outlet closed.
    wanted: Notify,
}

/// Why an outlet takes nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closed {
    /// Writing to the socket failed: the client is gone.
    Gone,
    /// More than the write budget waited: a client that does not read.
    OverBudget,
    /// The session ended.
    Ended,
}

struct Queue {
    /// Bytes the socket has not taken, in order: whole frames, but the first may have been
    /// written in part (what is left of it).
    waiting: VecDeque<Bytes>,
    len: usize,
    /// The newest update not yet queued, kept unencoded while bytes wait.
    owed: Option<Arc<CountsFrame>>,
    /// The `seq` of the last update queued or written (the snapshot's, at first).
    last_seq: i64,
    closed: Option<Closed>,
}

/// What a [`Outlet::flush`] left.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flushed {
    /// Nothing waits.
    All,
    /// The socket is full; bytes wait.
    Blocked,
    Closed(Closed),
}

impl Outlet {
    /// An outlet whose last update sent was `last_seq` (the snapshot's): `direct` is the
    /// socket when it may be written from any task.
    pub(super) fn new(direct: Option<OwnedWriteHalf>, last_seq: i64) -> Arc<Self> {
        Arc::new(Self {
            direct,
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                len: 0,
                owed: None,
                last_seq,
                closed: None,
            }),
            wanted: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("not poisoned")
    }

    /// Sends one or more whole frames (a snapshot, a ping, a pong, a close): written now if
    /// nothing waits and the socket takes them, else queued. `false` if the outlet is closed
    /// (or closes now, over its budget).
    pub(super) fn send(&self, frames: Bytes) -> bool {
        let mut queue = self.lock();
        if queue.closed.is_some() {
            return false;
        }
        // An update owed was handed in first: it goes first (a close after it must not
        // leave the poll's final counts unsent behind it).
        queue_owed(&mut queue);
        self.push(&mut queue, frames)
    }

    /// Offers the poll's newest update: sent if newer than what the subscriber has, as the
    /// delta when it follows the last one, else with every count. `false` if the outlet is
    /// closed, so the fan-out can forget it.
    pub(super) fn offer(&self, frame: &Arc<CountsFrame>) -> bool {
        let mut queue = self.lock();
        if queue.closed.is_some() {
            return false;
        }
        if frame.seq() <= queue.last_seq {
            return true;
        }
        if self.direct.is_none() || !queue.waiting.is_empty() {
            // Encoded when the session gets to it; only the newest is kept.
            if queue
                .owed
                .as_ref()
                .is_none_or(|owed| owed.seq() < frame.seq())
            {
                queue.owed = Some(frame.clone());
            }
            self.wanted.notify_one();
            return true;
        }
        match encoded(&mut queue, frame) {
            Some(bytes) => self.push(&mut queue, bytes),
            None => true,
        }
    }

    /// Writes what waits (the owed update included) as far as the socket takes it, without
    /// waiting. For an outlet without a direct socket see [`Outlet::take`].
    pub(super) fn flush(&self) -> Flushed {
        let mut queue = self.lock();
        if let Some(closed) = queue.closed {
            return Flushed::Closed(closed);
        }
        queue_owed(&mut queue);
        let Some(socket) = &self.direct else {
            return if queue.waiting.is_empty() {
                Flushed::All
            } else {
                Flushed::Blocked
            };
        };
        let queue = &mut *queue;
        while let Some(front) = queue.waiting.front_mut() {
            match socket.try_write(front) {
                Ok(n) if n == front.len() => {
                    queue.len -= n;
                    queue.waiting.pop_front();
                }
                Ok(n) => {
                    queue.len -= n;
                    let _ = front.split_to(n);
                    return Flushed::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
                Err(_) => return Flushed::Closed(close(queue, Closed::Gone)),
            }
        }
        Flushed::All
    }

    /// Everything that waits (the owed update included), for a session that writes to its
    /// socket itself; empty if nothing does.
    pub(super) fn take(&self) -> Result<Vec<Bytes>, Closed> {
        let mut queue = self.lock();
        if let Some(closed) = queue.closed {
            return Err(closed);
        }
        queue_owed(&mut queue);
        queue.len = 0;
        Ok(queue.waiting.drain(..).collect())
    }

    /// Resolves when the session has something to do: call [`Outlet::flush`] (or
    /// [`Outlet::take`]) after. Made before the flush, a wake in between is not lost.
    pub(super) fn wanted(&self) -> Notified<'_> {
        self.wanted.notified()
    }

    /// Resolves when the direct socket may take more (at once without one).
    pub(super) async fn writable(&self) -> io::Result<()> {
        match &self.direct {
            Some(socket) => socket.writable().await,
            None => Ok(()),
        }
    }

    /// Takes nothing more; what waits is dropped.
    pub(super) fn close(&self, why: Closed) {
        let mut queue = self.lock();
        if queue.closed.is_none() {
            close(&mut queue, why);
        }
    }

    /// Queues `bytes` behind what waits, or writes them now if nothing does; closes the outlet
    /// on a failed write or beyond the budget.
    fn push(&self, queue: &mut Queue, mut bytes: Bytes) -> bool {
        if let (Some(socket), true) = (&self.direct, queue.waiting.is_empty()) {
            match socket.try_write(&bytes) {
                Ok(n) if n == bytes.len() => return true,
                Ok(n) => {
                    let _ = bytes.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    close(queue, Closed::Gone);
                    self.wanted.notify_one();
                    return false;
                }
            }
        }
        enqueue(queue, bytes);
        if queue.len > WRITE_BUDGET {
            close(queue, Closed::OverBudget);
            self.wanted.notify_one();
            return false;
        }
        self.wanted.notify_one();
        true
    }
}

/// Queues the owed update, if any, behind what waits.
fn queue_owed(queue: &mut Queue) {
    if let Some(bytes) = queue.owed.take().and_then(|f| encoded(queue, &f)) {
        enqueue(queue, bytes);
    }
}

fn enqueue(queue: &mut Queue, bytes: Bytes) {
    if !bytes.is_empty() {
        queue.len += bytes.len();
        queue.waiting.push_back(bytes);
    }
}

fn close(queue: &mut Queue, why: Closed) -> Closed {
    queue.closed = Some(why);
    queue.waiting.clear();
    queue.len = 0;
    queue.owed = None;
    why
}

/// `frame`'s bytes for a subscriber at the queue's `last_seq`, counting the updates it skips;
/// the queue is then at the frame's `seq`. `None` if the frame is not newer.
fn encoded(queue: &mut Queue, frame: &CountsFrame) -> Option<Bytes> {
    let last = queue.last_seq;
    let bytes = frame.encoded_after(last, super::counts_frame)?.clone();
    let skipped = frame.seq() - last - 1;
    if skipped > 0 {
        metrics::counter!("pollcast_websocket_updates_coalesced_total").increment(skipped as u64);
    }
    queue.last_seq = frame.seq();
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use pollcast_actors::{CountsUpdate, OptionCount};
    use tokio::net::{TcpSocket, TcpStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::http::ws::frame;

    /// An outlet on one end of a loopback connection with small buffers (so that it fills
    /// after a few frames), and the other end as a client reads it.
    async fn outlet() -> (Arc<Outlet>, WebSocketStream<TcpStream>) {
        let listening = TcpSocket::new_v4().unwrap();
        listening.set_recv_buffer_size(4096).unwrap();
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let (ours, theirs) = tokio::join!(socket.connect(listener.local_addr().unwrap()), async {
            listener.accept().await.unwrap().0
        });
        let (_read, write) = ours.unwrap().into_split();
        std::mem::forget(_read); // the client never sends here
        let client = WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
        (Outlet::new(Some(write), 0), client)
    }

    fn update(seq: i64) -> Arc<CountsFrame> {
        let count = OptionCount {
            option_id: 1,
            new_count: seq,
        };
        Arc::new(CountsFrame::new(&CountsUpdate {
            poll_id: 7,
            seq,
            changed: vec![count],
            all: vec![count],
            flushed_at: 1,
            closed_at: None,
            hide_results: false,
        }))
    }

    fn waiting(outlet: &Outlet) -> usize {
        outlet.lock().len
    }

    /// Sends 1 KiB text frames numbered from 0 until some wait; returns how many were sent.
    fn fill(outlet: &Outlet) -> usize {
        let mut sent = 0;
        while waiting(outlet) == 0 {
            let text = format!("{sent:04}{}", "x".repeat(1020));
            assert!(outlet.send(frame::text(text.as_bytes())));
            sent += 1;
        }
        sent
    }

    /// Reads the client's side while flushing the outlet, until `count` messages are in.
    async fn read(
        outlet: &Outlet,
        client: &mut WebSocketStream<TcpStream>,
        count: usize,
    ) -> Vec<Message> {
        let mut messages = Vec::new();
        while messages.len() < count {
            let _ = outlet.flush();
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(50), client.next()).await
            {
                messages.push(msg.unwrap());
            }
        }
        messages
    }

    fn seq_of(message: &Message) -> i64 {
        let json: serde_json::Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
        json["seq"].as_i64().unwrap()
    }

    #[tokio::test]
    async fn frames_that_wait_for_a_full_socket_reach_the_client_whole_and_in_order() {
        let (outlet, mut client) = outlet().await;
        let filled = fill(&outlet);
        assert!(outlet.send(frame::ping()));
        let after = format!("{filled:04}");
        assert!(outlet.send(frame::text(after.as_bytes())));
        assert_eq!(outlet.flush(), Flushed::Blocked);

        let messages = read(&outlet, &mut client, filled + 2).await;
        for (i, message) in messages[..filled].iter().enumerate() {
            assert!(message.to_text().unwrap().starts_with(&format!("{i:04}")));
        }
        assert!(messages[filled].is_ping());
        assert_eq!(messages[filled + 1].to_text().unwrap(), after);
        assert_eq!(outlet.flush(), Flushed::All);
        assert_eq!(waiting(&outlet), 0);
    }

    #[tokio::test]
    async fn a_subscriber_whose_socket_is_full_gets_only_the_newest_update_with_every_count() {
        let (outlet, mut client) = outlet().await;
        assert!(outlet.offer(&update(1)));
        let filled = fill(&outlet);
        for seq in 2..=4 {
            assert!(outlet.offer(&update(seq)));
        }
        // An older one offered late (a session's catch-up) does not replace the newest.
        assert!(outlet.offer(&update(3)));

        let messages = read(&outlet, &mut client, 1 + filled + 1).await;
        assert_eq!(seq_of(&messages[0]), 1);
        assert_eq!(seq_of(&messages[filled + 1]), 4);
        // Nothing more: 2 and 3 were skipped, and 4 is not sent twice.
        assert!(outlet.offer(&update(4)));
        assert_eq!(outlet.flush(), Flushed::All);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), client.next())
                .await
                .is_err()
        );
    }

    /// The direct writes are a fast path (docs/BENCHMARKS.md, "Fast paths"): a client must
    /// read the same messages from them as from the simple way, the session writing all.
    #[tokio::test]
    async fn direct_writes_reach_a_client_as_the_sessions_own_writes_do() {
        enum Op {
            Send(Bytes),
            Offer(i64),
        }
        let ops = [
            Op::Send(frame::text(b"{\"type\":\"snapshot\",\"seq\":0}")),
            Op::Offer(1),
            Op::Offer(2),
            Op::Send(frame::ping()),
            Op::Offer(2),
            Op::Offer(4),
            Op::Send(frame::close(frame::GOING_AWAY, "bye")),
        ];
        let apply = |outlet: &Outlet, op: &Op| match op {
            Op::Send(bytes) => assert!(outlet.send(bytes.clone())),
            Op::Offer(seq) => assert!(outlet.offer(&update(*seq))),
        };

        let (direct, mut client) = outlet().await;
        for op in &ops {
            apply(&direct, op);
        }
        let from_direct = read(&direct, &mut client, 6).await;

        // The session that keeps up: it takes what waits after every step.
        let simple = Outlet::new(None, 0);
        let mut written = Vec::new();
        for op in &ops {
            apply(&simple, op);
            for bytes in simple.take().unwrap() {
                written.extend_from_slice(&bytes);
            }
        }
        let mut reader = tokio_tungstenite::tungstenite::protocol::WebSocket::from_raw_socket(
            std::io::Cursor::new(written),
            Role::Client,
            None,
        );
        let from_simple: Vec<Message> = std::iter::from_fn(|| reader.read().ok()).collect();
        assert_eq!(from_direct, from_simple);
        assert_eq!(
            from_direct.iter().filter(|m| m.is_text()).count(),
            4,
            "the snapshot and updates 1, 2 and 4"
        );
    }

    #[tokio::test]
    async fn an_update_no_newer_than_what_the_subscriber_has_is_not_sent() {
        let outlet = Outlet::new(None, 5);
        assert!(outlet.offer(&update(5)));
        assert!(outlet.offer(&update(4)));
        assert!(outlet.take().unwrap().is_empty());
        assert!(outlet.offer(&update(6)));
        assert_eq!(outlet.take().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn more_than_the_write_budget_waiting_closes_the_outlet_and_drops_what_waits() {
        let (outlet, _client) = outlet().await;
        fill(&outlet);
        let big = frame::text(&vec![b'x'; WRITE_BUDGET]);
        assert!(!outlet.send(big));
        assert_eq!(outlet.flush(), Flushed::Closed(Closed::OverBudget));
        assert!(!outlet.send(frame::ping()));
        assert!(!outlet.offer(&update(1)));
        assert_eq!(waiting(&outlet), 0);
    }

    #[tokio::test]
    async fn an_update_owed_to_a_full_socket_goes_out_before_a_close_sent_after_it() {
        let (outlet, mut client) = outlet().await;
        let filled = fill(&outlet);
        assert!(outlet.offer(&update(1)));
        assert!(outlet.send(frame::close(frame::GOING_AWAY, "server shutting down")));
        let messages = read(&outlet, &mut client, filled + 2).await;
        assert_eq!(seq_of(&messages[filled]), 1);
        assert!(messages[filled + 1].is_close());
    }

    #[tokio::test]
    async fn without_a_direct_socket_everything_waits_for_the_session_in_order() {
        let outlet = Outlet::new(None, 0);
        assert!(outlet.send(frame::text(b"snapshot")));
        assert!(outlet.offer(&update(1)));
        assert!(outlet.send(frame::ping()));
        assert!(outlet.offer(&update(2)));
        assert!(outlet.offer(&update(3)));
        let taken = outlet.take().unwrap();
        // Each in the order handed in; of the updates owed together, only the newest.
        assert_eq!(taken.len(), 4);
        assert_eq!(taken[0], frame::text(b"snapshot"));
        let seq = |bytes: &Bytes, seq: &str| bytes.windows(seq.len()).any(|w| w == seq.as_bytes());
        assert!(seq(&taken[1], "\"seq\":1,"));
        assert_eq!(taken[2], frame::ping());
        assert!(seq(&taken[3], "\"seq\":3,"));
        outlet.close(Closed::Ended);
        assert_eq!(outlet.take(), Err(Closed::Ended));
    }
}
