//! Fan-out of new counts to the WebSocket subscribers of each poll.
//!
//! Each poll with subscribers has one `watch` channel holding its latest [`CountsFrame`].
//! Publishing is O(1) whatever the number of subscribers, the frame is encoded once (by the
//! edge that sends it) and its bytes are shared by reference count (no subscriber copies
//! them), and a slow
//! subscriber cannot slow the others: it simply wakes up to the newest frame (coalescing),
//! and the frame carries every option's count so nothing is lost by skipping one.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::domain::{CountsUpdate, PollId};
use crate::ports::CountsBus;

/// One flush's update of one poll, as every subscriber of the poll receives it.
#[derive(Debug)]
pub struct CountsFrame {
    /// The update.
    pub update: CountsUpdate,
    /// The edge's encoding of the update for a subscriber that saw the previous one, and for
    /// one that missed some: made by the first subscriber that sends each, then shared by
    /// every other (one encoding per update, whatever the audience). What is in them is the
    /// edge's business: the core knows no wire format.
    delta: OnceLock<Bytes>,
    full: OnceLock<Bytes>,
}

impl CountsFrame {
    /// A frame of `update`, not yet encoded.
    pub fn new(update: &CountsUpdate) -> Self {
        Self {
            update: update.clone(),
            delta: OnceLock::new(),
            full: OnceLock::new(),
        }
    }

    /// The poll's version after the flush.
    pub fn seq(&self) -> i64 {
        self.update.seq
    }

    /// What to send a subscriber whose last message had version `last_seq`, or `None` if
    /// this frame is not newer: `encode(update, delta)` (see [`CountsUpdate::counts`]),
    /// encoded once per form and shared. Every caller of one hub must pass the same
    /// `encode`: the first one's bytes are what the others get.
    pub fn encoded_after(
        &self,
        last_seq: i64,
        encode: fn(&CountsUpdate, bool) -> Bytes,
    ) -> Option<&Bytes> {
        let seq = self.seq();
        if seq <= last_seq {
            None
        } else if seq == last_seq + 1 {
            Some(self.delta.get_or_init(|| encode(&self.update, true)))
        } else {
            Some(self.full.get_or_init(|| encode(&self.update, false)))
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
        // This receiver goes first. Why: counted while it dropped, two subscriptions of one
        // poll dropped at once on two threads could each see the other's receiver and keep
        // the entry, which nobody would then remove. The shard lock that `remove_if` holds
        // orders the check with a `subscribe` of the same poll, so a new subscriber either
        // finds the entry kept or makes a new one.
        drop(std::mem::replace(&mut self.updates, watch::channel(None).1));
        self.polls
            .remove_if(&self.poll, |_, feed| feed.receiver_count() == 0);
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
        if update.is_hidden() {
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
        if subscribers > 0 && update.is_hidden() {
            return subscribers;
        }
        if subscribers > 0 {
            sender.send_if_modified(|latest| {
                if latest.as_ref().is_some_and(|f| f.seq() >= update.seq) {
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
    use crate::domain::OptionCount;

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

    /// An edge's encoding, reduced to what the tests look at: which form, how many counts.
    fn encode(update: &CountsUpdate, delta: bool) -> Bytes {
        Bytes::from(format!(
            "delta={delta} counts={}",
            update.counts(delta).len()
        ))
    }

    #[test]
    fn a_polls_final_update_lists_every_count_even_to_an_up_to_date_subscriber() {
        let closed = CountsUpdate {
            closed_at: Some(1_764_000_000_000),
            ..update(9)
        };
        let frame = CountsFrame::new(&closed);
        assert_eq!(
            frame.encoded_after(8, encode).unwrap(),
            "delta=true counts=2"
        );
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
        assert!(frame.update.is_final());
    }

    #[test]
    fn subscriber_up_to_date_gets_only_changed_counts() {
        let frame = CountsFrame::new(&update(4));
        assert_eq!(
            frame.encoded_after(3, encode).unwrap(),
            "delta=true counts=1"
        );
    }

    #[test]
    fn subscriber_that_missed_an_update_gets_every_count() {
        let frame = CountsFrame::new(&update(6));
        assert_eq!(
            frame.encoded_after(3, encode).unwrap(),
            "delta=false counts=2"
        );
    }

    #[test]
    fn each_form_is_encoded_once_and_shared() {
        let frame = CountsFrame::new(&update(6));
        let first = frame.encoded_after(3, encode).unwrap().clone();
        let again = frame
            .encoded_after(4, |_, _| Bytes::from_static(b"not again"))
            .unwrap();
        assert_eq!(again, &first);
        assert_eq!(again.as_ptr(), first.as_ptr(), "the same bytes, not a copy");
    }

    #[test]
    fn stale_frames_are_not_sent() {
        assert!(
            CountsFrame::new(&update(3))
                .encoded_after(3, encode)
                .is_none()
        );
    }

    #[tokio::test]
    async fn publish_reaches_only_that_polls_subscribers() {
        let hub = BroadcastHub::new();
        let mut watching = hub.subscribe(7);
        let other = hub.subscribe(8);
        assert_eq!(hub.publish(&update(1)), 1);
        watching.changed().await.unwrap();
        assert_eq!(watching.borrow().as_ref().unwrap().seq(), 1);
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
        assert_eq!(watching.borrow().as_ref().unwrap().seq(), 2);
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
