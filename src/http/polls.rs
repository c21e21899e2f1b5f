//! `POST /polls`, `GET /polls`, `GET /polls/{id}`, `POST /polls/{id}/close`.

use std::sync::Arc;

use pollcast_actors::PollId;
use pollcast_actors::domain::now_millis;
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
    let new = body.validate(now_millis())?;
    let poll = ctx
        .store
        .create_poll(new)
        .await
        .map_err(ApiError::unavailable)?;
    ctx.catalog.remember(&poll);
    ctx.events.opened(&poll);
    tracing::info!(
        poll_id = poll.id,
        options = poll.options.len(),
        max_choices = poll.settings.max_choices,
        closes_at = poll.settings.closes_at,
        webhook = poll.settings.webhook.is_some(),
        "poll created"
    );
    let webhook = poll.settings.webhook.clone();
    let created = CreatedPoll {
        poll: PollView::at(poll, now_millis()),
        webhook_secret: webhook.as_ref().map(|w| w.secret.clone()),
        webhook,
    };
    Ok(json_reply(&created, StatusCode::CREATED))
}

async fn list(ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let polls = ctx
        .store
        .list_polls()
        .await
        .map_err(ApiError::unavailable)?;
    let now = now_millis();
    let views: Vec<PollView> = polls.into_iter().map(|p| PollView::at(p, now)).collect();
    Ok(json_reply(&views, StatusCode::OK))
}

async fn get(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .store
        .get_poll(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    Ok(json_reply(
        &PollView::at(poll, now_millis()),
        StatusCode::OK,
    ))
}

async fn close(id: PollId, ctx: Arc<ApiContext>) -> Result<Response, Rejection> {
    let poll = ctx
        .intake
        .close(id)
        .await
        .map_err(ApiError::from)?
        .ok_or(ApiError::PollNotFound(id))?;
    tracing::info!(poll_id = id, "poll closed");
    Ok(json_reply(
        &PollView::at(poll, now_millis()),
        StatusCode::OK,
    ))
}
