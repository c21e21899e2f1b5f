//! `POST /vote`

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use pollcast_actors::domain::now_millis;
use warp::filters::BoxedFilter;
use warp::http::header::CONTENT_TYPE;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::models::{VoteAccepted, VoteRequest, parse_json};
use super::{ApiContext, raw_body, with_ctx};
use crate::voter_token::{TokenError, VoterTokens};

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    warp::path!("vote")
        .and(warp::post())
        .and(with_ctx(ctx))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("idempotency-key"))
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
    match take(&ctx, authorization, idempotency_key, body).await {
        Ok(()) => {
            ACCEPTED_VOTES.increment(1);
            Ok(accepted())
        }
        Err(err) => {
            metrics::counter!("pollcast_votes_total", "result" => err.code()).increment(1);
            Err(err.into())
        }
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
