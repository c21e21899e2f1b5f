//! The production [`PollStore`]: Postgres through sqlx, schema in `migrations/postgres`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::ballot;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, LedgerRow, NewPoll, OptionCount, OptionId, Poll, PollId, PollOption, PollPage,
    PollStore, StoreError, Vote, Voter,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Row};

use super::sql_common::{self, LIST_LIMIT, LedgerMarks, POLL_COLUMNS, PollRow, err, poll_row};

/// Pool sizing and timeouts (from `[store]` in config.toml).
#[derive(Debug, Clone, Copy)]
pub struct PgPoolSettings {
    /// Connections at most.
    pub max_connections: u32,
    /// Longest wait for a connection from the pool (and to open one).
    pub acquire_timeout: Duration,
    /// Longest a single statement may run.
    pub statement_timeout: Duration,
}

/// A [`PollStore`] in Postgres.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    /// Writes and reads: Postgres has no single-writer limit, so `readers` is the same pool
    /// (two names, so that the statements shared with SQLite name the pool they need).
    writer: PgPool,
    readers: PgPool,
    /// The vote path's own connections (closed flags). Why its own: listing, exports and
    /// snapshots queue on `writer`, and a vote must never wait behind them.
    flags: PgPool,
    /// The hour this process last marked in the ledger (see [`LedgerMarks`]).
    marks: LedgerMarks,
}

/// Connections of the vote path's own pool.
const FLAG_CONNECTIONS: u32 = 2;

/// The migrations of the Postgres schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl PostgresStore {
    /// Connects lazily: the pool opens connections on first use, so pollcast starts (and
    /// reports not-ready) while Postgres is down, and recovers when it comes back.
    pub fn connect(url: &str, settings: PgPoolSettings) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(err("parse store.url"))?;
        let statement_timeout = settings.statement_timeout.as_millis().to_string();
        let options = options
            .application_name("pollcast")
            .options([("statement_timeout", statement_timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.clone());
        let flags = PgPoolOptions::new()
            .max_connections(FLAG_CONNECTIONS)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self {
            readers: pool.clone(),
            writer: pool,
            flags,
            marks: LedgerMarks::default(),
        })
    }

    /// Applies pending migrations (idempotent; serialised by sqlx's advisory lock, so several
    /// processes may start at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::new("migrate the database", e))
    }

    /// The polls among `ids` (at most [`LIST_LIMIT`]), or a page of the newest.
    async fn polls_where(
        &self,
        ids: Option<&[PollId]>,
        page: PollPage,
    ) -> Result<Vec<Poll>, sqlx::Error> {
        // Why REPEATABLE READ: the version and the counts are two statements, and a flush
        // committing between them would pair an old `seq` with newer counts.
        let mut conn = self.writer.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *conn)
            .await?;
        let sql = format!(
            "SELECT {POLL_COLUMNS} FROM polls \
             WHERE ($1::BIGINT[] IS NULL OR id = ANY($1)) AND id < $3 \
             ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(ids)
            .bind(page.limit.min(LIST_LIMIT))
            .bind(page.before.unwrap_or(PollId::MAX))
            .fetch_all(&mut *conn)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<PollRow> = rows.iter().map(|r| poll_row!(r)).collect();
        let ids: Vec<PollId> = rows.iter().map(|r| r.id).collect();
        let options = Self::options_of(&mut conn, &ids).await?;
        conn.commit().await?;
        Ok(sql_common::assemble(rows, options))
    }

    async fn options_of(
        conn: &mut PgConnection,
        ids: &[PollId],
    ) -> Result<HashMap<PollId, Vec<PollOption>>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT poll_id, id, text, votes FROM poll_options \
             WHERE poll_id = ANY($1) ORDER BY poll_id, id",
        )
        .bind(ids)
        .fetch_all(conn)
        .await?;
        let mut out: HashMap<PollId, Vec<PollOption>> = HashMap::new();
        for row in rows {
            out.entry(row.get(0)).or_default().push(PollOption {
                id: row.get(1),
                text: row.get(2),
                votes: row.get(3),
            });
        }
        Ok(out)
    }
}

sql_common::same_in_both_dialects!(PostgresStore, PgConnection);

/// Every ballot of some voters (`$2`) of a poll (`$1`): the current ones through
/// `votes_one_ballot`, the replaced ones through `votes_replaced`. Why two halves: each
/// index holds only its half of the rows (migration `0004_ledger_lean_keys` says why).
const BALLOTS_OF_VOTERS: &str = "SELECT user_id, vote_id, choices, current FROM votes \
     WHERE poll_id = $1 AND user_id = ANY($2) AND current \
     UNION ALL SELECT user_id, vote_id, choices, current FROM votes \
     WHERE poll_id = $1 AND user_id = ANY($2) AND NOT current";

/// A flush's two ways (see `apply_votes`), and the statements they share.
impl PostgresStore {
    /// The fast path for a poll whose ballots cannot change, when every vote of the flush is
    /// new: [`ballot::plan`] then comes down to "insert each, count each", and the ledger's
    /// two unique keys can tell whether that holds: a plain insert of the whole flush fails
    /// on the first vote that was a repeat or a replay. So no ledger read, a probe per
    /// voter (docs/BENCHMARKS.md, "Fast paths"). `None`, with nothing written, when some vote
    /// was not new. Why not `ON CONFLICT DO NOTHING`: Postgres inserts each row
    /// speculatively then, with a WAL record more per vote, which cost more than the read
    /// saved (measured there too). The store contract's random histories check both ways
    /// against the rule.
    async fn apply_first_ballots(
        &self,
        poll: PollId,
        votes: &[Vote],
    ) -> Result<Option<FlushOutcome>, StoreError> {
        let mut tx = self.writer.begin().await.map_err(err("begin flush"))?;
        Self::lock_poll(&mut tx, poll).await?;
        let rows = votes.iter().map(|v| (v, true));
        let inserted = match Self::insert_ballots(&mut tx, poll, rows).await {
            Ok(inserted) => inserted,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                tx.rollback().await.map_err(err("roll back flush"))?;
                return Ok(None);
            }
            Err(e) => return Err(err("insert votes into the ledger")(e)),
        };
        let mut deltas = BTreeMap::new();
        for choice in votes.iter().flat_map(|v| &v.choices) {
            *deltas.entry(*choice).or_insert(0) += 1;
        }
        let (seq, all) = Self::count_in(&mut tx, poll, &deltas, inserted as i64).await?;
        tx.commit().await.map_err(err("commit flush"))?;
        Ok(Some(sql_common::outcome(&deltas, inserted, seq, all)))
    }

    /// Reads the flush's voters' ballots from the ledger and applies [`ballot::plan`].
    async fn apply_by_plan(
        &self,
        poll: PollId,
        allow_change: bool,
        votes: &[Vote],
    ) -> Result<FlushOutcome, StoreError> {
        let mut tx = self.writer.begin().await.map_err(err("begin flush"))?;
        Self::lock_poll(&mut tx, poll).await?;
        let rows: Vec<(String, String, String, bool)> = sqlx::query_as(BALLOTS_OF_VOTERS)
            .bind(poll)
            .bind(sql_common::voters_of(votes))
            .fetch_all(&mut *tx)
            .await
            .map_err(err("read ballots"))?;
        let plan = ballot::plan(allow_change, &sql_common::ledger_view(rows), votes);
        let (seq, all) = if plan.is_empty() {
            let seq = sqlx::query_scalar("SELECT version FROM polls WHERE id = $1")
                .bind(poll)
                .fetch_one(&mut *tx)
                .await
                .map_err(err("read poll version"))?;
            (seq, Self::counts(&mut tx, poll).await?)
        } else {
            if !plan.replaced.is_empty() {
                // Why first: the partial unique index allows one current ballot per voter.
                sqlx::query(
                    "UPDATE votes SET current = FALSE \
                     WHERE poll_id = $1 AND user_id = ANY($2) AND current",
                )
                .bind(poll)
                .bind(&plan.replaced)
                .execute(&mut *tx)
                .await
                .map_err(err("replace ballots"))?;
            }
            let rows = plan.inserts.iter().map(|i| (i.vote, i.current));
            Self::insert_ballots(&mut tx, poll, rows)
                .await
                .map_err(err("insert votes into the ledger"))?;
            Self::count_in(&mut tx, poll, &plan.deltas, plan.new_voters).await?
        };
        tx.commit().await.map_err(err("commit flush"))?;
        sql_common::report_reused(plan.reused.iter().map(|v| (poll, *v)));
        Ok(sql_common::outcome(
            &plan.deltas,
            plan.inserts.len() as u64,
            seq,
            all,
        ))
    }

    /// Why FOR UPDATE: during a partition hand-over two processes may flush the same poll
    /// for a moment; the ledger reads and writes that follow must not race. A poll that does
    /// not exist fails the flush here.
    async fn lock_poll(tx: &mut PgConnection, poll: PollId) -> Result<(), StoreError> {
        sqlx::query("SELECT id FROM polls WHERE id = $1 FOR UPDATE")
            .bind(poll)
            .fetch_one(&mut *tx)
            .await
            .map_err(err("lock poll"))?;
        Ok(())
    }

    /// Appends `rows` (each vote and whether it is the voter's current ballot) to the
    /// ledger; how many went in. Why `COPY` and not `INSERT ... SELECT FROM UNNEST`: COPY
    /// writes a page of rows per heap insert and WAL record, not a row each: Postgres spent
    /// 17-25 % less CPU per ballot (docs/BENCHMARKS.md, "Catch-up and one hot poll").
    /// Like the insert, it fails whole on the first repeat of a ledger key.
    async fn insert_ballots<'a>(
        tx: &mut PgConnection,
        poll: PollId,
        rows: impl ExactSizeIterator<Item = (&'a Vote, bool)>,
    ) -> Result<u64, sqlx::Error> {
        let data = ledger_copy_data(poll, now_millis(), rows);
        let mut copy = tx
            .copy_in_raw(
                "COPY votes (poll_id, user_id, vote_id, choices, voted_at, current) \
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        copy.send(data).await?;
        copy.finish().await
    }

    /// Adds `deltas` to the counts and `new_voters` to the poll's voters, bumping its
    /// version; the new version and every count.
    async fn count_in(
        tx: &mut PgConnection,
        poll: PollId,
        deltas: &BTreeMap<OptionId, i64>,
        new_voters: i64,
    ) -> Result<(i64, Vec<OptionCount>), StoreError> {
        let (options, deltas): (Vec<i64>, Vec<i64>) = deltas.iter().map(|(k, v)| (*k, *v)).unzip();
        sqlx::query(
            "UPDATE poll_options SET votes = votes + d.n \
             FROM UNNEST($2::BIGINT[], $3::BIGINT[]) AS d(id, n) \
             WHERE poll_options.poll_id = $1 AND poll_options.id = d.id",
        )
        .bind(poll)
        .bind(&options)
        .bind(&deltas)
        .execute(&mut *tx)
        .await
        .map_err(err("update counts"))?;
        let seq: i64 = sqlx::query_scalar(
            "UPDATE polls SET version = version + 1, voters = voters + $2 WHERE id = $1 \
             RETURNING version",
        )
        .bind(poll)
        .bind(new_voters)
        .fetch_one(&mut *tx)
        .await
        .map_err(err("bump poll version"))?;
        Ok((seq, Self::counts(&mut *tx, poll).await?))
    }
}

#[async_trait]
impl PollStore for PostgresStore {
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError> {
        let created_at = now_millis();
        let mut tx = self.writer.begin().await.map_err(err("create poll"))?;
        let id = Self::insert_poll_row(&mut tx, &poll, created_at).await?;
        sqlx::query(
            "INSERT INTO poll_options (poll_id, id, text) \
             SELECT $1, ord, text FROM UNNEST($2::TEXT[]) WITH ORDINALITY AS o(text, ord)",
        )
        .bind(id)
        .bind(&poll.options)
        .execute(&mut *tx)
        .await
        .map_err(err("create poll options"))?;
        tx.commit().await.map_err(err("create poll"))?;
        Ok(sql_common::created(id, poll, created_at))
    }

    async fn list_polls(&self, page: PollPage) -> Result<Vec<Poll>, StoreError> {
        self.polls_where(None, page)
            .await
            .map_err(err("list polls"))
    }

    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let polls = self.polls_where(Some(&[id]), PollPage::ALL).await;
        Ok(polls.map_err(err("get poll"))?.into_iter().next())
    }

    async fn get_polls(&self, ids: &[PollId]) -> Result<Vec<Poll>, StoreError> {
        let mut polls = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LIST_LIMIT as usize) {
            let read = self.polls_where(Some(chunk), PollPage::ALL).await;
            polls.extend(read.map_err(err("get polls"))?);
        }
        Ok(polls)
    }

    async fn is_closed(&self, id: PollId) -> Result<Option<bool>, StoreError> {
        self.closed_flag(id).await
    }

    async fn closed_among(&self, ids: &[PollId]) -> Result<Vec<PollId>, StoreError> {
        sqlx::query_scalar("SELECT id FROM polls WHERE closed_at IS NOT NULL AND id = ANY($1)")
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
        // Why a task of its own: a flush must not be dropped midway through its `COPY`.
        // sqlx does not count a COPY's outstanding replies as it does a statement's, so a
        // connection let go between the COPY's end and its reply would go back to the pool
        // out of step with the server. Left to run, the flush commits or fails whole; a
        // caller that went away replays its votes from the log, and the ledger's keys
        // refuse them a second time.
        let store = self.clone();
        tokio::spawn(async move {
            (store.marks)
                .before_flush(&store.writer, LedgerMarks::MARK_POSTGRES)
                .await;
            if !allow_change && let Some(outcome) = store.apply_first_ballots(poll, &votes).await? {
                return Ok(outcome);
            }
            // A poll whose ballots may change, or a flush with a repeat or a replay in it:
            // read the ledger and let the ballot rule decide.
            store.apply_by_plan(poll, allow_change, &votes).await
        })
        .await
        .map_err(|e| StoreError::new("flush votes", e))?
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

/// Ledger rows in the binary form of `COPY` (PostgreSQL 15 docs, "COPY", "Binary Format"):
/// a header, then per row its field count and each field as a length and its bytes in
/// network order, then -1. Columns as in [`PostgresStore::insert_ballots`]' statement.
fn ledger_copy_data<'a>(
    poll: PollId,
    now: UnixMillis,
    rows: impl ExactSizeIterator<Item = (&'a Vote, bool)>,
) -> Vec<u8> {
    fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
        let len = i32::try_from(bytes.len()).expect("a ledger field is far below 2 GiB");
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(bytes);
    }
    const COLUMNS: i16 = 6;
    let mut buf = Vec::with_capacity(19 + rows.len() * 96 + 2);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for (vote, current) in rows {
        buf.extend_from_slice(&COLUMNS.to_be_bytes());
        field(&mut buf, &poll.to_be_bytes());
        field(&mut buf, vote.user_id.as_bytes());
        field(&mut buf, vote.ledger_id().as_bytes());
        field(&mut buf, ballot::encode_choices(&vote.choices).as_bytes());
        field(&mut buf, &vote.voted_at.unwrap_or(now).to_be_bytes());
        field(&mut buf, &[u8::from(current)]);
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of its own on the test Postgres (`POLLCAST_TEST_POSTGRES`, which
    /// `scripts/test` sets), migrated; dropped by the caller.
    async fn migrated_database() -> (PgPool, PgPool, String) {
        let admin_url = std::env::var("POLLCAST_TEST_POSTGRES")
            .expect("POLLCAST_TEST_POSTGRES names the test Postgres (scripts/test sets it)");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .unwrap();
        let name = pollcast_actors::ids::random_id("pollcast_unit_");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("POLLCAST_TEST_POSTGRES has no database: {admin_url}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .unwrap();
        (admin, pool, name)
    }

    #[tokio::test]
    async fn ledger_reads_use_its_indexes() {
        let (admin, pool, name) = migrated_database().await;
        let mut conn = pool.acquire().await.unwrap();
        // Why no seq scans: on a nearly empty table the planner scans whatever indexes
        // exist; forbidding it asks whether an index can serve the read at all.
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        let users = vec!["u1".to_string(), "u2".to_string()];
        for (what, sql, index) in [
            (
                "every ballot of some voters",
                BALLOTS_OF_VOTERS,
                "votes_replaced",
            ),
            (
                "a page of the ledger",
                sql_common::LEDGER_PAGE,
                "votes_by_poll",
            ),
        ] {
            let explain = format!("EXPLAIN {sql}");
            let q = sqlx::query_scalar::<_, String>(&explain).bind(1_i64);
            let q = if sql.contains("$3") {
                q.bind(0_i64).bind(100_i64)
            } else {
                q.bind(&users)
            };
            let plan = q.fetch_all(&mut *conn).await.unwrap().join("\n");
            assert!(
                !plan.contains("Seq Scan"),
                "{what} scans the ledger:\n{plan}"
            );
            assert!(plan.contains(index), "{what} does not use {index}:\n{plan}");
        }
        drop(conn);
        pool.close().await;
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
    }
}
