//! The embedded [`PollStore`]: SQLite through sqlx, migrated on open.

use std::collections::{BTreeMap, HashMap};

use super::sql_common::{self, LIST_LIMIT, PollRow};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, NewPoll, OptionCount, Poll, PollId, PollOption, PollStore, StoreError, Vote,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

/// Rows per multi-row INSERT (4 bound parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 1000;

/// A [`PollStore`] in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: SQLite has a single writer, and queueing in the pool is cheaper than
    /// spinning on SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
}

fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::new(what, e)
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
            .connect_with(options.read_only(true))
            .await
            .map_err(err("open the database for reading"))?;
        Ok(Self { writer, readers })
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

    async fn polls_where(&self, filter: &str, bind: Option<i64>) -> Result<Vec<Poll>, sqlx::Error> {
        // Why a transaction: a poll's version and its counts are read by two statements, and
        // a flush committing between them would pair an old `seq` with newer counts. In WAL
        // mode a read transaction sees one snapshot.
        let mut conn = self.readers.begin().await?;
        let sql = format!(
            "SELECT id, question, created_at, closed_at, version FROM polls {filter} \
             ORDER BY id DESC LIMIT {LIST_LIMIT}"
        );
        let mut query = sqlx::query(&sql);
        if let Some(v) = bind {
            query = query.bind(v);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<PollId> = rows.iter().map(|r| r.get(0)).collect();
        let options = Self::options_of(&mut conn, &ids).await?;
        let rows = rows
            .into_iter()
            .map(|r| PollRow {
                id: r.get(0),
                question: r.get(1),
                created_at: r.get(2),
                closed_at: r.get(3),
                version: r.get(4),
            })
            .collect();
        conn.commit().await?;
        Ok(sql_common::assemble(rows, options))
    }
}

#[async_trait]
impl PollStore for SqliteStore {
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError> {
        let created_at = now_millis();
        let mut tx = self.writer.begin().await.map_err(err("create poll"))?;
        let id: PollId = sqlx::query_scalar(
            "INSERT INTO polls (question, created_at) VALUES (?, ?) RETURNING id",
        )
        .bind(&poll.question)
        .bind(created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(err("create poll"))?;
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

    async fn list_polls(&self) -> Result<Vec<Poll>, StoreError> {
        self.polls_where("", None).await.map_err(err("list polls"))
    }

    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let polls = self
            .polls_where("WHERE id = ?", Some(id))
            .await
            .map_err(err("get poll"))?;
        Ok(polls.into_iter().next())
    }

    async fn close_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let updated =
            sqlx::query("UPDATE polls SET closed_at = COALESCE(closed_at, ?) WHERE id = ?")
                .bind(now_millis())
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(err("close poll"))?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_poll(id).await
    }

    async fn apply_votes(&self, poll: PollId, votes: &[Vote]) -> Result<FlushOutcome, StoreError> {
        let now = now_millis();
        let mut tx = self.writer.begin().await.map_err(err("begin flush"))?;
        let mut counted: BTreeMap<i64, i64> = BTreeMap::new();
        for chunk in votes.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO votes (poll_id, user_id, option_id, voted_at) ",
            );
            q.push_values(chunk, |mut row, v| {
                row.push_bind(poll)
                    .push_bind(&v.user_id)
                    .push_bind(v.option_id)
                    .push_bind(v.voted_at.unwrap_or(now));
            });
            // Why DO NOTHING + RETURNING: the rows returned are exactly the votes not yet in
            // the ledger, so a replayed vote increments nothing.
            q.push(" ON CONFLICT (poll_id, user_id) DO NOTHING RETURNING option_id");
            let inserted: Vec<i64> = q
                .build_query_scalar()
                .fetch_all(&mut *tx)
                .await
                .map_err(err("insert votes into the ledger"))?;
            for option in inserted {
                *counted.entry(option).or_default() += 1;
            }
        }
        for (option, n) in &counted {
            sqlx::query("UPDATE poll_options SET votes = votes + ? WHERE poll_id = ? AND id = ?")
                .bind(n)
                .bind(poll)
                .bind(option)
                .execute(&mut *tx)
                .await
                .map_err(err("increment counts"))?;
        }
        let seq: i64 = if !counted.is_empty() {
            sqlx::query_scalar(
                "UPDATE polls SET version = version + 1 WHERE id = ? RETURNING version",
            )
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
        let all: Vec<OptionCount> =
            sqlx::query("SELECT id, votes FROM poll_options WHERE poll_id = ? ORDER BY id")
                .bind(poll)
                .fetch_all(&mut *tx)
                .await
                .map_err(err("read counts"))?
                .into_iter()
                .map(|r| OptionCount {
                    option_id: r.get(0),
                    new_count: r.get(1),
                })
                .collect();
        tx.commit().await.map_err(err("commit flush"))?;
        Ok(sql_common::outcome(&counted, seq, all))
    }

    async fn voters_since(&self, since: UnixMillis) -> Result<Vec<(PollId, String)>, StoreError> {
        let rows = sqlx::query("SELECT poll_id, user_id FROM votes WHERE voted_at >= ?")
            .bind(since)
            .fetch_all(&self.readers)
            .await
            .map_err(err("list recent voters"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.readers)
            .await
            .map_err(err("ping"))?;
        Ok(())
    }
}
