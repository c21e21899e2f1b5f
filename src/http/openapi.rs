//! `GET /openapi.json`: the OpenAPI 3.1 description of every HTTP endpoint.
//!
//! Generated from the handlers' `#[utoipa::path]` attributes and the request and response
//! types themselves, so it changes with them; `tests/api/openapi.rs` checks real responses
//! of each endpoint against it, so it cannot drift either. Endpoints served by a closure
//! (health, metrics, the join link) are described here.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::error::ErrorBody;
use super::models::{CreatePollRequest, CreatedPoll, PollView, VoteAccepted, VoteRequest};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pollcast",
        description = "Live-polling vote backend: every vote counted exactly once, results live \
                       over WebSocket. Errors are `{\"error\", \"message\"}`; any request may also \
                       get 403 (cross-origin), 408 (slow body), 429 (rate limit) and 503 (a \
                       dependency is down).",
    ),
    paths(
        super::votes::vote,
        super::polls::create,
        super::polls::list,
        super::polls::get,
        super::polls::close,
        super::export::export,
        super::ws::upgrade,
        super::join::qr_svg,
        join_link,
        healthz,
        readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        CreatePollRequest,
        CreatedPoll,
        PollView,
        VoteRequest,
        VoteAccepted,
        ErrorBody,
        super::export::LedgerRowView,
        Health,
        Ready,
    )),
    modifiers(&AdminToken),
    tags(
        (name = "votes", description = "Taking votes"),
        (name = "polls", description = "Creating, reading, closing and exporting polls"),
        (name = "live", description = "Live results and joining"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The admin token, a bearer token.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document, rendered once: it is the same for the life of the process.
static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
});

pub fn routes() -> BoxedFilter<(Response,)> {
    warp::path!("openapi.json")
        .and(warp::get())
        .map(|| {
            warp::reply::with_header(DOCUMENT.as_str(), "content-type", "application/json")
                .into_response()
        })
        .boxed()
}

/// `GET /healthz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct Health {
    /// Always "ok".
    #[schema(example = "ok")]
    status: String,
}

/// `GET /readyz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct Ready {
    /// "ready" or "unavailable".
    status: String,
    /// Each dependency (`store`, `dedup`, `log`, `consumer`): "ok" or what failed.
    checks: std::collections::BTreeMap<String, String>,
    /// With Kafka, when ready: the `raw-votes` partitions this process counts.
    partitions: Option<Vec<i32>>,
    /// When unavailable: the dependencies that failed.
    failing: Option<Vec<String>>,
}

#[utoipa::path(get, path = "/j/{id}", tag = "live",
    params(("id" = i64, Path, description = "The poll")),
    responses((status = 302, description = "To the audience's voting view, `/#/vote/{id}`")))]
#[allow(dead_code)]
fn join_link() {}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process serves", body = Health)))]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every dependency answers", body = Ready),
        (status = 503, description = "Some dependency does not", body = Ready),
    ))]
#[allow(dead_code)]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}
