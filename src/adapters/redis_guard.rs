//! The production [`DedupGuard`]: Redis `SET vote:{pollId}:{userId} {voteId} NX GET EX ttl`.
//!
//! One multiplexed connection shared by every request, re-established by the connection
//! manager when Redis comes back; every command is bounded by a timeout so a dead Redis turns
//! into a prompt 503 rather than hung requests.

use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{Claim, DedupGuard, GuardError, PollId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Connection and key settings (from `[dedup]` in config.toml).
#[derive(Debug, Clone)]
pub struct RedisGuardSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prepended to every key (`""` keeps the seed app's `vote:{pollId}:{userId}`).
    pub key_prefix: String,
    /// Claim lifetime.
    pub ttl: Duration,
    /// Longest a command (or a reconnection attempt) may take.
    pub timeout: Duration,
}

/// A [`DedupGuard`] in Redis.
#[derive(Clone)]
pub struct RedisGuard {
    conn: ConnectionManager,
    key_prefix: String,
    ttl_secs: u64,
    timeout: Duration,
}

impl RedisGuard {
    /// Prepares the connection; it is opened on first use, so pollcast starts (and reports
    /// not-ready) while Redis is down.
    pub fn connect(settings: RedisGuardSettings) -> Result<Self, GuardError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| GuardError::new("parse dedup.redis_url", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| GuardError::new("configure the Redis connection", e))?;
        Ok(Self {
            conn,
            key_prefix: settings.key_prefix,
            ttl_secs: settings.ttl.as_secs().max(1),
            timeout: settings.timeout,
        })
    }

    fn key(&self, poll: PollId, user: &str) -> String {
        format!("{}vote:{poll}:{user}", self.key_prefix)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, GuardError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(GuardError::new(what, e)),
            Err(_) => Err(GuardError::new(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }
}

#[async_trait]
impl DedupGuard for RedisGuard {
    async fn claim(&self, poll: PollId, user: &str, vote_id: &str) -> Result<Claim, GuardError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(poll, user))
            .arg(vote_id)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(self.ttl_secs);
        // SET NX GET (Redis 7) sets the key only if it is absent and answers with the value it
        // found: nil when this vote claimed it, else the vote id of the vote that holds it. One
        // atomic step, where the seed app raced a GET against a later SET.
        let holder: Option<String> = self.run("claim", &cmd).await?;
        Ok(match holder {
            None => Claim::Fresh,
            Some(id) if id == vote_id => Claim::Retry,
            Some(_) => Claim::Taken,
        })
    }

    async fn release(&self, poll: PollId, user: &str) -> Result<(), GuardError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(poll, user));
        self.run::<i64>("release", &cmd).await.map(|_| ())
    }

    async fn ping(&self) -> Result<(), GuardError> {
        self.run::<String>("ping", &redis::cmd("PING"))
            .await
            .map(|_| ())
    }
}
