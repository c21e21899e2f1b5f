//! The one cache of polls in a process: what the vote path and the API know of each poll
//! (its [`PollRules`] and closed flag) without a store round trip per vote.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::domain::UnixMillis;
use crate::{Poll, PollId, PollRules, PollStore, StoreError};
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long a cached poll is trusted before it is read again (closing is visible to every
/// process within this delay).
const CATALOG_TTL: Duration = Duration::from_secs(1);

/// How often the closed flags of the polls voted in are re-read together. Why ahead of the
/// TTL: an active poll is then never stale when a vote comes, so 10,000 active polls cost
/// one query every half second instead of 10,000 a second (docs/BENCHMARKS.md).
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// How long an expired entry of a poll being voted in is still served while the refresher
/// re-reads it; a vote then never waits on the store for a poll it knows.
const STALE_MAX: Duration = Duration::from_secs(5);

/// Polls whose cached closed flag is re-read in one query, at most.
const STALE_READS_MAX: usize = 1000;

/// A poll whose cached closed flag has expired, and the vote waiting for it to be re-read.
type StaleRead = (PollId, oneshot::Sender<Result<bool, String>>);
/// What the vote path needs to know about a poll: its rules (fixed at creation) and whether
/// it is closed, as read at `loaded`.
#[derive(Debug)]
pub struct PollMeta {
    /// What the poll allows.
    pub rules: PollRules,
    /// Its stored closed flag.
    pub closed: bool,
    loaded: Instant,
    /// Set by every vote; the refresher re-reads only the polls voted in since its last pass.
    voted: AtomicBool,
}

impl PollMeta {
    fn of(poll: &Poll) -> Self {
        Self {
            rules: poll.rules(),
            closed: poll.closed,
            loaded: Instant::now(),
            voted: AtomicBool::new(false),
        }
    }

    /// The same poll, closed or not as read at `loaded`. Why `||`: a poll never reopens, and
    /// a read that began before this process closed it must not undo the close.
    fn reread(&self, closed: bool, loaded: Instant) -> Self {
        Self {
            rules: self.rules.clone(),
            closed: self.closed || closed,
            loaded,
            voted: AtomicBool::new(false),
        }
    }

    /// Whether the poll refuses votes at `now` (see [`PollRules::is_closed_at`]).
    pub fn is_closed_at(&self, now: UnixMillis) -> bool {
        self.rules.is_closed_at(self.closed, now)
    }
}

/// A read-through cache of poll metadata, so that validating a vote costs no store round trip.
#[derive(Clone)]
pub struct PollCatalog {
    store: Arc<dyn PollStore>,
    polls: Arc<DashMap<PollId, Arc<PollMeta>>>,
    /// To the background task, which re-reads expired flags together; `None`: each vote
    /// reads its own.
    stale: Option<mpsc::Sender<StaleRead>>,
}

impl PollCatalog {
    /// An empty cache in front of `store`, and its refresher: the task that re-reads the
    /// closed flags of the polls being voted in, and ends when the cache is dropped. The
    /// caller spawns it with the process's other background tasks (see `startup`).
    pub fn new(store: Arc<dyn PollStore>) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let mut catalog = Self::unrefreshed(store);
        let (stale, asks) = mpsc::channel(STALE_READS_MAX);
        catalog.stale = Some(stale);
        let (store, polls) = (catalog.store.clone(), Arc::downgrade(&catalog.polls));
        (catalog, refresh_while_alive(store, polls, asks))
    }

    /// What the cache knows of a poll now, without reading the store or counting it as
    /// voted in (for the lifecycle events, which only skip polls known to have no webhook).
    pub fn known(&self, id: PollId) -> Option<Arc<PollMeta>> {
        self.polls.get(&id).map(|meta| meta.clone())
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn PollStore> {
        &self.store
    }

    /// A cache without the background refresher: each expired flag is read by the vote
    /// that finds it (for tests, and tools that hold a catalog briefly).
    pub fn unrefreshed(store: Arc<dyn PollStore>) -> Self {
        Self {
            store,
            polls: Arc::default(),
            stale: None,
        }
    }

    /// The poll's metadata, `None` if there is no such poll. While the store is unreachable
    /// a poll already known is served from the cache: votes only need the log and the guard,
    /// so a store outage must not stop them.
    pub async fn get(&self, id: PollId) -> Result<Option<Arc<PollMeta>>, StoreError> {
        let meta = self.read(id).await?;
        if let Some(meta) = &meta {
            // Why load first: a store on a cache line shared by every voter of the poll
            // costs, where a load does not.
            if !meta.voted.load(Ordering::Relaxed) {
                meta.voted.store(true, Ordering::Relaxed);
            }
        }
        Ok(meta)
    }

    async fn read(&self, id: PollId) -> Result<Option<Arc<PollMeta>>, StoreError> {
        let cached = self.polls.get(&id).map(|m| m.clone());
        if let Some(meta) = &cached {
            let age = meta.loaded.elapsed();
            // Why serve an expired entry while the refresher runs: `get` has marked the poll
            // voted in, so the refresher's next pass re-reads it; the vote need not wait for
            // the store, whatever else queues on it. Past `STALE_MAX` the refresher is not
            // keeping up (the store is slow or down) and the vote reads for itself.
            if age < CATALOG_TTL || (self.stale.is_some() && age < STALE_MAX) {
                return Ok(cached);
            }
        }
        // Why only the closed flag once a poll is known: everything else about it is fixed
        // at creation.
        let fresh = match &cached {
            Some(_) => {
                let loaded = Instant::now();
                self.closed_now(id)
                    .await
                    .map(|closed| closed.map(|closed| self.reread(id, closed, loaded)))
            }
            None => self
                .store
                .get_poll(id)
                .await
                .map(|poll| poll.map(|poll| self.remember(&poll))),
        };
        match fresh {
            Ok(meta) => Ok(meta),
            Err(err) => match cached {
                Some(stale) => {
                    tracing::debug!(poll_id = id, error = %err, "store unreachable; using the cached poll");
                    Ok(Some(stale))
                }
                None => Err(err),
            },
        }
    }

    /// Whether the poll is closed, as the store says now. Why through the background task:
    /// when votes start in 10,000 polls created a while ago, every cached flag has expired
    /// and each first vote would read its own (a query each, all at once; figures in
    /// docs/BENCHMARKS.md, "Fast paths"); the task reads what is waiting in one query per
    /// [`STALE_READS_MAX`] polls.
    async fn closed_now(&self, id: PollId) -> Result<Option<bool>, StoreError> {
        let Some(stale) = &self.stale else {
            return self.store.is_closed(id).await;
        };
        let (reply, answer) = oneshot::channel();
        if stale.try_send((id, reply)).is_err() {
            // As many votes as the channel holds are waiting already: read alone.
            return self.store.is_closed(id).await;
        }
        match answer.await {
            Ok(Ok(closed)) => Ok(Some(closed)),
            Ok(Err(err)) => Err(StoreError::new("read poll states", err)),
            // The task is gone (the catalog is being dropped).
            Err(_) => self.store.is_closed(id).await,
        }
    }

    /// Records what the store just said about a poll (after creating, reading or closing
    /// it). A close already remembered is kept: a read that began before it must not undo it.
    pub fn remember(&self, poll: &Poll) -> Arc<PollMeta> {
        let mut meta = PollMeta::of(poll);
        match self.polls.entry(poll.id) {
            dashmap::Entry::Occupied(mut known) => {
                meta.closed |= known.get().closed;
                let meta = Arc::new(meta);
                known.insert(meta.clone());
                meta
            }
            dashmap::Entry::Vacant(new) => new.insert(Arc::new(meta)).clone(),
        }
    }

    /// Installs a closed flag re-read at `loaded` into the entry as it is *now*. Why not
    /// into the copy taken before the read: a close remembered while the read ran would be
    /// overwritten by the older answer, and the poll would take votes again here.
    fn reread(&self, id: PollId, closed: bool, loaded: Instant) -> Arc<PollMeta> {
        let mut entry = self
            .polls
            .get_mut(&id)
            .expect("known polls are never forgotten");
        let fresh = Arc::new(entry.reread(closed, loaded));
        *entry = fresh.clone();
        fresh
    }

    /// Re-reads, in one query, the closed flag of every poll voted in since the last
    /// refresh; returns how many. Polls nobody votes in are left to expire.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        refresh(&*self.store, &self.polls).await
    }
}

async fn refresh(
    store: &dyn PollStore,
    polls: &DashMap<PollId, Arc<PollMeta>>,
) -> Result<usize, StoreError> {
    let voted: Vec<PollId> = polls
        .iter()
        .filter(|meta| meta.voted.swap(false, Ordering::Relaxed))
        .map(|meta| *meta.key())
        .collect();
    if voted.is_empty() {
        return Ok(0);
    }
    let loaded = Instant::now();
    let closed: HashSet<PollId> = store.closed_among(&voted).await?.into_iter().collect();
    for id in &voted {
        if let Some(mut meta) = polls.get_mut(id) {
            let fresh = Arc::new(meta.reread(closed.contains(id), loaded));
            *meta = fresh;
        }
    }
    Ok(voted.len())
}

/// Answers every waiting [`StaleRead`] from one query. A poll is never deleted, so one
/// the store does not list as closed is open.
async fn read_stale(store: &dyn PollStore, asks: &mut Vec<StaleRead>) {
    let mut ids: Vec<PollId> = asks.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let closed = store
        .closed_among(&ids)
        .await
        .map(|closed| closed.into_iter().collect::<HashSet<PollId>>())
        .map_err(|err| err.to_string());
    for (id, reply) in asks.drain(..) {
        // The vote may have gone (its client hung up).
        let _ = reply.send(
            closed
                .as_ref()
                .map(|c| c.contains(&id))
                .map_err(Clone::clone),
        );
    }
}

async fn refresh_while_alive(
    store: Arc<dyn PollStore>,
    polls: Weak<DashMap<PollId, Arc<PollMeta>>>,
    mut stale: mpsc::Receiver<StaleRead>,
) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asks = Vec::with_capacity(STALE_READS_MAX);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(polls) = polls.upgrade() else { return };
                if let Err(err) = refresh(&*store, &polls).await {
                    // The polls then expire and are read when voted in, or served stale
                    // while the store is down (see `get`).
                    tracing::debug!(error = %err, "could not re-read the closed flags of active polls");
                }
            }
            // Why batching comes free: the asks queue up while the previous query runs.
            n = stale.recv_many(&mut asks, STALE_READS_MAX) => {
                if n == 0 {
                    return;
                }
                read_stale(&*store, &mut asks).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::now_millis;
    use crate::service::memory_store::MemoryStore;

    /// A catalog without its background refresher (the tests refresh by hand), over a store
    /// holding `n` open polls.
    async fn catalog_of(n: usize) -> (PollCatalog, Vec<PollId>) {
        let (store, polls) = MemoryStore::with_polls(n).await;
        (PollCatalog::unrefreshed(store), polls)
    }

    async fn closed(catalog: &PollCatalog, poll: PollId) -> bool {
        catalog.get(poll).await.unwrap().unwrap().closed
    }

    #[tokio::test]
    async fn a_refresh_sees_a_poll_closed_elsewhere_before_its_ttl_is_up() {
        let (catalog, polls) = catalog_of(3).await;
        for &poll in &polls {
            assert!(!closed(&catalog, poll).await);
        }
        // As another process would: through the store, not this catalog.
        catalog
            .store
            .close_poll(polls[1], now_millis())
            .await
            .unwrap();
        assert!(!closed(&catalog, polls[1]).await, "still cached as open");
        assert_eq!(catalog.refresh().await.unwrap(), 3);
        let mut seen = Vec::new();
        for &poll in &polls {
            seen.push(closed(&catalog, poll).await);
        }
        assert_eq!(seen, [false, true, false]);
    }

    #[tokio::test]
    async fn only_polls_voted_in_since_the_last_refresh_are_read_again() {
        let (catalog, polls) = catalog_of(2).await;
        catalog.get(polls[0]).await.unwrap();
        catalog.get(polls[1]).await.unwrap();
        catalog.get(polls[1]).await.unwrap();
        assert_eq!(catalog.refresh().await.unwrap(), 2);
        catalog.get(polls[0]).await.unwrap();
        assert_eq!(catalog.refresh().await.unwrap(), 1);
        assert_eq!(catalog.refresh().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn expired_flags_read_together_give_each_poll_its_own_answer() {
        let (unrefreshed, polls) = catalog_of(5).await;
        let (catalog, refresher) = PollCatalog::new(unrefreshed.store.clone());
        tokio::spawn(refresher);
        for &poll in &polls {
            assert!(!closed(&catalog, poll).await);
        }
        // Longer ago than the refresher is trusted to keep up: each vote reads for itself.
        let long_ago = Instant::now() - 2 * STALE_MAX;
        for mut meta in catalog.polls.iter_mut() {
            *meta = Arc::new(meta.reread(false, long_ago));
        }
        for &poll in [polls[1], polls[3]].iter() {
            catalog.store.close_poll(poll, now_millis()).await.unwrap();
        }
        // Asked at once, so that the refresher reads them together.
        let reads: Vec<_> = polls
            .iter()
            .map(|&poll| {
                let catalog = catalog.clone();
                tokio::spawn(async move { closed(&catalog, poll).await })
            })
            .collect();
        let mut seen = Vec::new();
        for read in reads {
            seen.push(read.await.unwrap());
        }
        assert_eq!(seen, [false, true, false, true, false]);
    }

    #[tokio::test]
    async fn an_expired_entry_read_again_while_this_process_closes_the_poll_stays_closed() {
        let (catalog, polls) = catalog_of(1).await;
        let id = polls[0];
        catalog.get(id).await.unwrap();
        let long_ago = Instant::now() - 2 * CATALOG_TTL;
        for mut meta in catalog.polls.iter_mut() {
            *meta = Arc::new(meta.reread(false, long_ago));
        }
        // The vote's re-read of the expired flag is under way (it has its copy of the entry
        // and will be told "open") when this process closes the poll.
        let before_the_close = catalog.polls.get(&id).unwrap().clone();
        let read_began = Instant::now();
        let mut poll = catalog.store.get_poll(id).await.unwrap().unwrap();
        poll.closed = true;
        catalog.remember(&poll);
        let answered = catalog.reread(id, false, read_began);
        assert!(!before_the_close.closed);
        assert!(answered.closed, "the close remembered meanwhile is kept");
        assert!(closed(&catalog, id).await);
    }

    #[tokio::test]
    async fn a_refresh_never_reopens_a_poll_closed_here() {
        let (catalog, polls) = catalog_of(1).await;
        catalog.get(polls[0]).await.unwrap();
        // Closed by this process while the refresh's read (which saw it open) was under way.
        let mut poll = catalog.store.get_poll(polls[0]).await.unwrap().unwrap();
        poll.closed = true;
        catalog.remember(&poll);
        catalog.get(polls[0]).await.unwrap();
        assert_eq!(catalog.refresh().await.unwrap(), 1);
        assert!(closed(&catalog, polls[0]).await);
    }
}
