//! The vocabulary of pollcast: polls, options, votes and the counts we publish.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};

/// Identifier of a poll, assigned by the store.
pub type PollId = i64;

/// Identifier of an option *within* its poll (1, 2, … in creation order).
pub type OptionId = i64;

/// Milliseconds since the Unix epoch; every timestamp on the wire uses this unit.
pub type UnixMillis = i64;

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One vote as it travels through the vote log (`raw-votes`).
///
/// The seed app's producers send ids as JSON strings (`{"pollId": "1", ...}`); both forms
/// deserialize, so records written by either app are counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// The poll voted in.
    #[serde(deserialize_with = "flexible_id")]
    pub poll_id: PollId,
    /// The option chosen.
    #[serde(deserialize_with = "flexible_id")]
    pub option_id: OptionId,
    /// Who voted; at most one vote per (poll, user) is ever counted.
    pub user_id: String,
    /// When the vote was accepted; absent in records written by the seed app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voted_at: Option<UnixMillis>,
}

impl Vote {
    /// Parses a `raw-votes` record value.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Serializes the vote as a `raw-votes` record value.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of integers and strings cannot fail to serialize.
        serde_json::to_vec(self).expect("vote serializes")
    }
}

/// Accepts an id written as a JSON integer or as a string holding one.
pub fn flexible_id<'de, D: Deserializer<'de>>(de: D) -> Result<i64, D::Error> {
    struct IdVisitor;

    impl serde::de::Visitor<'_> for IdVisitor {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer id, or a string holding one")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("id out of range"))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<i64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }

    de.deserialize_any(IdVisitor)
}

/// One option of a poll with its current count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollOption {
    /// The option's id within its poll.
    pub id: OptionId,
    /// The text shown to voters.
    pub text: String,
    /// Votes counted so far (only what has been flushed to the store).
    pub votes: i64,
}

/// A poll as stored: its question, options and counts, and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Poll {
    /// The poll's id.
    pub id: PollId,
    /// The question asked.
    pub question: String,
    /// The options in creation order.
    pub options: Vec<PollOption>,
    /// Whether the poll refuses new votes.
    pub closed: bool,
    /// Creation time.
    pub created_at: UnixMillis,
    /// When the poll was closed, if it was.
    pub closed_at: Option<UnixMillis>,
    /// The poll's version: incremented by every flush that changed its counts. WebSocket
    /// messages carry it as `seq` so that clients can drop stale updates.
    pub seq: i64,
}

impl Poll {
    /// Sum of the counts of all options.
    pub fn total_votes(&self) -> i64 {
        self.options.iter().map(|o| o.votes).sum()
    }

    /// Whether `option` is one of this poll's options.
    pub fn has_option(&self, option: OptionId) -> bool {
        self.options.iter().any(|o| o.id == option)
    }
}

/// A poll to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPoll {
    /// The question asked.
    pub question: String,
    /// Option texts in display order; ids 1..=n are assigned in this order.
    pub options: Vec<String>,
}

/// The new count of one option after a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OptionCount {
    /// The option.
    pub option_id: OptionId,
    /// Its count after the flush.
    pub new_count: i64,
}

/// What one flush changed in one poll: the message the broadcaster fans out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountsUpdate {
    /// The poll.
    pub poll_id: PollId,
    /// The poll's version after the flush.
    pub seq: i64,
    /// New counts of the options the flush changed.
    pub changed: Vec<OptionCount>,
    /// New counts of every option, so that a subscriber that skipped an update catches up.
    pub all: Vec<OptionCount>,
    /// When the flush transaction committed (server clock).
    pub flushed_at: UnixMillis,
}

impl fmt::Display for CountsUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "poll {} seq {} ({} options changed)",
            self.poll_id,
            self.seq,
            self.changed.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vote_accepts_numeric_and_string_ids() {
        let a = Vote::from_json(br#"{"pollId":1,"optionId":2,"userId":"u-17"}"#).unwrap();
        let b = Vote::from_json(br#"{"pollId":"1","optionId":"2","userId":"u-17"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.poll_id, 1);
        assert_eq!(a.option_id, 2);
    }

    #[test]
    fn vote_rejects_non_numeric_string_ids() {
        assert!(Vote::from_json(br#"{"pollId":"one","optionId":2,"userId":"u"}"#).is_err());
    }

    #[test]
    fn vote_round_trips_through_json() {
        let v = Vote {
            poll_id: 3,
            option_id: 1,
            user_id: "x".into(),
            voted_at: Some(5),
        };
        assert_eq!(Vote::from_json(&v.to_json()).unwrap(), v);
    }
}
