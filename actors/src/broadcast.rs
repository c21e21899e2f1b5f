//! Fan-out of new counts to the WebSocket subscribers of each poll.
//!
//! Each poll with subscribers has one `watch` channel holding its latest [`CountsFrame`].
//! Publishing is O(1) whatever the number of subscribers, the frame is serialised once and
//! its bytes are shared by reference count (no subscriber copies them), and a slow
//! subscriber cannot slow the others: it simply wakes up to the newest frame (coalescing),
//! and the frame carries every option's count so nothing is lost by skipping one.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::domain::{CountsUpdate, OptionCount, PollId, UnixMillis, rfc3339};
use crate::ports::CountsBus;

/// One flush's update of one poll, serialised once for every subscriber.
#[derive(Debug)]
pub struct CountsFrame {
    /// The poll's version after the flush.
    pub seq: i64,
    /// `{"type":"counts",…}` (UTF-8 JSON) listing only the options the flush changed: what a
    /// subscriber that saw `seq - 1` needs.
    pub changed_json: Bytes,
    /// The same message listing every option: for a subscriber that missed an update.
    pub full_json: Bytes,
    /// The update itself, for edges that encode it in a wire format of their own
    /// (Socket.IO's `poll-stats`).
    pub update: CountsUpdate,
}

#[derive(Serialize)]
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

impl CountsFrame {
    /// Serialises an update in both of its forms. A poll's final update is a `closed`
    /// message, with every count in both forms.
    pub fn new(update: &CountsUpdate) -> Self {
        let closed_at = update.closed_at.map(rfc3339);
        let render = |counts: &[OptionCount]| {
            serde_json::to_string(&CountsMessage {
                r#type: if closed_at.is_some() {
                    "closed"
                } else {
                    "counts"
                },
                poll_id: update.poll_id,
                seq: update.seq,
                counts,
                flushed_at: update.flushed_at,
                closed_at: closed_at.clone(),
            })
            .expect("counts message serializes")
        };
        let full_json = Bytes::from(render(&update.all));
        Self {
            seq: update.seq,
            changed_json: if closed_at.is_some() {
                full_json.clone()
            } else {
                Bytes::from(render(&update.changed))
            },
            full_json,
            update: update.clone(),
        }
    }

    /// The JSON to send to a subscriber whose last message had version `last_seq`, or
    /// `None` if this frame is not newer. Cloning the answer shares the bytes.
    pub fn json_after(&self, last_seq: i64) -> Option<&Bytes> {
        if self.seq <= last_seq {
            None
        } else if self.seq == last_seq + 1 {
            Some(&self.changed_json)
        } else {
            Some(&self.full_json)
        }
    }
}

type Feed = watch::Sender<Option<Arc<CountsFrame>>>;

/// Receives the frames of one poll (`None` until the first publish after subscribing); use
/// it as the `watch::Receiver` it derefs to. Dropping the last subscription of a poll
/// forgets the poll. Why here and not at the next publish: a poll that is never published
/// again (an id that does not exist, asked for by a client sweeping ids) would otherwise
/// keep its entry forever.
#[derive(Debug)]
pub struct Subscription {
    updates: watch::Receiver<Option<Arc<CountsFrame>>>,
    poll: PollId,
    polls: Arc<DashMap<PollId, Feed>>,
}

impl std::ops::Deref for Subscription {
    type Target = watch::Receiver<Option<Arc<CountsFrame>>>;

    fn deref(&self) -> &Self::Target {
        &self.updates
    }
}

impl std::ops::DerefMut for Subscription {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.updates
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // `1`: this receiver, still alive while it drops. The shard lock that `remove_if`
        // holds orders it with a `subscribe` of the same poll, so a new subscriber either
        // finds the entry kept or makes a new one.
        self.polls
            .remove_if(&self.poll, |_, feed| feed.receiver_count() <= 1);
    }
}

/// Updates of every poll queued for one [`AllPolls`] receiver at most; a receiver further
/// behind skips to the newest update of each poll (see [`AllPolls::recv`]).
const ALL_POLLS_BACKLOG: usize = 256;

/// The feed of every poll's updates, for clients that watch the whole server (the seed's
/// Socket.IO clients). Why a bounded `broadcast` plus the newest update of each poll: a
/// receiver that keeps up gets every update in order; one that falls behind loses its
/// backlog and catches up from `latest`, so nothing is queued without bound and no poll's
/// newest counts are lost.
#[derive(Debug)]
struct AllFeed {
    updates: broadcast::Sender<Arc<CountsUpdate>>,
    /// The newest update published of each poll, while anyone watches every poll.
    latest: DashMap<PollId, Arc<CountsUpdate>>,
}

impl Default for AllFeed {
    fn default() -> Self {
        Self {
            updates: broadcast::channel(ALL_POLLS_BACKLOG).0,
            latest: DashMap::new(),
        }
    }
}

/// What an [`AllPolls`] receiver gets next.
#[derive(Debug)]
pub enum AllPollsUpdate {
    /// The next update, in publishing order.
    One(Arc<CountsUpdate>),
    /// The receiver fell behind and skipped updates: the newest update of every poll that
    /// has one, to be sent with every count where the client missed one.
    CatchUp(Vec<Arc<CountsUpdate>>),
}

/// Receives the updates of every poll (see [`BroadcastHub::subscribe_all`]). Hidden results
/// are left out until the poll closes, as for a poll's own subscribers.
#[derive(Debug)]
pub struct AllPolls {
    updates: broadcast::Receiver<Arc<CountsUpdate>>,
    feed: Arc<AllFeed>,
}

impl AllPolls {
    /// The next update; `None` once the hub is gone.
    pub async fn recv(&mut self) -> Option<AllPollsUpdate> {
        match self.updates.recv().await {
            Ok(update) => Some(AllPollsUpdate::One(update)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(self.catch_up()),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Drops the backlog and returns the newest update of every poll: for a receiver that
    /// could not send for a while.
    pub fn catch_up(&mut self) -> AllPollsUpdate {
        self.updates = self.updates.resubscribe();
        AllPollsUpdate::CatchUp(self.feed.latest.iter().map(|e| e.value().clone()).collect())
    }
}

/// The per-poll subscriber registry, shared by the broadcaster and the WebSocket handlers.
/// Cloning is cheap. It outlives broadcaster restarts, so subscribers are never dropped by
/// one.
#[derive(Debug, Clone, Default)]
pub struct BroadcastHub {
    polls: Arc<DashMap<PollId, Feed>>,
    all: Arc<AllFeed>,
}

impl BroadcastHub {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Receives every poll's updates published from now on.
    pub fn subscribe_all(&self) -> AllPolls {
        AllPolls {
            updates: self.all.updates.subscribe(),
            feed: self.all.clone(),
        }
    }

    /// Receivers of every poll's updates.
    pub fn all_polls_receivers(&self) -> usize {
        self.all.updates.receiver_count()
    }

    /// Feeds the receivers of every poll, once per flush (an update no newer than the last
    /// of its poll is dropped). Costs nothing while there are none; then the newest updates
    /// are forgotten, so they are kept only while someone may need to catch up.
    fn publish_all(&self, update: &CountsUpdate) {
        if self.all.updates.receiver_count() == 0 {
            if !self.all.latest.is_empty() {
                self.all.latest.clear();
            }
            return;
        }
        if update.hide_results && update.closed_at.is_none() {
            return;
        }
        let update = Arc::new(update.clone());
        match self.all.latest.entry(update.poll_id) {
            dashmap::Entry::Occupied(mut newest) => {
                if newest.get().seq >= update.seq {
                    return;
                }
                newest.insert(update.clone());
            }
            dashmap::Entry::Vacant(none) => {
                none.insert(update.clone());
            }
        }
        // Why under no lock: receivers drop what is not newer than what they sent.
        let _ = self.all.updates.send(update);
    }

    /// Subscribes to the updates of `poll` published from now on.
    pub fn subscribe(&self, poll: PollId) -> Subscription {
        let updates = self
            .polls
            .entry(poll)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Subscription {
            updates,
            poll,
            polls: self.polls.clone(),
        }
    }

    /// Polls that have at least one subscriber.
    pub fn polls_watched(&self) -> usize {
        self.polls.len()
    }

    /// Publishes an update to the current subscribers of its poll; returns how many there
    /// are. Polls nobody watches cost one map lookup. An update no newer than the last one
    /// published is dropped: with several processes the same flush arrives twice (locally
    /// and through the counts bus).
    pub fn publish(&self, update: &CountsUpdate) -> usize {
        self.publish_all(update);
        let Some(sender) = self.polls.get(&update.poll_id) else {
            return 0;
        };
        let subscribers = sender.receiver_count();
        // A poll hiding its results shows subscribers only its final counts.
        let hidden = update.hide_results && update.closed_at.is_none();
        if subscribers > 0 && hidden {
            return subscribers;
        }
        if subscribers > 0 {
            sender.send_if_modified(|latest| {
                if latest.as_ref().is_some_and(|f| f.seq >= update.seq) {
                    return false;
                }
                *latest = Some(Arc::new(CountsFrame::new(update)));
                true
            });
            return subscribers;
        }
        drop(sender);
        // Why remove_if: a subscriber may have arrived since the check above.
        self.polls
            .remove_if(&update.poll_id, |_, s| s.receiver_count() == 0);
        0
    }

    /// Subscribers across all polls.
    pub fn subscriber_count(&self) -> usize {
        self.polls.iter().map(|s| s.receiver_count()).sum()
    }
}

/// Messages of the [`Broadcaster`].
#[derive(Debug)]
pub enum BroadcasterMsg {
    /// New counts after a flush made by this process.
    Publish(CountsUpdate),
}

/// Arguments of the [`Broadcaster`].
#[derive(Clone)]
pub struct BroadcasterArgs {
    /// The subscriber registry.
    pub hub: BroadcastHub,
    /// Other processes' updates, in multi-node mode.
    pub bus: Option<Arc<dyn CountsBus>>,
}

/// State of the [`Broadcaster`].
pub struct BroadcasterState {
    args: BroadcasterArgs,
    remote: Option<JoinHandle<()>>,
}

/// The actor every count update goes through on its way to subscribers. In multi-node mode
/// it also publishes local flushes to the counts bus and feeds the bus's updates (of polls
/// counted by other processes) to local subscribers.
#[derive(Debug, Default)]
pub struct Broadcaster;

impl Actor for Broadcaster {
    type Msg = BroadcasterMsg;
    type State = BroadcasterState;
    type Arguments = BroadcasterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BroadcasterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let remote = match &args.bus {
            Some(bus) => {
                let mut feed = bus.subscribe().await?;
                let hub = args.hub.clone();
                Some(tokio::spawn(async move {
                    loop {
                        match feed.next().await {
                            Ok(update) => {
                                hub.publish(&update);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "reading count updates of other processes failed");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }))
            }
            None => None,
        };
        Ok(BroadcasterState { args, remote })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(remote) = state.remote.take() {
            remote.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BroadcasterMsg::Publish(update) => {
                let subscribers = state.args.hub.publish(&update);
                if let Some(bus) = &state.args.bus {
                    bus.publish(&update);
                }
                tracing::debug!(
                    poll_id = update.poll_id,
                    seq = update.seq,
                    subscribers,
                    "published counts"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(seq: i64) -> CountsUpdate {
        CountsUpdate {
            poll_id: 7,
            seq,
            changed: vec![OptionCount {
                option_id: 2,
                new_count: 5,
            }],
            all: vec![
                OptionCount {
                    option_id: 1,
                    new_count: 3,
                },
                OptionCount {
                    option_id: 2,
                    new_count: 5,
                },
            ],
            flushed_at: 1,
            closed_at: None,
            hide_results: false,
        }
    }

    #[test]
    fn a_polls_final_update_is_a_closed_message_with_every_count() {
        let closed = CountsUpdate {
            closed_at: Some(1_764_000_000_000),
            ..update(9)
        };
        let frame = CountsFrame::new(&closed);
        let json: serde_json::Value = serde_json::from_slice(frame.json_after(8).unwrap()).unwrap();
        assert_eq!(json["type"], "closed");
        assert_eq!(json["counts"].as_array().unwrap().len(), 2);
        assert_eq!(json["closedAt"], "2025-11-24T16:00:00.000Z");
    }

    #[test]
    fn hidden_results_reach_subscribers_only_when_the_poll_closes() {
        let hub = BroadcastHub::new();
        let mut watching = hub.subscribe(7);
        let hidden = |seq, closed_at| CountsUpdate {
            hide_results: true,
            closed_at,
            ..update(seq)
        };
        hub.publish(&hidden(1, None));
        assert!(!watching.has_changed().unwrap());
        hub.publish(&hidden(2, Some(5)));
        assert!(watching.has_changed().unwrap());
        let frame = watching.borrow_and_update().clone().unwrap();
        assert!(
            std::str::from_utf8(&frame.full_json)
                .unwrap()
                .contains("\"closed\"")
        );
    }

    #[test]
    fn subscriber_up_to_date_gets_only_changed_counts() {
        let frame = CountsFrame::new(&update(4));
        let json: serde_json::Value = serde_json::from_slice(frame.json_after(3).unwrap()).unwrap();
        assert_eq!(json["type"], "counts");
        assert_eq!(json["seq"], 4);
        assert_eq!(json["counts"].as_array().unwrap().len(), 1);
        assert_eq!(json["counts"][0]["newCount"], 5);
    }

    #[test]
    fn subscriber_that_missed_an_update_gets_every_count() {
        let frame = CountsFrame::new(&update(6));
        let json: serde_json::Value = serde_json::from_slice(frame.json_after(3).unwrap()).unwrap();
        assert_eq!(json["counts"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn stale_frames_are_not_sent() {
        assert!(CountsFrame::new(&update(3)).json_after(3).is_none());
    }

    #[tokio::test]
    async fn publish_reaches_only_that_polls_subscribers() {
        let hub = BroadcastHub::new();
        let mut watching = hub.subscribe(7);
        let other = hub.subscribe(8);
        assert_eq!(hub.publish(&update(1)), 1);
        watching.changed().await.unwrap();
        assert_eq!(watching.borrow().as_ref().unwrap().seq, 1);
        assert!(!other.has_changed().unwrap());
    }

    #[tokio::test]
    async fn an_update_no_newer_than_the_last_is_dropped() {
        let hub = BroadcastHub::new();
        let mut watching = hub.subscribe(7);
        hub.publish(&update(2));
        watching.changed().await.unwrap();
        hub.publish(&update(2));
        hub.publish(&update(1));
        assert!(!watching.has_changed().unwrap());
        assert_eq!(watching.borrow().as_ref().unwrap().seq, 2);
    }

    #[test]
    fn the_last_subscriber_leaving_forgets_the_poll_even_if_it_is_never_published() {
        let hub = BroadcastHub::new();
        let (first, second) = (hub.subscribe(7), hub.subscribe(7));
        drop(first);
        assert_eq!(hub.polls_watched(), 1, "one subscriber is still there");
        drop(second);
        assert_eq!(hub.polls_watched(), 0);
        let _again = hub.subscribe(7);
        assert_eq!(hub.polls_watched(), 1);
    }

    fn of_poll(poll_id: PollId, seq: i64) -> CountsUpdate {
        CountsUpdate {
            poll_id,
            ..update(seq)
        }
    }

    #[tokio::test]
    async fn every_polls_updates_reach_a_whole_server_receiver_once_each() {
        let hub = BroadcastHub::new();
        let mut all = hub.subscribe_all();
        hub.publish(&of_poll(7, 1));
        hub.publish(&of_poll(8, 1));
        hub.publish(&of_poll(7, 1)); // the same flush again, through the counts bus
        let hidden = CountsUpdate {
            hide_results: true,
            ..of_poll(9, 1)
        };
        hub.publish(&hidden);
        hub.publish(&CountsUpdate {
            closed_at: Some(5),
            ..hidden.clone()
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            match all.recv().await.unwrap() {
                AllPollsUpdate::One(u) => got.push((u.poll_id, u.seq, u.closed_at.is_some())),
                other => panic!("no catch-up expected: {other:?}"),
            }
        }
        assert_eq!(got, vec![(7, 1, false), (8, 1, false), (9, 1, true)]);
        assert!(
            all.updates.is_empty(),
            "nothing else: {:?}",
            all.updates.len()
        );
    }

    #[tokio::test]
    async fn a_whole_server_receiver_that_falls_behind_gets_the_newest_of_each_poll() {
        let hub = BroadcastHub::new();
        let mut all = hub.subscribe_all();
        for seq in 1..=(ALL_POLLS_BACKLOG as i64 + 10) {
            hub.publish(&of_poll(7, seq));
        }
        hub.publish(&of_poll(8, 3));
        let AllPollsUpdate::CatchUp(mut newest) = all.recv().await.unwrap() else {
            panic!("a receiver that fell behind catches up");
        };
        newest.sort_by_key(|u| u.poll_id);
        let newest: Vec<_> = newest.iter().map(|u| (u.poll_id, u.seq)).collect();
        assert_eq!(newest, vec![(7, ALL_POLLS_BACKLOG as i64 + 10), (8, 3)]);
    }

    #[test]
    fn without_whole_server_receivers_nothing_is_kept() {
        let hub = BroadcastHub::new();
        hub.publish(&of_poll(7, 1));
        assert!(hub.all.latest.is_empty());
        let all = hub.subscribe_all();
        hub.publish(&of_poll(7, 2));
        assert_eq!(hub.all.latest.len(), 1);
        drop(all);
        hub.publish(&of_poll(7, 3));
        assert!(hub.all.latest.is_empty(), "forgotten once nobody listens");
    }

    #[test]
    fn polls_without_subscribers_are_forgotten() {
        let hub = BroadcastHub::new();
        drop(hub.subscribe(7));
        assert_eq!(hub.publish(&update(1)), 0);
        assert!(hub.polls.is_empty());
    }
}
