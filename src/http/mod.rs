//! The HTTP and WebSocket API, on warp.
//!
//! Each resource has its own module with its `routes` (filters) and handlers; this module
//! holds what they share ([`ApiContext`], body parsing, admin auth) and assembles them.

mod connection;
mod debug;
pub mod error;
mod export;
mod health;
mod join;
pub mod models;
mod openapi;
mod page;
mod polls;
pub mod rate_limit;
mod read_budget;
mod server;
pub mod socketio;
mod votes;
mod write_deadline;
pub mod ws;

use std::sync::Arc;

use bytes::Bytes;
use pollcast_actors::{BroadcastHub, FaultHooks};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

pub use connection::PeerAddr;
pub use health::Readiness;
pub use server::{ConnectionLimits, HttpServer, listen, load_tls};

use crate::config::{Origin, Secret};
use error::ApiError;
use pollcast_actors::service::PollService;

/// What every handler may use. Cloning is cheap (handles only).
#[derive(Clone)]
pub struct ApiContext {
    /// What pollcast does with polls: handlers map requests onto it.
    pub polls: PollService,
    /// Dependencies pinged by `/readyz`.
    pub readiness: Readiness,
    /// WebSocket subscriber registry.
    pub hub: BroadcastHub,
    /// How the API behaves, from `[http]` and `[socketio]`.
    pub settings: ApiSettings,
    /// Test-only failure switches.
    pub faults: FaultHooks,
    /// Cancelled when the server shuts down; WebSocket sessions then send a close frame.
    pub shutdown: CancellationToken,
    /// WebSocket sessions, awaited at shutdown.
    pub sessions: TaskTracker,
    /// Verifies voter tokens in signed identity mode (`None`: userId from the body).
    pub voter_tokens: Option<crate::voter_token::VoterTokens>,
    /// Per-IP and per-user rate limits.
    pub limits: rate_limit::RateLimits,
    /// Renders `GET /metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// How the API behaves: the settings handlers read, fixed at start.
#[derive(Clone)]
pub struct ApiSettings {
    /// Poll creation and closing need it as a bearer token.
    pub admin_token: Secret,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Longest a body may take to arrive once the request head is in (408 beyond).
    pub body_read_timeout: std::time::Duration,
    /// WebSocket ping interval and idle timeout.
    pub keepalive: ws::Keepalive,
    /// The address the audience reaches the server at, for join links (`None`: the host
    /// each request was sent to).
    pub public_url: Option<Origin>,
    /// Whether the server speaks HTTPS (join links then start with `https://`).
    pub tls: bool,
    /// Origins allowed cross-origin access (empty: none).
    pub cors_origins: Vec<Origin>,
    /// The seed's Socket.IO clients at `/socket.io/`.
    pub socketio: crate::config::SocketIoSettings,
}

/// Every route, with errors turned into JSON.
pub fn routes(
    ctx: ApiContext,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone + Send + Sync + 'static
{
    // Health and metrics are not rate limited: probes must always get through.
    // Why `POST /vote` first: it is nearly every request, and each route tried before the
    // one that matches costs a boxed future and its own path checks.
    let limited = rate_limit::per_ip(&ctx.limits).and(
        votes::routes(&ctx)
            .or(polls::routes(&ctx))
            .unify()
            .or(export::routes(&ctx))
            .unify()
            .or(ws::routes(&ctx))
            .unify()
            .or(join::routes(&ctx))
            .unify(),
    );
    let api = health::routes(&ctx)
        .or(openapi::routes())
        .unify()
        .or(limited)
        .unify()
        .or(debug::routes(&ctx))
        .unify()
        .or(page::routes())
        .unify();
    // Why recover first: once a request is known to be same-origin its errors must be
    // answered here, not retried through the other branch (which would run it twice).
    let own = api.recover(error::recover).unify().boxed();
    let api: BoxedFilter<(Response,)> = match cors(&ctx.settings.cors_origins) {
        Some(cors) => same_origin()
            .and(own.clone())
            .or(own.with(cors).map(Reply::into_response))
            .unify()
            .boxed(),
        // No origin allowed: a page on another site gets 403 before anything runs, even a
        // "simple" request (a text/plain POST) that a browser sends without a preflight.
        None => same_origin()
            .and(own)
            .or(warp::any().map(|| {
                error::error_reply(
                    warp::http::StatusCode::FORBIDDEN,
                    "forbidden",
                    "cross-origin requests are not allowed (see http.cors_origins)",
                )
            }))
            .unify()
            .boxed(),
    };
    api.recover(error::recover)
        .unify()
        .with(warp::log::custom(|info| {
            log_request(info.method(), info.path(), info.status(), info.elapsed())
        }))
}

/// Every answered request's metrics and debug line (the route tree's and the vote fast
/// path's).
fn log_request(
    method: &warp::http::Method,
    path: &str,
    status: warp::http::StatusCode,
    elapsed: std::time::Duration,
) {
    crate::metrics::record_request(method, path, status, elapsed.as_secs_f64());
    tracing::debug!(
        method = %method,
        path,
        status = status.as_u16(),
        micros = elapsed.as_micros() as u64,
        "request"
    );
}

/// What the admin listener (`http.admin_addr`) serves: `/healthz`, `/readyz` and `/metrics`
/// alone. Why a listener of their own: probes and scrapes must get through while the public
/// one is full of clients, hostile or not.
pub fn admin_routes(
    ctx: &ApiContext,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone + Send + Sync + 'static
{
    health::routes(ctx).recover(error::recover).unify()
}

/// Passes requests from pollcast's own page (or without an Origin): the allowlist is for
/// other sites, and browsers send Origin on same-origin POSTs and WebSocket upgrades too.
/// Why `warp::host`: over HTTP/2 the host is the request's `:authority`, not a Host header.
fn same_origin() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("origin")
        .and(warp::host::optional())
        .and_then(
            |origin: Option<String>, host: Option<warp::host::Authority>| async move {
                match origin {
                    None => Ok(()),
                    Some(o) if is_same_origin(&o, host.as_ref().map(|h| h.as_str())) => Ok(()),
                    Some(_) => Err(warp::reject::not_found()),
                }
            },
        )
        .untuple_one()
}

/// Whether a browser's `Origin` names the host the request was sent to: pollcast's own page.
/// The one rule for the API and Socket.IO alike.
fn is_same_origin(origin: &str, host: Option<&str>) -> bool {
    let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

/// Cross-origin access for the configured origins only (preflights included).
fn cors(origins: &[Origin]) -> Option<warp::filters::cors::Builder> {
    if origins.is_empty() {
        return None;
    }
    Some(
        warp::cors()
            .allow_origins(origins.iter().map(Origin::as_str))
            .allow_methods(["GET", "POST"])
            .allow_headers(["content-type", "authorization", "x-request-id"])
            .expose_headers(["x-request-id", "retry-after"])
            .max_age(600),
    )
}

/// Hands the context to a handler. Why an `Arc`: several filters of every request take it,
/// and cloning the context itself (a dozen handles) showed up in instruction profiles.
fn with_ctx(
    ctx: &ApiContext,
) -> impl Filter<Extract = (Arc<ApiContext>,), Error = std::convert::Infallible> + Clone + use<> {
    let ctx = Arc::new(ctx.clone());
    warp::any().map(move || ctx.clone())
}

/// A JSON body of at most `max_body_bytes` (413 beyond), parsed into `T` (400 / 422).
fn json_body<T: DeserializeOwned + Send>(
    ctx: &ApiContext,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone + use<T> {
    raw_body(ctx).and_then(|body: Result<Bytes, ApiError>| async move {
        body.and_then(|bytes| models::parse_json::<T>(&bytes))
            .map_err(Rejection::from)
    })
}

/// The body, or why it cannot be had (too large, unreadable).
fn raw_body(
    ctx: &ApiContext,
) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone + use<> {
    let settings = ctx.settings.clone();
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .then(move |declared: Option<u64>, body| {
            let settings = settings.clone();
            async move { read_body(&settings, declared, body).await }
        })
}

/// Reads a body within the configured size (413 beyond) and time (408 beyond).
async fn read_body<B: bytes::Buf, E: std::fmt::Display>(
    settings: &ApiSettings,
    declared: Option<u64>,
    body: impl futures_util::Stream<Item = Result<B, E>>,
) -> Result<Bytes, ApiError> {
    let (limit, timeout) = (settings.max_body_bytes, settings.body_read_timeout);
    // Why a deadline: a client trickling its body a byte at a time would otherwise hold its
    // connection, its task and the bytes so far for as long as it likes.
    tokio::time::timeout(timeout, read_limited(declared, body, limit))
        .await
        .unwrap_or(Err(ApiError::BodyTimeout(timeout)))
}

/// Reads a body, with or without Content-Length (chunked), refusing more than `limit` bytes
/// without buffering them.
async fn read_limited<B: bytes::Buf, E: std::fmt::Display>(
    declared: Option<u64>,
    body: impl futures_util::Stream<Item = Result<B, E>>,
    limit: u64,
) -> Result<Bytes, ApiError> {
    use futures_util::TryStreamExt;
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(mut chunk) = body
        .try_next()
        .await
        .map_err(|e| ApiError::Malformed(format!("unreadable body: {e}")))?
    {
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::TooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Passes when the request carries the admin token.
fn admin(ctx: &ApiContext) -> impl Filter<Extract = (), Error = Rejection> + Clone + use<> {
    is_admin(ctx)
        .and_then(|admin: bool| async move {
            if admin {
                Ok(())
            } else {
                Err(Rejection::from(ApiError::Unauthorized))
            }
        })
        .untuple_one()
}

/// Whether the request carries the admin token.
fn is_admin(ctx: &ApiContext) -> impl Filter<Extract = (bool,), Error = Rejection> + Clone + use<> {
    let token = ctx.settings.admin_token.clone();
    warp::header::optional::<String>("authorization").map(move |header: Option<String>| {
        let given = header
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Constant-time: the comparison must not leak how much of a guess was right.
        bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
    })
}

/// A JSON reply with a status.
fn json_reply(body: &impl serde::Serialize, status: warp::http::StatusCode) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}
