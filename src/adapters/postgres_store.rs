//! The production [`PollStore`]: Postgres through sqlx, schema in `migrations/postgres`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::domain::{UnixMillis, now_millis};
use pollcast_actors::{
    FlushOutcome, NewPoll, OptionCount, Poll, PollId, PollOption, PollStore, StoreError, Vote,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Row};

use super::sql_common::{self, LIST_LIMIT, PollRow};

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
    pool: PgPool,
}

fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::new(what, e)
}

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
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    /// Applies pending migrations (idempotent; serialised by sqlx's advisory lock, so several
    /// processes may start at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::new("migrate the database", e))
    }

    async fn polls_where(&self, id: Option<PollId>) -> Result<Vec<Poll>, sqlx::Error> {
        // Why REPEATABLE READ: the version and the counts are two statements, and a flush
        // committing between them would pair an old `seq` with newer counts.
        let mut conn = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *conn)
            .await?;
        let rows = sqlx::query(
            "SELECT id, question, created_at, closed_at, version FROM polls \
             WHERE ($1::BIGINT IS NULL OR id = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(LIST_LIMIT)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<PollRow> = rows
            .into_iter()
            .map(|r| PollRow {
                id: r.get(0),
                question: r.get(1),
                created_at: r.get(2),
                closed_at: r.get(3),
                version: r.get(4),
            })
            .collect();
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

#[async_trait]
impl PollStore for PostgresStore {
    async fn create_poll(&self, poll: NewPoll) -> Result<Poll, StoreError> {
        let created_at = now_millis();
        let mut tx = self.pool.begin().await.map_err(err("create poll"))?;
        let id: PollId = sqlx::query_scalar(
            "INSERT INTO polls (question, created_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(&poll.question)
        .bind(created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(err("create poll"))?;
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

    async fn list_polls(&self) -> Result<Vec<Poll>, StoreError> {
        self.polls_where(None).await.map_err(err("list polls"))
    }

    async fn get_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let polls = self.polls_where(Some(id)).await.map_err(err("get poll"))?;
        Ok(polls.into_iter().next())
    }

    async fn close_poll(&self, id: PollId) -> Result<Option<Poll>, StoreError> {
        let updated =
            sqlx::query("UPDATE polls SET closed_at = COALESCE(closed_at, $1) WHERE id = $2")
                .bind(now_millis())
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(err("close poll"))?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_poll(id).await
    }

    async fn apply_votes(&self, poll: PollId, votes: &[Vote]) -> Result<FlushOutcome, StoreError> {
        let now = now_millis();
        let users: Vec<&str> = votes.iter().map(|v| v.user_id.as_str()).collect();
        let options: Vec<i64> = votes.iter().map(|v| v.option_id).collect();
        let times: Vec<i64> = votes.iter().map(|v| v.voted_at.unwrap_or(now)).collect();
        let mut tx = self.pool.begin().await.map_err(err("begin flush"))?;
        // Why one set-based INSERT: the whole batch is one round trip, and the rows RETURNING
        // gives back are exactly the votes not yet in the ledger, so a replay counts nothing.
        let counted: BTreeMap<i64, i64> = sqlx::query(
            "WITH inserted AS ( \
                 INSERT INTO votes (poll_id, user_id, option_id, voted_at) \
                 SELECT $1, u, o, t FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS v(u, o, t) \
                 ON CONFLICT (poll_id, user_id) DO NOTHING \
                 RETURNING option_id) \
             SELECT option_id, COUNT(*) FROM inserted GROUP BY option_id",
        )
        .bind(poll)
        .bind(&users)
        .bind(&options)
        .bind(&times)
        .fetch_all(&mut *tx)
        .await
        .map_err(err("insert votes into the ledger"))?
        .into_iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
        .collect();
        let seq: i64 = if counted.is_empty() {
            sqlx::query_scalar("SELECT version FROM polls WHERE id = $1")
                .bind(poll)
                .fetch_one(&mut *tx)
                .await
        } else {
            let (ids, ns): (Vec<i64>, Vec<i64>) = counted.iter().map(|(k, v)| (*k, *v)).unzip();
            sqlx::query(
                "UPDATE poll_options SET votes = votes + d.n \
                 FROM UNNEST($2::BIGINT[], $3::BIGINT[]) AS d(id, n) \
                 WHERE poll_options.poll_id = $1 AND poll_options.id = d.id",
            )
            .bind(poll)
            .bind(&ids)
            .bind(&ns)
            .execute(&mut *tx)
            .await
            .map_err(err("increment counts"))?;
            sqlx::query_scalar(
                "UPDATE polls SET version = version + 1 WHERE id = $1 RETURNING version",
            )
            .bind(poll)
            .fetch_one(&mut *tx)
            .await
        }
        .map_err(err("bump poll version"))?;
        let all: Vec<OptionCount> =
            sqlx::query("SELECT id, votes FROM poll_options WHERE poll_id = $1 ORDER BY id")
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
        let rows = sqlx::query("SELECT poll_id, user_id FROM votes WHERE voted_at >= $1")
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(err("list recent voters"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(err("ping"))?;
        Ok(())
    }
}
