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

/// A timestamp as the API shows it: RFC 3339 in UTC, with milliseconds.
pub fn rfc3339(ms: UnixMillis) -> String {
    let at = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

/// One vote as it travels through the vote log (`raw-votes`).
///
/// The seed app's producers send ids as JSON strings (`{"pollId": "1", ...}`); both forms
/// deserialize, so records written by either app are counted. A single choice is written as
/// `optionId` (the seed's field), several as `optionIds`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "VoteRecord")]
pub struct Vote {
    /// The poll voted in.
    pub poll_id: PollId,
    /// The options chosen: one, or up to the poll's `max_choices`, distinct.
    pub choices: Vec<OptionId>,
    /// Who voted; at most one ballot per (poll, user) is ever counted.
    pub user_id: String,
    /// When the vote was accepted; absent in records written by the seed app.
    pub voted_at: Option<UnixMillis>,
    /// The voter's idempotency key (or one the server made up). The ledger records each
    /// (poll, user, vote id) once, so a retried or replayed vote is applied once.
    pub vote_id: Option<String>,
}

impl Vote {
    /// A single-choice vote, as the seed app sends them.
    pub fn single(poll_id: PollId, option_id: OptionId, user_id: impl Into<String>) -> Self {
        Self {
            poll_id,
            choices: vec![option_id],
            user_id: user_id.into(),
            voted_at: None,
            vote_id: None,
        }
    }

    /// Parses a `raw-votes` record value.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Serializes the vote as a `raw-votes` record value.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of integers and strings cannot fail to serialize.
        serde_json::to_vec(self).expect("vote serializes")
    }

    /// Appends the vote's record value to `out`: what its `Serialize` writes, byte for byte
    /// (a test holds the two together). Why by hand: every vote is written once on its way
    /// into the log, and serde's struct serializer scanned each constant key for characters
    /// to escape: 1,840 instructions a vote, against 920 by hand (docs/BENCHMARKS.md, "Fast
    /// paths"). The strings still go through serde_json's escaping.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(b"{\"pollId\":");
        out.extend_from_slice(number.format(self.poll_id).as_bytes());
        match self.choices.as_slice() {
            [one] => {
                out.extend_from_slice(b",\"optionId\":");
                out.extend_from_slice(number.format(*one).as_bytes());
            }
            many => {
                out.extend_from_slice(b",\"optionIds\":[");
                for (i, option) in many.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(number.format(*option).as_bytes());
                }
                out.push(b']');
            }
        }
        out.extend_from_slice(b",\"userId\":");
        write_json_str(out, &self.user_id);
        if let Some(at) = self.voted_at {
            out.extend_from_slice(b",\"votedAt\":");
            out.extend_from_slice(number.format(at).as_bytes());
        }
        if let Some(id) = &self.vote_id {
            out.extend_from_slice(b",\"voteId\":");
            write_json_str(out, id);
        }
        out.push(b'}');
    }

    /// The vote id the ledger keys this vote by (records of the seed app have none).
    pub fn ledger_id(&self) -> &str {
        self.vote_id.as_deref().unwrap_or("")
    }
}

/// The wire form of a [`Vote`], read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VoteRecord {
    #[serde(deserialize_with = "flexible_id")]
    poll_id: PollId,
    #[serde(
        default,
        deserialize_with = "flexible_opt_id",
        skip_serializing_if = "Option::is_none"
    )]
    option_id: Option<OptionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    option_ids: Option<Vec<OptionId>>,
    user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    voted_at: Option<UnixMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vote_id: Option<String>,
}

impl TryFrom<VoteRecord> for Vote {
    type Error = String;

    fn try_from(r: VoteRecord) -> Result<Self, String> {
        let choices = match (r.option_id, r.option_ids) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.is_empty() => many,
            (None, _) => return Err("a vote needs `optionId` or a non-empty `optionIds`".into()),
            (Some(_), Some(_)) => {
                return Err("a vote has `optionId` or `optionIds`, not both".into());
            }
        };
        Ok(Vote {
            poll_id: r.poll_id,
            choices,
            user_id: r.user_id,
            voted_at: r.voted_at,
            vote_id: r.vote_id,
        })
    }
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing to a Vec cannot fail, nor can a string serialize wrongly.
    serde_json::to_writer(out, text).expect("a string serializes");
}

/// The wire form of a [`Vote`], written. Why borrowed: every vote is serialized once on
/// its way into the log, and converting an owned copy cost three allocations each time.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VoteRecordRef<'a> {
    poll_id: PollId,
    #[serde(skip_serializing_if = "Option::is_none")]
    option_id: Option<OptionId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    option_ids: Option<&'a [OptionId]>,
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    voted_at: Option<UnixMillis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vote_id: Option<&'a str>,
}

impl Serialize for Vote {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (option_id, option_ids) = match self.choices.as_slice() {
            [one] => (Some(*one), None),
            many => (None, Some(many)),
        };
        VoteRecordRef {
            poll_id: self.poll_id,
            option_id,
            option_ids,
            user_id: &self.user_id,
            voted_at: self.voted_at,
            vote_id: self.vote_id.as_deref(),
        }
        .serialize(serializer)
    }
}

/// A poll was closed: every vote before this record in the poll's partition is in, so its
/// aggregator flushes them and publishes the final counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollClosed {
    /// Always "pollClosed"; what tells this record from a vote.
    pub event: ClosedEvent,
    /// The poll.
    pub poll_id: PollId,
    /// When it closed.
    pub closed_at: UnixMillis,
}

/// The tag of a [`PollClosed`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClosedEvent {
    /// The only control event.
    #[serde(rename = "pollClosed")]
    PollClosed,
}

/// One record of the vote log: a vote, or the marker that closes a poll. Both are keyed by
/// pollId, so a poll's close marker is ordered after every vote appended before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "EntryRecord")]
pub enum LogEntry {
    /// A record with `"event": "pollClosed"`.
    Closed(PollClosed),
    /// A vote: a record without `event`.
    Vote(Vote),
}

/// The wire form of any [`LogEntry`], read in one pass. Why not `#[serde(untagged)]` on the
/// way in: it buffers every record into an intermediate tree and tries each variant, for
/// every record read (what that cost: docs/BENCHMARKS.md, "Fast paths").
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryRecord {
    #[serde(default)]
    event: Option<ClosedEvent>,
    #[serde(default)]
    closed_at: Option<UnixMillis>,
    #[serde(deserialize_with = "flexible_id")]
    poll_id: PollId,
    #[serde(default, deserialize_with = "flexible_opt_id")]
    option_id: Option<OptionId>,
    #[serde(default)]
    option_ids: Option<Vec<OptionId>>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    voted_at: Option<UnixMillis>,
    #[serde(default)]
    vote_id: Option<String>,
}

impl TryFrom<EntryRecord> for LogEntry {
    type Error = String;

    fn try_from(r: EntryRecord) -> Result<Self, String> {
        if let Some(event) = r.event {
            let closed_at = r.closed_at.ok_or("a pollClosed record needs `closedAt`")?;
            return Ok(LogEntry::Closed(PollClosed {
                event,
                poll_id: r.poll_id,
                closed_at,
            }));
        }
        let user_id = r.user_id.ok_or("a vote needs `userId`")?;
        Vote::try_from(VoteRecord {
            poll_id: r.poll_id,
            option_id: r.option_id,
            option_ids: r.option_ids,
            user_id,
            voted_at: r.voted_at,
            vote_id: r.vote_id,
        })
        .map(LogEntry::Vote)
    }
}

impl LogEntry {
    /// The marker that closes `poll_id` as of `closed_at`.
    pub fn closed(poll_id: PollId, closed_at: UnixMillis) -> Self {
        LogEntry::Closed(PollClosed {
            event: ClosedEvent::PollClosed,
            poll_id,
            closed_at,
        })
    }

    /// The poll the record belongs to (its log key).
    pub fn poll_id(&self) -> PollId {
        match self {
            LogEntry::Closed(c) => c.poll_id,
            LogEntry::Vote(v) => v.poll_id,
        }
    }

    /// Parses a `raw-votes` record value.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Serializes the record value.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = Vec::new();
        self.write_json(&mut json);
        json
    }

    /// Appends the record value to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            LogEntry::Vote(vote) => vote.write_json(out),
            // Integers and strings cannot fail to serialize, nor can a Vec be written to.
            LogEntry::Closed(closed) => {
                serde_json::to_writer(out, closed).expect("log entry serializes")
            }
        }
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

/// [`flexible_id`] for an optional field.
pub fn flexible_opt_id<'de, D: Deserializer<'de>>(de: D) -> Result<Option<i64>, D::Error> {
    flexible_id(de).map(Some)
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
    /// Set on the poll's final update, sent once its last votes are in: when it closed.
    pub closed_at: Option<UnixMillis>,
    /// The poll hides its counts until it closes: subscribers get only the final update.
    pub hide_results: bool,
}

impl CountsUpdate {
    /// Whether this is the poll's final update (a `closed` message on every edge), sent once
    /// its last votes are in.
    pub fn is_final(&self) -> bool {
        self.closed_at.is_some()
    }

    /// Whether subscribers must not see it: the poll hides its counts until this final one.
    pub fn is_hidden(&self) -> bool {
        self.hide_results && !self.is_final()
    }

    /// The counts to send: with `delta`, only the options this flush changed (for a receiver
    /// that saw the previous update), else every option. A final update always lists every
    /// option, so the last word on a poll stands on its own.
    pub fn counts(&self, delta: bool) -> &[OptionCount] {
        if delta && !self.is_final() {
            &self.changed
        } else {
            &self.all
        }
    }
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
        assert_eq!(a.choices, vec![2]);
    }

    #[test]
    fn votes_written_by_hand_are_what_serde_writes() {
        let users = [
            "u-17",
            "",
            "quote \" and \\ back",
            "tab\tnew\nline\u{1}",
            "é 🗳 ü",
        ];
        let mut written = 0;
        for user in users {
            for choices in [vec![2], vec![1, 3, 32], vec![], vec![i64::MAX, -1]] {
                for voted_at in [None, Some(1_765_000_000_123), Some(-5)] {
                    for vote_id in [None, Some("s-0f3a"), Some("\"</script>")] {
                        let vote = Vote {
                            poll_id: if written % 2 == 0 { 7 } else { i64::MIN },
                            choices: choices.clone(),
                            user_id: user.into(),
                            voted_at,
                            vote_id: vote_id.map(str::to_owned),
                        };
                        // After other bytes: the writer appends, as into a group's buffer.
                        let mut by_hand = b"[".to_vec();
                        LogEntry::Vote(vote.clone()).write_json(&mut by_hand);
                        assert_eq!(
                            String::from_utf8(by_hand).unwrap(),
                            format!("[{}", String::from_utf8(vote.to_json()).unwrap()),
                        );
                        written += 1;
                    }
                }
            }
        }
        assert_eq!(written, 180);
    }

    #[test]
    fn vote_rejects_non_numeric_string_ids() {
        assert!(Vote::from_json(br#"{"pollId":"one","optionId":2,"userId":"u"}"#).is_err());
    }

    #[test]
    fn vote_needs_exactly_one_of_option_id_and_option_ids() {
        let many = Vote::from_json(br#"{"pollId":1,"optionIds":[1,3],"userId":"u"}"#).unwrap();
        assert_eq!(many.choices, vec![1, 3]);
        for bad in [
            &br#"{"pollId":1,"userId":"u"}"#[..],
            br#"{"pollId":1,"optionIds":[],"userId":"u"}"#,
            br#"{"pollId":1,"optionId":1,"optionIds":[2],"userId":"u"}"#,
        ] {
            assert!(Vote::from_json(bad).is_err());
        }
    }

    #[test]
    fn vote_round_trips_through_json() {
        for choices in [vec![1], vec![1, 3]] {
            let v = Vote {
                poll_id: 3,
                choices,
                user_id: "x".into(),
                voted_at: Some(5),
                vote_id: Some("k".into()),
            };
            assert_eq!(Vote::from_json(&v.to_json()).unwrap(), v);
        }
    }

    #[test]
    fn single_choice_votes_keep_the_seed_apps_shape() {
        let json: serde_json::Value =
            serde_json::from_slice(&Vote::single(1, 2, "u").to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"pollId": 1, "optionId": 2, "userId": "u"})
        );
    }

    #[test]
    fn log_entries_that_are_neither_vote_nor_marker_are_refused() {
        for bad in [
            &br#"{"event":"pollClosed","pollId":4}"#[..],
            br#"{"event":"pollOpened","pollId":4,"closedAt":1,"optionId":1,"userId":"u"}"#,
            br#"{"pollId":4,"optionId":1}"#,
            br#"{"pollId":4,"userId":"u"}"#,
        ] {
            assert!(
                LogEntry::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn log_entries_tell_close_markers_from_votes() {
        let closed = LogEntry::closed(4, 99);
        assert_eq!(LogEntry::from_json(&closed.to_json()).unwrap(), closed);
        let vote = LogEntry::from_json(br#"{"pollId":"4","optionId":"1","userId":"u"}"#).unwrap();
        assert_eq!(vote, LogEntry::Vote(Vote::single(4, 1, "u")));
        assert_eq!(closed.poll_id(), vote.poll_id());
        let changed = Vote {
            voted_at: Some(7),
            vote_id: Some("v-1".into()),
            ..Vote::single(4, 2, "u")
        };
        let entry = LogEntry::Vote(changed);
        assert_eq!(LogEntry::from_json(&entry.to_json()).unwrap(), entry);
    }
}
