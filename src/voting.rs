//! Taking a vote: validate it against the poll, claim the voter in the duplicate guard, append
//! it durably to the vote log. This is the whole hot path of `POST /vote`.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll as TaskPoll, ready};
use std::time::Duration;

use dashmap::DashMap;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    Claim, DedupGuard, GuardError, LogEntry, LogError, OptionId, Poll, PollId, PollStore,
    StoreError, Vote, VoteAppender,
};
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

/// What the vote path needs to know about a poll.
#[derive(Debug)]
pub struct PollMeta {
    options: HashSet<OptionId>,
    max_choices: usize,
    closed: bool,
    closes_at: Option<UnixMillis>,
    allow_change: bool,
    loaded: Instant,
    /// Set by every vote; the refresher re-reads only the polls voted in since its last pass.
    voted: AtomicBool,
}

impl PollMeta {
    fn of(poll: &Poll) -> Self {
        Self {
            options: poll.options.iter().map(|o| o.id).collect(),
            max_choices: poll.settings.max_choices as usize,
            closed: poll.closed,
            closes_at: poll.settings.closes_at,
            allow_change: poll.settings.allow_change,
            loaded: Instant::now(),
            voted: AtomicBool::new(false),
        }
    }

    /// The same poll, closed or not as read at `loaded`. Why `||`: a poll never reopens, and
    /// a read that began before this process closed it must not undo the close.
    fn reread(&self, closed: bool, loaded: Instant) -> Self {
        Self {
            options: self.options.clone(),
            max_choices: self.max_choices,
            closed: self.closed || closed,
            closes_at: self.closes_at,
            allow_change: self.allow_change,
            loaded,
            voted: AtomicBool::new(false),
        }
    }

    /// Why the clock and not only the flag: the closing time is fixed at creation, so every
    /// process refuses votes from that very moment, before the scheduler has closed the poll.
    fn is_closed_at(&self, now: UnixMillis) -> bool {
        self.closed || self.closes_at.is_some_and(|at| now >= at)
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
    /// An empty cache in front of `store`, re-reading the closed flags of the polls being
    /// voted in in the background for as long as the cache lives.
    pub fn new(store: Arc<dyn PollStore>) -> Self {
        let mut catalog = Self::unrefreshed(store);
        let (stale, asks) = mpsc::channel(STALE_READS_MAX);
        catalog.stale = Some(stale);
        let (store, polls) = (catalog.store.clone(), Arc::downgrade(&catalog.polls));
        tokio::spawn(refresh_while_alive(store, polls, asks));
        catalog
    }

    fn unrefreshed(store: Arc<dyn PollStore>) -> Self {
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
    /// and each first vote would read its own (10,000 queries in two seconds, measured); the
    /// task reads what is waiting in one query per [`STALE_READS_MAX`] polls.
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

/// A future that runs to completion even if whoever awaits it goes away: it is polled in
/// place while awaited, and what is left of it becomes a task of its own if it is dropped
/// unfinished. Why not always a task: spawning one per vote, and waking the handler when it
/// ended, cost more than the claim; a client hanging up mid-vote is the rare case.
struct FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    future: Option<Pin<Box<F>>>,
}

impl<F> FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn new(future: F) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }
}

impl<F> Future for FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<F::Output> {
        let future = self.future.as_mut().expect("not polled after it finished");
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        let output = match polled {
            Ok(polled) => ready!(polled),
            Err(panic) => {
                // A future that panicked cannot go on: not one to finish on drop.
                self.future = None;
                std::panic::resume_unwind(panic);
            }
        };
        self.future = None;
        TaskPoll::Ready(output)
    }
}

impl<F> Drop for FinishOnDrop<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(rest) = self.future.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(rest);
            }
            // Only when the runtime itself is being torn down: nothing can run any more.
            Err(_) => tracing::warn!("a vote in progress was abandoned at shutdown"),
        }
    }
}

/// Why a vote was not taken.
#[derive(Debug, thiserror::Error)]
pub enum VoteRejection {
    /// No such poll.
    #[error("poll {0} does not exist")]
    UnknownPoll(PollId),
    /// The poll has no such option.
    #[error("poll {poll} has no option {option}")]
    UnknownOption {
        /// The poll.
        poll: PollId,
        /// The option asked for.
        option: OptionId,
    },
    /// More options than the poll allows one voter.
    #[error("poll {poll} allows at most {max} choices")]
    TooManyChoices {
        /// The poll.
        poll: PollId,
        /// Its `max_choices`.
        max: usize,
    },
    /// The poll is closed.
    #[error("poll {0} is closed")]
    Closed(PollId),
    /// This user already voted in this poll.
    #[error("user already voted in poll {0}")]
    Duplicate(PollId),
    /// The vote id (idempotency key) was used before by this user in this poll, for another
    /// ballot.
    #[error("this voteId (Idempotency-Key) was already used in poll {0} for another ballot")]
    VoteIdReused(PollId),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The duplicate guard could not be reached; nothing was appended.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The vote could not be made durable; the claim was released if it certainly was not.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The vote path's handles; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct VoteIntake {
    catalog: PollCatalog,
    guard: Arc<dyn DedupGuard>,
    log: Arc<dyn VoteAppender>,
}

impl VoteIntake {
    /// Builds the vote path.
    pub fn new(
        catalog: PollCatalog,
        guard: Arc<dyn DedupGuard>,
        log: Arc<dyn VoteAppender>,
    ) -> Self {
        Self {
            catalog,
            guard,
            log,
        }
    }

    /// Takes a vote. `Ok` means it is durable in the log and will be counted exactly once.
    pub async fn submit(&self, mut vote: Vote) -> Result<(), VoteRejection> {
        let meta = self
            .catalog
            .get(vote.poll_id)
            .await?
            .ok_or(VoteRejection::UnknownPoll(vote.poll_id))?;
        if let Some(&option) = vote.choices.iter().find(|c| !meta.options.contains(c)) {
            return Err(VoteRejection::UnknownOption {
                poll: vote.poll_id,
                option,
            });
        }
        if vote.choices.len() > meta.max_choices {
            return Err(VoteRejection::TooManyChoices {
                poll: vote.poll_id,
                max: meta.max_choices,
            });
        }
        let now = now_millis();
        if meta.is_closed_at(now) {
            return Err(VoteRejection::Closed(vote.poll_id));
        }
        vote.voted_at = Some(now);
        // Why always an id: the ledger keys votes by (poll, user, vote id), so a vote without
        // a client key still replays as itself, and a later change is told apart from it.
        vote.vote_id
            .get_or_insert_with(|| crate::ids::random_id("s-"));
        let allow_change = meta.allow_change;
        let this = self.clone();
        // Why: if the client hangs up mid-request, hyper drops the handler future.
        // Claim-then-append must still finish as a unit, or the voter would stay locked out
        // by a claim whose vote never reached the log.
        FinishOnDrop::new(async move { this.claim_and_append(vote, allow_change).await }).await
    }

    async fn claim_and_append(&self, vote: Vote, allow_change: bool) -> Result<(), VoteRejection> {
        // Random, so that a claim names the request that holds it, across processes too.
        let attempt: u64 = rand::random();
        let claim = self.guard.claim(&vote, attempt).await?;
        // A retry is appended again rather than answered from memory: the first attempt may
        // still be failing, and the ledger applies the vote id once however often it is read.
        // A change is appended too where the poll allows it; the ledger orders it after the
        // ballot it replaces. A vote id reused for another ballot never is: the ledger would
        // skip it as the vote already applied, and a 202 must mean "counted".
        match claim {
            Claim::Reused => return Err(VoteRejection::VoteIdReused(vote.poll_id)),
            Claim::Taken if !allow_change => return Err(VoteRejection::Duplicate(vote.poll_id)),
            _ => {}
        }
        let (poll_id, user_id) = (vote.poll_id, vote.user_id.clone());
        if let Err(err) = self.log.append(LogEntry::Vote(vote)).await {
            // Released only where this attempt made the claim and the vote is certainly not
            // in the log: a retry's claim may stand for an earlier attempt still in flight,
            // and a vote whose append has an unknown outcome may yet be delivered and counted
            // (then a retry with its vote id is a retry, and another vote a 409). The guard
            // releases the claim only while this attempt holds it.
            if claim == Claim::Fresh && !err.outcome_unknown {
                match self.guard.release(poll_id, &user_id, attempt).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(poll_id, user_id = %user_id, "the claim of a vote that was not appended was taken over by a retry; kept");
                    }
                    Err(release) => {
                        tracing::error!(poll_id, user_id = %user_id, error = %release, "could not release the claim of a vote that was not appended");
                    }
                }
            }
            return Err(err.into());
        }
        tracing::trace!(poll_id, user_id = %user_id, ?claim, "vote appended");
        Ok(())
    }

    /// Closes a poll now: the store refuses it new votes from this moment, and the close
    /// marker, appended behind every vote already in the log, makes its aggregator publish
    /// the final counts once those are flushed. `None`: no such poll.
    pub async fn close(&self, id: PollId) -> Result<Option<Poll>, VoteRejection> {
        let Some((poll, newly)) = self.catalog.store.close_poll(id, now_millis()).await? else {
            return Ok(None);
        };
        self.catalog.remember(&poll);
        // Closing twice appends one marker: the first (or the scheduler's re-send) seals it.
        if newly {
            let closed_at = poll.closed_at.unwrap_or_else(now_millis);
            self.log.append(LogEntry::closed(id, closed_at)).await?;
        }
        Ok(Some(poll))
    }

    /// Closes the polls whose closing time has come, and re-sends the close marker of
    /// polls whose final counts were never published (the marker was lost in a crash).
    /// Returns how many markers were appended.
    pub async fn close_due_polls(&self, lost_after: Duration) -> Result<usize, VoteRejection> {
        let now = now_millis();
        let unsealed_before = now - lost_after.as_millis() as i64;
        let due = self
            .catalog
            .store
            .polls_to_seal(now, unsealed_before)
            .await?;
        for (poll_id, closed_at) in &due {
            self.log
                .append(LogEntry::closed(*poll_id, *closed_at))
                .await?;
            tracing::info!(poll_id, "poll closed on schedule");
        }
        Ok(due.len())
    }
}

#[cfg(test)]
mod tests {
    use pollcast_actors::NewPoll;

    use super::*;
    use crate::adapters::SqliteStore;

    /// A catalog without its background refresher (the tests refresh by hand), over a
    /// SQLite store holding `n` open polls.
    async fn catalog_of(n: usize) -> (tempfile::TempDir, PollCatalog, Vec<PollId>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Arc::new(SqliteStore::open(&url).await.unwrap());
        let mut polls = Vec::new();
        for i in 0..n {
            let poll = store
                .create_poll(NewPoll {
                    question: format!("Q{i}"),
                    options: vec!["A".into(), "B".into()],
                    settings: Default::default(),
                })
                .await
                .unwrap();
            polls.push(poll.id);
        }
        (dir, PollCatalog::unrefreshed(store), polls)
    }

    #[tokio::test]
    async fn work_dropped_midway_is_finished_in_a_task_of_its_own() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (finished, done) = tokio::sync::oneshot::channel();
        let mut work = FinishOnDrop::new(async move {
            wait.await.unwrap();
            finished.send(()).unwrap();
        });
        // Polled for a while, as a request handler is, then dropped: the client hung up.
        let awaited = tokio::time::timeout(Duration::from_millis(20), &mut work).await;
        assert!(awaited.is_err(), "still waiting");
        drop(work);
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("finished after the drop")
            .unwrap();
    }

    /// Panics the first time it is polled; counts every poll.
    struct PanicsOnFirstPoll(Arc<std::sync::atomic::AtomicUsize>);

    impl Future for PanicsOnFirstPoll {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> TaskPoll<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the vote path failed");
            }
            TaskPoll::Pending
        }
    }

    #[tokio::test]
    async fn work_that_panicked_is_not_finished_on_drop() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let work = FinishOnDrop::new(PanicsOnFirstPoll(polls.clone()));
        let caught = tokio::spawn(work).await;
        assert!(caught.unwrap_err().is_panic());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, never again");
    }

    #[tokio::test]
    async fn work_awaited_to_the_end_gives_its_output() {
        assert_eq!(FinishOnDrop::new(async { 42 }).await, 42);
    }

    async fn closed(catalog: &PollCatalog, poll: PollId) -> bool {
        catalog.get(poll).await.unwrap().unwrap().closed
    }

    #[tokio::test]
    async fn a_refresh_sees_a_poll_closed_elsewhere_before_its_ttl_is_up() {
        let (_dir, catalog, polls) = catalog_of(3).await;
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
        let (_dir, catalog, polls) = catalog_of(2).await;
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
        let (_dir, unrefreshed, polls) = catalog_of(5).await;
        let catalog = PollCatalog::new(unrefreshed.store.clone());
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
        let seen =
            futures_util::future::join_all(polls.iter().map(|&poll| closed(&catalog, poll))).await;
        assert_eq!(seen, [false, true, false, true, false]);
    }

    #[tokio::test]
    async fn an_expired_entry_read_again_while_this_process_closes_the_poll_stays_closed() {
        let (_dir, catalog, polls) = catalog_of(1).await;
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
        let (_dir, catalog, polls) = catalog_of(1).await;
        catalog.get(polls[0]).await.unwrap();
        // Closed by this process while the refresh's read (which saw it open) was under way.
        let mut poll = catalog.store.get_poll(polls[0]).await.unwrap().unwrap();
        poll.closed = true;
        catalog.remember(&poll);
        catalog.get(polls[0]).await.unwrap();
        assert_eq!(catalog.refresh().await.unwrap(), 1);
        assert!(closed(&catalog, polls[0]).await);
    }

    /// What [`ScriptedLog`] does with one append.
    enum Step {
        Append,
        Fail {
            outcome_unknown: bool,
        },
        /// Says it started, waits to be let go, then fails definitely.
        SlowFail {
            started: oneshot::Sender<()>,
            go: oneshot::Receiver<()>,
        },
    }

    /// A vote log that answers each append with the next step of its script.
    struct ScriptedLog(std::sync::Mutex<std::collections::VecDeque<Step>>);

    impl ScriptedLog {
        fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
            Arc::new(Self(std::sync::Mutex::new(steps.into_iter().collect())))
        }
    }

    #[async_trait::async_trait]
    impl VoteAppender for ScriptedLog {
        async fn append(&self, _entry: LogEntry) -> Result<(), LogError> {
            let step = self.0.lock().unwrap().pop_front().unwrap_or(Step::Append);
            match step {
                Step::Append => Ok(()),
                Step::Fail { outcome_unknown } if outcome_unknown => {
                    Err(LogError::outcome_unknown("append", "no delivery report"))
                }
                Step::Fail { .. } => Err(LogError::new("append", "refused")),
                Step::SlowFail { started, go } => {
                    started.send(()).unwrap();
                    go.await.unwrap();
                    Err(LogError::new("append", "refused, late"))
                }
            }
        }
    }

    /// A vote path over one open poll (options 1 and 2), an in-process guard and `log`.
    async fn intake_with(log: Arc<ScriptedLog>) -> (tempfile::TempDir, VoteIntake, PollId) {
        let (dir, catalog, polls) = catalog_of(1).await;
        let guard = Arc::new(crate::adapters::MemoryGuard::new(Duration::from_secs(60)));
        (dir, VoteIntake::new(catalog, guard, log), polls[0])
    }

    fn vote(poll: PollId, id: &str) -> Vote {
        Vote {
            vote_id: Some(id.into()),
            ..Vote::single(poll, 1, "u")
        }
    }

    #[tokio::test]
    async fn a_definite_append_failure_releases_the_claim_for_another_vote() {
        let log = ScriptedLog::new([Step::Fail {
            outcome_unknown: false,
        }]);
        let (_dir, intake, poll) = intake_with(log).await;
        let failed = intake.submit(vote(poll, "a")).await;
        assert!(matches!(failed, Err(VoteRejection::Log(_))), "{failed:?}");
        intake
            .submit(vote(poll, "b"))
            .await
            .expect("not a duplicate of a vote that is not in the log");
    }

    #[tokio::test]
    async fn an_append_of_unknown_outcome_keeps_the_claim_for_its_retry() {
        let log = ScriptedLog::new([Step::Fail {
            outcome_unknown: true,
        }]);
        let (_dir, intake, poll) = intake_with(log).await;
        let failed = intake.submit(vote(poll, "a")).await;
        assert!(matches!(failed, Err(VoteRejection::Log(_))), "{failed:?}");
        let other = intake.submit(vote(poll, "b")).await;
        assert!(
            matches!(other, Err(VoteRejection::Duplicate(_))),
            "the first vote may still be counted: {other:?}"
        );
        intake
            .submit(vote(poll, "a"))
            .await
            .expect("its retry is accepted");
    }

    #[tokio::test]
    async fn a_slow_attempt_that_fails_late_keeps_the_claim_of_its_successful_retry() {
        let (started, started_rx) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        let log = ScriptedLog::new([Step::SlowFail { started, go: go_rx }]);
        let (_dir, intake, poll) = intake_with(log).await;
        let first = tokio::spawn({
            let intake = intake.clone();
            async move { intake.submit(vote(poll, "a")).await }
        });
        started_rx.await.unwrap();
        intake
            .submit(vote(poll, "a"))
            .await
            .expect("the retry is appended");
        go.send(()).unwrap();
        let first = first.await.unwrap();
        assert!(matches!(first, Err(VoteRejection::Log(_))), "{first:?}");
        let other = intake.submit(vote(poll, "b")).await;
        assert!(
            matches!(other, Err(VoteRejection::Duplicate(_))),
            "the retry's vote is in the log: {other:?}"
        );
    }

    #[tokio::test]
    async fn a_vote_id_reused_for_another_ballot_is_refused_before_the_log() {
        let log = ScriptedLog::new([Step::Append]);
        let (_dir, intake, poll) = intake_with(log.clone()).await;
        intake.submit(vote(poll, "a")).await.unwrap();
        let other_ballot = Vote {
            choices: vec![2],
            ..vote(poll, "a")
        };
        let refused = intake.submit(other_ballot).await;
        assert!(
            matches!(refused, Err(VoteRejection::VoteIdReused(_))),
            "{refused:?}"
        );
        intake.submit(vote(poll, "a")).await.expect("a retry");
    }
}
