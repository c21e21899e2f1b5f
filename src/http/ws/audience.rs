//! The WebSocket subscribers of each poll in this process, and the tasks that hand each of
//! the poll's updates to all of them.
//!
//! A poll's audience is split in shards, one per runtime worker, each with a task of its own
//! that waits for the poll's updates on the hub and offers each to every outlet of its shard
//! (see [`super::outlet`] for why the fan-out writes and the sessions do not). Why shards: one
//! task would send a large audience's update on one core while the other idled. A shard and
//! its task exist while it has subscribers: the last one to leave removes it, so a poll nobody
//! watches any more costs nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pollcast_actors::{BroadcastHub, PollId, Subscription};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outlet::Outlet;

/// Outlets offered an update between two yields of a shard's task: the other tasks of its
/// worker (votes, say) wait at most that many writes.
const OFFERS_PER_YIELD: usize = 256;

/// Every poll's audience in this process. Cheap to clone.
#[derive(Clone)]
pub(in crate::http) struct Audiences(Arc<Inner>);

struct Inner {
    hub: BroadcastHub,
    /// Ends every shard's task: the server is stopping.
    stop: CancellationToken,
    tasks: TaskTracker,
    shards: usize,
    /// Where the next subscriber goes, in turn.
    turn: AtomicUsize,
    next_id: AtomicU64,
    /// Why one lock for joining and leaving: a shard is removed when its last outlet leaves,
    /// and a subscriber joining at that moment must find either the shard kept or none.
    polls: Mutex<HashMap<(PollId, usize), Arc<Shard>>>,
}

struct Shard {
    outlets: Mutex<HashMap<u64, Arc<Outlet>>>,
    /// Ends this shard's task once it is removed.
    gone: CancellationToken,
}

/// A subscriber's place in its poll's audience; [`Audiences::leave`] gives it up.
pub(super) struct Seat {
    poll: PollId,
    shard: usize,
    id: u64,
}

impl Audiences {
    /// Audiences fed by `hub`, whose tasks run on `tasks` until `stop`.
    pub(super) fn new(hub: BroadcastHub, stop: CancellationToken, tasks: TaskTracker) -> Self {
        let shards = tokio::runtime::Handle::try_current()
            .map(|rt| rt.metrics().num_workers())
            .unwrap_or(1)
            .max(1);
        Self(Arc::new(Inner {
            hub,
            stop,
            tasks,
            shards,
            turn: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            polls: Mutex::default(),
        }))
    }

    /// Adds `outlet` to the audience of `poll`: every update published from now on is offered
    /// to it (the caller offers it what came before).
    pub(super) fn join(&self, poll: PollId, outlet: Arc<Outlet>) -> Seat {
        let inner = &self.0;
        let shard = inner.turn.fetch_add(1, Ordering::Relaxed) % inner.shards;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut polls = inner.polls.lock().expect("not poisoned");
        let entry = polls.entry((poll, shard)).or_insert_with(|| {
            let new = Arc::new(Shard {
                outlets: Mutex::default(),
                gone: inner.stop.child_token(),
            });
            // Subscribed here, under the lock: the shard hears every update from its start.
            let updates = inner.hub.subscribe(poll);
            inner.tasks.spawn(fan_out(new.clone(), updates));
            new
        });
        entry
            .outlets
            .lock()
            .expect("not poisoned")
            .insert(id, outlet);
        Seat { poll, shard, id }
    }

    /// Gives up `seat`; the last subscriber of a shard ends its task.
    pub(super) fn leave(&self, seat: Seat) {
        let key = (seat.poll, seat.shard);
        // Why not under the audiences' lock: a shard's list may be held while its task copies
        // it, and every join and leave of the process would wait for that.
        let shard = self
            .0
            .polls
            .lock()
            .expect("not poisoned")
            .get(&key)
            .cloned();
        let Some(shard) = shard else {
            return;
        };
        let mut outlets = shard.outlets.lock().expect("not poisoned");
        outlets.remove(&seat.id);
        if !outlets.is_empty() {
            return;
        }
        drop(outlets);
        // Empty: removed unless someone joined meanwhile (a join holds both locks, in this
        // order, so it is either seen here or finds the shard gone and makes a new one).
        let mut polls = self.0.polls.lock().expect("not poisoned");
        let still_ours = polls.get(&key).is_some_and(|s| Arc::ptr_eq(s, &shard));
        if still_ours && shard.outlets.lock().expect("not poisoned").is_empty() {
            polls.remove(&key);
            shard.gone.cancel();
        }
    }

    /// Subscribers in every audience (for tests).
    #[cfg(test)]
    pub(super) fn subscribers(&self) -> usize {
        let polls = self.0.polls.lock().expect("not poisoned");
        polls
            .values()
            .map(|s| s.outlets.lock().expect("not poisoned").len())
            .sum()
    }
}

/// A shard's task: each update of the poll, offered to every outlet of the shard.
async fn fan_out(shard: Arc<Shard>, mut updates: Subscription) {
    loop {
        tokio::select! {
            biased;
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shard.gone.cancelled() => return,
        }
        let Some(frame) = updates.borrow_and_update().clone() else {
            continue;
        };
        // Offered from a copy of the list: subscribers join and leave meanwhile without
        // waiting for a whole update to go out.
        let outlets: Vec<Arc<Outlet>> = shard
            .outlets
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        for (i, outlet) in outlets.iter().enumerate() {
            // A closed outlet's session leaves by itself.
            outlet.offer(&frame);
            if i % OFFERS_PER_YIELD == OFFERS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use pollcast_actors::CountsUpdate;

    use super::*;

    fn update(poll: PollId, seq: i64) -> CountsUpdate {
        CountsUpdate {
            poll_id: poll,
            seq,
            changed: vec![],
            all: vec![],
            flushed_at: 1,
            closed_at: None,
            hide_results: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_of_a_poll_is_offered_its_updates_and_no_other_polls() {
        let hub = BroadcastHub::new();
        let audiences = Audiences::new(hub.clone(), CancellationToken::new(), TaskTracker::new());
        let watching: Vec<_> = (0..5).map(|_| Outlet::new(None, 0)).collect();
        let seats: Vec<_> = watching
            .iter()
            .map(|o| audiences.join(1, o.clone()))
            .collect();
        let other = Outlet::new(None, 0);
        let _other = audiences.join(2, other.clone());
        assert_eq!(audiences.subscribers(), 6);

        hub.publish(&update(1, 1));
        for outlet in &watching {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                if !outlet.take().unwrap().is_empty() {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "no update offered");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        assert!(other.take().unwrap().is_empty());
        for seat in seats {
            audiences.leave(seat);
        }
        assert_eq!(audiences.subscribers(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_subscriber_to_leave_ends_its_shards_task_and_the_polls_feed() {
        let hub = BroadcastHub::new();
        let tasks = TaskTracker::new();
        let audiences = Audiences::new(hub.clone(), CancellationToken::new(), tasks.clone());
        let seats: Vec<_> = (0..4)
            .map(|_| audiences.join(1, Outlet::new(None, 0)))
            .collect();
        assert_eq!(hub.polls_watched(), 1);
        for seat in seats {
            audiences.leave(seat);
        }
        tasks.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait())
            .await
            .expect("every shard's task ended");
        assert_eq!(audiences.subscribers(), 0);
        assert_eq!(hub.polls_watched(), 0, "the hub forgot the poll");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_ends_every_shards_task() {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let audiences = Audiences::new(BroadcastHub::new(), stop.clone(), tasks.clone());
        let _seat = audiences.join(1, Outlet::new(None, 0));
        stop.cancel();
        tasks.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait())
            .await
            .expect("every shard's task ended");
    }
}
