//! The embedded [`PollStore`]: SQLite through sqlx, migrated on open.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::sql_common::{self, LIST_LIMIT, POLL_COLUMNS, err, poll_row};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::ballot;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, LedgerRow, NewPoll, OptionCount, OptionId, Poll, PollId, PollOption, PollPage,
    PollStore, StoreError, Vote, Voter,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

/// Rows per multi-row INSERT or IN list (6 bound parameters per ledger row: 6000, under the
/// 32766 of the SQLite that sqlx bundles).
const INSERT_CHUNK: usize = 1000;

/// The lengths [`sized_chunks`] cuts into, largest first; each divides the one before.
const CHUNK_SIZES: [usize; 5] = [INSERT_CHUNK, 200, 40, 8, 1];

/// Splits `items` into runs whose lengths all come from [`CHUNK_SIZES`], largest first.
///
/// Why: a statement with a row per item has one SQL text per length, sqlx caches prepared
/// statements by text, and SQLite parses and plans every new text again. With 10,000 active
/// polls nearly every flush group had new lengths, and preparing them was a large share of
/// the embedded server's instructions (docs/BENCHMARKS.md, "Fast paths"); five lengths per
/// statement are prepared once and reused.
fn sized_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let size = *CHUNK_SIZES.iter().find(|size| **size <= rest.len())?;
        let (chunk, after) = rest.split_at(size);
        rest = after;
        Some(chunk)
    })
}

/// A statement with one group of placeholders per row, its SQL text written once for each
/// length of [`CHUNK_SIZES`]. Why not `QueryBuilder`: it wrote the same text again,
/// placeholder by placeholder, for every chunk of every flush (its cost with thousands of
/// polls per group: docs/BENCHMARKS.md, "Fast paths").
struct RowsStatement {
    texts: [String; CHUNK_SIZES.len()],
}

impl RowsStatement {
    /// `head`, then `row` once per row separated by commas, then `tail`.
    fn new(head: &str, row: &str, tail: &str) -> Self {
        Self {
            texts: CHUNK_SIZES.map(|rows| format!("{head}{}{tail}", vec![row; rows].join(", "))),
        }
    }

    /// The text for `rows` rows; `rows` is a length [`sized_chunks`] cuts.
    fn sql(&self, rows: usize) -> &str {
        let i = CHUNK_SIZES
            .iter()
            .position(|size| *size == rows)
            .expect("chunks come from sized_chunks");
        &self.texts[i]
    }
}

static INSERT_FIRST_BALLOTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "INSERT INTO votes (poll_id, user_id, vote_id, choices, voted_at, current) VALUES ",
        "(?, ?, ?, ?, ?, ?)",
        " ON CONFLICT DO NOTHING",
    )
});

static ADD_TO_COUNTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "WITH d(poll_id, id, n) AS (VALUES ",
        "(?, ?, ?)",
        ") UPDATE poll_options SET votes = votes + d.n FROM d \
         WHERE poll_options.poll_id = d.poll_id AND poll_options.id = d.id",
    )
});

static BUMP_VERSIONS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "WITH d(poll_id, n) AS (VALUES ",
        "(?, ?)",
        ") UPDATE polls SET version = version + 1, voters = voters + d.n FROM d \
         WHERE polls.id = d.poll_id",
    )
});

// One row per poll: its version and its counts packed as `option:votes,…` (`packed_pairs`).
static READ_COUNTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "SELECT id, version, (SELECT group_concat(o.id || ':' || o.votes, ',') \
         FROM poll_options o WHERE o.poll_id = polls.id) FROM polls WHERE id IN (",
        "?",
        ")",
    )
});

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
    /// Opens (creating it and its directory if missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
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
        tokio::spawn(group_commit(writer.clone(), jobs));
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

/// Flushes waiting for the group commit, at most, per transaction.
const GROUP_MAX: usize = 512;

/// A flush waiting for the group commit.
struct FlushJob {
    poll: PollId,
    allow_change: bool,
    votes: Arc<[Vote]>,
    reply: oneshot::Sender<Result<FlushOutcome, StoreError>>,
}

/// The embedded store's writer: applies every flush waiting at that moment in one
/// transaction, so 10,000 active polls cost one fsync per group, not 10,000 per flush
/// interval.
async fn group_commit(writer: SqlitePool, mut jobs: mpsc::Receiver<FlushJob>) {
    let mut batch = Vec::with_capacity(GROUP_MAX);
    while jobs.recv_many(&mut batch, GROUP_MAX).await > 0 {
        let results = match commit_group(&writer, &batch).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            // Why one by one then: a failure is rare (the aggregators validated the votes),
            // and one poll's failure must not fail the others.
            Err(e) => {
                tracing::debug!(error = %e, "flush group failed; applying its flushes one by one");
                let mut results = Vec::with_capacity(batch.len());
                for job in &batch {
                    results.push(commit_one(&writer, job).await);
                }
                results
            }
        };
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Every flush of the group in one transaction; all or nothing. Why no savepoint each: two
/// more statements per poll is what 10,000 active polls cannot afford.
async fn commit_group(
    writer: &SqlitePool,
    batch: &[FlushJob],
) -> Result<Vec<FlushOutcome>, StoreError> {
    let mut tx = writer.begin().await.map_err(err("begin flush"))?;
    let mut reused = Vec::new();
    let mut outcomes: Vec<Option<FlushOutcome>> = vec![None; batch.len()];
    let fixed: Vec<usize> = (0..batch.len())
        .filter(|i| !batch[*i].allow_change)
        .collect();
    // Why only with distinct polls: the statements below cannot tell two flushes of one
    // poll apart (a restarted aggregator's flush may still be queued behind its old one).
    let distinct: HashSet<PollId> = fixed.iter().map(|i| batch[*i].poll).collect();
    if distinct.len() == fixed.len() {
        let many = apply_first_ballots_of_many(&mut tx, batch, &fixed, &mut reused).await?;
        for (i, outcome) in fixed.iter().zip(many) {
            outcomes[*i] = Some(outcome);
        }
    }
    let mut done = Vec::with_capacity(batch.len());
    for (job, outcome) in batch.iter().zip(outcomes) {
        done.push(match outcome {
            Some(outcome) => outcome,
            None => apply_in(&mut tx, job, &mut reused).await?,
        });
    }
    tx.commit().await.map_err(err("commit flush"))?;
    sql_common::report_reused(reused.iter().map(|(poll, vote)| (*poll, vote)));
    Ok(done)
}

/// Parses `a:b` pairs separated by `separator`, as the flush statements pack them with
/// `group_concat`. Why packed: sqlx hands every row from its worker thread to the flush
/// one at a time, with allocations each; with thousands of polls in a group a row per
/// option and per ballot cost more than one row per poll (docs/BENCHMARKS.md, "Fast
/// paths").
fn packed_pairs<A: FromStr, B: FromStr>(
    text: &str,
    separator: char,
) -> Result<Vec<(A, B)>, StoreError> {
    text.split(separator)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| StoreError::new("flush", format!("malformed row {pair:?}")))
        })
        .collect()
}

/// Adds up, per poll and option, the ballots the ledger recorded above `watermark`.
async fn count_recorded(
    tx: &mut SqliteConnection,
    watermark: i64,
    inserted: &mut HashMap<PollId, i64>,
    deltas: &mut HashMap<PollId, BTreeMap<OptionId, i64>>,
) -> Result<(), StoreError> {
    // One row per poll, its ballots packed as `n:choices;…` (see `packed_pairs`). Why NOT
    // INDEXED: it pins the row id range; SQLite 3.40 planned this as a scan of the whole
    // ledger through its unique index (to group without sorting), a cost that grows with
    // every vote ever taken.
    let counted: Vec<(PollId, String)> = sqlx::query_as(
        "SELECT poll_id, group_concat(n || ':' || choices, ';') FROM \
         (SELECT poll_id, choices, COUNT(*) AS n FROM votes NOT INDEXED WHERE row_id > ? \
          GROUP BY poll_id, choices) GROUP BY poll_id",
    )
    .bind(watermark)
    .fetch_all(&mut *tx)
    .await
    .map_err(err("count the inserted votes"))?;
    for (poll, packed) in counted {
        for (n, choices) in packed_pairs::<i64, String>(&packed, ';')? {
            tally(inserted, deltas, poll, ballot::decode_choices(&choices), n);
        }
    }
    Ok(())
}

/// Finds, among votes the ledger did not take (`DO NOTHING`), those whose (poll, user, vote
/// id) it holds with another ballot: [`ballot::plan`]'s `reused`, for the flushes that skip
/// it. Why only here: when every vote was new none can be (the usual case reads nothing).
async fn find_reused(
    tx: &mut SqliteConnection,
    rows: &[(PollId, &Vote)],
    reused: &mut Reused,
) -> Result<(), StoreError> {
    let mut held: HashMap<(PollId, String, String), String> = HashMap::new();
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT poll_id, user_id, vote_id, choices FROM votes \
             WHERE (poll_id, user_id, vote_id) IN (VALUES ",
        );
        let mut list = q.separated(", ");
        for (poll, vote) in chunk {
            list.push("(")
                .push_bind_unseparated(*poll)
                .push_unseparated(", ")
                .push_bind_unseparated(&vote.user_id)
                .push_unseparated(", ")
                .push_bind_unseparated(vote.ledger_id())
                .push_unseparated(")");
        }
        q.push(")");
        let found: Vec<(PollId, String, String, String)> = q
            .build_query_as()
            .fetch_all(&mut *tx)
            .await
            .map_err(err("read the ledger's vote ids"))?;
        held.extend(found.into_iter().map(|(p, u, i, c)| ((p, u, i), c)));
    }
    for (poll, vote) in rows {
        let key = (*poll, vote.user_id.clone(), vote.ledger_id().to_owned());
        if let Some(choices) = held.get(&key)
            && !ballot::same_ballot(&ballot::decode_choices(choices), &vote.choices)
        {
            reused.push((*poll, (*vote).clone()));
        }
    }
    Ok(())
}

/// Records `n` ballots of `poll` choosing `options`.
fn tally(
    inserted: &mut HashMap<PollId, i64>,
    deltas: &mut HashMap<PollId, BTreeMap<OptionId, i64>>,
    poll: PollId,
    options: impl IntoIterator<Item = OptionId>,
    n: i64,
) {
    *inserted.entry(poll).or_default() += n;
    let poll_deltas = deltas.entry(poll).or_default();
    for option in options {
        *poll_deltas.entry(option).or_default() += n;
    }
}

/// The flushes `which` of polls where voters cannot change their vote. There
/// [`ballot::plan`] comes down to "insert, unless the voter has a ballot or the vote is in
/// the ledger": exactly what `ON CONFLICT DO NOTHING` on the ledger's two unique keys does,
/// without reading first. And all of them at once: a handful of statements for the whole
/// group instead of 3 + k for each poll, which is what 10,000 active polls spend their time
/// on.
async fn apply_first_ballots_of_many(
    tx: &mut SqliteConnection,
    batch: &[FlushJob],
    which: &[usize],
    reused: &mut Reused,
) -> Result<Vec<FlushOutcome>, StoreError> {
    let now = now_millis();
    let rows: Vec<(PollId, &Vote)> = which
        .iter()
        .flat_map(|i| batch[*i].votes.iter().map(move |v| (batch[*i].poll, v)))
        .collect();
    let mut deltas: HashMap<PollId, BTreeMap<OptionId, i64>> = HashMap::new();
    let mut inserted: HashMap<PollId, i64> = HashMap::new();
    // Why a watermark rather than `RETURNING`: returning every inserted row streamed each
    // one back through sqlx's worker channel (a string allocation and often a thread
    // wake-up per vote). Row ids only grow (AUTOINCREMENT) and this connection is the only
    // writer, so the rows above the watermark are exactly the ones this flush inserted.
    let watermark: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(row_id), 0) FROM votes")
        .fetch_one(&mut *tx)
        .await
        .map_err(err("read the ledger's last row"))?;
    let mut recorded = 0;
    for chunk in sized_chunks(&rows) {
        let mut q = sqlx::query(INSERT_FIRST_BALLOTS.sql(chunk.len()));
        for (poll, v) in chunk {
            q = q
                .bind(*poll)
                .bind(&v.user_id)
                .bind(v.ledger_id())
                .bind(ballot::encode_choices(&v.choices))
                .bind(v.voted_at.unwrap_or(now))
                .bind(true);
        }
        recorded += q
            .execute(&mut *tx)
            .await
            .map_err(err("insert votes into the ledger"))?
            .rows_affected();
    }
    if recorded == rows.len() as u64 {
        // Every vote was new, the usual case: they are the deltas, and the ledger need not
        // be read back (that query was a sixth of a many-poll flush group's time).
        for (poll, vote) in &rows {
            tally(
                &mut inserted,
                &mut deltas,
                *poll,
                vote.choices.iter().copied(),
                1,
            );
        }
    } else {
        // Some were repeats or replays (`DO NOTHING`): count what the ledger took.
        count_recorded(tx, watermark, &mut inserted, &mut deltas).await?;
        find_reused(tx, &rows, reused).await?;
    }
    let moves: Vec<(PollId, OptionId, i64)> = deltas
        .iter()
        .flat_map(|(poll, d)| d.iter().map(move |(option, n)| (*poll, *option, *n)))
        .collect();
    for chunk in sized_chunks(&moves) {
        let mut q = sqlx::query(ADD_TO_COUNTS.sql(chunk.len()));
        for (poll, option, n) in chunk {
            q = q.bind(*poll).bind(*option).bind(*n);
        }
        q.execute(&mut *tx).await.map_err(err("update counts"))?;
    }
    let bumps: Vec<(PollId, i64)> = inserted.iter().map(|(p, n)| (*p, *n)).collect();
    for chunk in sized_chunks(&bumps) {
        let mut q = sqlx::query(BUMP_VERSIONS.sql(chunk.len()));
        for (poll, n) in chunk {
            q = q.bind(*poll).bind(*n);
        }
        q.execute(&mut *tx)
            .await
            .map_err(err("bump poll versions"))?;
    }
    let polls: Vec<PollId> = which.iter().map(|i| batch[*i].poll).collect();
    let mut versions: HashMap<PollId, i64> = HashMap::new();
    let mut counts: HashMap<PollId, Vec<(OptionId, i64)>> = HashMap::new();
    for ids in sized_chunks(&polls) {
        let mut q = sqlx::query_as(READ_COUNTS.sql(ids.len()));
        for id in ids {
            q = q.bind(*id);
        }
        let found: Vec<(PollId, i64, Option<String>)> =
            q.fetch_all(&mut *tx).await.map_err(err("read counts"))?;
        for (poll, version, packed) in found {
            versions.insert(poll, version);
            let mut options = packed_pairs(packed.as_deref().unwrap_or(""), ',')?;
            // group_concat's order is unspecified; subscribers get the options in order.
            options.sort_unstable_by_key(|(option, _)| *option);
            counts.insert(poll, options);
        }
    }
    let none = BTreeMap::new();
    polls
        .iter()
        .map(|poll| {
            let seq = *versions
                .get(poll)
                .ok_or_else(|| StoreError::new("flush", format!("poll {poll} does not exist")))?;
            let all = sql_common::option_counts(counts.remove(poll).unwrap_or_default());
            let inserted = inserted.get(poll).copied().unwrap_or(0) as u64;
            Ok(sql_common::outcome(
                deltas.get(poll).unwrap_or(&none),
                inserted,
                seq,
                all,
            ))
        })
        .collect()
}

async fn commit_one(writer: &SqlitePool, job: &FlushJob) -> Result<FlushOutcome, StoreError> {
    let mut tx = writer.begin().await.map_err(err("begin flush"))?;
    let mut reused = Vec::new();
    let outcome = apply_in(&mut tx, job, &mut reused).await?;
    tx.commit().await.map_err(err("commit flush"))?;
    sql_common::report_reused(reused.iter().map(|(poll, vote)| (*poll, vote)));
    Ok(outcome)
}

/// Votes whose vote id the ledger held with another ballot (see [`ballot::BallotPlan::reused`]),
/// reported once their flush has committed.
type Reused = Vec<(PollId, Vote)>;

/// One poll's flush, inside a transaction (see [`group_commit`]).
async fn apply_in(
    tx: &mut SqliteConnection,
    job: &FlushJob,
    reused: &mut Reused,
) -> Result<FlushOutcome, StoreError> {
    if job.allow_change {
        apply_changes(tx, job.poll, &job.votes, reused).await
    } else {
        let job = std::slice::from_ref(job);
        let mut one = apply_first_ballots_of_many(tx, job, &[0], reused).await?;
        Ok(one.pop().expect("one outcome per flush"))
    }
}

/// Where voters may change their vote: read their ballots, plan, write.
async fn apply_changes(
    tx: &mut SqliteConnection,
    poll: PollId,
    votes: &[Vote],
    reused: &mut Reused,
) -> Result<FlushOutcome, StoreError> {
    let now = now_millis();
    let mut rows = Vec::new();
    for users in sized_chunks(&sql_common::voters_of(votes)) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT user_id, vote_id, choices, current FROM votes WHERE poll_id = ",
        );
        q.push_bind(poll).push(" AND user_id IN (");
        let mut list = q.separated(", ");
        for user in users {
            list.push_bind(*user);
        }
        q.push(")");
        let found: Vec<(String, String, String, bool)> = q
            .build_query_as()
            .fetch_all(&mut *tx)
            .await
            .map_err(err("read ballots"))?;
        rows.extend(found);
    }
    let plan = ballot::plan(true, &sql_common::ledger_view(rows), votes);
    reused.extend(plan.reused.iter().map(|v| (poll, (*v).clone())));
    // Why first: the partial unique index allows one current ballot per voter.
    for user in &plan.replaced {
        sqlx::query(
            "UPDATE votes SET current = FALSE WHERE poll_id = ? AND user_id = ? AND current",
        )
        .bind(poll)
        .bind(*user)
        .execute(&mut *tx)
        .await
        .map_err(err("replace ballots"))?;
    }
    for chunk in sized_chunks(&plan.inserts) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO votes (poll_id, user_id, vote_id, choices, voted_at, current) ",
        );
        q.push_values(chunk, |mut row, insert| {
            let v = insert.vote;
            row.push_bind(poll)
                .push_bind(&v.user_id)
                .push_bind(v.ledger_id())
                .push_bind(ballot::encode_choices(&v.choices))
                .push_bind(v.voted_at.unwrap_or(now))
                .push_bind(insert.current);
        });
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(err("insert votes into the ledger"))?;
    }
    let inserted = plan.inserts.len() as u64;
    finish_flush(tx, poll, &plan.deltas, inserted, plan.new_voters).await
}

/// Applies the count deltas, bumps the poll's version (when anything was recorded), and
/// reads every count back.
async fn finish_flush(
    tx: &mut SqliteConnection,
    poll: PollId,
    deltas: &BTreeMap<OptionId, i64>,
    inserted: u64,
    new_voters: i64,
) -> Result<FlushOutcome, StoreError> {
    for (option, n) in deltas {
        sqlx::query("UPDATE poll_options SET votes = votes + ? WHERE poll_id = ? AND id = ?")
            .bind(n)
            .bind(poll)
            .bind(option)
            .execute(&mut *tx)
            .await
            .map_err(err("update counts"))?;
    }
    let seq: i64 = if inserted > 0 {
        sqlx::query_scalar(
            "UPDATE polls SET version = version + 1, voters = voters + ? WHERE id = ? \
             RETURNING version",
        )
        .bind(new_voters)
        .bind(poll)
        .fetch_one(&mut *tx)
        .await
    } else {
        sqlx::query_scalar("SELECT version FROM polls WHERE id = ?")
            .bind(poll)
            .fetch_one(&mut *tx)
            .await
    }
    .map_err(err("bump poll version"))?;
    let all = SqliteStore::counts(tx, poll).await?;
    Ok(sql_common::outcome(deltas, inserted, seq, all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollcast_actors::PollSettings;

    #[test]
    fn chunks_come_in_a_handful_of_lengths_and_cover_every_item() {
        let items: Vec<usize> = (0..2_357).collect();
        let chunks: Vec<&[usize]> = sized_chunks(&items).collect();
        let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(
            lengths,
            [1000, 1000, 200, 40, 40, 40, 8, 8, 8, 8, 1, 1, 1, 1, 1]
        );
        assert_eq!(chunks.concat(), items);
        assert_eq!(sized_chunks::<u8>(&[]).count(), 0);
    }

    #[test]
    fn statements_have_one_placeholder_group_per_row() {
        let sql = BUMP_VERSIONS.sql(8);
        assert_eq!(sql.matches("(?, ?)").count(), 8);
        assert!(sql.starts_with("WITH d(poll_id, n) AS (VALUES (?, ?), (?, ?),"));
        assert_eq!(READ_COUNTS.sql(1).matches('?').count(), 1);
    }

    #[test]
    fn packed_rows_parse_into_pairs_and_malformed_ones_are_errors() {
        assert_eq!(
            packed_pairs::<i64, String>("3:1;2:1,3", ';').unwrap(),
            [(3, "1".to_string()), (2, "1,3".to_string())]
        );
        assert_eq!(packed_pairs::<i64, i64>("", ',').unwrap(), []);
        assert!(packed_pairs::<i64, i64>("1:x", ',').is_err());
        assert!(packed_pairs::<i64, i64>("17", ',').is_err());
    }

    #[tokio::test]
    async fn flushes_committed_together_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
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
        let store = SqliteStore::open(&url).await.unwrap();
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
}
