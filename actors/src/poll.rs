//! What a poll is and what it allows: the one home of a poll's rules.
//!
//! Every layer that needs a rule asks here, so that changing what a poll allows is a change
//! to this file (and its spec tests below): creating a poll ([`PollDraft::check`], called by
//! the poll service for the HTTP API), taking a ballot ([`PollRules::check_ballot`], called
//! by the vote path and again by the aggregator for records other producers wrote), closing
//! ([`PollRules::is_closed_at`]), changing a ballot ([`PollRules::allows_change`], applied
//! by the ledger rule in [`crate::ballot`]) and hiding the counts
//! ([`Poll::results_visible_at`] and [`PollRules::hides_updates`]).

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::domain::{OptionId, PollId, UnixMillis};

/// Longest question, in characters.
pub const QUESTION_MAX: usize = 500;
/// Longest option text, in characters.
pub const OPTION_MAX: usize = 200;
/// Fewest and most options of a poll.
pub const OPTIONS_RANGE: RangeInclusive<usize> = 2..=32;
/// Longest webhook URL.
pub const WEBHOOK_URL_MAX: usize = 2000;

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

/// Where a poll's lifecycle events are delivered (see the webhooks adapter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookTarget {
    /// The operator's endpoint.
    pub url: String,
    /// Key of the HMAC that signs every delivery; shown once, when the poll is created.
    #[serde(skip_serializing, default)]
    pub secret: String,
    /// Also send the counts this often while the poll is open (`None`: only opened/closed).
    pub results_every_secs: Option<u32>,
}

/// How a poll behaves; fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollSettings {
    /// How many options one voter may choose (1: single choice).
    pub max_choices: u32,
    /// When the poll closes by itself.
    pub closes_at: Option<UnixMillis>,
    /// Counts are shown only once the poll is closed.
    pub hide_results: bool,
    /// Voters may replace their ballot until the poll closes.
    pub allow_change: bool,
    /// Lifecycle events go there.
    pub webhook: Option<WebhookTarget>,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            max_choices: 1,
            closes_at: None,
            hide_results: false,
            allow_change: false,
            webhook: None,
        }
    }
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
    /// Voters counted (with several choices each, fewer than the sum of the counts).
    pub voters: i64,
    /// How it behaves.
    pub settings: PollSettings,
}

impl Poll {
    /// Sum of the counts of all options.
    pub fn total_votes(&self) -> i64 {
        self.options.iter().map(|o| o.votes).sum()
    }

    /// What it allows.
    pub fn rules(&self) -> PollRules {
        PollRules::of(self)
    }

    /// Whether the poll refuses votes at `now`: closed, or past its closing time (the same
    /// rule as [`PollRules::is_closed_at`], without building the rules, so that listing
    /// polls copies no options).
    pub fn is_closed_at(&self, now: UnixMillis) -> bool {
        closed_at(self.closed, self.settings.closes_at, now)
    }

    /// Whether its counts may be shown at `now`.
    pub fn results_visible_at(&self, now: UnixMillis) -> bool {
        !self.settings.hide_results || self.is_closed_at(now)
    }
}

/// A poll to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPoll {
    /// The question asked.
    pub question: String,
    /// Option texts in display order; ids 1..=n are assigned in this order.
    pub options: Vec<String>,
    /// How it behaves.
    pub settings: PollSettings,
}

/// A poll as its creator described it, before the rules are checked: what `POST /polls`
/// carries, already parsed (times as [`UnixMillis`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollDraft {
    /// The question (trimmed by [`PollDraft::check`]).
    pub question: String,
    /// Option texts in display order (each trimmed).
    pub options: Vec<String>,
    /// Options one voter may choose (`None`: 1).
    pub max_choices: Option<u32>,
    /// When the poll closes by itself.
    pub closes_at: Option<UnixMillis>,
    /// Counts are shown only once the poll is closed.
    pub hide_results: bool,
    /// Voters may replace their ballot until the poll closes.
    pub allow_change: bool,
    /// Where lifecycle events go.
    pub webhook: Option<WebhookDraft>,
}

/// The webhook of a [`PollDraft`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDraft {
    /// An `http` or `https` URL.
    pub url: String,
    /// Also send the counts this often while the poll is open.
    pub results_every_secs: Option<u32>,
}

/// Why a [`PollDraft`] is not a poll. The messages are the API's (422 `invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPoll {
    /// Empty, or longer than [`QUESTION_MAX`].
    #[error("question must have 1 to {QUESTION_MAX} characters")]
    Question,
    /// Fewer or more options than [`OPTIONS_RANGE`].
    #[error("a poll has {min} to {max} options, not {0}", min = OPTIONS_RANGE.start(), max = OPTIONS_RANGE.end())]
    NumberOfOptions(usize),
    /// Option `n` (from 1) is empty or longer than [`OPTION_MAX`].
    #[error("option {0} must have 1 to {OPTION_MAX} characters")]
    OptionText(usize),
    /// Two options have this text.
    #[error("option {0:?} appears twice")]
    OptionTwice(String),
    /// `max_choices` is 0 or more than the options (their number).
    #[error("maxChoices must be between 1 and the number of options ({0})")]
    MaxChoices(usize),
    /// The closing time has passed.
    #[error("closesAt must be in the future")]
    ClosesInThePast,
    /// Not an absolute `http(s)` URL with a host, or longer than [`WEBHOOK_URL_MAX`].
    #[error("webhook.url must be an http(s) URL of at most {WEBHOOK_URL_MAX} characters")]
    WebhookUrl,
    /// A results interval of 0.
    #[error("webhook.resultsEverySecs must be at least 1")]
    WebhookInterval,
}

impl PollDraft {
    /// The poll to create, if the draft keeps the rules at `now`; whitespace around the
    /// question, the options and the webhook URL is trimmed. A webhook is given
    /// `webhook_secret` as its signing key.
    pub fn check(self, now: UnixMillis, webhook_secret: String) -> Result<NewPoll, InvalidPoll> {
        let question = self.question.trim().to_owned();
        if question.is_empty() || question.chars().count() > QUESTION_MAX {
            return Err(InvalidPoll::Question);
        }
        if !OPTIONS_RANGE.contains(&self.options.len()) {
            return Err(InvalidPoll::NumberOfOptions(self.options.len()));
        }
        let options: Vec<String> = self.options.iter().map(|o| o.trim().to_owned()).collect();
        for (i, text) in options.iter().enumerate() {
            if text.is_empty() || text.chars().count() > OPTION_MAX {
                return Err(InvalidPoll::OptionText(i + 1));
            }
            if options[..i].contains(text) {
                return Err(InvalidPoll::OptionTwice(text.clone()));
            }
        }
        let max_choices = self.max_choices.unwrap_or(1);
        if max_choices < 1 || max_choices as usize > options.len() {
            return Err(InvalidPoll::MaxChoices(options.len()));
        }
        if self.closes_at.is_some_and(|at| at <= now) {
            return Err(InvalidPoll::ClosesInThePast);
        }
        let webhook = match self.webhook {
            None => None,
            Some(hook) => Some(hook.check(webhook_secret)?),
        };
        Ok(NewPoll {
            question,
            options,
            settings: PollSettings {
                max_choices,
                closes_at: self.closes_at,
                hide_results: self.hide_results,
                allow_change: self.allow_change,
                webhook,
            },
        })
    }
}

impl WebhookDraft {
    fn check(self, secret: String) -> Result<WebhookTarget, InvalidPoll> {
        let url = self.url.trim().to_owned();
        let uri: Option<http::Uri> = url.parse().ok();
        let scheme_ok = uri
            .as_ref()
            .and_then(|u| u.scheme_str())
            .is_some_and(|s| s == "http" || s == "https");
        let host_ok = uri.as_ref().and_then(|u| u.host()).is_some();
        if !scheme_ok || !host_ok || url.len() > WEBHOOK_URL_MAX {
            return Err(InvalidPoll::WebhookUrl);
        }
        if self.results_every_secs == Some(0) {
            return Err(InvalidPoll::WebhookInterval);
        }
        Ok(WebhookTarget {
            url,
            secret,
            results_every_secs: self.results_every_secs,
        })
    }
}

/// What a poll allows, taken from its settings once: everything here is fixed at creation.
/// Cheap to check against for every vote; cached by the poll service's catalog and by each
/// aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRules {
    /// The poll's option ids (few: at most the end of [`OPTIONS_RANGE`]).
    options: Vec<OptionId>,
    max_choices: usize,
    closes_at: Option<UnixMillis>,
    hide_results: bool,
    allow_change: bool,
    has_webhook: bool,
}

/// Why a ballot does not fit its poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BallotRejection {
    /// No option chosen.
    #[error("a ballot chooses at least one option")]
    Empty,
    /// An option chosen twice.
    #[error("`optionIds` lists an option twice")]
    RepeatsAChoice,
    /// An option the poll does not have.
    #[error("no option {0}")]
    UnknownOption(OptionId),
    /// More options than the poll allows one voter.
    #[error("at most {0} choices")]
    TooManyChoices(usize),
}

impl PollRules {
    /// The rules of `poll`.
    pub fn of(poll: &Poll) -> Self {
        Self {
            options: poll.options.iter().map(|o| o.id).collect(),
            max_choices: poll.settings.max_choices as usize,
            closes_at: poll.settings.closes_at,
            hide_results: poll.settings.hide_results,
            allow_change: poll.settings.allow_change,
            has_webhook: poll.settings.webhook.is_some(),
        }
    }

    /// Whether `choices` is a ballot this poll takes: at least one option, each of the poll's
    /// and chosen once, and no more than `max_choices`.
    pub fn check_ballot(&self, choices: &[OptionId]) -> Result<(), BallotRejection> {
        if choices.is_empty() {
            return Err(BallotRejection::Empty);
        }
        if let Some(&option) = choices.iter().find(|c| !self.options.contains(c)) {
            return Err(BallotRejection::UnknownOption(option));
        }
        if choices.len() > self.max_choices {
            return Err(BallotRejection::TooManyChoices(self.max_choices));
        }
        if repeats_a_choice(choices) {
            return Err(BallotRejection::RepeatsAChoice);
        }
        Ok(())
    }

    /// Whether the poll refuses votes at `now`, `closed` being its stored flag. Why the clock
    /// and not only the flag: the closing time is fixed at creation, so every process refuses
    /// votes from that very moment, before the scheduler has closed the poll.
    pub fn is_closed_at(&self, closed: bool, now: UnixMillis) -> bool {
        closed_at(closed, self.closes_at, now)
    }

    /// Whether a voter's later ballot replaces the earlier one (else it is a duplicate).
    pub fn allows_change(&self) -> bool {
        self.allow_change
    }

    /// Whether the counts stay hidden from subscribers until the final update. Why `closed_at`
    /// and `published_after`: once the final counts have had `published_after` to go out (or
    /// be re-sent by the scheduler, with every count), the results are public, and a vote
    /// counted after them must reach subscribers too.
    pub fn hides_updates(
        &self,
        closed_at: Option<UnixMillis>,
        now: UnixMillis,
        published_after: UnixMillis,
    ) -> bool {
        self.hide_results && closed_at.is_none_or(|at| now < at + published_after)
    }

    /// Whether lifecycle events of this poll go to a webhook.
    pub fn has_webhook(&self) -> bool {
        self.has_webhook
    }
}

/// The closing rule: closed by its flag, or from its closing time on.
fn closed_at(closed: bool, closes_at: Option<UnixMillis>, now: UnixMillis) -> bool {
    closed || closes_at.is_some_and(|at| now >= at)
}

/// Whether an option appears twice in `choices`. Ballots are short (at most
/// [`OPTIONS_RANGE`]'s end), so comparing pairs costs less than building a set.
pub fn repeats_a_choice(choices: &[OptionId]) -> bool {
    choices
        .iter()
        .enumerate()
        .any(|(i, c)| choices[..i].contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = 1_700_000_000_000;

    fn draft(options: &[&str]) -> PollDraft {
        PollDraft {
            question: "Tabs or spaces?".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    fn check(draft: PollDraft) -> Result<NewPoll, InvalidPoll> {
        draft.check(NOW, "secret".into())
    }

    fn poll_of(new: NewPoll, closed: bool) -> Poll {
        Poll {
            id: 1,
            question: new.question,
            options: (1..)
                .zip(new.options)
                .map(|(id, text)| PollOption { id, text, votes: 0 })
                .collect(),
            closed,
            created_at: NOW,
            closed_at: closed.then_some(NOW),
            seq: 0,
            voters: 0,
            settings: new.settings,
        }
    }

    fn rules(max_choices: u32) -> PollRules {
        let draft = PollDraft {
            max_choices: Some(max_choices),
            ..draft(&["A", "B", "C"])
        };
        poll_of(check(draft).unwrap(), false).rules()
    }

    #[test]
    fn a_draft_is_trimmed_and_single_choice_by_default() {
        let new = check(PollDraft {
            question: "  Q?  ".into(),
            options: vec![" A ".into(), "B".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(new.question, "Q?");
        assert_eq!(new.options, ["A", "B"]);
        assert_eq!(new.settings, PollSettings::default());
    }

    #[test]
    fn a_question_has_one_to_five_hundred_characters() {
        let with = |q: String| {
            check(PollDraft {
                question: q,
                ..draft(&["A", "B"])
            })
        };
        assert_eq!(with("   ".into()), Err(InvalidPoll::Question));
        assert_eq!(
            with("é".repeat(QUESTION_MAX + 1)),
            Err(InvalidPoll::Question)
        );
        assert!(
            with("é".repeat(QUESTION_MAX)).is_ok(),
            "characters, not bytes"
        );
    }

    #[test]
    fn a_poll_has_two_to_thirty_two_distinct_non_empty_options() {
        assert_eq!(check(draft(&["A"])), Err(InvalidPoll::NumberOfOptions(1)));
        let many: Vec<String> = (0..33).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(check(draft(&many)), Err(InvalidPoll::NumberOfOptions(33)));
        assert!(check(draft(&many[..32])).is_ok());
        assert_eq!(check(draft(&["A", " "])), Err(InvalidPoll::OptionText(2)));
        let long = "x".repeat(OPTION_MAX + 1);
        assert_eq!(check(draft(&[&long, "B"])), Err(InvalidPoll::OptionText(1)));
        assert_eq!(
            check(draft(&["A", "B", " A"])),
            Err(InvalidPoll::OptionTwice("A".into())),
            "the same once trimmed"
        );
    }

    #[test]
    fn max_choices_is_between_one_and_the_number_of_options() {
        let with = |n| {
            check(PollDraft {
                max_choices: Some(n),
                ..draft(&["A", "B", "C"])
            })
        };
        assert_eq!(with(0), Err(InvalidPoll::MaxChoices(3)));
        assert_eq!(with(4), Err(InvalidPoll::MaxChoices(3)));
        assert_eq!(with(3).unwrap().settings.max_choices, 3);
    }

    #[test]
    fn a_closing_time_must_be_in_the_future() {
        let with = |at| {
            check(PollDraft {
                closes_at: Some(at),
                ..draft(&["A", "B"])
            })
        };
        assert_eq!(with(NOW), Err(InvalidPoll::ClosesInThePast));
        assert_eq!(with(NOW + 1).unwrap().settings.closes_at, Some(NOW + 1));
    }

    #[test]
    fn a_webhook_is_an_http_url_with_a_host_and_gets_the_secret() {
        let with = |url: &str, every| {
            check(PollDraft {
                webhook: Some(WebhookDraft {
                    url: url.into(),
                    results_every_secs: every,
                }),
                ..draft(&["A", "B"])
            })
        };
        for bad in ["ftp://h/x", "http://", "not a url", "/relative"] {
            assert_eq!(with(bad, None), Err(InvalidPoll::WebhookUrl), "{bad}");
        }
        let long = format!("https://h/{}", "x".repeat(WEBHOOK_URL_MAX));
        assert_eq!(with(&long, None), Err(InvalidPoll::WebhookUrl));
        assert_eq!(
            with("https://h", Some(0)),
            Err(InvalidPoll::WebhookInterval)
        );
        let hook = with(" https://hooks.example/p ", Some(5))
            .unwrap()
            .settings
            .webhook
            .unwrap();
        assert_eq!(hook.url, "https://hooks.example/p");
        assert_eq!(hook.secret, "secret");
        assert_eq!(hook.results_every_secs, Some(5));
    }

    #[test]
    fn a_ballot_chooses_known_options_once_each_up_to_max_choices() {
        let two = rules(2);
        assert_eq!(two.check_ballot(&[1]), Ok(()));
        assert_eq!(two.check_ballot(&[3, 1]), Ok(()));
        assert_eq!(two.check_ballot(&[]), Err(BallotRejection::Empty));
        assert_eq!(
            two.check_ballot(&[1, 9]),
            Err(BallotRejection::UnknownOption(9))
        );
        assert_eq!(
            two.check_ballot(&[1, 2, 3]),
            Err(BallotRejection::TooManyChoices(2))
        );
        assert_eq!(
            two.check_ballot(&[2, 2]),
            Err(BallotRejection::RepeatsAChoice)
        );
        assert_eq!(
            rules(1).check_ballot(&[1, 2]),
            Err(BallotRejection::TooManyChoices(1))
        );
    }

    #[test]
    fn a_poll_is_closed_by_its_flag_or_from_its_closing_time_on() {
        let new = check(PollDraft {
            closes_at: Some(NOW + 10),
            ..draft(&["A", "B"])
        })
        .unwrap();
        let open = poll_of(new.clone(), false);
        assert!(!open.is_closed_at(NOW + 9));
        assert!(open.is_closed_at(NOW + 10));
        assert!(poll_of(new, true).is_closed_at(NOW));
    }

    #[test]
    fn hidden_results_show_once_closed_and_updates_once_the_final_one_had_time() {
        let new = check(PollDraft {
            hide_results: true,
            ..draft(&["A", "B"])
        })
        .unwrap();
        let open = poll_of(new.clone(), false);
        assert!(!open.results_visible_at(NOW));
        assert!(poll_of(new, true).results_visible_at(NOW));
        let hidden = open.rules();
        assert!(hidden.hides_updates(None, NOW, 3000));
        assert!(hidden.hides_updates(Some(NOW), NOW + 2999, 3000));
        assert!(!hidden.hides_updates(Some(NOW), NOW + 3000, 3000));
        assert!(!rules(1).hides_updates(None, NOW, 3000), "not hidden");
    }

    #[test]
    fn a_change_of_ballot_and_a_webhook_are_what_the_settings_say() {
        assert!(!rules(1).allows_change());
        assert!(!rules(1).has_webhook());
        let new = check(PollDraft {
            allow_change: true,
            webhook: Some(WebhookDraft {
                url: "http://h".into(),
                results_every_secs: None,
            }),
            ..draft(&["A", "B"])
        })
        .unwrap();
        let both = poll_of(new, false).rules();
        assert!(both.allows_change() && both.has_webhook());
    }

    #[test]
    fn a_repeated_choice_is_found() {
        assert!(repeats_a_choice(&[1, 3, 1]));
        assert!(!repeats_a_choice(&[1, 3, 2]));
        assert!(!repeats_a_choice(&[4]));
        assert!(!repeats_a_choice(&[]));
    }
}
