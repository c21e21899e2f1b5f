//! The events' wire format: what a receiver parses. Encoded once, here, at the edge that
//! sends it; the core hands over domain types ([`Poll`], [`CountsUpdate`]) and knows no JSON.

use bytes::Bytes;
use pollcast_actors::domain::{OptionId, UnixMillis, rfc3339};
use pollcast_actors::{CountsUpdate, OptionCount, Poll, PollId};
use serde::Serialize;

/// The kind of a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The poll was created.
    Opened,
    /// Periodic counts of an open poll.
    Results,
    /// The poll closed; carries its final counts.
    Closed,
}

impl EventKind {
    /// The event's `type`, as in the body and `X-Pollcast-Event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Opened => "poll.opened",
            EventKind::Results => "poll.results",
            EventKind::Closed => "poll.closed",
        }
    }

    /// The event a count update would become, if any is sent.
    pub fn of_update(update: &CountsUpdate) -> Self {
        if update.is_final() {
            EventKind::Closed
        } else {
            EventKind::Results
        }
    }
}

/// One event ready to send: its id and JSON body. The body is fixed; the signature is made
/// at each attempt, since it covers the time of sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// The poll.
    pub poll_id: PollId,
    /// What happened.
    pub kind: EventKind,
    /// `<pollId>-<type>-<seq>`: the same for every attempt, for receivers to deduplicate.
    pub id: String,
    /// The JSON body.
    pub body: Bytes,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    poll_id: PollId,
    seq: i64,
    occurred_at: String,
    counts: &'a [OptionCount],
    closed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    poll: Option<PollBody<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollBody<'a> {
    id: PollId,
    question: &'a str,
    options: Vec<OptionBody<'a>>,
    closes_at: Option<String>,
    max_choices: u32,
}

#[derive(Serialize)]
struct OptionBody<'a> {
    id: OptionId,
    text: &'a str,
}

impl WebhookEvent {
    /// `poll.opened` for a poll just created.
    pub fn opened(poll: &Poll) -> Self {
        let counts: Vec<OptionCount> = poll
            .options
            .iter()
            .map(|o| OptionCount {
                option_id: o.id,
                new_count: o.votes,
            })
            .collect();
        let summary = PollBody {
            id: poll.id,
            question: &poll.question,
            options: poll
                .options
                .iter()
                .map(|o| OptionBody {
                    id: o.id,
                    text: &o.text,
                })
                .collect(),
            closes_at: poll.settings.closes_at.map(rfc3339),
            max_choices: poll.settings.max_choices,
        };
        Self::build(
            poll.id,
            EventKind::Opened,
            poll.seq,
            poll.created_at,
            &counts,
            poll.closed_at,
            Some(summary),
        )
    }

    /// `poll.results` or `poll.closed` (by `update.closed_at`) with every option's count.
    pub fn of_update(update: &CountsUpdate) -> Self {
        Self::build(
            update.poll_id,
            EventKind::of_update(update),
            update.seq,
            update.flushed_at,
            &update.all,
            update.closed_at,
            None,
        )
    }

    fn build(
        poll_id: PollId,
        kind: EventKind,
        seq: i64,
        occurred_at: UnixMillis,
        counts: &[OptionCount],
        closed_at: Option<UnixMillis>,
        poll: Option<PollBody<'_>>,
    ) -> Self {
        let id = format!("{poll_id}-{}-{seq}", kind.as_str());
        let body = Body {
            id: &id,
            kind: kind.as_str(),
            poll_id,
            seq,
            occurred_at: rfc3339(occurred_at),
            counts,
            closed_at: closed_at.map(rfc3339),
            poll,
        };
        // Integers and strings only: serializing cannot fail.
        let body = Bytes::from(serde_json::to_vec(&body).expect("webhook body serializes"));
        Self {
            poll_id,
            kind,
            id,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::adapters::webhooks::tests::{poll, target, update};

    #[test]
    fn event_bodies_carry_ids_receivers_can_deduplicate_by() {
        let closed = WebhookEvent::of_update(&update(1, 7, Some(1_700_000_100_000)));
        assert_eq!(closed.kind, EventKind::Closed);
        assert_eq!(closed.id, "1-poll.closed-7");
        let body: Value = serde_json::from_slice(&closed.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "1-poll.closed-7",
                "type": "poll.closed",
                "pollId": 1,
                "seq": 7,
                "occurredAt": "2023-11-14T22:13:20.007Z",
                "counts": [{"optionId": 1, "newCount": 7}, {"optionId": 2, "newCount": 0}],
                "closedAt": "2023-11-14T22:15:00.000Z",
            })
        );

        let results = WebhookEvent::of_update(&update(1, 3, None));
        assert_eq!(results.id, "1-poll.results-3");
        let body: Value = serde_json::from_slice(&results.body).unwrap();
        assert_eq!(body["type"], "poll.results");
        assert_eq!(body["closedAt"], Value::Null);

        let opened = WebhookEvent::opened(&poll(4, Some(target("http://x", None)), false));
        assert_eq!(opened.id, "4-poll.opened-0");
        let body: Value = serde_json::from_slice(&opened.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "4-poll.opened-0",
                "type": "poll.opened",
                "pollId": 4,
                "seq": 0,
                "occurredAt": "2023-11-14T22:13:20.000Z",
                "counts": [{"optionId": 1, "newCount": 0}, {"optionId": 2, "newCount": 0}],
                "closedAt": null,
                "poll": {
                    "id": 4,
                    "question": "Tabs or spaces?",
                    "options": [{"id": 1, "text": "Tabs"}, {"id": 2, "text": "Spaces"}],
                    "closesAt": "2023-11-14T22:14:20.000Z",
                    "maxChoices": 1,
                },
            })
        );
        assert!(
            !String::from_utf8_lossy(&opened.body).contains("whsec-test"),
            "the secret never goes on the wire"
        );
    }
}
