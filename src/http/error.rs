//! API errors: one enum, each variant mapped to a status code and a JSON body
//! `{"error": "<code>", "message": "<for people>"}`. Every rejection, ours or warp's, goes
//! through [`recover`], so no client ever sees an HTML or empty error.

use std::convert::Infallible;

use pollcast_actors::PollId;
use warp::http::StatusCode;
use warp::reject::Reject;
use warp::{Rejection, Reply};

use pollcast_actors::service::{CreateError, VoteError, VoteRejection};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// A request that is not what the endpoint takes (other than its body).
    #[error("{0}")]
    BadRequest(String),
    /// The body is JSON but not a valid request.
    #[error("{0}")]
    Invalid(String),
    /// The body is larger than `http.max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    /// The body did not arrive within `http.body_read_timeout_ms`.
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(std::time::Duration),
    /// Missing or wrong admin token.
    #[error("this endpoint needs `Authorization: Bearer <admin token>`")]
    Unauthorized,
    /// The poll hides its results until it closes.
    #[error("poll {0} shows its results once it is closed")]
    ResultsHidden(PollId),
    /// No such poll.
    #[error("poll {0} does not exist")]
    PollNotFound(PollId),
    /// No such option in the poll.
    #[error("poll {poll} has no option {option}")]
    OptionNotFound {
        /// The poll.
        poll: PollId,
        /// The option asked for.
        option: i64,
    },
    /// The poll no longer takes votes.
    #[error("poll {0} is closed")]
    PollClosed(PollId),
    /// One vote per user and poll.
    #[error("this user already voted in poll {0}")]
    AlreadyVoted(PollId),
    /// A `voteId` / `Idempotency-Key` already used by this voter for another ballot.
    #[error(
        "this voteId (Idempotency-Key) was already used by this user in poll {0} for another ballot; a new vote needs a new key"
    )]
    VoteIdReused(PollId),
    /// Signed voter identity: the token is missing, forged or expired.
    #[error("{0}: votes need `Authorization: Bearer <voter token>`")]
    VoterToken(crate::voter_token::TokenError),
    /// Too many requests from this client or for this user.
    #[error("too many requests; retry in {} s", retry_secs(.0))]
    RateLimited(std::time::Duration),
    /// Rate limiting by a proxy header is configured, and the request lacks it.
    #[error("the configured client address header is missing or not an IP address")]
    NoClientAddress,
    /// A dependency is down; nothing was done.
    /// A dependency (store, guard, log) failed. Why no detail: the client can do nothing
    /// with the backend's own words, and they name hosts, users and queries; the log line
    /// written by [`ApiError::unavailable`] has them.
    #[error("service unavailable; retry later")]
    Unavailable,
}

impl Reject for ApiError {}

impl ApiError {
    /// The machine-readable code of the error (the `error` field of the body).
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::ResultsHidden(_) => (StatusCode::FORBIDDEN, "results_hidden"),
            Self::VoterToken(_) => (StatusCode::UNAUTHORIZED, "invalid_voter_token"),
            Self::PollNotFound(_) => (StatusCode::NOT_FOUND, "poll_not_found"),
            Self::OptionNotFound { .. } => (StatusCode::NOT_FOUND, "option_not_found"),
            Self::PollClosed(_) => (StatusCode::GONE, "poll_closed"),
            Self::AlreadyVoted(_) => (StatusCode::CONFLICT, "already_voted"),
            // 422 as the IETF Idempotency-Key draft answers a key reused with another payload.
            Self::VoteIdReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::NoClientAddress => (StatusCode::BAD_REQUEST, "bad_request"),
        }
    }

    /// Wraps a backend failure, logging it (the client only learns that we are unavailable).
    pub fn unavailable(err: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %err, "dependency unavailable");
        Self::Unavailable
    }
}

impl From<VoteRejection> for ApiError {
    fn from(rejection: VoteRejection) -> Self {
        if let Some((poll, option)) = rejection.unknown_option() {
            return Self::OptionNotFound { poll, option };
        }
        match rejection {
            VoteRejection::UnknownPoll(poll) => Self::PollNotFound(poll),
            VoteRejection::Closed(poll) => Self::PollClosed(poll),
            VoteRejection::Duplicate(poll) => Self::AlreadyVoted(poll),
            VoteRejection::VoteIdReused(poll) => Self::VoteIdReused(poll),
            rejection @ VoteRejection::Ballot { .. } => Self::Invalid(rejection.to_string()),
        }
    }
}

impl From<VoteError> for ApiError {
    fn from(err: VoteError) -> Self {
        match err {
            VoteError::Rejected(rejection) => rejection.into(),
            VoteError::Unavailable(err) => Self::unavailable(err),
        }
    }
}

impl From<CreateError> for ApiError {
    fn from(err: CreateError) -> Self {
        match err {
            CreateError::Invalid(invalid) => Self::Invalid(invalid.to_string()),
            CreateError::Unavailable(err) => Self::unavailable(err),
        }
    }
}

/// Whole seconds to wait, rounded up (Retry-After has no fractions), and never 0: a 429
/// that says "retry now" invites a hot loop.
fn retry_secs(wait: &std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Every error's body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// What went wrong, for programs: `poll_not_found`, `already_voted`, …
    #[schema(value_type = String, example = "poll_not_found")]
    pub error: &'a str,
    /// The same, for people.
    #[schema(value_type = String)]
    pub message: &'a str,
}

/// The JSON error response.
pub fn error_reply(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = ErrorBody {
        error: code,
        message,
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// One of our own errors as its JSON response (with `Retry-After` on a 429).
pub fn api_error_reply(err: &ApiError) -> warp::reply::Response {
    let (status, code) = err.status_and_code();
    let mut reply = error_reply(status, code, &err.to_string());
    if let ApiError::RateLimited(wait) = err {
        let secs = warp::http::HeaderValue::from(retry_secs(wait));
        reply.headers_mut().insert("retry-after", secs);
    }
    reply
}

/// Turns every rejection into a JSON error.
pub async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    use warp::reject;
    if let Some(err) = rejection.find::<ApiError>() {
        return Ok(api_error_reply(err));
    }
    let (status, code, message) = if rejection.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint".to_owned(),
        )
    } else if let Some(cors) = rejection.find::<warp::filters::cors::CorsForbidden>() {
        (StatusCode::FORBIDDEN, "forbidden", cors.to_string())
    } else if rejection.find::<reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this endpoint".to_owned(),
        )
    } else {
        // Why 400 and not 500: every remaining rejection of warp's is about the request (a bad
        // header, a missing WebSocket upgrade); our own failures are ApiErrors, handled above.
        (
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("bad request: {rejection:?}"),
        )
    };
    Ok(error_reply(status, code, &message))
}
