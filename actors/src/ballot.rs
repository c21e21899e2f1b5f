//! The exactly-once rule as one pure function: how a batch of votes changes a poll's
//! ballots and counts, given what the ledger already holds. Both SQL stores read the ledger,
//! call [`plan`], and write its result in the same transaction, so the rule is written (and
//! tested) once.
//!
//! - A vote whose (user, vote id) is already in the ledger was applied before: skipped. This
//!   is what makes replays and client retries harmless.
//! - A voter's first ballot is counted.
//! - A later ballot of the same voter is skipped, unless the poll allows changes; then it
//!   replaces the current one: its options lose a vote, the new ones gain one, and both stay
//!   in the ledger (the old one no longer current).
//! - A vote whose (user, vote id) is already in the ledger *with another ballot* is skipped
//!   too, but reported in [`BallotPlan::reused`]: its vote id was reused for a different
//!   vote, which the duplicate guard should have refused and which cannot be counted.

use std::collections::{BTreeMap, HashMap};

use crate::domain::{OptionId, Vote};

/// What the ledger holds for the voters of a batch.
#[derive(Debug, Default)]
pub struct LedgerView {
    /// Each voter's current ballot.
    pub current: HashMap<String, Vec<OptionId>>,
    /// (user, vote id) pairs already in the ledger, with their options (to tell a replay
    /// from a vote id reused for another ballot).
    pub applied: HashMap<(String, String), Vec<OptionId>>,
}

/// A vote to insert into the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerInsert<'a> {
    /// The vote.
    pub vote: &'a Vote,
    /// Whether it is the voter's ballot after this batch (false: a later vote of the same
    /// batch replaced it).
    pub current: bool,
}

/// What a batch changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BallotPlan<'a> {
    /// Ledger rows to insert, in log order.
    pub inserts: Vec<LedgerInsert<'a>>,
    /// Voters whose ballot in the ledger is replaced (its row is no longer current).
    pub replaced: Vec<&'a str>,
    /// How much each option's count moves (no zero entries).
    pub deltas: BTreeMap<OptionId, i64>,
    /// Voters counted for the first time.
    pub new_voters: i64,
    /// Votes skipped because their (user, vote id) is in the ledger, or earlier in the batch,
    /// with another ballot: each was acknowledged but is not counted (see [`same_ballot`]).
    pub reused: Vec<&'a Vote>,
}

impl BallotPlan<'_> {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty()
    }
}

/// Applies the rule to `votes` (one poll's, in log order).
pub fn plan<'a>(allow_change: bool, ledger: &LedgerView, votes: &'a [Vote]) -> BallotPlan<'a> {
    let mut out = BallotPlan::default();
    // Each voter's ballot as the batch goes, and where it came from: the ledger, or the
    // index in `out.inserts` of the row that is current so far.
    let mut ballots: HashMap<&str, (&[OptionId], Option<usize>)> = HashMap::new();
    let mut seen: HashMap<(&str, &str), &[OptionId]> = HashMap::new();
    for vote in votes {
        let (user, id) = (vote.user_id.as_str(), vote.ledger_id());
        let earlier = match seen.get(&(user, id)) {
            Some(choices) => Some(*choices),
            None => ledger
                .applied
                .get(&(user.to_owned(), id.to_owned()))
                .map(Vec::as_slice),
        };
        if let Some(earlier) = earlier {
            if !same_ballot(earlier, &vote.choices) {
                out.reused.push(vote);
            }
            continue;
        }
        seen.insert((user, id), &vote.choices);
        let before = ballots
            .get(user)
            .copied()
            .or_else(|| ledger.current.get(user).map(|c| (c.as_slice(), None)));
        match before {
            Some(_) if !allow_change => continue,
            // Why a same-choice change is still written: every vote this function looked at
            // must be in the ledger, or a replay would apply it again later, over a newer
            // change. Its deltas cancel out.
            Some((old, row)) => {
                for option in old {
                    *out.deltas.entry(*option).or_default() -= 1;
                }
                match row {
                    Some(i) => out.inserts[i].current = false,
                    None => out.replaced.push(user),
                }
            }
            None => out.new_voters += 1,
        }
        for option in &vote.choices {
            *out.deltas.entry(*option).or_default() += 1;
        }
        ballots.insert(user, (&vote.choices, Some(out.inserts.len())));
        out.inserts.push(LedgerInsert {
            vote,
            current: true,
        });
    }
    out.deltas.retain(|_, d| *d != 0);
    out
}

/// Whether two ballots choose the same options, in whatever order.
pub fn same_ballot(a: &[OptionId], b: &[OptionId]) -> bool {
    a.len() == b.len() && a.iter().all(|o| b.contains(o)) && b.iter().all(|o| a.contains(o))
}

/// A ballot's options in one canonical text, whatever their order: `1,3` for `[3, 1]`. What
/// the Redis duplicate guard keeps of a ballot.
pub fn canonical_choices(choices: &[OptionId]) -> String {
    if choices.is_sorted() {
        return encode_choices(choices);
    }
    let mut sorted = choices.to_vec();
    sorted.sort_unstable();
    encode_choices(&sorted)
}

/// Options as the ledger stores them: `1,3`.
pub fn encode_choices(choices: &[OptionId]) -> String {
    use std::fmt::Write;
    // Why by hand: it runs for every vote flushed, and a Vec of Strings joined cost an
    // allocation per choice.
    let mut text = String::with_capacity(choices.len() * 4);
    for (i, choice) in choices.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        write!(text, "{choice}").expect("writing to a String cannot fail");
    }
    text
}

/// The inverse of [`encode_choices`]; a malformed entry is skipped (the schema only ever
/// stores what `encode_choices` wrote).
pub fn decode_choices(text: &str) -> Vec<OptionId> {
    text.split(',').filter_map(|p| p.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(user: &str, id: &str, choices: &[OptionId]) -> Vote {
        Vote {
            vote_id: Some(id.into()),
            choices: choices.to_vec(),
            ..Vote::single(1, 0, user)
        }
    }

    fn ledger(
        current: &[(&str, &[OptionId])],
        applied: &[(&str, &str, &[OptionId])],
    ) -> LedgerView {
        LedgerView {
            current: current
                .iter()
                .map(|(u, c)| (u.to_string(), c.to_vec()))
                .collect(),
            applied: applied
                .iter()
                .map(|(u, i, c)| ((u.to_string(), i.to_string()), c.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn a_voters_first_ballot_counts_and_a_second_does_not() {
        let votes = [
            vote("a", "1", &[1]),
            vote("a", "2", &[2]),
            vote("b", "3", &[2]),
        ];
        let plan = plan(false, &LedgerView::default(), &votes);
        assert_eq!(plan.inserts.len(), 2);
        assert_eq!(plan.deltas, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(plan.new_voters, 2);
    }

    #[test]
    fn a_voter_already_in_the_ledger_is_not_counted_again() {
        let votes = [vote("a", "9", &[2])];
        let plan = plan(false, &ledger(&[("a", &[1])], &[]), &votes);
        assert!(plan.is_empty());
        assert!(plan.deltas.is_empty());
    }

    #[test]
    fn a_change_moves_the_count_once_and_keeps_the_old_ballot_in_the_ledger() {
        let votes = [vote("a", "2", &[2])];
        let plan = plan(true, &ledger(&[("a", &[1])], &[("a", "1", &[1])]), &votes);
        assert_eq!(plan.deltas, BTreeMap::from([(1, -1), (2, 1)]));
        assert_eq!(plan.replaced, vec!["a"]);
        assert_eq!(plan.new_voters, 0);
        assert!(plan.inserts[0].current);
    }

    #[test]
    fn replaying_a_change_after_it_was_applied_changes_nothing() {
        let votes = [vote("a", "1", &[1]), vote("a", "2", &[2])];
        let applied = ledger(&[("a", &[2])], &[("a", "1", &[1]), ("a", "2", &[2])]);
        assert!(plan(true, &applied, &votes).is_empty());
    }

    #[test]
    fn changes_within_one_batch_net_out_and_only_the_last_stays_current() {
        let votes = [
            vote("a", "1", &[1]),
            vote("a", "2", &[2]),
            vote("a", "3", &[3]),
        ];
        let plan = plan(true, &LedgerView::default(), &votes);
        assert_eq!(plan.deltas, BTreeMap::from([(3, 1)]));
        let current: Vec<bool> = plan.inserts.iter().map(|i| i.current).collect();
        assert_eq!(current, [false, false, true]);
        assert!(plan.replaced.is_empty());
        assert_eq!(plan.new_voters, 1);
    }

    #[test]
    fn a_retried_vote_in_the_same_batch_is_applied_once() {
        let votes = [vote("a", "1", &[1, 2]), vote("a", "1", &[1, 2])];
        let plan = plan(true, &LedgerView::default(), &votes);
        assert_eq!(plan.inserts.len(), 1);
        assert_eq!(plan.deltas, BTreeMap::from([(1, 1), (2, 1)]));
    }

    #[test]
    fn changing_to_the_same_options_moves_no_count_but_is_recorded() {
        let votes = [vote("a", "2", &[2, 1])];
        let plan = plan(
            true,
            &ledger(&[("a", &[1, 2])], &[("a", "1", &[1, 2])]),
            &votes,
        );
        assert!(plan.deltas.is_empty());
        assert_eq!(plan.inserts.len(), 1);
        assert_eq!(plan.replaced, vec!["a"]);
    }

    #[test]
    fn replaying_a_same_choice_vote_cannot_undo_a_later_change() {
        // a: v1 [1], v2 [1] (same), v3 [2], all applied; then the log replays them.
        let votes = [
            vote("a", "1", &[1]),
            vote("a", "2", &[1]),
            vote("a", "3", &[2]),
        ];
        let first = plan(true, &LedgerView::default(), &votes);
        let applied: Vec<(&str, &str, &[OptionId])> = first
            .inserts
            .iter()
            .map(|i| {
                let v = i.vote;
                (v.user_id.as_str(), v.ledger_id(), v.choices.as_slice())
            })
            .collect();
        assert_eq!(applied.len(), 3, "every vote looked at is recorded");
        let replay = plan(true, &ledger(&[("a", &[2])], &applied), &votes);
        assert!(replay.is_empty(), "{replay:?}");
        assert!(replay.reused.is_empty(), "a replay is not a reuse");
    }

    #[test]
    fn a_vote_id_reused_for_another_ballot_is_skipped_and_reported() {
        // Reused against the ledger (no changes allowed, and allowed), and within a batch.
        for allow_change in [false, true] {
            let votes = [vote("a", "1", &[3]), vote("a", "1", &[1])];
            let plan = plan(
                allow_change,
                &ledger(&[("a", &[1])], &[("a", "1", &[1])]),
                &votes,
            );
            assert!(plan.is_empty());
            let reused: Vec<&[OptionId]> = plan.reused.iter().map(|v| &v.choices[..]).collect();
            assert_eq!(
                reused,
                [&[3][..]],
                "the same ballot again is a plain replay"
            );
        }
        let votes = [
            vote("b", "k", &[1, 2]),
            vote("b", "k", &[2, 1]),
            vote("b", "k", &[3]),
        ];
        let plan = plan(false, &LedgerView::default(), &votes);
        assert_eq!(plan.inserts.len(), 1);
        assert_eq!(plan.deltas, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(plan.reused.len(), 1, "[2, 1] is the same ballot as [1, 2]");
        assert_eq!(plan.reused[0].choices, [3]);
    }

    #[test]
    fn a_ballots_canonical_text_ignores_the_order_of_its_options() {
        assert_eq!(canonical_choices(&[3, 1, 12]), "1,3,12");
        assert_eq!(canonical_choices(&[2]), "2");
        assert!(same_ballot(&[1, 3], &[3, 1]));
        assert!(!same_ballot(&[1, 3], &[1]));
        assert!(!same_ballot(&[1, 3], &[1, 2]));
    }

    #[test]
    fn choices_round_trip_through_their_ledger_form() {
        assert_eq!(decode_choices(&encode_choices(&[3, 1, 12])), vec![3, 1, 12]);
        assert_eq!(encode_choices(&[4]), "4");
    }
}
