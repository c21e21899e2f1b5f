//! The production backends in tests: per-test resources on the machine's Postgres and Redis
//! and on the Kafka-protocol broker (tansu) that `scripts/test` starts, plus a TCP proxy to
//! cut and restore a dependency, and a private broker for tests that must cut Kafka.
//!
//! Nothing is mocked and nothing is skipped: a missing service fails the test with a message
//! saying what to start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pollcast::RawSettings;
use pollcast::config::{DedupKind, LogKind};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Which adapters a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, the local log, the in-process guard.
    Embedded,
    /// Postgres, Kafka (tansu), Redis.
    Production,
}

fn required_env(name: &str, what: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. Run the tests with scripts/test, which {what} and sets it \
             (or set it yourself)."
        )
    })
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's own database, Redis key space, topics and consumer group on the shared services.
#[derive(Debug, Clone)]
pub struct Production {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub brokers: String,
    pub raw_votes_topic: String,
    pub poll_updates_topic: String,
    pub group_id: String,
}

impl Production {
    /// Creates a fresh database and picks fresh names.
    pub async fn create() -> Self {
        let admin_url = required_env(
            "POLLCAST_TEST_POSTGRES",
            "finds PostgreSQL on 127.0.0.1:5432 or starts a throwaway one",
        );
        let redis_url = required_env(
            "POLLCAST_TEST_REDIS",
            "finds Redis on 127.0.0.1:6379 or starts a throwaway one",
        );
        let brokers = required_env(
            "POLLCAST_TEST_KAFKA",
            "installs and starts the tansu Kafka-protocol broker",
        );
        let database = unique("pollcast_t");
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {admin_url}: {e}. Run the tests with scripts/test, which starts a throwaway PostgreSQL when none answers")
        });
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let database_url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database}"),
            None => panic!("POLLCAST_TEST_POSTGRES must end with /DATABASE"),
        };
        let name = unique("t");
        Self {
            database_url,
            redis_url,
            redis_prefix: format!("pollcast-test:{name}:"),
            brokers,
            raw_votes_topic: format!("raw-votes-{name}"),
            poll_updates_topic: format!("poll-updates-{name}"),
            group_id: format!("pollcast-{name}"),
        }
    }

    /// Points `settings` at this test's resources.
    pub fn apply(&self, s: &mut RawSettings) {
        s.store.url = self.database_url.clone();
        s.dedup.kind = DedupKind::Redis;
        s.dedup.redis_url = self.redis_url.clone();
        s.dedup.key_prefix = self.redis_prefix.clone();
        s.log.kind = LogKind::Kafka;
        let k = &mut s.log.kafka;
        k.brokers = self.brokers.clone();
        k.raw_votes_topic = self.raw_votes_topic.clone();
        k.poll_updates_topic = self.poll_updates_topic.clone();
        k.group_id = self.group_id.clone();
        k.partitions = 3;
        k.produce_timeout_ms = 3000;
        k.consumer_properties = [
            ("session_timeout_ms", "6000"),
            ("heartbeat_interval_ms", "1000"),
            ("max_poll_interval_ms", "10000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    }

    /// The same, as environment variables for the binary.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("POLLCAST__STORE__URL", self.database_url.as_str()),
            ("POLLCAST__DEDUP__KIND", "redis"),
            ("POLLCAST__DEDUP__REDIS_URL", &self.redis_url),
            ("POLLCAST__DEDUP__KEY_PREFIX", &self.redis_prefix),
            ("POLLCAST__LOG__KIND", "kafka"),
            ("POLLCAST__LOG__KAFKA__BROKERS", &self.brokers),
            (
                "POLLCAST__LOG__KAFKA__RAW_VOTES_TOPIC",
                &self.raw_votes_topic,
            ),
            (
                "POLLCAST__LOG__KAFKA__POLL_UPDATES_TOPIC",
                &self.poll_updates_topic,
            ),
            ("POLLCAST__LOG__KAFKA__GROUP_ID", &self.group_id),
            ("POLLCAST__LOG__KAFKA__PARTITIONS", "6"),
            // Short sessions: a member killed with SIGKILL is replaced within seconds.
            (
                "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__SESSION_TIMEOUT_MS",
                "2000",
            ),
            (
                "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__HEARTBEAT_INTERVAL_MS",
                "500",
            ),
            (
                "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__MAX_POLL_INTERVAL_MS",
                "10000",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// User ids in the ledger of a poll.
    pub async fn ledger(&self, poll: i64) -> Vec<String> {
        let mut conn = sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap();
        sqlx::query("SELECT user_id FROM votes WHERE poll_id = $1 AND current ORDER BY user_id")
            .bind(poll)
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Whether the duplicate guard holds a claim for (poll, user).
    pub async fn claimed(&self, poll: i64, user: &str) -> bool {
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let key = format!("{}vote:{poll}:{user}", self.redis_prefix);
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap()
            == 1
    }
}

/// Reads the SQLite ledger of a poll.
pub async fn sqlite_ledger(path: PathBuf, poll: i64) -> Vec<String> {
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    sqlx::query("SELECT user_id FROM votes WHERE poll_id = ? AND current ORDER BY user_id")
        .bind(poll)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// A TCP proxy between pollcast and a dependency: cutting it drops every connection and
/// refuses new ones, as a dead server or a partition would; restoring lets them through.
pub struct TcpProxy {
    pub addr: SocketAddr,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    cut: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl TcpProxy {
    /// A proxy on a free local port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), target)
    }

    /// A proxy on `listener` forwarding to `target`.
    pub fn start_on(listener: TcpListener, target: SocketAddr) -> Self {
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(std::sync::Mutex::new(Vec::<AbortHandle>::new()));
        let shared_target = Arc::new(std::sync::Mutex::new(target));
        let (is_cut, conns, to) = (cut.clone(), connections.clone(), shared_target.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if is_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = *to.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            target: shared_target,
            cut,
            connections,
            accept,
        }
    }

    /// Sends new connections to `target` from now on (a load balancer that noticed a
    /// backend die).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.connections.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The address in a `scheme://host:port/...` URL.
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let host_port = rest.split('/').next().unwrap();
    let host_port = host_port.rsplit('@').next().unwrap();
    host_port.parse().unwrap()
}

/// Replaces the address in a URL (to route it through a proxy).
pub fn with_addr(url: &str, addr: SocketAddr) -> String {
    url.replacen(&url_addr(url).to_string(), &addr.to_string(), 1)
}

/// A tansu broker of one test's own, advertised behind a [`TcpProxy`], so that the test can
/// cut Kafka (clients reconnect to the advertised address, so the proxy must be it).
pub struct PrivateBroker {
    pub proxy: TcpProxy,
    child: Child,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let tansu = required_env("POLLCAST_TEST_TANSU", "installs the tansu broker");
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let back_addr = back.local_addr().unwrap();
        drop(back);
        let advertised = front.local_addr().unwrap();
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{back_addr}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu at {tansu}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(back_addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {back_addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            proxy: TcpProxy::start_on(front, back_addr),
            child,
        }
    }

    pub fn brokers(&self) -> String {
        self.proxy.addr.to_string()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
