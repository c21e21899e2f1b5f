//! `POST /vote`

use std::sync::Arc;

use bytes::Bytes;
use pollcast_actors::domain::now_millis;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::models::{VoteAccepted, VoteRequest, parse_json};
use super::{ApiContext, json_reply, raw_body, with_ctx};
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

/// Why the body is parsed here rather than by a filter: every outcome, malformed bodies
/// included, is counted in `pollcast_votes_total` by result.
async fn vote(
    ctx: Arc<ApiContext>,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Result<Response, Rejection> {
    let outcome = take(&ctx, authorization, idempotency_key, body).await;
    let result = match &outcome {
        Ok(()) => "accepted",
        Err(err) => err.code(),
    };
    metrics::counter!("pollcast_votes_total", "result" => result).increment(1);
    outcome?;
    let accepted = VoteAccepted {
        status: "Vote queued",
    };
    Ok(json_reply(&accepted, StatusCode::ACCEPTED))
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
    ctx.intake.submit(vote).await.map_err(ApiError::from)
}
