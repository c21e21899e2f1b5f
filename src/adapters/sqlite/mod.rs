//! The embedded [`PollStore`]: SQLite through sqlx, migrated on open.

use std::collections::HashMap;

use super::sql_common::{self, LIST_LIMIT, POLL_COLUMNS, err, poll_row};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, LedgerRow, NewPoll, OptionCount, Poll, PollId, PollOption, PollPage, PollStore,
    StoreError, Vote, Voter,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

mod statements;
mod writer;

use writer::{FlushJob, GROUP_MAX, group_commit};

use crate::background::{Background, Stage};

/// A [`PollStore`] in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: SQLite has a single writer, and queueing in the pool is cheaper than
    /// spinning on SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
    /// The vote path's own reader (closed flags). Why its own: listing, exports and
    /// snapshots queue on `readers`, and a vote must never wait behind them.
    flags: SqlitePool,
    /// Flushes, applied by the group-committing writer task.
    flushes: mpsc::Sender<FlushJob>,
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) and migrates the database at `url`,
    /// and starts its group-committing writer in `background`'s `Storage` stage.
    pub async fn open(url: &str, background: &Background) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(err("parse store.url"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Why FULL: log offsets are committed right after a flush; the flush must survive
            // a power loss that the committed offset survives.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::new("create the database directory", e))?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(err("open the database"))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::new("migrate the database", e))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(err("open the database for reading"))?;
        let flags = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.read_only(true))
            .await
            .map_err(err("open the database for reading"))?;
        let (flushes, jobs) = mpsc::channel(GROUP_MAX);
        let pool = writer.clone();
        background.spawn(Stage::Storage, "sqlite writer", |stop| {
            group_commit(pool, jobs, stop)
        });
        Ok(Self {
            writer,
            readers,
            flags,
            flushes,
        })
    }

    async fn options_of(
        conn: &mut SqliteConnection,
        ids: &[PollId],
    ) -> Result<HashMap<PollId, Vec<PollOption>>, sqlx::Error> {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT poll_id, id, text, votes FROM poll_options WHERE poll_id IN (",
        );
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(id);
        }
        q.push(") ORDER BY poll_id, id");
        let mut out: HashMap<PollId, Vec<PollOption>> = HashMap::new();
        for row in q.build().fetch_all(conn).await? {
            out.entry(row.get(0)).or_default().push(PollOption {
                id: row.get(1),
                text: row.get(2),
                votes: row.get(3),
            });
        }
        Ok(out)
    }

    async fn polls_where(&self, which: Which<'_>) -> Result<Vec<Poll>, sqlx::Error> {
        // Why a transaction: a poll's version and its counts are read by two statements, and
        // a flush committing between them would pair an old `seq` with newer counts. In WAL
        // mode a read transaction sees one snapshot.
        let mut conn = self.readers.begin().await?;
        let filter = match which {
            Which::Page(_) => "WHERE id < ?",
            Which::One(_) => "WHERE id = ?",
            // One JSON array parameter, whatever the number of ids.
            Which::Among(_) => "WHERE id IN (SELECT value FROM json_each(?))",
        };
        let sql = format!("SELECT {POLL_COLUMNS} FROM polls {filter} ORDER BY id DESC LIMIT ?");
        let mut query = sqlx::query(&sql);
        let mut limit = LIST_LIMIT;
        match which {
            Which::Page(page) => {
                query = query.bind(page.before.unwrap_or(PollId::MAX));
                limit = page.limit.min(LIST_LIMIT);
            }
            Which::One(id) => query = query.bind(id),
            Which::Among(ids) => {
                query = query.bind(serde_json::to_string(ids).expect("ids serialize"))
            }
        }
        let query = query.bind(limit);
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<PollId> = rows.iter().map(|r| r.get(0)).collect();
        let options = Self::options_of(&mut conn, &ids).await?;
        let rows = rows.iter().map(|r| poll_row!(r)).collect();
        conn.commit().await?;
        Ok(sql_common::assemble(rows, options))
    }
}

/// Which polls [`SqliteStore::polls_where`] reads.
#[derive(Clone, Copy)]
enum Which<'a> {
    /// One page of the list (at most [`LIST_LIMIT`]).
    Page(PollPage),
    One(PollId),
    /// At most [`LIST_LIMIT`] ids.
    Among(&'a [PollId]),
}

sql_common::same_in_both_dialects!(SqliteStore, SqliteConnection);

#[async_trait]
impl PollStore for SqliteStore {
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError> {
        let created_at = now_millis();
        let mut tx = self.writer.begin().await.map_err(err("create poll"))?;
        let id = Self::insert_poll_row(&mut tx, &poll, created_at).await?;
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO poll_options (poll_id, id, text) ");
        q.push_values(poll.options.iter().enumerate(), |mut row, (i, text)| {
            row.push_bind(id).push_bind(i as i64 + 1).push_bind(text);
        });
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(err("create poll options"))?;
        tx.commit().await.map_err(err("create poll"))?;
        Ok(sql_common::created(id, poll, created_at))
    }

    async fn list_polls(&self, page: PollPage) -> Result<Vec<Poll>, StoreError> {
        self.polls_where(Which::Page(page))
            .await
            .map_err(err("list polls"))
    }

    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let polls = self
            .polls_where(Which::One(id))
            .await
            .map_err(err("get poll"))?;
        Ok(polls.into_iter().next())
    }

    async fn get_polls(&self, ids: &[PollId]) -> Result<Vec<Poll>, StoreError> {
        let mut polls = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LIST_LIMIT as usize) {
            let read = self.polls_where(Which::Among(chunk)).await;
            polls.extend(read.map_err(err("get polls"))?);
        }
        Ok(polls)
    }

    async fn is_closed(&self, id: PollId) -> Result<Option<bool>, StoreError> {
        self.closed_flag(id).await
    }

    async fn closed_among(&self, ids: &[PollId]) -> Result<Vec<PollId>, StoreError> {
        // One JSON array parameter, whatever the number of ids (SQLite caps parameters).
        let ids = serde_json::to_string(ids).expect("ids serialize");
        sqlx::query_scalar(
            "SELECT id FROM polls WHERE closed_at IS NOT NULL \
             AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
        .fetch_all(&self.flags)
        .await
        .map_err(err("read poll states"))
    }

    async fn close_poll(
        &self,
        id: PollId,
        at: UnixMillis,
    ) -> Result<Option<(Poll, bool)>, StoreError> {
        let newly = self.close_unless_closed(id, at).await?;
        Ok(self.get_poll(id).await?.map(|poll| (poll, newly)))
    }

    async fn polls_to_seal(
        &self,
        now: UnixMillis,
        resend_before: UnixMillis,
    ) -> Result<Vec<(PollId, UnixMillis)>, StoreError> {
        self.take_polls_to_seal(now, resend_before).await
    }

    async fn apply_votes(
        &self,
        poll: PollId,
        allow_change: bool,
        votes: Arc<[Vote]>,
    ) -> Result<FlushOutcome, StoreError> {
        let (reply, result) = oneshot::channel();
        let job = FlushJob {
            poll,
            allow_change,
            votes,
            reply,
        };
        let stopped = || StoreError::new("flush", "the SQLite writer has stopped");
        self.flushes.send(job).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }

    async fn seal_poll(&self, poll: PollId) -> Result<Option<FlushOutcome>, StoreError> {
        self.seal(poll).await
    }

    async fn ledger(
        &self,
        poll: PollId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        self.ledger_page(poll, after, limit).await
    }

    async fn voters_since(&self, since: UnixMillis) -> Result<Vec<Voter>, StoreError> {
        self.current_voters_since(since).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.ping_readers().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollcast_actors::PollSettings;

    #[tokio::test]
    async fn flushes_committed_together_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url, &Background::new()).await.unwrap();
        let poll = store
            .create_poll(NewPoll {
                question: "Q".into(),
                options: vec!["A".into(), "B".into()],
                settings: Default::default(),
            })
            .await
            .unwrap();
        let good: Arc<[Vote]> = (0..50)
            .map(|i| Vote::single(poll.id, 1 + i % 2, format!("u{i}")))
            .collect();
        let bad: Arc<[Vote]> = Arc::new([Vote::single(poll.id + 1000, 1, "nobody")]);
        // Sent at once, so the writer applies them in one group.
        let (ok, failed) = tokio::join!(
            store.apply_votes(poll.id, false, good.clone()),
            store.apply_votes(poll.id + 1000, false, bad)
        );
        assert!(
            failed.is_err(),
            "a poll that does not exist cannot be flushed"
        );
        let ok = ok.unwrap();
        assert_eq!(ok.inserted, 50);
        assert_eq!(
            store
                .get_poll(poll.id)
                .await
                .unwrap()
                .unwrap()
                .total_votes(),
            50
        );
        let again = store.apply_votes(poll.id, false, good).await.unwrap();
        assert_eq!(again.inserted, 0, "a replay changes nothing");
    }

    /// A store in a directory of its own (kept while the returned guard lives) with `n`
    /// three-option polls.
    async fn store_with_polls(
        n: usize,
        settings: PollSettings,
    ) -> (tempfile::TempDir, SqliteStore, Vec<PollId>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url, &Background::new()).await.unwrap();
        let mut polls = Vec::new();
        for _ in 0..n {
            let poll = store
                .create_poll(NewPoll {
                    question: "Q".into(),
                    options: vec!["A".into(), "B".into(), "C".into()],
                    settings: settings.clone(),
                })
                .await
                .unwrap();
            polls.push(poll.id);
        }
        (dir, store, polls)
    }

    #[tokio::test]
    async fn many_polls_flushed_in_one_group_count_like_one_at_a_time() {
        let (_dir, store, polls) = store_with_polls(6, PollSettings::default()).await;
        // Poll i gets i + 1 voters on option 2, one of them twice (a duplicate).
        let batches: Vec<Vec<Vote>> = polls
            .iter()
            .enumerate()
            .map(|(i, poll)| {
                let mut votes: Vec<Vote> = (0..=i)
                    .map(|u| Vote::single(*poll, 2, format!("u{u}")))
                    .collect();
                votes.push(Vote::single(*poll, 3, "u0"));
                votes
            })
            .collect();
        let flush_all = || {
            futures_util::future::join_all(
                polls
                    .iter()
                    .zip(&batches)
                    .map(|(poll, votes)| store.apply_votes(*poll, false, votes.as_slice().into())),
            )
        };
        for (i, outcome) in flush_all().await.into_iter().enumerate() {
            let outcome = outcome.unwrap();
            assert_eq!(outcome.inserted, i as u64 + 1);
            assert_eq!(outcome.seq, 1);
            assert_eq!(outcome.changed.len(), 1, "only option 2 moved");
            assert_eq!(outcome.changed[0].new_count, i as i64 + 1);
        }
        for outcome in flush_all().await {
            let outcome = outcome.unwrap();
            assert_eq!(
                (outcome.inserted, outcome.seq),
                (0, 1),
                "a replay changes nothing"
            );
        }
        for (i, poll) in polls.iter().enumerate() {
            let poll = store.get_poll(*poll).await.unwrap().unwrap();
            assert_eq!(poll.total_votes(), i as i64 + 1);
            assert_eq!(poll.voters, i as i64 + 1);
        }
    }

    #[tokio::test]
    async fn new_votes_and_replays_mixed_into_a_group_are_each_counted_once() {
        let settings = PollSettings {
            max_choices: 2,
            ..Default::default()
        };
        let (_dir, store, polls) = store_with_polls(3, settings).await;
        let votes = |poll: PollId, users: std::ops::Range<i64>| -> Vec<Vote> {
            users
                .map(|u| Vote {
                    // Every third voter picks two options.
                    choices: if u % 3 == 0 { vec![1, 3] } else { vec![2] },
                    ..Vote::single(poll, 0, format!("u{u}"))
                })
                .collect()
        };
        let flush = |batches: Vec<Vec<Vote>>| {
            futures_util::future::join_all(
                polls
                    .iter()
                    .zip(batches)
                    .map(|(poll, votes)| store.apply_votes(*poll, false, votes.into())),
            )
        };
        // Only new votes: nothing is read back from the ledger.
        let first = flush(polls.iter().map(|p| votes(*p, 0..6)).collect()).await;
        for outcome in first {
            let outcome = outcome.unwrap();
            assert_eq!(outcome.inserted, 6);
            let counts: Vec<i64> = outcome.all.iter().map(|c| c.new_count).collect();
            assert_eq!(counts, [2, 4, 2]);
        }
        // The same votes again with two new voters: only the new ones count.
        let second = flush(polls.iter().map(|p| votes(*p, 0..8)).collect()).await;
        for outcome in second {
            let outcome = outcome.unwrap();
            assert_eq!(outcome.inserted, 2, "the replayed six change nothing");
            let counts: Vec<i64> = outcome.all.iter().map(|c| c.new_count).collect();
            assert_eq!(counts, [3, 5, 3]);
        }
        for poll in &polls {
            let poll = store.get_poll(*poll).await.unwrap().unwrap();
            assert_eq!(poll.voters, 8);
        }
    }

    /// The plan of `sql` (with `binds` ones bound): each line of SQLite's `EXPLAIN QUERY PLAN`.
    async fn plan_of(store: &SqliteStore, sql: &str, binds: usize) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut q = sqlx::query(&explain);
        for _ in 0..binds {
            q = q.bind(1_i64);
        }
        let rows = q.fetch_all(&store.writer).await.unwrap();
        rows.iter().map(|r| r.get::<String, _>(3)).collect()
    }

    #[tokio::test]
    async fn ledger_reads_use_its_indexes() {
        let (_dir, store, _) = store_with_polls(1, Default::default()).await;
        // Each read of a few voters, or a page, must seek in an index: a scan would read
        // every ballot ever taken, once per flush that needs it.
        for (what, sql, binds, index) in [
            (
                "current ballots of (poll, user) pairs",
                statements::CURRENT_BALLOTS.sql(8),
                16,
                "votes_one_ballot",
            ),
            (
                "every ballot of some voters",
                statements::BALLOTS_OF_VOTERS.sql(8),
                9,
                "votes_replaced",
            ),
            (
                "a page of the ledger",
                sql_common::LEDGER_PAGE,
                3,
                "votes_by_poll",
            ),
        ] {
            let plan = plan_of(&store, sql, binds).await;
            let on_votes: Vec<&String> = plan
                .iter()
                .filter(|line| line.contains(" votes ") || line.contains(" v "))
                .collect();
            assert!(!on_votes.is_empty(), "{what}: {plan:?}");
            assert!(
                on_votes.iter().all(|line| line.starts_with("SEARCH")),
                "{what} scans the ledger: {plan:?}"
            );
            assert!(
                plan.iter().any(|line| line.contains(index)),
                "{what} does not use {index}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_ledger_from_before_the_lean_keys_keeps_its_rows_row_ids_and_rules() {
        // A database as the release before `0003_ledger_lean_keys` left it: the first two
        // migrations, applied from a copy of their files.
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("migrations");
        std::fs::create_dir(&old).unwrap();
        for file in [
            "0001_polls_and_ledger.sql",
            "0002_ledger_marks_instead_of_time_index.sql",
        ] {
            let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
            std::fs::copy(from.join(file), old.join(file)).unwrap();
        }
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(
            "INSERT INTO polls (question, created_at, allow_change) VALUES ('Q', 1, TRUE);
             INSERT INTO poll_options (poll_id, id, text, votes) VALUES (1, 1, 'A', 1), (1, 2, 'B', 1);
             INSERT INTO votes (poll_id, user_id, vote_id, choices, voted_at, current) VALUES
                 (1, 'u1', 'k1', '1', 10, FALSE),
                 (1, 'u1', 'k2', '2', 11, TRUE),
                 (1, 'u2', 'k3', '1', 12, TRUE);
             UPDATE polls SET voters = 2, version = 1;
             -- The counter above the last row, as an insert that failed leaves it.
             UPDATE sqlite_sequence SET seq = 7 WHERE name = 'votes';",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&url, &Background::new()).await.unwrap();
        let rows = |page: Vec<LedgerRow>| -> Vec<(i64, String, String, bool)> {
            page.into_iter()
                .map(|r| (r.row, r.user_id, r.vote_id, r.current))
                .collect()
        };
        let kept = rows(store.ledger(1, 0, 100).await.unwrap());
        assert_eq!(
            kept,
            [
                (1, "u1".into(), "k1".into(), false),
                (2, "u1".into(), "k2".into(), true),
                (3, "u2".into(), "k3".into(), true),
            ]
        );
        // The replaced ballot's vote id replayed changes nothing; a new ballot replaces
        // u2's, and its row continues from the counter, not from the last row.
        let mut replayed = Vote::single(1, 1, "u1");
        replayed.vote_id = Some("k1".into());
        let mut changed = Vote::single(1, 2, "u2");
        changed.vote_id = Some("k4".into());
        let outcome = store
            .apply_votes(1, true, vec![replayed, changed].into())
            .await
            .unwrap();
        assert_eq!(outcome.inserted, 1);
        let counts: Vec<i64> = outcome.all.iter().map(|c| c.new_count).collect();
        assert_eq!(counts, [0, 2]);
        let after = rows(store.ledger(1, 3, 100).await.unwrap());
        assert_eq!(after, [(8, "u2".into(), "k4".into(), true)]);
    }
}
