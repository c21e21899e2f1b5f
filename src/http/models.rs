//! Request and response bodies of the HTTP API.

use std::time::UNIX_EPOCH;

use pollcast_actors::domain::{UnixMillis, flexible_id, flexible_opt_id, rfc3339};
use pollcast_actors::{OptionId, Poll, PollDraft, PollId, Vote, WebhookDraft, WebhookTarget};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Longest user id, in characters.
pub const USER_ID_MAX: usize = 128;

/// Parses a JSON body: a syntax error is a 400, a well-formed body of the wrong shape a 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::Malformed(e.to_string()),
    })
}

/// `POST /polls`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreatePollRequest {
    /// The question (1 to 500 characters).
    #[schema(min_length = 1, max_length = 500)]
    pub question: String,
    /// Option texts, in display order (2 to 32, each 1 to 200 characters, no duplicates).
    #[schema(min_items = 2, max_items = 32)]
    pub options: Vec<String>,
    /// Options one voter may choose (default 1).
    #[schema(minimum = 1)]
    pub max_choices: Option<u32>,
    /// RFC 3339 time at which the poll closes by itself.
    #[schema(format = DateTime)]
    pub closes_at: Option<String>,
    /// Show counts only once the poll is closed.
    #[serde(default)]
    pub hide_results: bool,
    /// Voters may change their ballot until the poll closes.
    #[serde(default)]
    pub allow_change: bool,
    /// Where lifecycle events are delivered.
    pub webhook: Option<WebhookRequest>,
}

/// The `webhook` of a `POST /polls`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookRequest {
    /// An `http` or `https` URL.
    pub url: String,
    /// Also send the counts this often while the poll is open.
    pub results_every_secs: Option<u32>,
}

impl CreatePollRequest {
    /// The poll the request describes, its times parsed; the poll's rules are checked by
    /// the service ([`pollcast_actors::PollDraft::check`]).
    pub fn into_draft(self) -> Result<PollDraft, ApiError> {
        let closes_at = match self.closes_at.as_deref() {
            None => None,
            Some(text) => Some(
                humantime::parse_rfc3339_weak(text.trim())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as UnixMillis)
                    .ok_or_else(|| {
                        ApiError::Invalid(format!(
                            "closesAt must be an RFC 3339 time such as 2026-11-25T18:00:00Z, not {text:?}"
                        ))
                    })?,
            ),
        };
        Ok(PollDraft {
            question: self.question,
            options: self.options,
            max_choices: self.max_choices,
            closes_at,
            hide_results: self.hide_results,
            allow_change: self.allow_change,
            webhook: self.webhook.map(|w| WebhookDraft {
                url: w.url,
                results_every_secs: w.results_every_secs,
            }),
        })
    }
}

/// `POST /vote`: the seed app's body; ids may be numbers or numeric strings. Several
/// choices come as `optionIds`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoteRequest {
    /// The poll.
    #[serde(deserialize_with = "flexible_id")]
    #[schema(schema_with = flexible_id_schema)]
    pub poll_id: PollId,
    /// The option chosen (single choice).
    #[serde(default, deserialize_with = "flexible_opt_id")]
    #[schema(schema_with = flexible_id_schema)]
    pub option_id: Option<OptionId>,
    /// The options chosen (multiple choice).
    pub option_ids: Option<Vec<OptionId>>,
    /// Who votes (required unless voters present signed tokens).
    pub user_id: Option<String>,
    /// The client's idempotency key (or the `Idempotency-Key` header).
    pub vote_id: Option<String>,
}

/// Longest vote id (idempotency key), in characters.
pub const VOTE_ID_MAX: usize = 128;

fn printable(text: &str, max: usize) -> bool {
    !text.is_empty() && text.chars().count() <= max && !text.chars().any(char::is_control)
}

impl VoteRequest {
    /// Checks the user id (the body's, or `signed_user` taken from a verified token), the
    /// choices, and the idempotency key (the body's `voteId` or the `Idempotency-Key`
    /// header; they must agree when both are given).
    pub fn validate(
        self,
        signed_user: Option<String>,
        idempotency_key: Option<String>,
    ) -> Result<Vote, ApiError> {
        let invalid = |m: &str| Err(ApiError::Invalid(m.into()));
        let Some(user) = signed_user.or(self.user_id) else {
            return invalid("missing field `userId`");
        };
        // Why not always `trim().to_owned()`: nearly every id has nothing to trim, and this
        // runs for every vote.
        let user = match user.trim() {
            trimmed if trimmed.len() == user.len() => user,
            trimmed => trimmed.to_owned(),
        };
        if !printable(&user, USER_ID_MAX) {
            return Err(ApiError::Invalid(format!(
                "userId must have 1 to {USER_ID_MAX} printable characters"
            )));
        }
        let choices = match (self.option_id, self.option_ids) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.is_empty() => many,
            (None, _) => return invalid("a vote needs `optionId` or a non-empty `optionIds`"),
            (Some(_), Some(_)) => return invalid("give `optionId` or `optionIds`, not both"),
        };
        let vote_id = match (self.vote_id, idempotency_key) {
            (Some(a), Some(b)) if a != b => {
                return invalid("`voteId` and the Idempotency-Key header differ");
            }
            (a, b) => a.or(b),
        };
        if vote_id
            .as_deref()
            .is_some_and(|id| !printable(id, VOTE_ID_MAX))
        {
            return Err(ApiError::Invalid(format!(
                "voteId must have 1 to {VOTE_ID_MAX} printable characters"
            )));
        }
        // Whether the choices fit the poll is the poll's rule, checked by the service.
        Ok(Vote {
            poll_id: self.poll_id,
            choices,
            user_id: user,
            voted_at: None,
            vote_id,
        })
    }
}

/// `202` body of `POST /vote` (the seed app's).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VoteAccepted {
    /// Always "Vote queued".
    #[schema(value_type = String, example = "Vote queued")]
    pub status: &'static str,
}

/// An id as a number, or as a numeric string (the seed app's clients send strings).
fn flexible_id_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    let one_of = OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Integer).format(Some(
            utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64),
        )))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^-?[0-9]+$")),
        )
        .build();
    Schema::OneOf(one_of)
}

/// A poll as every endpoint and the WebSocket snapshot show it. While a poll hides its
/// results, every count is `null`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollView {
    /// The poll's id.
    pub id: PollId,
    /// The question.
    pub question: String,
    /// Options with their counts.
    pub options: Vec<OptionView>,
    /// Whether it refuses votes.
    pub closed: bool,
    /// RFC 3339 creation time.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339 closing time.
    #[schema(format = DateTime)]
    pub closed_at: Option<String>,
    /// RFC 3339 time at which it closes by itself.
    #[schema(format = DateTime)]
    pub closes_at: Option<String>,
    /// Options one voter may choose.
    pub max_choices: u32,
    /// Counts are shown only once it is closed.
    pub hide_results: bool,
    /// Voters may change their ballot.
    pub allow_change: bool,
    /// Sum of all counts.
    pub total_votes: Option<i64>,
    /// Voters counted.
    pub voters: Option<i64>,
    /// Version of the counts (see the WebSocket messages).
    pub seq: i64,
}

/// One option of a [`PollView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OptionView {
    /// Its id within the poll.
    pub id: OptionId,
    /// Its text.
    pub text: String,
    /// Its count (`null` while hidden).
    pub votes: Option<i64>,
}

impl PollView {
    /// The poll as anyone may see it at `now`.
    pub fn at(poll: Poll, now: UnixMillis) -> Self {
        let visible = poll.results_visible_at(now);
        Self::new(poll, visible)
    }

    /// The poll with its counts whatever its settings (admins).
    pub fn with_counts(poll: Poll) -> Self {
        Self::new(poll, true)
    }

    fn new(poll: Poll, visible: bool) -> Self {
        let shown = |n: i64| visible.then_some(n);
        Self {
            id: poll.id,
            total_votes: shown(poll.total_votes()),
            voters: shown(poll.voters),
            question: poll.question,
            options: poll
                .options
                .into_iter()
                .map(|o| OptionView {
                    id: o.id,
                    text: o.text,
                    votes: shown(o.votes),
                })
                .collect(),
            closed: poll.closed,
            created_at: rfc3339(poll.created_at),
            closed_at: poll.closed_at.map(rfc3339),
            closes_at: poll.settings.closes_at.map(rfc3339),
            max_choices: poll.settings.max_choices,
            hide_results: poll.settings.hide_results,
            allow_change: poll.settings.allow_change,
            seq: poll.seq,
        }
    }
}

/// `201` body of `POST /polls`: the poll, and its webhook with the signing secret, shown
/// this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedPoll {
    /// The poll.
    #[serde(flatten)]
    pub poll: PollView,
    /// The webhook, if one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WebhookView>)]
    pub webhook: Option<WebhookTarget>,
    /// The key of the HMAC that signs its deliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

/// How a poll's webhook is shown (its secret only once, beside it, in `webhookSecret`).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Webhook)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // a description of `WebhookTarget`'s JSON, never built
pub struct WebhookView {
    /// Where the events are delivered.
    url: String,
    /// Also sends the counts this often while the poll is open.
    results_every_secs: Option<u32>,
}

/// First WebSocket message: the poll as it is now.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Always "snapshot".
    pub r#type: &'static str,
    /// The poll's version; later `counts` messages have greater ones.
    pub seq: i64,
    /// The poll.
    pub poll: PollView,
}
