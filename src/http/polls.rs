//! `POST /polls`, `GET /polls`, `GET /polls/{id}`, `POST /polls/{id}/close`.

use std::sync::Arc;

use pollcast_actors::domain::now_millis;
use pollcast_actors::{PollId, PollPage};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::models::{CreatePollRequest, CreatedPoll, PollView};
use super::{ApiContext, admin, json_body, json_reply, with_ctx};

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    let create = warp::path!("polls")
        .and(warp::post())
        .and(admin(ctx))
        .and(with_ctx(ctx))
        .and(json_body::<CreatePollRequest>(ctx))
        .and_then(create);
    let list = warp::path!("polls")
        .and(warp::get())
        .and(with_ctx(ctx))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(super::rate_limit::charge(&ctx.limits))
        .and_then(list);
    let get = warp::path!("polls" / PollId)
        .and(warp::get())
        .and(with_ctx(ctx))
        .and_then(get);
    let close = warp::path!("polls" / PollId / "close")
        .and(warp::post())
        .and(admin(ctx))
        .and(with_ctx(ctx))
        .and_then(close);
    create
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(close)
        .unify()
        .boxed()
}

#[utoipa::path(post, path = "/polls", tag = "polls", request_body = CreatePollRequest,
    security(("admin" = [])),
    responses(
        (status = 201, description = "The poll (and its webhook secret, shown this once)", body = crate::http::models::CreatedPoll),
        (status = 400, description = "Not JSON", body = crate::http::error::ErrorBody),
        (status = 401, description = "No or wrong admin token", body = crate::http::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::http::error::ErrorBody),
        (status = 422, description = "Not a valid poll", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn create(
    ctx: Arc<ApiContext>,
    body: CreatePollRequest,
) -> Result<Response, Rejection> {
    let poll = ctx
        .polls
        .create(body.into_draft()?)
        .await
        .map_err(ApiError::from)?;
    let webhook = poll.settings.webhook.clone();
    let created = CreatedPoll {
        poll: PollView::at(poll, now_millis()),
        webhook_secret: webhook.as_ref().map(|w| w.secret.clone()),
        webhook,
    };
    Ok(json_reply(&created, StatusCode::CREATED))
}

/// Polls a page holds unless the client asks for fewer or more, and at most.
pub const PAGE_DEFAULT: i64 = 50;
pub const PAGE_MAX: i64 = 200;
/// Polls per extra request charged to the client's rate limit: a long page costs the server
/// (and the store) as much as that many small requests.
const POLLS_PER_CHARGE: i64 = 10;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
    before: Option<PollId>,
}

#[utoipa::path(get, path = "/polls", tag = "polls",
    params(
        ("limit" = Option<i64>, Query, description = "Polls per page, 1 to 200 (default 50)"),
        ("before" = Option<i64>, Query, description = "Only polls older than this id: the previous page's `Pollcast-Next-Before`"),
    ),
    responses(
        (status = 200, description = "A page of polls, newest first", body = Vec<PollView>,
            headers(("pollcast-next-before" = i64, description = "The cursor of the next page, while more may follow"))),
        (status = 422, description = "A bad query", body = crate::http::error::ErrorBody),
        (status = 429, description = "Over the rate limit", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn list(
    ctx: Arc<ApiContext>,
    query: String,
    charge: super::rate_limit::Charge,
) -> Result<Response, Rejection> {
    let query: ListQuery = serde_urlencoded::from_str(&query)
        .map_err(|e| ApiError::Invalid(format!("bad query: {e} (expected limit and before)")))?;
    let limit = query.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::Invalid(format!("limit must be 1..={PAGE_MAX}")).into());
    }
    charge.extra((limit / POLLS_PER_CHARGE) as u32)?;
    let page = PollPage {
        before: query.before,
        limit,
    };
    let polls = ctx.polls.list(page).await.map_err(ApiError::unavailable)?;
    // A full page may have more behind it: the cursor is its last (oldest) id.
    let next = (polls.len() as i64 == limit)
        .then(|| polls.last().map(|p| p.id))
        .flatten();
    let now = now_millis();
    let views: Vec<PollView> = polls.into_iter().map(|p| PollView::at(p, now)).collect();
    let mut reply = json_reply(&views, StatusCode::OK);
    if let Some(next) = next {
        let headers = reply.headers_mut();
        headers.insert("pollcast-next-before", next.into());
        let link = format!("</polls?before={next}&limit={limit}>; rel=\"next\"");
        headers.insert(
            "link",
            warp::http::HeaderValue::from_str(&link).expect("a link is a valid header value"),
        );
    }
    Ok(reply)
}

#[utoipa::path(get, path = "/polls/{id}", tag = "polls",
    params(("id" = i64, Path, description = "The poll")),
    responses(
        (status = 200, description = "The poll with its current counts", body = PollView),
        (status = 404, description = "No such poll", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn get(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .polls
        .get(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    Ok(json_reply(
        &PollView::at(poll, now_millis()),
        StatusCode::OK,
    ))
}

#[utoipa::path(post, path = "/polls/{id}/close", tag = "polls",
    params(("id" = i64, Path, description = "The poll")),
    security(("admin" = [])),
    responses(
        (status = 200, description = "The closed poll (closing again changes nothing)", body = PollView),
        (status = 401, description = "No or wrong admin token", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such poll", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn close(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .polls
        .close(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    tracing::info!(poll_id = id, "poll closed");
    Ok(json_reply(
        &PollView::at(poll, now_millis()),
        StatusCode::OK,
    ))
}
