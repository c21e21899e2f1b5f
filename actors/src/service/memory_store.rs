//! A store of polls in memory, for the service's own tests: only what the catalog reads and
//! writes (create, get, closed flags, close). Flushes and the ledger are the stores' own
//! contract, tested against the real ones (`tests/store`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::domain::UnixMillis;
use crate::ports::{FlushOutcome, LedgerRow, PollPage, PollStore, StoreError, Voter};
use crate::{NewPoll, Poll, PollId, PollOption, Vote};

#[derive(Default)]
pub(crate) struct MemoryStore {
    polls: Mutex<HashMap<PollId, Poll>>,
}

impl MemoryStore {
    /// A store holding `n` open polls of two options; their ids.
    pub(crate) async fn with_polls(n: usize) -> (Arc<Self>, Vec<PollId>) {
        let store = Arc::new(Self::default());
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let poll = NewPoll {
                question: format!("Q{i}"),
                options: vec!["A".into(), "B".into()],
                settings: Default::default(),
            };
            ids.push(store.create_poll(poll).await.unwrap().id);
        }
        (store, ids)
    }
}

const NOT_FOR_THESE_TESTS: &str = "the service's tests use only the poll catalog's reads";

#[async_trait]
impl PollStore for MemoryStore {
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError> {
        let mut polls = self.polls.lock().unwrap();
        let id = polls.len() as PollId + 1;
        let created = Poll {
            id,
            question: poll.question,
            options: (1..)
                .zip(poll.options)
                .map(|(id, text)| PollOption { id, text, votes: 0 })
                .collect(),
            closed: false,
            created_at: 0,
            closed_at: None,
            seq: 0,
            voters: 0,
            settings: poll.settings,
        };
        polls.insert(id, created.clone());
        Ok(created)
    }

    async fn list_polls(&self, _page: PollPage) -> Result<Vec<Poll>, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        Ok(self.polls.lock().unwrap().get(&id).cloned())
    }

    async fn is_closed(&self, id: PollId) -> Result<Option<bool>, StoreError> {
        Ok(self.polls.lock().unwrap().get(&id).map(|p| p.closed))
    }

    async fn close_poll(
        &self,
        id: PollId,
        at: UnixMillis,
    ) -> Result<Option<(Poll, bool)>, StoreError> {
        let mut polls = self.polls.lock().unwrap();
        Ok(polls.get_mut(&id).map(|poll| {
            let newly = !poll.closed;
            if newly {
                poll.closed = true;
                poll.closed_at = Some(at);
            }
            (poll.clone(), newly)
        }))
    }

    async fn polls_to_seal(
        &self,
        _now: UnixMillis,
        _resend_before: UnixMillis,
    ) -> Result<Vec<(PollId, UnixMillis)>, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn apply_votes(
        &self,
        _poll: PollId,
        _allow_change: bool,
        _votes: Arc<[Vote]>,
    ) -> Result<FlushOutcome, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn seal_poll(&self, _poll: PollId) -> Result<Option<FlushOutcome>, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn ledger(
        &self,
        _poll: PollId,
        _after: i64,
        _limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn voters_since(&self, _since: UnixMillis) -> Result<Vec<Voter>, StoreError> {
        unreachable!("{NOT_FOR_THESE_TESTS}")
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
