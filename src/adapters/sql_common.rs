//! What the SQL stores share: turning rows into domain values. The SQL itself differs per
//! dialect (SQLite: multi-row VALUES; Postgres: UNNEST over arrays) and stays in each adapter.

use std::collections::{BTreeMap, HashMap};

use pollcast_actors::domain::UnixMillis;
use pollcast_actors::{FlushOutcome, NewPoll, OptionCount, Poll, PollId, PollOption};

/// Polls listed by `GET /polls` at most (newest first).
pub const LIST_LIMIT: i64 = 1000;

/// A row of `polls`.
pub struct PollRow {
    pub id: PollId,
    pub question: String,
    pub created_at: UnixMillis,
    pub closed_at: Option<UnixMillis>,
    pub version: i64,
}

/// Joins poll rows with their options (keyed by poll id), keeping the rows' order.
pub fn assemble(rows: Vec<PollRow>, mut options: HashMap<PollId, Vec<PollOption>>) -> Vec<Poll> {
    rows.into_iter()
        .map(|r| Poll {
            id: r.id,
            question: r.question,
            options: options.remove(&r.id).unwrap_or_default(),
            closed: r.closed_at.is_some(),
            created_at: r.created_at,
            closed_at: r.closed_at,
            seq: r.version,
        })
        .collect()
}

/// The poll just inserted with id `id`: options numbered 1..=n, no votes.
pub fn created(id: PollId, poll: NewPoll, created_at: UnixMillis) -> Poll {
    Poll {
        id,
        question: poll.question,
        options: poll
            .options
            .into_iter()
            .zip(1..)
            .map(|(text, id)| PollOption { id, text, votes: 0 })
            .collect(),
        closed: false,
        created_at,
        closed_at: None,
        seq: 0,
    }
}

/// A flush's outcome from the votes inserted per option and the counts read back.
pub fn outcome(counted: &BTreeMap<i64, i64>, seq: i64, all: Vec<OptionCount>) -> FlushOutcome {
    let changed = all
        .iter()
        .filter(|c| counted.contains_key(&c.option_id))
        .copied()
        .collect();
    FlushOutcome {
        inserted: counted.values().sum::<i64>() as u64,
        seq,
        changed,
        all,
    }
}
