//! `GET /healthz` (the process is up), `GET /readyz` (its dependencies answer) and
//! `GET /metrics` (Prometheus).

use std::sync::Arc;
use std::time::Duration;

use pollcast_actors::{ConsumerStatus, DedupGuard, PollStore, VoteAppender, VoteSourceFactory};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::{ApiContext, json_reply, with_ctx};

/// Longest a dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The dependencies a readiness check pings.
#[derive(Clone)]
pub struct Readiness {
    store: Arc<dyn PollStore>,
    guard: Arc<dyn DedupGuard>,
    log: Arc<dyn VoteAppender>,
    consumer: Arc<dyn VoteSourceFactory>,
}

impl Readiness {
    /// Checks the store, the guard, the log, and that the log's consumer has its partitions.
    pub fn new(
        store: Arc<dyn PollStore>,
        guard: Arc<dyn DedupGuard>,
        log: Arc<dyn VoteAppender>,
        consumer: Arc<dyn VoteSourceFactory>,
    ) -> Self {
        Self {
            store,
            guard,
            log,
            consumer,
        }
    }

    /// Pings every dependency at once; `(name, None)` for a healthy one, else the error.
    async fn check(&self) -> Vec<(&'static str, Option<String>)> {
        async fn bounded<E: std::fmt::Display>(
            f: impl Future<Output = Result<(), E>>,
        ) -> Option<String> {
            match tokio::time::timeout(CHECK_TIMEOUT, f).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        }
        let (store, guard, log) = tokio::join!(
            bounded(self.store.ping()),
            bounded(self.guard.ping()),
            bounded(self.log.ping()),
        );
        let consumer = match self.consumer.status() {
            ConsumerStatus::Joining => Some("joining its consumer group".to_owned()),
            ConsumerStatus::Local | ConsumerStatus::Assigned(_) => None,
        };
        vec![
            ("store", store),
            ("dedup", guard),
            ("log", log),
            ("consumer", consumer),
        ]
    }

    /// The partitions the consumer owns, if it is a group consumer.
    fn partitions(&self) -> Option<Vec<i32>> {
        match self.consumer.status() {
            ConsumerStatus::Assigned(p) => Some(p),
            _ => None,
        }
    }
}

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    let health = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_reply(&json!({ "status": "ok" }), StatusCode::OK));
    let ready = warp::path!("readyz")
        .and(warp::get())
        .and(with_ctx(ctx))
        .then(|ctx: Arc<ApiContext>| async move {
            let checks = ctx.readiness.check().await;
            let failing: Vec<&str> = checks
                .iter()
                .filter(|(_, e)| e.is_some())
                .map(|(n, _)| *n)
                .collect();
            let detail: serde_json::Map<String, serde_json::Value> = checks
                .into_iter()
                .map(|(name, err)| (name.to_owned(), json!(err.unwrap_or_else(|| "ok".into()))))
                .collect();
            if failing.is_empty() {
                let partitions = ctx.readiness.partitions();
                json_reply(
                    &json!({ "status": "ready", "checks": detail, "partitions": partitions }),
                    StatusCode::OK,
                )
            } else {
                json_reply(
                    &json!({ "status": "unavailable", "failing": failing, "checks": detail }),
                    StatusCode::SERVICE_UNAVAILABLE,
                )
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_ctx(ctx))
        .map(|ctx: Arc<ApiContext>| {
            warp::reply::with_header(
                ctx.metrics.render(),
                "content-type",
                "text/plain; version=0.0.4",
            )
            .into_response()
        });
    health.or(ready).unify().or(metrics).unify().boxed()
}
