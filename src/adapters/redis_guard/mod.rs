//! The production [`DedupGuard`]: Redis `SET vote:{pollId}:{userId} {claim} NX GET EX ttl`.
//!
//! The key is the seed app's. A claim's value is `{voteId}␟{ballot}␟{attempt}` (␟ is the
//! unit separator, U+001F, which vote ids cannot contain; the ballot its options sorted,
//! `1,3`; the attempt 16 hex digits). A value without a separator is a claim written by an
//! older pollcast, the vote id alone: its ballot is unknown (the same id is then a retry,
//! whatever the options), and no attempt of this version releases it.
//!
//! One multiplexed connection shared by every request, re-established by the connection
//! manager when Redis comes back; every command is bounded by a timeout so a dead Redis turns
//! into a prompt 503 rather than hung requests. Claims made at the same time go to Redis
//! together, in one pipeline (`claims.rs`).

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::ballot;
use pollcast_actors::{Claim, DedupGuard, GuardError, PollId, Vote};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use self::claims::Claims;
use crate::background::Background;

mod claims;

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
    claims: Claims,
    key_prefix: String,
    timeout: Duration,
}

impl RedisGuard {
    /// Prepares the connection; it is opened on first use, so pollcast starts (and reports
    /// not-ready) while Redis is down. The task that pipelines claims runs in `background`.
    pub fn connect(
        settings: RedisGuardSettings,
        background: &Background,
    ) -> Result<Self, GuardError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| GuardError::new("parse dedup.redis_url", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| GuardError::new("configure the Redis connection", e))?;
        let ttl_secs = settings.ttl.as_secs().max(1);
        Ok(Self {
            claims: Claims::start(conn.clone(), ttl_secs, settings.timeout, background),
            conn,
            key_prefix: settings.key_prefix,
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
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    /// Waits at most the timeout for a command's answer.
    async fn bounded<T>(
        &self,
        what: &'static str,
        answer: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, GuardError> {
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(GuardError::new(what, e)),
            Err(_) => Err(GuardError::new(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }
}

/// Separates the parts of a claim's value.
const SEP: char = '\u{1f}';

/// Replaces a claim by the retry's only while it still holds the same vote: `KEYS[1]` the
/// key, `ARGV[1]` the value read, `ARGV[2]` the retry's. Keeps the TTL.
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
";

/// Deletes a claim only while the attempt `ARGV[1]` (the value's last part, separator
/// included) holds it: compare and delete in one step.
const RELEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and #held > #ARGV[1] and string.sub(held, -#ARGV[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

static TAKE_OVER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE_OVER));
static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// What a claim's value says about the vote `vote_id` with ballot `ballot` (canonical).
fn classify(held: &str, vote_id: &str, ballot: &str) -> Claim {
    let mut parts = held.split(SEP);
    let holder = parts.next().unwrap_or_default();
    if holder != vote_id {
        return Claim::Taken;
    }
    match parts.next() {
        // An older pollcast's claim: the ballot is unknown, the ledger checks it.
        None => Claim::Retry,
        Some(held_ballot) if held_ballot == ballot => Claim::Retry,
        Some(_) => Claim::Reused,
    }
}

/// The suffix of a claim's value that names attempt `attempt`.
fn attempt_suffix(attempt: u64) -> String {
    format!("{SEP}{attempt:016x}")
}

#[async_trait]
impl DedupGuard for RedisGuard {
    async fn claim(&self, vote: &Vote, attempt: u64) -> Result<Claim, GuardError> {
        let key = self.key(vote.poll_id, &vote.user_id);
        let ballot = ballot::canonical_choices(&vote.choices);
        let value = format!(
            "{}{SEP}{ballot}{}",
            vote.ledger_id(),
            attempt_suffix(attempt)
        );
        // Why a loop: a retry takes the claim over in a second step, which finds the claim
        // changed if it was released, expired or taken over meanwhile; then claim again.
        // Three rounds are plenty: each needs another request of the same vote in between.
        let mut claim = Claim::Taken;
        for _ in 0..3 {
            // SET NX GET (Redis 7) sets the key only if it is absent and answers with the
            // value it found: nil when this attempt claimed it, else the claim that holds it.
            // One atomic step, where the seed app raced a GET against a later SET.
            let Some(held) = self.claims.set(key.clone(), value.clone()).await? else {
                return Ok(Claim::Fresh);
            };
            claim = classify(&held, vote.ledger_id(), &ballot);
            if claim != Claim::Retry || !held.contains(SEP) {
                return Ok(claim);
            }
            // The same vote: take the claim over, so that the attempt that made it cannot
            // release it should it fail after this retry succeeded.
            let mut take_over = TAKE_OVER_SCRIPT.key(&key);
            take_over.arg(&held).arg(&value);
            let mut conn = self.conn.clone();
            let taken = self
                .bounded(
                    "take over a claim",
                    take_over.invoke_async::<i64>(&mut conn),
                )
                .await?;
            if taken == 1 {
                return Ok(Claim::Retry);
            }
        }
        Ok(claim)
    }

    async fn release(&self, poll: PollId, user: &str, attempt: u64) -> Result<bool, GuardError> {
        let mut release = RELEASE_SCRIPT.key(self.key(poll, user));
        release.arg(attempt_suffix(attempt));
        let mut conn = self.conn.clone();
        let deleted = self
            .bounded("release", release.invoke_async::<i64>(&mut conn))
            .await?;
        Ok(deleted == 1)
    }

    async fn ping(&self) -> Result<(), GuardError> {
        self.run::<String>("ping", &redis::cmd("PING"))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollcast_actors::OptionId;

    /// A guard on the test Redis (`POLLCAST_TEST_REDIS`, set by `scripts/test`), under a key
    /// prefix of its own.
    fn guard() -> RedisGuard {
        guard_in(&Background::new())
    }

    /// [`guard`], its pipelining task in `background`.
    fn guard_in(background: &Background) -> RedisGuard {
        let url = std::env::var("POLLCAST_TEST_REDIS")
            .expect("POLLCAST_TEST_REDIS must name the test Redis (scripts/test sets it)");
        let prefix = format!(
            "pollcast-test:guard:{}:",
            pollcast_actors::ids::random_id("")
        );
        RedisGuard::connect(
            RedisGuardSettings {
                url,
                key_prefix: prefix,
                ttl: Duration::from_secs(60),
                timeout: Duration::from_secs(5),
            },
            background,
        )
        .unwrap()
    }

    fn vote(user: &str, id: &str, choices: &[OptionId]) -> Vote {
        Vote {
            vote_id: Some(id.into()),
            choices: choices.to_vec(),
            ..Vote::single(1, 0, user)
        }
    }

    #[test]
    fn a_claims_value_is_read_as_written_and_as_older_versions_wrote_it() {
        let held = format!("a{SEP}1,3{}", attempt_suffix(7));
        assert_eq!(classify(&held, "a", "1,3"), Claim::Retry);
        assert_eq!(classify(&held, "a", "1"), Claim::Reused);
        assert_eq!(classify(&held, "b", "1,3"), Claim::Taken);
        assert_eq!(classify("a", "a", "2"), Claim::Retry, "an older claim");
        assert_eq!(classify("a", "b", "2"), Claim::Taken, "an older claim");
    }

    #[tokio::test]
    async fn only_the_attempt_that_holds_a_claim_releases_it() {
        let guard = guard();
        assert_eq!(
            guard.claim(&vote("u", "a", &[1]), 7).await.unwrap(),
            Claim::Fresh
        );
        assert!(
            !guard.release(1, "u", 8).await.unwrap(),
            "another attempt's"
        );
        assert_eq!(
            guard.claim(&vote("u", "b", &[1]), 9).await.unwrap(),
            Claim::Taken
        );
        // A retry takes the claim over: the first attempt, failing late, leaves it alone.
        assert_eq!(
            guard.claim(&vote("u", "a", &[1]), 10).await.unwrap(),
            Claim::Retry
        );
        assert!(
            !guard.release(1, "u", 7).await.unwrap(),
            "taken over by the retry"
        );
        assert_eq!(
            guard.claim(&vote("u", "b", &[1]), 11).await.unwrap(),
            Claim::Taken
        );
        assert!(guard.release(1, "u", 10).await.unwrap(), "the retry's own");
        assert_eq!(
            guard.claim(&vote("u", "b", &[1]), 12).await.unwrap(),
            Claim::Fresh
        );
    }

    #[tokio::test]
    async fn the_same_vote_id_with_another_ballot_is_a_reuse() {
        let guard = guard();
        assert_eq!(
            guard.claim(&vote("u", "a", &[3, 1]), 1).await.unwrap(),
            Claim::Fresh
        );
        assert_eq!(
            guard.claim(&vote("u", "a", &[1, 3]), 2).await.unwrap(),
            Claim::Retry
        );
        assert_eq!(
            guard.claim(&vote("u", "a", &[1]), 3).await.unwrap(),
            Claim::Reused
        );
        assert_eq!(
            guard.claim(&vote("u", "b", &[1]), 4).await.unwrap(),
            Claim::Taken
        );
        assert!(
            !guard.release(1, "u", 3).await.unwrap(),
            "a refused attempt holds nothing"
        );
    }

    #[tokio::test]
    async fn a_claim_written_by_an_older_pollcast_is_understood_and_kept() {
        let guard = guard();
        let mut set = redis::cmd("SET");
        set.arg(guard.key(1, "u")).arg("a").arg("EX").arg(60);
        guard.run::<String>("set", &set).await.unwrap();
        assert_eq!(
            guard.claim(&vote("u", "a", &[2]), 1).await.unwrap(),
            Claim::Retry
        );
        assert_eq!(
            guard.claim(&vote("u", "b", &[2]), 2).await.unwrap(),
            Claim::Taken
        );
        assert!(!guard.release(1, "u", 1).await.unwrap());
        let held: String = guard
            .run("get", redis::cmd("GET").arg(guard.key(1, "u")))
            .await
            .unwrap();
        assert_eq!(held, "a", "left as the older version wrote it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_made_together_ride_in_few_pipelines_and_each_gets_its_own_answer() {
        let guard = guard();
        // Two votes of each of 200 users, all at once: one of each pair wins.
        let claims: Vec<_> = (0..400)
            .map(|i| {
                let guard = guard.clone();
                let (user, id) = (format!("u{}", i % 200), format!("v{i}"));
                tokio::spawn(async move { guard.claim(&vote(&user, &id, &[1]), i).await })
            })
            .collect();
        let mut fresh = 0;
        for claim in claims {
            match claim.await.unwrap().unwrap() {
                Claim::Fresh => fresh += 1,
                Claim::Taken => {}
                other => panic!("two different vote ids: {other:?}"),
            }
        }
        assert_eq!(fresh, 200, "one claim per user");
        let pipelines = guard.claims.pipelines();
        assert!(
            pipelines < 100,
            "400 claims made at once went in {pipelines} pipelines"
        );
    }

    #[tokio::test]
    async fn a_stopped_guard_answers_what_was_queued_and_refuses_later_claims() {
        let background = Background::new();
        let guard = guard_in(&background);
        assert_eq!(
            guard.claim(&vote("u", "a", &[1]), 1).await.unwrap(),
            Claim::Fresh
        );
        background.stop_all().await;
        let refused = guard.claim(&vote("w", "b", &[1]), 2).await.unwrap_err();
        assert!(refused.to_string().contains("stopped"), "{refused}");
    }
}
