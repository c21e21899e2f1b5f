//! The whole `PollStore` contract, run by the same code against a real SQLite file and a
//! real PostgreSQL database (`store_contract!` makes a `sqlite` and a `postgres` test of
//! each). What the vote path, the aggregators and the closing scheduler rely on is here:
//! exactly once on replay, ballot changes, close and seal, the polls to seal, the ledger
//! export and the voters that warm a duplicate guard. `random_histories_count_as_the_ballot_rule_says`
//! checks each store's flush, the SQLite fast path included, against `ballot::plan`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pollcast::adapters::{PgPoolSettings, PostgresStore, SqliteStore};
use pollcast_actors::ballot::{self, LedgerView};
use pollcast_actors::domain::now_millis;
use pollcast_actors::{NewPoll, OptionId, PollId, PollSettings, PollStore, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::helpers::Production;

/// A store under test; holds what must outlive it (the SQLite file's directory).
struct Store {
    store: Arc<dyn PollStore>,
    /// Where the database is, for a test that reads or writes it behind the store's back.
    url: String,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    Store {
        store: Arc::new(
            SqliteStore::open(&url, &pollcast::background::Background::new())
                .await
                .unwrap(),
        ),
        url,
        _dir: Some(dir),
    }
}

async fn postgres() -> Store {
    let db = Production::create().await;
    let settings = PgPoolSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(10),
    };
    let store = PostgresStore::connect(&db.database_url, settings).unwrap();
    store.migrate().await.unwrap();
    Store {
        store: Arc::new(store),
        url: db.database_url,
        _dir: None,
    }
}

/// A `sqlite` and a `postgres` test of each contract function.
macro_rules! store_contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::sqlite().await.store.as_ref()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::postgres().await.store.as_ref()).await
                }
            )*
        }
    };
}

/// Runs `sql` on the database under a store, and returns its rows of two integers.
async fn sql(url: &str, sql: &str) -> Vec<(i64, i64)> {
    if url.starts_with("sqlite:") {
        let db = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query_as(sql).fetch_all(&db).await.unwrap()
    } else {
        let db = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query_as(sql).fetch_all(&db).await.unwrap()
    }
}

/// The contract functions that also read or write the database behind the store.
macro_rules! store_contract_with_sql {
    ($($name:ident),* $(,)?) => {
        mod sqlite_sql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let under = super::sqlite().await;
                    super::$name(under.store.as_ref(), &under.url).await
                }
            )*
        }
        mod postgres_sql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let under = super::postgres().await;
                    super::$name(under.store.as_ref(), &under.url).await
                }
            )*
        }
    };
}

store_contract_with_sql!(voters_since_reads_from_the_mark_of_an_hour_long_past);

store_contract!(
    get_polls_reads_every_poll_among_the_ids,
    a_batch_replayed_changes_nothing,
    a_voters_second_ballot_is_skipped_unless_the_poll_allows_changes,
    a_vote_id_reused_for_another_ballot_is_not_counted,
    a_multiple_choice_ballot_counts_each_option_and_one_voter,
    a_flush_for_a_poll_that_does_not_exist_fails,
    a_poll_closes_once_and_keeps_its_closing_time,
    sealing_publishes_every_count_once,
    polls_due_to_close_and_lost_markers_are_handed_out_once,
    the_ledger_pages_in_counting_order,
    the_ledger_keeps_every_field_of_a_ballot_as_it_was,
    voters_since_lists_the_current_ballots_from_then_on,
    random_histories_count_as_the_ballot_rule_says,
);

/// A poll whose voters may change their ballot.
const CHANGING: PollSettings = PollSettings {
    max_choices: 1,
    closes_at: None,
    hide_results: false,
    allow_change: true,
    webhook: None,
};

async fn create(store: &dyn PollStore, options: usize, settings: PollSettings) -> PollId {
    let poll = NewPoll {
        question: "Q".into(),
        options: (1..=options).map(|i| format!("O{i}")).collect(),
        settings,
    };
    store.create_poll(poll).await.unwrap().id
}

async fn create_polls(store: &dyn PollStore, n: usize) -> Vec<PollId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let poll = NewPoll {
            question: format!("Q{i}"),
            options: vec!["A".into(), "B".into()],
            settings: Default::default(),
        };
        ids.push(store.create_poll(poll).await.unwrap().id);
    }
    ids
}

fn vote(poll: PollId, user: &str, id: &str, choices: &[OptionId]) -> Vote {
    Vote {
        poll_id: poll,
        choices: choices.to_vec(),
        user_id: user.into(),
        voted_at: Some(now_millis()),
        vote_id: Some(id.into()),
    }
}

fn batch(votes: impl IntoIterator<Item = Vote>) -> Arc<[Vote]> {
    votes.into_iter().collect()
}

/// The poll's counts by option id, and its voters.
async fn counts(store: &dyn PollStore, poll: PollId) -> (BTreeMap<OptionId, i64>, i64) {
    let poll = store.get_poll(poll).await.unwrap().unwrap();
    let counts = poll.options.iter().map(|o| (o.id, o.votes)).collect();
    (counts, poll.voters)
}

fn counted(pairs: &[(OptionId, i64)]) -> BTreeMap<OptionId, i64> {
    pairs.iter().copied().collect()
}

/// More ids than the stores read in one statement (1,000), and some that are no poll.
async fn get_polls_reads_every_poll_among_the_ids(store: &dyn PollStore) {
    let created = create_polls(store, 1_001).await;
    let mut asked = created.clone();
    asked.extend([-1, 1_000_000]);
    let mut read = store.get_polls(&asked).await.unwrap();
    read.sort_by_key(|p| p.id);
    assert_eq!(read.iter().map(|p| p.id).collect::<Vec<_>>(), created);
    let last = read.last().unwrap();
    assert_eq!(last.question, "Q1000");
    assert_eq!(
        last.options
            .iter()
            .map(|o| o.text.as_str())
            .collect::<Vec<_>>(),
        ["A", "B"]
    );
    assert_eq!(store.get_polls(&[]).await.unwrap().len(), 0);
}

async fn a_batch_replayed_changes_nothing(store: &dyn PollStore) {
    let poll = create(store, 2, PollSettings::default()).await;
    let votes = batch((0..20).map(|i| vote(poll, &format!("u{i}"), "v", &[1 + i % 2])));
    let first = store.apply_votes(poll, false, votes.clone()).await.unwrap();
    assert_eq!(first.inserted, 20);
    let all: Vec<_> = first
        .all
        .iter()
        .map(|c| (c.option_id, c.new_count))
        .collect();
    assert_eq!(all, [(1, 10), (2, 10)]);
    let replay = store.apply_votes(poll, false, votes).await.unwrap();
    assert_eq!(replay.inserted, 0);
    assert_eq!(
        replay.seq, first.seq,
        "the version moves only when counts do"
    );
    assert!(replay.changed.is_empty());
    assert_eq!(
        counts(store, poll).await,
        (counted(&[(1, 10), (2, 10)]), 20)
    );
}

async fn a_voters_second_ballot_is_skipped_unless_the_poll_allows_changes(store: &dyn PollStore) {
    let fixed = create(store, 2, PollSettings::default()).await;
    let changing = create(store, 2, CHANGING).await;
    for (poll, allow_change) in [(fixed, false), (changing, true)] {
        store
            .apply_votes(poll, allow_change, batch([vote(poll, "u", "a", &[1])]))
            .await
            .unwrap();
        store
            .apply_votes(poll, allow_change, batch([vote(poll, "u", "b", &[2])]))
            .await
            .unwrap();
    }
    assert_eq!(counts(store, fixed).await, (counted(&[(1, 1), (2, 0)]), 1));
    assert_eq!(
        counts(store, changing).await,
        (counted(&[(1, 0), (2, 1)]), 1)
    );
    let ledger = store.ledger(changing, 0, 10).await.unwrap();
    let rows: Vec<_> = ledger
        .iter()
        .map(|r| (r.vote_id.as_str(), r.option_ids.clone(), r.current))
        .collect();
    assert_eq!(rows, [("a", vec![1], false), ("b", vec![2], true)]);
    // A change within one batch: only its last ballot is current.
    let batch_change = batch([
        vote(changing, "w", "a", &[1]),
        vote(changing, "w", "b", &[2]),
    ]);
    let outcome = store
        .apply_votes(changing, true, batch_change)
        .await
        .unwrap();
    assert_eq!(outcome.inserted, 2);
    assert_eq!(
        counts(store, changing).await,
        (counted(&[(1, 0), (2, 2)]), 2)
    );
}

async fn a_vote_id_reused_for_another_ballot_is_not_counted(store: &dyn PollStore) {
    let poll = create(store, 2, CHANGING).await;
    store
        .apply_votes(poll, true, batch([vote(poll, "u", "a", &[1])]))
        .await
        .unwrap();
    let reused = store
        .apply_votes(poll, true, batch([vote(poll, "u", "a", &[2])]))
        .await
        .unwrap();
    assert_eq!(reused.inserted, 0);
    assert_eq!(counts(store, poll).await, (counted(&[(1, 1), (2, 0)]), 1));
}

async fn a_multiple_choice_ballot_counts_each_option_and_one_voter(store: &dyn PollStore) {
    let poll = create(
        store,
        3,
        PollSettings {
            max_choices: 2,
            ..Default::default()
        },
    )
    .await;
    let outcome = store
        .apply_votes(
            poll,
            false,
            batch([vote(poll, "u", "a", &[1, 3]), vote(poll, "w", "a", &[3])]),
        )
        .await
        .unwrap();
    assert_eq!(outcome.inserted, 2);
    let changed: Vec<_> = outcome
        .changed
        .iter()
        .map(|c| (c.option_id, c.new_count))
        .collect();
    assert_eq!(changed, [(1, 1), (3, 2)], "only the options that moved");
    assert_eq!(
        counts(store, poll).await,
        (counted(&[(1, 1), (2, 0), (3, 2)]), 2)
    );
}

async fn a_flush_for_a_poll_that_does_not_exist_fails(store: &dyn PollStore) {
    let poll = create(store, 2, PollSettings::default()).await;
    let nowhere = poll + 1000;
    let (good, bad) = tokio::join!(
        store.apply_votes(poll, false, batch([vote(poll, "u", "a", &[1])])),
        store.apply_votes(nowhere, false, batch([vote(nowhere, "u", "a", &[1])])),
    );
    assert!(bad.is_err(), "a poll that does not exist cannot be flushed");
    assert_eq!(
        good.unwrap().inserted,
        1,
        "flushed beside it, not failed with it"
    );
    assert!(store.get_poll(nowhere).await.unwrap().is_none());
}

async fn a_poll_closes_once_and_keeps_its_closing_time(store: &dyn PollStore) {
    let poll = create(store, 2, PollSettings::default()).await;
    assert_eq!(store.is_closed(poll).await.unwrap(), Some(false));
    let (closed, newly) = store.close_poll(poll, 1_000).await.unwrap().unwrap();
    assert!(newly && closed.closed);
    assert_eq!(closed.closed_at, Some(1_000));
    let (again, newly) = store.close_poll(poll, 2_000).await.unwrap().unwrap();
    assert!(!newly);
    assert_eq!(
        again.closed_at,
        Some(1_000),
        "closing again keeps the first time"
    );
    assert_eq!(store.is_closed(poll).await.unwrap(), Some(true));
    assert_eq!(
        store.closed_among(&[poll, poll + 1000]).await.unwrap(),
        [poll]
    );
    assert!(
        store
            .close_poll(poll + 1000, 1_000)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.is_closed(poll + 1000).await.unwrap(), None);
}

async fn sealing_publishes_every_count_once(store: &dyn PollStore) {
    let poll = create(store, 2, PollSettings::default()).await;
    let flushed = store
        .apply_votes(poll, false, batch([vote(poll, "u", "a", &[2])]))
        .await
        .unwrap();
    store.close_poll(poll, now_millis()).await.unwrap();
    let sealed = store
        .seal_poll(poll)
        .await
        .unwrap()
        .expect("the first seal");
    assert_eq!(
        sealed.seq,
        flushed.seq + 1,
        "the final update is a version of its own"
    );
    let all: Vec<_> = sealed
        .all
        .iter()
        .map(|c| (c.option_id, c.new_count))
        .collect();
    assert_eq!(all, [(1, 0), (2, 1)]);
    assert_eq!(sealed.changed, sealed.all, "every count, as changed");
    assert!(
        store.seal_poll(poll).await.unwrap().is_none(),
        "sealed once"
    );
}

async fn polls_due_to_close_and_lost_markers_are_handed_out_once(store: &dyn PollStore) {
    let now = now_millis();
    let due = create(
        store,
        2,
        PollSettings {
            closes_at: Some(now - 10),
            ..Default::default()
        },
    )
    .await;
    let not_yet = create(
        store,
        2,
        PollSettings {
            closes_at: Some(now + 3_600_000),
            ..Default::default()
        },
    )
    .await;
    let (_, _) = store
        .close_poll(create(store, 2, PollSettings::default()).await, now - 5)
        .await
        .unwrap()
        .unwrap();
    // Two schedulers at once: each due poll goes to one of them, closed as of its closesAt.
    let (a, b) = tokio::join!(store.polls_to_seal(now, 0), store.polls_to_seal(now, 0));
    let mut handed: Vec<_> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    handed.sort_unstable();
    assert_eq!(handed, [(due, now - 10)]);
    assert_eq!(store.is_closed(due).await.unwrap(), Some(true));
    assert_eq!(store.is_closed(not_yet).await.unwrap(), Some(false));
    // Nothing new within the resend delay; once it has passed, every closed unsealed poll
    // again (its marker was lost), once: the scheduler's clock half a minute on.
    assert!(store.polls_to_seal(now, 0).await.unwrap().is_empty());
    let later = now + 60_000;
    let (a, b) = tokio::join!(
        store.polls_to_seal(later, later - 30_000),
        store.polls_to_seal(later, later - 30_000)
    );
    let mut again: Vec<_> = a
        .unwrap()
        .into_iter()
        .chain(b.unwrap())
        .map(|(id, _)| id)
        .collect();
    again.sort_unstable();
    assert_eq!(
        again.len(),
        2,
        "the due poll and the one closed by hand: {again:?}"
    );
    assert!(again.contains(&due));
    store.seal_poll(due).await.unwrap();
    let much_later = later + 60_000;
    let after_seal = store
        .polls_to_seal(much_later, much_later - 30_000)
        .await
        .unwrap();
    assert!(
        after_seal.iter().all(|(id, _)| *id != due),
        "a sealed poll is done"
    );
}

async fn the_ledger_pages_in_counting_order(store: &dyn PollStore) {
    let poll = create(store, 2, PollSettings::default()).await;
    let votes: Vec<Vote> = (0..5)
        .map(|i| vote(poll, &format!("u{i}"), "v", &[1]))
        .collect();
    store
        .apply_votes(poll, false, batch(votes[..3].to_vec()))
        .await
        .unwrap();
    store
        .apply_votes(poll, false, batch(votes[3..].to_vec()))
        .await
        .unwrap();
    let first = store.ledger(poll, 0, 2).await.unwrap();
    let users: Vec<_> = first.iter().map(|r| r.user_id.as_str()).collect();
    assert_eq!(users, ["u0", "u1"]);
    let rest = store.ledger(poll, first[1].row, 10).await.unwrap();
    let users: Vec<_> = rest.iter().map(|r| r.user_id.as_str()).collect();
    assert_eq!(users, ["u2", "u3", "u4"]);
    assert!(
        rest.iter()
            .all(|r| r.current && r.option_ids == [1] && r.vote_id == "v")
    );
    assert!(
        store
            .ledger(poll, rest[2].row, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Ids are any printable text: quotes, backslashes, commas, tabs' look-alikes, and letters
/// of several bytes go into the ledger and come back as they were, with the vote's time,
/// its options, and whether it is current (each a field of the Postgres `COPY`), on both
/// paths of a flush: new first ballots, and the ballot plan of a poll that allows changes.
async fn the_ledger_keeps_every_field_of_a_ballot_as_it_was(store: &dyn PollStore) {
    let odd_ids = [
        r#"quote"d 'and' \back\slash"#,
        "comma,semi;colon|pipe {braces} [x] \\N NULL",
        "ünïcödé 投票 🗳️ ½",
        &"u".repeat(128),
    ];
    for allow_change in [false, true] {
        let settings = PollSettings {
            allow_change,
            max_choices: 3,
            ..PollSettings::default()
        };
        let poll = create(store, 3, settings).await;
        let votes: Vec<Vote> = odd_ids
            .iter()
            .enumerate()
            .map(|(i, id)| Vote {
                voted_at: Some(1_765_000_000_000 + i as i64),
                ..vote(poll, id, &format!("{id}#vote"), &[1, 3][..1 + i % 2])
            })
            .collect();
        store
            .apply_votes(poll, allow_change, batch(votes.clone()))
            .await
            .unwrap();
        let rows = store.ledger(poll, 0, 10).await.unwrap();
        assert_eq!(rows.len(), votes.len(), "allow_change {allow_change}");
        for (row, vote) in rows.iter().zip(&votes) {
            assert_eq!(row.user_id, vote.user_id);
            assert_eq!(row.vote_id, format!("{}#vote", vote.user_id));
            assert_eq!(row.option_ids, vote.choices);
            assert_eq!(row.voted_at, vote.voted_at.unwrap());
            assert!(row.current);
        }
    }
}

async fn voters_since_lists_the_current_ballots_from_then_on(store: &dyn PollStore) {
    let poll = create(store, 2, CHANGING).await;
    let old = Vote {
        voted_at: Some(1_000),
        ..vote(poll, "old", "a", &[1])
    };
    store.apply_votes(poll, true, batch([old])).await.unwrap();
    let since = now_millis();
    store
        .apply_votes(
            poll,
            true,
            batch([vote(poll, "u", "a", &[1]), vote(poll, "u", "b", &[2])]),
        )
        .await
        .unwrap();
    let voters: Vec<_> = store
        .voters_since(since)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.poll_id == poll)
        .map(|v| (v.user_id, v.vote_id, v.choices))
        .collect();
    assert_eq!(voters, [("u".to_owned(), "b".to_owned(), vec![2])]);
}

/// The ledger has no index on `voted_at`: each hour's first flush marks the ledger's next
/// row id, and `voters_since` reads only the rows above the mark of an hour that ended,
/// with an hour to spare for clocks, before the time it is asked for.
async fn voters_since_reads_from_the_mark_of_an_hour_long_past(store: &dyn PollStore, url: &str) {
    const HOUR: i64 = 3_600_000;
    let poll = create(store, 2, CHANGING).await;
    let since = now_millis();
    let seeded = sql(url, "DELETE FROM ledger_marks RETURNING hour, first_row").await;
    assert_eq!(seeded.len(), 1, "the migration marks the rows it found");
    store
        .apply_votes(poll, true, batch([vote(poll, "below", "a", &[1])]))
        .await
        .unwrap();
    let marks = sql(url, "SELECT hour, first_row FROM ledger_marks").await;
    let hour = since / HOUR;
    assert!(
        marks == [(hour, 1)] || marks == [(hour + 1, 1)],
        "the first flush marks its hour at the first row: {marks:?}"
    );
    // A mark as a flush in 1970 would have left it: "below" was voted after `since`, so
    // only a scan that starts at the mark leaves it out.
    sql(
        url,
        "INSERT INTO ledger_marks (hour, first_row) SELECT 1, MAX(row_id) + 1 FROM votes \
         RETURNING hour, first_row",
    )
    .await;
    store
        .apply_votes(poll, true, batch([vote(poll, "above", "a", &[2])]))
        .await
        .unwrap();
    let users = || async {
        let voters = store.voters_since(since).await.unwrap();
        let users: Vec<String> = voters
            .into_iter()
            .filter(|v| v.poll_id == poll)
            .map(|v| v.user_id)
            .collect();
        users
    };
    assert_eq!(users().await, ["above"]);
    // The mark of the hour before `since`'s ended less than an hour before it: not used
    // (it would leave "above" out too).
    sql(
        url,
        &format!(
            "INSERT INTO ledger_marks (hour, first_row) SELECT {}, MAX(row_id) + 1 FROM votes \
             RETURNING hour, first_row",
            hour - 1
        ),
    )
    .await;
    assert_eq!(users().await, ["above"]);
}

/// What the ledger holds of one poll, kept as the ballot rule says it changes.
#[derive(Default)]
struct Model {
    ledger: LedgerView,
    rows: usize,
}

impl Model {
    /// Applies a batch as [`ballot::plan`] does; returns the rows it inserts.
    fn apply(&mut self, allow_change: bool, votes: &[Vote]) -> u64 {
        let plan = ballot::plan(allow_change, &self.ledger, votes);
        for insert in &plan.inserts {
            let (user, choices) = (&insert.vote.user_id, &insert.vote.choices);
            self.ledger.applied.insert(
                (user.clone(), insert.vote.ledger_id().to_owned()),
                choices.clone(),
            );
            if insert.current {
                self.ledger.current.insert(user.clone(), choices.clone());
            }
        }
        self.rows += plan.inserts.len();
        plan.inserts.len() as u64
    }

    fn counts(&self, options: OptionId) -> (BTreeMap<OptionId, i64>, i64) {
        let mut counts: BTreeMap<OptionId, i64> = (1..=options).map(|o| (o, 0)).collect();
        for choices in self.ledger.current.values() {
            for c in choices {
                *counts.get_mut(c).unwrap() += 1;
            }
        }
        (counts, self.ledger.current.len() as i64)
    }
}

/// Random batches with replays, repeated voters, vote ids reused for other ballots, ballot
/// changes and seed-style votes without an id, flushed a round at a time with every poll's
/// flush sent at once (so that SQLite's writer commits them as one group and takes its fast
/// path for the polls that allow no change). After every flush each poll's counts, voters
/// and rows inserted must be what the ballot rule says.
async fn random_histories_count_as_the_ballot_rule_says(store: &dyn PollStore) {
    const OPTIONS: OptionId = 3;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut polls = Vec::new();
        for p in 0..6 {
            let allow_change = p % 2 == 1;
            let settings = PollSettings {
                max_choices: 2,
                allow_change,
                ..Default::default()
            };
            let id = create(store, OPTIONS as usize, settings).await;
            polls.push((id, allow_change, Model::default(), Vec::<Vote>::new()));
        }
        for _round in 0..12 {
            let mut batches = Vec::new();
            for (id, _, _, history) in polls.iter_mut() {
                let mut votes = Vec::new();
                for _ in 0..rng.random_range(1..10) {
                    if !history.is_empty() && rng.random_bool(0.2) {
                        // A replay of an earlier vote (a restarted consumer reading again).
                        votes.push(history[rng.random_range(0..history.len())].clone());
                        continue;
                    }
                    let first = rng.random_range(1..=OPTIONS);
                    let mut choices = vec![first];
                    if rng.random_bool(0.3) {
                        let second = 1 + first % OPTIONS;
                        choices.push(second);
                    }
                    let user = format!("u{}", rng.random_range(0..8));
                    let vote_id = match rng.random_range(0..4) {
                        0 => None,
                        n => Some(format!("v{n}")),
                    };
                    votes.push(Vote {
                        vote_id,
                        ..vote(*id, &user, "", &choices)
                    });
                }
                history.extend(votes.iter().cloned());
                batches.push(votes);
            }
            let flushes = polls
                .iter()
                .zip(&batches)
                .map(|((id, allow_change, _, _), votes)| {
                    store.apply_votes(*id, *allow_change, batch(votes.clone()))
                });
            let outcomes = futures_util::future::join_all(flushes).await;
            for ((id, allow_change, model, _), (votes, outcome)) in
                polls.iter_mut().zip(batches.iter().zip(outcomes))
            {
                let expected = model.apply(*allow_change, votes);
                let outcome = outcome.unwrap();
                assert_eq!(
                    outcome.inserted, expected,
                    "seed {seed}, poll {id}: rows inserted"
                );
                assert_eq!(
                    counts(store, *id).await,
                    model.counts(OPTIONS),
                    "seed {seed}, poll {id} (allow_change {allow_change}): counts and voters"
                );
            }
        }
        for (id, _, model, _) in &polls {
            let rows = store.ledger(*id, 0, 10_000).await.unwrap();
            assert_eq!(
                rows.len(),
                model.rows,
                "seed {seed}, poll {id}: ledger rows"
            );
        }
    }
}

// Kept beside the contract: what the stores share must not drift either.
#[test]
fn the_model_counts_a_change_as_a_move() {
    let mut model = Model::default();
    let first = [vote(1, "u", "a", &[1])];
    assert_eq!(model.apply(true, &first), 1);
    let change = [vote(1, "u", "b", &[2])];
    assert_eq!(model.apply(true, &change), 1);
    assert_eq!(model.counts(2), (counted(&[(1, 0), (2, 1)]), 1));
}
