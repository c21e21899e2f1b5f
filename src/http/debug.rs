//! Test-only endpoints (debug builds only): `POST /debug/faults/aggregator-panic/{pollId}`
//! makes that poll's aggregator panic at its next flush with votes buffered, so tests can
//! watch the supervisor restart it and the votes come back from the log.

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use super::ApiContext;

#[cfg(debug_assertions)]
pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    use std::sync::Arc;

    use pollcast_actors::PollId;
    use warp::http::StatusCode;

    use super::{admin, json_reply, with_ctx};

    warp::path!("debug" / "faults" / "aggregator-panic" / PollId)
        .and(warp::post())
        .and(admin(ctx))
        .and(with_ctx(ctx))
        .map(|poll_id: PollId, ctx: Arc<ApiContext>| {
            tracing::warn!(
                poll_id,
                "fault armed: aggregator will panic at its next flush"
            );
            ctx.faults.panic_at_next_flush(poll_id);
            json_reply(
                &serde_json::json!({ "armed": "aggregator-panic", "pollId": poll_id }),
                StatusCode::ACCEPTED,
            )
        })
        .boxed()
}

#[cfg(not(debug_assertions))]
pub fn routes(_ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    warp::any()
        .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
        .boxed()
}
