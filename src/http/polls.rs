//! `POST /polls`, `GET /polls`, `GET /polls/{id}`, `POST /polls/{id}/close`.

use std::sync::Arc;

use pollcast_actors::PollId;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::models::{CreatePollRequest, PollView};
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

async fn create(ctx: Arc<ApiContext>, body: CreatePollRequest) -> Result<Response, Rejection> {
    let new = body.validate()?;
    let poll = ctx
        .store
        .create_poll(new)
        .await
        .map_err(ApiError::unavailable)?;
    ctx.catalog.remember(&poll);
    tracing::info!(
        poll_id = poll.id,
        options = poll.options.len(),
        "poll created"
    );
    Ok(json_reply(&PollView::from(poll), StatusCode::CREATED))
}

async fn list(ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let polls = ctx
        .store
        .list_polls()
        .await
        .map_err(ApiError::unavailable)?;
    let views: Vec<PollView> = polls.into_iter().map(PollView::from).collect();
    Ok(json_reply(&views, StatusCode::OK))
}

async fn get(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .store
        .get_poll(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    Ok(json_reply(&PollView::from(poll), StatusCode::OK))
}

async fn close(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .store
        .close_poll(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    ctx.catalog.remember(&poll);
    tracing::info!(poll_id = id, "poll closed");
    Ok(json_reply(&PollView::from(poll), StatusCode::OK))
}
