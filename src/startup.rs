//! Wiring: the one place where config.toml becomes adapters, the API and the actor tree.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pollcast_actors::domain::now_millis;
use pollcast_actors::{
    BroadcastHub, CountsBus, DedupGuard, FaultHooks, IngestSettings, PollEvents, PollStore,
    RootArgs, RootMsg, RootSupervisor, VoteAppender, VoteSourceFactory,
};
use ractor::{Actor, ActorRef, call_t};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::background::{Background, Stage};

use crate::adapters::{
    FileVoteLog, KafkaCountsBus, KafkaSourceFactory, KafkaVoteLog, MemoryGuard, PgPoolSettings,
    PostgresStore, RedisGuard, RedisGuardSettings, SqliteStore, WebhookDispatcher, ensure_topics,
};
use crate::config::{GuardSettings, LogSettings, Secret, Settings, StoreUrl, VoterSettings};
use crate::http::Readiness;
use crate::http::rate_limit::RateLimits;
use crate::http::ws::Keepalive;
use crate::http::{ApiContext, ApiSettings, ConnectionLimits, HttpServer, load_tls};
use crate::voter_token::VoterTokens;
use pollcast_actors::service::{PollCatalog, PollService};

/// Longest graceful shutdown (stop accepting, final flush, commit).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// A running pollcast: the API listening and the actor tree started.
pub struct Application {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    root: ActorRef<RootMsg>,
    tree: JoinHandle<()>,
    /// Every task outside the tree: the closing scheduler, webhook deliveries, the store's
    /// and the log's writers, sweepers, the poll cache's refresher.
    background: Background,
}

/// How the application stopped.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The supervision tree gave up (a restart budget was exhausted); the reason was logged.
    #[error("the supervision tree stopped: a restart budget was exhausted (see the log above)")]
    TreeFailed,
    /// The final flush did not finish in time; unflushed votes stay in the log.
    #[error("graceful shutdown did not finish in time")]
    ShutdownTimedOut,
}

/// The adapters chosen in config.toml, behind their ports.
pub struct Backends {
    /// Polls and counts.
    pub store: Arc<dyn PollStore>,
    /// Producing side of the vote log.
    pub appender: Arc<dyn VoteAppender>,
    /// Consuming side of the vote log.
    pub source: Arc<dyn VoteSourceFactory>,
    /// Count updates shared with other processes (Kafka only).
    pub bus: Option<Arc<dyn CountsBus>>,
    /// Duplicate guard.
    pub guard: Arc<dyn DedupGuard>,
}

/// Opens the store named by `store.url` and applies its migrations; its background work (the
/// SQLite writer) runs in `background`.
pub async fn open_store(
    settings: &Settings,
    background: &Background,
) -> anyhow::Result<Arc<dyn PollStore>> {
    let store = &settings.store;
    match &store.url {
        StoreUrl::Postgres(url) => {
            let postgres = PostgresStore::connect(
                url.expose(),
                PgPoolSettings {
                    max_connections: store.max_connections,
                    acquire_timeout: store.acquire_timeout,
                    statement_timeout: store.statement_timeout,
                },
            )?;
            postgres
                .migrate()
                .await
                .with_context(|| format!("migrating {url}"))?;
            Ok(Arc::new(postgres))
        }
        StoreUrl::Sqlite(url) => {
            let sqlite = SqliteStore::open(url, background)
                .await
                .with_context(|| format!("opening store {url}"))?;
            Ok(Arc::new(sqlite))
        }
    }
}

/// The configured admin token, or a random one, logged once, so that a server started without
/// one is never open to anyone who finds it.
fn admin_token(settings: &Settings) -> Secret {
    if let Some(token) = &settings.admin.token {
        return token.clone();
    }
    use rand::Rng;
    let token: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    tracing::warn!(
        admin_token = %token,
        "admin.token is not set: generated one for this run (creating and closing polls need \
         `Authorization: Bearer <token>`); set admin.token to choose your own"
    );
    Secret::from(token)
}

/// The token verifier of signed voter identity, if configured.
pub fn voter_tokens(settings: &Settings) -> Option<VoterTokens> {
    match &settings.voters {
        VoterSettings::Body => None,
        VoterSettings::Signed(secret) => Some(VoterTokens::new(secret.expose().as_bytes())),
    }
}

fn rate_limits(settings: &Settings) -> RateLimits {
    let r = &settings.rate_limit;
    RateLimits::new(r.per_ip, r.per_user, r.client_ip_header.clone())
}

/// Opens every adapter chosen in `settings`, their background work running in `background`.
pub async fn open_backends(
    settings: &Settings,
    background: &Background,
) -> anyhow::Result<Backends> {
    let store = open_store(settings, background).await?;
    let mut embedded_log = None;
    let (appender, source, bus): (Arc<dyn VoteAppender>, Arc<dyn VoteSourceFactory>, _) =
        match &settings.log {
            LogSettings::Embedded(file) => {
                let log = FileVoteLog::open(&file.path, file.segment_bytes, background)
                    .with_context(|| format!("opening vote log {}", file.path.display()))?;
                let source = log.source_factory();
                embedded_log = Some(log.clone());
                (Arc::new(log), source, None)
            }
            LogSettings::Kafka(kafka) => {
                if kafka.create_topics {
                    ensure_topics(kafka).await.with_context(|| {
                        format!("creating topics on Kafka at {}", kafka.brokers)
                    })?;
                }
                let bus: Arc<dyn CountsBus> = Arc::new(KafkaCountsBus::new(kafka)?);
                (
                    Arc::new(KafkaVoteLog::new(kafka)?),
                    Arc::new(KafkaSourceFactory::new(kafka.clone())),
                    Some(bus),
                )
            }
        };
    let ttl = settings.dedup.ttl;
    let guard: Arc<dyn DedupGuard> = match &settings.dedup.guard {
        GuardSettings::Memory => {
            let guard = MemoryGuard::new(ttl);
            let swept = guard.clone();
            background.every(
                Stage::Upkeep,
                "duplicate guard sweep",
                MemoryGuard::SWEEP_EVERY,
                move || swept.sweep(),
            );
            let since = now_millis() - ttl.as_millis() as i64;
            let mut voters = store
                .voters_since(since)
                .await
                .context("warming the duplicate guard")?;
            // Votes accepted before a crash but not yet counted are only in the log.
            if let Some(log) = &embedded_log {
                voters.extend(
                    log.unapplied_voters()
                        .await
                        .context("warming the duplicate guard")?,
                );
            }
            let warmed = guard.warm(voters);
            tracing::info!(
                voters = warmed,
                "duplicate guard warmed from the ledger and the log"
            );
            Arc::new(guard)
        }
        GuardSettings::Redis {
            url,
            key_prefix,
            timeout,
        } => Arc::new(RedisGuard::connect(
            RedisGuardSettings {
                url: url.expose().to_owned(),
                key_prefix: key_prefix.clone(),
                ttl,
                timeout: *timeout,
            },
            background,
        )?),
    };
    Ok(Backends {
        store,
        appender,
        source,
        bus,
        guard,
    })
}

impl Application {
    /// Opens the backends, binds the listener and starts the supervision tree.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Before the backends, which take descriptors too.
        crate::fdlimit::prepare(&settings);
        let background = Background::new();
        // Why stop it on every early return: a half-built application must not leave its
        // writers behind.
        match Self::start(settings, background.clone()).await {
            Ok(app) => Ok(app),
            Err(e) => {
                background.stop_all().await;
                Err(e)
            }
        }
    }

    async fn start(settings: Settings, background: Background) -> anyhow::Result<Self> {
        let Backends {
            store,
            appender,
            source,
            bus,
            guard,
        } = open_backends(&settings, &background).await?;
        let http = &settings.http;
        let tls = http
            .tls
            .as_ref()
            .map(|files| load_tls(&files.cert, &files.key))
            .transpose()?;
        let listener = crate::http::listen(http.addr)
            .with_context(|| format!("binding http.addr {}", http.addr))?;
        let addr = listener.local_addr()?;
        let admin = http
            .admin_addr
            .map(|admin| {
                crate::http::listen(admin)
                    .with_context(|| format!("binding http.admin_addr {}", admin))
            })
            .transpose()?;
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let hub = BroadcastHub::new();
        let faults = FaultHooks::default();
        // The process's one poll cache: the vote path's, and the webhooks' (which skip polls
        // it knows to have none).
        let (catalog, catalog_refresher) = PollCatalog::new(store.clone());
        background.spawn_until_stopped(Stage::Upkeep, "poll cache refresher", catalog_refresher);
        let events: Arc<dyn PollEvents> =
            WebhookDispatcher::start(catalog.clone(), &settings.webhooks, &background);
        let polls = PollService::new(catalog, guard.clone(), appender.clone(), events.clone());
        let closing = polls.clone();
        background.spawn(Stage::Intake, "closing scheduler", |stop| {
            crate::lifecycle::run_closer(closing, stop)
        });
        let limits = rate_limits(&settings);
        if limits.is_limiting() {
            let swept = limits.clone();
            background.every(
                Stage::Upkeep,
                "rate limit sweep",
                RateLimits::SWEEP_EVERY,
                move || swept.sweep(),
            );
        }
        let ctx = ApiContext {
            polls,
            readiness: Readiness::new(store.clone(), guard, appender, source.clone()),
            hub: hub.clone(),
            faults: faults.clone(),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            metrics: crate::metrics::install(),
            limits,
            voter_tokens: voter_tokens(&settings),
            settings: ApiSettings {
                admin_token: admin_token(&settings),
                max_body_bytes: http.max_body_bytes,
                body_read_timeout: http.body_read_timeout,
                keepalive: Keepalive {
                    ping_every: http.ws_ping_interval,
                    idle_timeout: http.ws_idle_timeout,
                },
                cors_origins: http.cors_origins.clone(),
                public_url: http.public_url.clone(),
                tls: http.tls.is_some(),
                socketio: settings.socketio,
            },
        };
        let args = RootArgs {
            store,
            source,
            hub,
            bus,
            http: Arc::new(HttpServer::new(
                listener,
                admin,
                ctx,
                ConnectionLimits {
                    max_connections: http.max_connections,
                    max_connections_per_ip: http.max_connections_per_ip,
                    max_header_bytes: http.max_header_bytes,
                    header_read_timeout: http.header_read_timeout,
                },
                tls,
            )),
            flush_interval: settings.aggregator.flush_interval,
            flush_max_votes: settings.aggregator.flush_max_votes,
            close_grace: settings.aggregator.close_grace,
            events,
            ingest: IngestSettings {
                idle_timeout: settings.aggregator.idle_timeout,
                max_unflushed: settings.aggregator.max_unflushed_votes,
                ..IngestSettings::default()
            },
            restart: settings.supervision,
            faults,
        };
        let (root, tree) = Actor::spawn(None, RootSupervisor, args)
            .await
            .context("starting the supervision tree")?;
        let scheme = if http.tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "listening");
        if let Some(admin) = admin_addr {
            tracing::info!(%admin, "health and metrics also on the admin listener");
        }
        Ok(Self {
            addr,
            admin_addr,
            root,
            tree,
            background,
        })
    }

    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `http.admin_addr` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Runs until `shutdown` completes (then stops gracefully: stop accepting, flush every
    /// aggregator, commit the log, close WebSockets) or until the tree gives up.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Stopped> {
        let Self {
            root,
            mut tree,
            background,
            ..
        } = self;
        tokio::select! {
            _ = &mut tree => {
                background.stop_all().await;
                return Err(Stopped::TreeFailed);
            }
            _ = shutdown => {}
        }
        // Why the scheduler first: a close marker must not be appended behind the final
        // commit; a poll due during shutdown is closed by the next start.
        background.stop(Stage::Intake).await;
        tracing::info!("shutting down: no new votes, flushing and committing");
        let timeout = SHUTDOWN_TIMEOUT.as_millis() as u64;
        let drained = call_t!(root, RootMsg::Shutdown, timeout);
        root.stop(None);
        let _ = tree.await;
        // After the tree: its final flush may publish closed polls' final counts to the
        // webhooks, and the writers answer what the tree queued.
        background.stop_all().await;
        match drained {
            Ok(()) => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
            Err(_) => Err(Stopped::ShutdownTimedOut),
        }
    }
}
