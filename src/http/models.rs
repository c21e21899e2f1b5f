//! Request and response bodies of the HTTP API.

use std::time::{Duration, UNIX_EPOCH};

use pollcast_actors::domain::{UnixMillis, flexible_id};
use pollcast_actors::{NewPoll, OptionId, Poll, PollId, PollOption, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Longest question, in characters.
pub const QUESTION_MAX: usize = 500;
/// Longest option text, in characters.
pub const OPTION_MAX: usize = 200;
/// Fewest and most options of a poll.
pub const OPTIONS_RANGE: std::ops::RangeInclusive<usize> = 2..=32;
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePollRequest {
    /// The question.
    pub question: String,
    /// Option texts, in display order.
    pub options: Vec<String>,
}

impl CreatePollRequest {
    /// Checks lengths and counts; trims whitespace.
    pub fn validate(self) -> Result<NewPoll, ApiError> {
        let invalid = |m: String| Err(ApiError::Invalid(m));
        let question = self.question.trim().to_owned();
        if question.is_empty() || question.chars().count() > QUESTION_MAX {
            return invalid(format!("question must have 1 to {QUESTION_MAX} characters"));
        }
        if !OPTIONS_RANGE.contains(&self.options.len()) {
            return invalid(format!(
                "a poll has {} to {} options, not {}",
                OPTIONS_RANGE.start(),
                OPTIONS_RANGE.end(),
                self.options.len()
            ));
        }
        let options: Vec<String> = self.options.iter().map(|o| o.trim().to_owned()).collect();
        for (i, text) in options.iter().enumerate() {
            if text.is_empty() || text.chars().count() > OPTION_MAX {
                return invalid(format!(
                    "option {} must have 1 to {OPTION_MAX} characters",
                    i + 1
                ));
            }
            if options[..i].contains(text) {
                return invalid(format!("option {text:?} appears twice"));
            }
        }
        Ok(NewPoll { question, options })
    }
}

/// `POST /vote`: the seed app's body; ids may be numbers or numeric strings.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoteRequest {
    /// The poll.
    #[serde(deserialize_with = "flexible_id")]
    pub poll_id: PollId,
    /// The option chosen.
    #[serde(deserialize_with = "flexible_id")]
    pub option_id: OptionId,
    /// Who votes (required unless voters present signed tokens).
    pub user_id: Option<String>,
}

impl VoteRequest {
    /// Checks the user id: the body's, or `signed_user` taken from a verified token.
    pub fn validate(self, signed_user: Option<String>) -> Result<Vote, ApiError> {
        let Some(user) = signed_user.or(self.user_id) else {
            return Err(ApiError::Invalid("missing field `userId`".into()));
        };
        let user = user.trim();
        if user.is_empty()
            || user.chars().count() > USER_ID_MAX
            || user.chars().any(char::is_control)
        {
            return Err(ApiError::Invalid(format!(
                "userId must have 1 to {USER_ID_MAX} printable characters"
            )));
        }
        Ok(Vote {
            poll_id: self.poll_id,
            option_id: self.option_id,
            user_id: user.to_owned(),
            voted_at: None,
        })
    }
}

/// `202` body of `POST /vote` (the seed app's).
#[derive(Debug, Serialize)]
pub struct VoteAccepted {
    /// Always "Vote queued".
    pub status: &'static str,
}

/// A poll as every endpoint and the WebSocket snapshot show it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollView {
    /// The poll's id.
    pub id: PollId,
    /// The question.
    pub question: String,
    /// Options with their counts.
    pub options: Vec<PollOption>,
    /// Whether it refuses votes.
    pub closed: bool,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 closing time.
    pub closed_at: Option<String>,
    /// Sum of all counts.
    pub total_votes: i64,
    /// Version of the counts (see the WebSocket messages).
    pub seq: i64,
}

fn rfc3339(ms: UnixMillis) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

impl From<Poll> for PollView {
    fn from(poll: Poll) -> Self {
        Self {
            id: poll.id,
            total_votes: poll.total_votes(),
            question: poll.question,
            options: poll.options,
            closed: poll.closed,
            created_at: rfc3339(poll.created_at),
            closed_at: poll.closed_at.map(rfc3339),
            seq: poll.seq,
        }
    }
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
