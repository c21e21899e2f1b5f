//! What the SQL stores share: the statements that are the same in both dialects
//! ([`same_in_both_dialects!`]), the columns of a poll, turning rows into domain values, and
//! turning a [`BallotPlan`] into a flush outcome. The SQL that differs per dialect (SQLite:
//! multi-row VALUES and one writer; Postgres: UNNEST over arrays and row locks) stays in
//! each adapter.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use pollcast_actors::ballot::{self, LedgerView};
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, NewPoll, OptionCount, OptionId, Poll, PollId, PollOption, PollSettings,
    StoreError, Voter, WebhookTarget,
};

/// Polls listed by `GET /polls` at most (newest first).
pub const LIST_LIMIT: i64 = 1000;

/// The columns [`poll_row!`] reads, in its order.
pub const POLL_COLUMNS: &str = "id, question, created_at, closed_at, version, voters, closes_at, \
     max_choices, hide_results, allow_change, webhook_url, webhook_secret, webhook_results_secs";

/// A page of a poll's ledger rows, in the columns and order [`ledger_row!`] reads (either
/// dialect): the poll, the row id to start after, the most rows.
pub const LEDGER_PAGE: &str = "SELECT row_id, user_id, vote_id, choices, voted_at, current \
     FROM votes WHERE poll_id = $1 AND row_id > $2 ORDER BY row_id LIMIT $3";

/// A row of `polls`.
pub struct PollRow {
    pub id: PollId,
    pub question: String,
    pub created_at: UnixMillis,
    pub closed_at: Option<UnixMillis>,
    pub version: i64,
    pub voters: i64,
    pub settings: PollSettings,
}

/// Reads a [`PollRow`] from a row selected with [`POLL_COLUMNS`] (either dialect).
macro_rules! poll_row {
    ($r:expr) => {{
        let r = $r;
        let url: Option<String> = r.get(10);
        let secret: Option<String> = r.get(11);
        let every: Option<i64> = r.get(12);
        $crate::adapters::sql_common::PollRow {
            id: r.get(0),
            question: r.get(1),
            created_at: r.get(2),
            closed_at: r.get(3),
            version: r.get(4),
            voters: r.get(5),
            settings: pollcast_actors::PollSettings {
                closes_at: r.get(6),
                max_choices: r.get::<i64, _>(7) as u32,
                hide_results: r.get(8),
                allow_change: r.get(9),
                webhook: $crate::adapters::sql_common::webhook(url, secret, every),
            },
        }
    }};
}

/// Reads a [`LedgerRow`] from a row selected by [`LEDGER_PAGE`] (either dialect).
macro_rules! ledger_row {
    ($r:expr) => {{
        let r = $r;
        pollcast_actors::LedgerRow {
            row: r.get(0),
            user_id: r.get(1),
            vote_id: r.get(2),
            option_ids: pollcast_actors::ballot::decode_choices(r.get::<&str, _>(3)),
            voted_at: r.get(4),
            current: r.get(5),
        }
    }};
}

pub(crate) use {ledger_row, poll_row};

/// The webhook of a poll from its three columns.
pub fn webhook(
    url: Option<String>,
    secret: Option<String>,
    every: Option<i64>,
) -> Option<WebhookTarget> {
    Some(WebhookTarget {
        url: url?,
        secret: secret.unwrap_or_default(),
        results_every_secs: every.map(|s| s as u32),
    })
}

/// The webhook columns of a new poll.
pub fn webhook_columns(settings: &PollSettings) -> (Option<&str>, Option<&str>, Option<i64>) {
    match &settings.webhook {
        Some(w) => (
            Some(&w.url),
            Some(&w.secret),
            w.results_every_secs.map(i64::from),
        ),
        None => (None, None, None),
    }
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
            voters: r.voters,
            settings: r.settings,
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
        voters: 0,
        settings: poll.settings,
    }
}

/// The ledger's hour marks (`ledger_marks`), which stand in for an index on `voted_at`.
///
/// Why they are enough: the first flush of each hour notes the ledger's next row id, and
/// row ids only grow, so every row below a mark was inserted before it was taken. A ballot
/// is inserted after it was accepted, and `voted_at` is when it was accepted: so a row
/// below the mark of an hour that ended before `since` was voted before `since`.
///
/// Why the hour is the database's: one clock for every process's marks, so a process
/// whose clock is off cannot write a mark that hides another's ballots. Why a margin of an
/// hour more: `voted_at` comes from the clock of the process that took the vote; the
/// marks hold while that clock is within an hour of the database's. And why they need a
/// sequence without a cache (Postgres's default): a session holding a block of row ids
/// could insert below a later mark.
#[derive(Debug, Default, Clone)]
pub struct LedgerMarks {
    /// The hour (by this process's clock) it marked last; 0: none yet. Why kept: a flush
    /// checks it instead of writing a statement, so the marks cost a statement an hour.
    marked: Arc<AtomicI64>,
}

/// The statement that marks the hour `$hour` (an SQL expression of the database's clock).
/// Why `WHERE TRUE`: SQLite reads `ON CONFLICT` after a bare `FROM votes` as a join's.
macro_rules! mark_sql {
    ($hour:literal) => {
        concat!(
            "INSERT INTO ledger_marks (hour, first_row) SELECT ",
            $hour,
            ", COALESCE(MAX(row_id), 0) + 1 FROM votes WHERE TRUE ON CONFLICT DO NOTHING"
        )
    };
}

impl LedgerMarks {
    /// Milliseconds in an hour, the marks' step.
    pub const HOUR: i64 = 3_600_000;
    /// Notes the ledger's next row id for this hour, unless an earlier flush did (SQLite).
    pub const MARK_SQLITE: &str = mark_sql!("unixepoch() / 3600");
    /// The same, in Postgres.
    pub const MARK_POSTGRES: &str =
        mark_sql!("floor(extract(epoch FROM clock_timestamp()) / 3600)::bigint");
    /// The mark a scan for the ballots voted since `$1` starts at (none: the first row).
    pub const SCAN_FROM: &str = "SELECT first_row FROM ledger_marks WHERE hour <= $1 \
         ORDER BY hour DESC LIMIT 1";

    /// Before a flush: marks this hour with `mark` (`MARK_SQLITE` or `MARK_POSTGRES`) on
    /// `pool`, unless this process did already.
    pub async fn before_flush<DB>(&self, pool: &sqlx::Pool<DB>, mark: &'static str)
    where
        DB: sqlx::Database,
        for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    {
        if let Some(hour) = self.due(now_millis()) {
            let done = sqlx::query(mark).execute(pool).await;
            self.record(hour, done.map(drop));
        }
    }

    /// The hour to mark before a flush that begins `now`, if this process has not yet.
    fn due(&self, now: UnixMillis) -> Option<i64> {
        let hour = now.div_euclid(Self::HOUR);
        (self.marked.load(Ordering::Relaxed) != hour).then_some(hour)
    }

    /// The outcome of the mark (`MARK_*`) run by the adapter before a flush in `hour`. Why
    /// not in the flush's transaction: a flush that fails must not take the mark with it.
    /// A mark that could not be written costs only a longer scan at the next start (the
    /// previous mark still holds), and the next flush tries again.
    fn record(&self, hour: i64, done: Result<(), sqlx::Error>) {
        match done {
            Ok(()) => self.marked.store(hour, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, hour, "could not mark the ledger's hour"),
        }
    }

    /// The latest hour whose mark may bound a scan for the ballots voted since `since`: it
    /// ended, with an hour to spare for clocks, before `since`.
    pub fn last_hour_before(since: UnixMillis) -> i64 {
        (since - Self::HOUR).div_euclid(Self::HOUR) - 1
    }
}

/// What the ledger holds for a batch's voters, from their rows (user, vote id, choices,
/// current).
pub fn ledger_view(rows: impl IntoIterator<Item = (String, String, String, bool)>) -> LedgerView {
    let mut view = LedgerView::default();
    for (user, vote_id, choices, current) in rows {
        let choices = ballot::decode_choices(&choices);
        if current {
            view.current.insert(user.clone(), choices.clone());
        }
        view.applied.insert((user, vote_id), choices);
    }
    view
}

/// The distinct voters of a batch.
pub fn voters_of(votes: &[pollcast_actors::Vote]) -> Vec<&str> {
    let mut users: Vec<&str> = votes.iter().map(|v| v.user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// A flush's outcome from the count deltas, the ledger rows inserted, the new version and
/// the counts read back.
pub fn outcome(
    deltas: &BTreeMap<OptionId, i64>,
    inserted: u64,
    seq: i64,
    all: Vec<OptionCount>,
) -> FlushOutcome {
    let changed = all
        .iter()
        .filter(|c| deltas.contains_key(&c.option_id))
        .copied()
        .collect();
    FlushOutcome {
        inserted,
        seq,
        changed,
        all,
    }
}

/// Voters from `(poll_id, user_id, vote_id, choices)` rows.
pub fn voters(rows: Vec<(PollId, String, String, String)>) -> Vec<Voter> {
    rows.into_iter()
        .map(|(poll_id, user_id, vote_id, choices)| Voter {
            poll_id,
            user_id,
            vote_id,
            choices: ballot::decode_choices(&choices),
        })
        .collect()
}

/// Logs and counts the votes of a flush whose vote id the ledger (or the batch) already held
/// with another ballot. Each got a 202 but is not counted; a flush cannot answer its client,
/// so this is the one trace of it (`pollcast_vote_id_reused_total`). The duplicate guard
/// refuses such votes (422) before they are appended; one that reaches the ledger slipped
/// past it (an expired or lost claim, or a claim made by an older pollcast).
pub fn report_reused<'a>(votes: impl IntoIterator<Item = (PollId, &'a pollcast_actors::Vote)>) {
    let mut n = 0;
    for (poll, vote) in votes {
        n += 1;
        tracing::error!(
            poll_id = poll,
            user_id = %vote.user_id,
            vote_id = vote.ledger_id(),
            choices = ?vote.choices,
            "a vote reused the vote id of another ballot of this voter: acknowledged but not counted"
        );
    }
    if n > 0 {
        metrics::counter!("pollcast_vote_id_reused_total").increment(n);
    }
}

/// Counts from `(option id, votes)` rows.
pub fn option_counts(rows: Vec<(OptionId, i64)>) -> Vec<OptionCount> {
    rows.into_iter()
        .map(|(option_id, new_count)| OptionCount {
            option_id,
            new_count,
        })
        .collect()
}

/// The final outcome of a sealed poll: every option counts as changed.
pub fn sealed(seq: i64, all: Vec<OptionCount>) -> FlushOutcome {
    FlushOutcome {
        inserted: 0,
        seq,
        changed: all.clone(),
        all,
    }
}

/// Maps a sqlx error to the store's, naming what was being done.
pub fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::new(what, e)
}

/// The statements of a SQL store that are the same in both dialects (parameters written
/// `$N`, which sqlx binds by position in SQLite too), written once and expanded into an
/// inherent `impl` of each store, whose `PollStore` methods call them. A store has `writer`,
/// `readers` and `flags` pools (the vote path's own reader of closed flags).
///
/// Why a macro and not generic functions over `sqlx::Database`: each would need a bound
/// per column type and executor, longer than the statements it shares.
macro_rules! same_in_both_dialects {
    ($store:ty, $conn:ty) => {
        impl $store {
            /// Inserts a new poll's row (not its options), inside the creating transaction;
            /// returns its id.
            async fn insert_poll_row(
                tx: &mut $conn,
                poll: &NewPoll,
                created_at: UnixMillis,
            ) -> Result<PollId, StoreError> {
                let (url, secret, every) = sql_common::webhook_columns(&poll.settings);
                sqlx::query_scalar(
                    "INSERT INTO polls (question, created_at, closes_at, max_choices, \
                     hide_results, allow_change, webhook_url, webhook_secret, \
                     webhook_results_secs) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                )
                .bind(&poll.question)
                .bind(created_at)
                .bind(poll.settings.closes_at)
                .bind(i64::from(poll.settings.max_choices))
                .bind(poll.settings.hide_results)
                .bind(poll.settings.allow_change)
                .bind(url)
                .bind(secret)
                .bind(every)
                .fetch_one(tx)
                .await
                .map_err(sql_common::err("create poll"))
            }

            /// Every option's count, inside a flush's transaction.
            async fn counts(
                tx: &mut $conn,
                poll: PollId,
            ) -> Result<Vec<OptionCount>, StoreError> {
                let rows: Vec<(i64, i64)> = sqlx::query_as(
                    "SELECT id, votes FROM poll_options WHERE poll_id = $1 ORDER BY id",
                )
                .bind(poll)
                .fetch_all(tx)
                .await
                .map_err(sql_common::err("read counts"))?;
                Ok(sql_common::option_counts(rows))
            }

            /// [`PollStore::is_closed`], on the vote path's own pool.
            async fn closed_flag(&self, id: PollId) -> Result<Option<bool>, StoreError> {
                sqlx::query_scalar("SELECT closed_at IS NOT NULL FROM polls WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.flags)
                    .await
                    .map_err(sql_common::err("read poll state"))
            }

            /// Closes the poll as of `at` unless it is closed; whether this call closed it.
            async fn close_unless_closed(
                &self,
                id: PollId,
                at: UnixMillis,
            ) -> Result<bool, StoreError> {
                let updated = sqlx::query(
                    "UPDATE polls SET closed_at = $1, marker_at = $1 \
                     WHERE id = $2 AND closed_at IS NULL",
                )
                .bind(at)
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(sql_common::err("close poll"))?;
                Ok(updated.rows_affected() == 1)
            }

            /// [`PollStore::polls_to_seal`]. Why conditional UPDATEs: with several processes
            /// each row goes to the one whose update takes it, so each poll gets one marker
            /// (the row lock decides; in SQLite, the single writer).
            async fn take_polls_to_seal(
                &self,
                now: UnixMillis,
                resend_before: UnixMillis,
            ) -> Result<Vec<(PollId, UnixMillis)>, StoreError> {
                let mut tx = self.writer.begin().await.map_err(sql_common::err("close due polls"))?;
                // Lost markers first, so that the polls closed just below are not counted
                // twice.
                let mut due: Vec<(PollId, UnixMillis)> = sqlx::query_as(
                    "UPDATE polls SET marker_at = $1 \
                     WHERE NOT sealed AND closed_at IS NOT NULL AND COALESCE(marker_at, 0) < $2 \
                     RETURNING id, closed_at",
                )
                .bind(now)
                .bind(resend_before)
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_common::err("find unsealed polls"))?;
                let closed: Vec<(PollId, UnixMillis)> = sqlx::query_as(
                    "UPDATE polls SET closed_at = closes_at, marker_at = $1 \
                     WHERE closed_at IS NULL AND closes_at <= $1 RETURNING id, closed_at",
                )
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_common::err("close due polls"))?;
                tx.commit().await.map_err(sql_common::err("close due polls"))?;
                due.extend(closed);
                Ok(due)
            }

            /// [`PollStore::seal_poll`].
            async fn seal(&self, poll: PollId) -> Result<Option<FlushOutcome>, StoreError> {
                let mut tx = self.writer.begin().await.map_err(sql_common::err("seal poll"))?;
                let seq: Option<i64> = sqlx::query_scalar(
                    "UPDATE polls SET version = version + 1, sealed = TRUE \
                     WHERE id = $1 AND NOT sealed RETURNING version",
                )
                .bind(poll)
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql_common::err("seal poll"))?;
                let Some(seq) = seq else {
                    return Ok(None);
                };
                let all = Self::counts(&mut tx, poll).await?;
                tx.commit().await.map_err(sql_common::err("seal poll"))?;
                Ok(Some(sql_common::sealed(seq, all)))
            }

            /// [`PollStore::ledger`].
            async fn ledger_page(
                &self,
                poll: PollId,
                after: i64,
                limit: i64,
            ) -> Result<Vec<LedgerRow>, StoreError> {
                let rows = sqlx::query(sql_common::LEDGER_PAGE)
                    .bind(poll)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.readers)
                    .await
                    .map_err(sql_common::err("read the ledger"))?;
                Ok(rows.iter().map(|r| sql_common::ledger_row!(r)).collect())
            }

            /// [`PollStore::voters_since`].
            async fn current_voters_since(
                &self,
                since: UnixMillis,
            ) -> Result<Vec<Voter>, StoreError> {
                // Why from a mark: the rows below it were all voted before `since`, and
                // the ledger has no index on `voted_at` (see `LedgerMarks`). Why read
                // first: bound as a number, the row id range is certain to be planned as
                // one.
                let from: Option<i64> = sqlx::query_scalar(sql_common::LedgerMarks::SCAN_FROM)
                    .bind(sql_common::LedgerMarks::last_hour_before(since))
                    .fetch_optional(&self.readers)
                    .await
                    .map_err(sql_common::err("read the ledger's marks"))?;
                let rows: Vec<(PollId, String, String, String)> = sqlx::query_as(
                    "SELECT poll_id, user_id, vote_id, choices FROM votes \
                     WHERE row_id >= $2 AND current AND voted_at >= $1",
                )
                .bind(since)
                .bind(from.unwrap_or(0))
                .fetch_all(&self.readers)
                .await
                .map_err(sql_common::err("list recent voters"))?;
                Ok(sql_common::voters(rows))
            }

            /// [`PollStore::ping`].
            async fn ping_readers(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.readers)
                    .await
                    .map_err(sql_common::err("ping"))?;
                Ok(())
            }
        }
    };
}
pub(crate) use same_in_both_dialects;

#[cfg(test)]
mod tests {
    use super::LedgerMarks;

    const HOUR: i64 = LedgerMarks::HOUR;

    #[test]
    fn a_scan_starts_at_the_mark_of_an_hour_that_ended_an_hour_before_since() {
        // Since 10:00 sharp: hour 8 (08:00-09:00) ended an hour before.
        assert_eq!(LedgerMarks::last_hour_before(10 * HOUR), 8);
        // Since 10:59: hour 9 ended at 10:00, less than an hour before.
        assert_eq!(LedgerMarks::last_hour_before(11 * HOUR - 1), 8);
        assert_eq!(LedgerMarks::last_hour_before(11 * HOUR), 9);
        // Before the epoch and near it nothing is excluded (no mark is that old).
        assert!(LedgerMarks::last_hour_before(HOUR / 2) < 0);
    }

    #[test]
    fn a_process_marks_each_hour_once() {
        let marks = LedgerMarks::default();
        assert_eq!(marks.due(5 * HOUR + 10), Some(5));
        marks.record(5, Err(sqlx::Error::PoolClosed));
        assert_eq!(
            marks.due(5 * HOUR + 10),
            Some(5),
            "a failed mark is tried again"
        );
        marks.record(5, Ok(()));
        assert_eq!(marks.due(6 * HOUR - 1), None);
        assert_eq!(marks.due(6 * HOUR), Some(6));
    }
}
