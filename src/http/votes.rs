//! `POST /vote`

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pollcast_actors::domain::now_millis;
use warp::filters::BoxedFilter;
use warp::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, UPGRADE};
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::PeerAddr;
use super::error::{self, ApiError};
use super::models::{VoteAccepted, VoteRequest, parse_json};
use super::{ApiContext, raw_body, with_ctx};
use crate::voter_token::{TokenError, VoterTokens};

/// Why a `HeaderName` (its text for warp's filter): a header looked up by a `&str` has its
/// name parsed and checked on every lookup, and the fast path looks up nine a vote.
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    warp::path!("vote")
        .and(warp::post())
        .and(with_ctx(ctx))
        .and(warp::header::optional::<String>(AUTHORIZATION.as_str()))
        .and(warp::header::optional::<String>(IDEMPOTENCY_KEY.as_str()))
        .and(raw_body(ctx))
        .and_then(vote)
        .boxed()
}

/// The body of every 202, serialized once: it never changes.
static ACCEPTED_BODY: LazyLock<Bytes> = LazyLock::new(|| {
    let accepted = VoteAccepted {
        status: "Vote queued",
    };
    Bytes::from(serde_json::to_vec(&accepted).expect("a struct of one string serializes"))
});

/// `pollcast_votes_total{result="accepted"}`, looked up once: with the result as a
/// variable label, every vote paid for building and hashing its key. Why lazily: the
/// recorder is installed at startup, before the first vote.
static ACCEPTED_VOTES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("pollcast_votes_total", "result" => "accepted"));

fn accepted() -> Response {
    let mut response = Response::new(ACCEPTED_BODY.clone().into());
    *response.status_mut() = StatusCode::ACCEPTED;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[utoipa::path(post, path = "/vote", tag = "votes", request_body = crate::http::models::VoteRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "The vote's id, if the body has no `voteId`")),
    responses(
        (status = 202, description = "Durable in the vote log: it will be counted once", body = crate::http::models::VoteAccepted),
        (status = 400, description = "Not JSON", body = crate::http::error::ErrorBody),
        (status = 401, description = "Signed voter identity: no valid voter token", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such poll or option", body = crate::http::error::ErrorBody),
        (status = 409, description = "This user already voted in this poll", body = crate::http::error::ErrorBody),
        (status = 410, description = "The poll is closed", body = crate::http::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::http::error::ErrorBody),
        (status = 422, description = "Not a valid vote, or a vote id reused with another ballot", body = crate::http::error::ErrorBody),
        (status = 429, description = "Over a rate limit", body = crate::http::error::ErrorBody),
        (status = 503, description = "A dependency is down: not known to be counted; retry with the same vote id", body = crate::http::error::ErrorBody),
    ))]
/// Why the body is parsed here rather than by a filter: every outcome, malformed bodies
/// included, is counted in `pollcast_votes_total` by result.
pub(super) async fn vote(
    ctx: Arc<ApiContext>,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Result<Response, Rejection> {
    Ok(answer(&ctx, authorization, idempotency_key, body).await?)
}

/// Takes the vote and counts the outcome in `pollcast_votes_total`.
async fn answer(
    ctx: &ApiContext,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Result<Response, ApiError> {
    match take(ctx, authorization, idempotency_key, body).await {
        Ok(()) => {
            ACCEPTED_VOTES.increment(1);
            Ok(accepted())
        }
        Err(err) => {
            metrics::counter!("pollcast_votes_total", "result" => err.code()).increment(1);
            Err(err)
        }
    }
}

/// `POST /vote` answered without warp's route tree, which cost the embedded server 6–15 % of
/// its CPU per vote (docs/BENCHMARKS.md, "Fast paths"). It runs what the tree runs for a
/// vote, each from its one home: the same-origin rule, the per-address limit, the body's size
/// and time limits, the handler, the error replies and the request metrics. Every request it
/// does not take goes through the tree: `tests/api/votes.rs` holds the two to the same
/// answers.
#[derive(Clone)]
pub(super) struct FastPath {
    ctx: Arc<ApiContext>,
}

impl FastPath {
    pub(super) fn new(ctx: &ApiContext) -> Self {
        Self {
            ctx: Arc::new(ctx.clone()),
        }
    }

    /// Whether the fast path answers `req`: `POST /vote` exactly (no query), from the server's
    /// own origin or with none, and every header it reads well-formed. The rest, cross-origin
    /// votes (CORS), malformed headers and HTTP/2 requests (their URI carries the authority)
    /// included, get the route tree's answers.
    pub(super) fn takes<B>(req: &Request<B>) -> bool {
        let headers = req.headers();
        let text = |name: &HeaderName| headers.get(name).is_none_or(|v| v.to_str().is_ok());
        req.method() == Method::POST
            && req.uri().path() == "/vote"
            && req.uri().query().is_none()
            && !headers.contains_key(UPGRADE)
            && text(&AUTHORIZATION)
            && text(&IDEMPOTENCY_KEY)
            && headers
                .get(CONTENT_LENGTH)
                .is_none_or(|v| v.to_str().is_ok_and(|v| v.parse::<u64>().is_ok()))
            && req.uri().authority().is_none()
            && Self::host(headers).is_ok_and(|host| {
                headers.get(ORIGIN).is_none_or(|origin| {
                    (origin.to_str()).is_ok_and(|origin| super::is_same_origin(origin, host))
                })
            })
    }

    /// The Host header as the route tree's same-origin check reads it; `Err`: one it refuses.
    fn host(headers: &HeaderMap) -> Result<Option<&str>, ()> {
        let Some(host) = headers.get(HOST) else {
            return Ok(None);
        };
        let host = host.to_str().map_err(|_| ())?;
        host.parse::<warp::http::uri::Authority>().map_err(|_| ())?;
        Ok(Some(host))
    }

    /// Answers a request that [`FastPath::takes`].
    pub(super) async fn answer(&self, peer: SocketAddr, req: Request<Incoming>) -> Response {
        let started = std::time::Instant::now();
        let (parts, body) = req.into_parts();
        let response = match self.vote(peer, &parts.headers, body).await {
            Ok(response) => response,
            Err(err) => error::api_error_reply(&err),
        };
        super::log_request(
            &parts.method,
            parts.uri.path(),
            response.status(),
            started.elapsed(),
        );
        response
    }

    async fn vote(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<Response, ApiError> {
        let ctx = &self.ctx;
        ctx.limits.check_ip(Some(PeerAddr(peer)), headers)?;
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let declared = text(&CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let body = super::read_body(&ctx.settings, declared, body.into_data_stream()).await;
        let owned = |name| text(name).map(str::to_owned);
        answer(ctx, owned(&AUTHORIZATION), owned(&IDEMPOTENCY_KEY), body).await
    }
}

/// The userId of the bearer token of a request, in signed voter identity mode.
fn signed_voter(tokens: &VoterTokens, authorization: Option<&str>) -> Result<String, ApiError> {
    let token = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or(ApiError::VoterToken(TokenError::Malformed))?;
    let now = (now_millis() / 1000) as u64;
    tokens.verify(token, now).map_err(ApiError::VoterToken)
}

async fn take(
    ctx: &ApiContext,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Result<(), ApiError> {
    let signed_user = match &ctx.voter_tokens {
        Some(tokens) => Some(signed_voter(tokens, authorization.as_deref())?),
        None => None,
    };
    let vote = parse_json::<VoteRequest>(&body?)?.validate(signed_user, idempotency_key)?;
    ctx.limits.check_user(&vote.user_id)?;
    ctx.polls.submit(vote).await.map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut req = Request::builder().method(Method::POST).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        req.body(()).unwrap()
    }

    #[test]
    fn the_fast_path_takes_plain_and_same_origin_votes_and_leaves_the_rest_to_the_routes() {
        let host: (&str, &[u8]) = ("host", b"polls.example:8080");
        for (taken, what, req) in [
            (true, "a plain vote", post("/vote", &[host])),
            (true, "with no Host", post("/vote", &[])),
            (
                true,
                "same origin",
                post("/vote", &[host, ("origin", b"https://polls.example:8080")]),
            ),
            (
                true,
                "with a token",
                post("/vote", &[host, ("authorization", b"Bearer t")]),
            ),
            (
                false,
                "another origin",
                post("/vote", &[host, ("origin", b"https://evil.example")]),
            ),
            (
                false,
                "an origin, no Host",
                post("/vote", &[("origin", b"https://polls.example:8080")]),
            ),
            (false, "a query", post("/vote?via=routes", &[host])),
            (false, "another path", post("/votes", &[host])),
            (
                false,
                "an absolute URI",
                post("http://polls.example:8080/vote", &[host]),
            ),
            (
                false,
                "a Host that is no authority",
                post("/vote", &[("host", b"a b")]),
            ),
            (
                false,
                "a token not text",
                post("/vote", &[host, ("authorization", b"Bearer \xff")]),
            ),
            (
                false,
                "a key not text",
                post("/vote", &[host, ("idempotency-key", b"\xff")]),
            ),
            (
                false,
                "a length not a number",
                post("/vote", &[host, ("content-length", b"x")]),
            ),
            (
                false,
                "an upgrade",
                post("/vote", &[host, ("upgrade", b"websocket")]),
            ),
        ] {
            assert_eq!(FastPath::takes(&req), taken, "{what}");
        }
        let mut get = post("/vote", &[host]);
        *get.method_mut() = Method::GET;
        assert!(!FastPath::takes(&get), "GET");
    }
}
