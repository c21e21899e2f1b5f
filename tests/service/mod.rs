//! The vote path's promises about claims and appends, against a real SQLite store and the
//! in-process duplicate guard, with a vote log that fails as each test scripts it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pollcast::adapters::{MemoryGuard, SqliteStore};
use pollcast_actors::service::{PollCatalog, PollService, Unavailable, VoteError, VoteRejection};
use pollcast_actors::{
    LogEntry, LogError, NewPoll, NoEvents, PollId, PollStore, Vote, VoteAppender,
};
use tokio::sync::oneshot;

/// What [`ScriptedLog`] does with one append.
enum Step {
    Append,
    Fail {
        outcome_unknown: bool,
    },
    /// Says it started, waits to be let go, then fails definitely.
    SlowFail {
        started: oneshot::Sender<()>,
        go: oneshot::Receiver<()>,
    },
}

/// A vote log that answers each append with the next step of its script.
struct ScriptedLog(Mutex<VecDeque<Step>>);

impl ScriptedLog {
    fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(steps.into_iter().collect())))
    }
}

#[async_trait::async_trait]
impl VoteAppender for ScriptedLog {
    async fn append(&self, _entry: LogEntry) -> Result<(), LogError> {
        let step = self.0.lock().unwrap().pop_front().unwrap_or(Step::Append);
        match step {
            Step::Append => Ok(()),
            Step::Fail { outcome_unknown } if outcome_unknown => {
                Err(LogError::outcome_unknown("append", "no delivery report"))
            }
            Step::Fail { .. } => Err(LogError::new("append", "refused")),
            Step::SlowFail { started, go } => {
                started.send(()).unwrap();
                go.await.unwrap();
                Err(LogError::new("append", "refused, late"))
            }
        }
    }
}

/// A vote path over one open poll (options 1 and 2), an in-process guard and `log`.
async fn intake_with(log: Arc<ScriptedLog>) -> (tempfile::TempDir, PollService, PollId) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Arc::new(
        SqliteStore::open(&url, &pollcast::background::Background::new())
            .await
            .unwrap(),
    );
    let poll = NewPoll {
        question: "Q".into(),
        options: vec!["A".into(), "B".into()],
        settings: Default::default(),
    };
    let poll = store.create_poll(poll).await.unwrap().id;
    let guard = Arc::new(MemoryGuard::new(Duration::from_secs(60)));
    // The catalog's refresher is not needed: the poll stays open.
    let (catalog, _refresher) = PollCatalog::new(store);
    let service = PollService::new(catalog, guard, log, Arc::new(NoEvents));
    (dir, service, poll)
}

fn vote(poll: PollId, id: &str) -> Vote {
    Vote {
        vote_id: Some(id.into()),
        ..Vote::single(poll, 1, "u")
    }
}

#[tokio::test]
async fn a_definite_append_failure_releases_the_claim_for_another_vote() {
    let log = ScriptedLog::new([Step::Fail {
        outcome_unknown: false,
    }]);
    let (_dir, intake, poll) = intake_with(log).await;
    let failed = intake.submit(vote(poll, "a")).await;
    assert!(
        matches!(failed, Err(VoteError::Unavailable(Unavailable::Log(_)))),
        "{failed:?}"
    );
    intake
        .submit(vote(poll, "b"))
        .await
        .expect("not a duplicate of a vote that is not in the log");
}

#[tokio::test]
async fn an_append_of_unknown_outcome_keeps_the_claim_for_its_retry() {
    let log = ScriptedLog::new([Step::Fail {
        outcome_unknown: true,
    }]);
    let (_dir, intake, poll) = intake_with(log).await;
    let failed = intake.submit(vote(poll, "a")).await;
    assert!(
        matches!(failed, Err(VoteError::Unavailable(Unavailable::Log(_)))),
        "{failed:?}"
    );
    let other = intake.submit(vote(poll, "b")).await;
    assert!(
        matches!(other, Err(VoteError::Rejected(VoteRejection::Duplicate(_)))),
        "the first vote may still be counted: {other:?}"
    );
    intake
        .submit(vote(poll, "a"))
        .await
        .expect("its retry is accepted");
}

#[tokio::test]
async fn a_slow_attempt_that_fails_late_keeps_the_claim_of_its_successful_retry() {
    let (started, started_rx) = oneshot::channel();
    let (go, go_rx) = oneshot::channel();
    let log = ScriptedLog::new([Step::SlowFail { started, go: go_rx }]);
    let (_dir, intake, poll) = intake_with(log).await;
    let first = tokio::spawn({
        let intake = intake.clone();
        async move { intake.submit(vote(poll, "a")).await }
    });
    started_rx.await.unwrap();
    intake
        .submit(vote(poll, "a"))
        .await
        .expect("the retry is appended");
    go.send(()).unwrap();
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(VoteError::Unavailable(Unavailable::Log(_)))),
        "{first:?}"
    );
    let other = intake.submit(vote(poll, "b")).await;
    assert!(
        matches!(other, Err(VoteError::Rejected(VoteRejection::Duplicate(_)))),
        "the retry's vote is in the log: {other:?}"
    );
}

#[tokio::test]
async fn a_vote_id_reused_for_another_ballot_is_refused_before_the_log() {
    let log = ScriptedLog::new([Step::Append]);
    let (_dir, intake, poll) = intake_with(log.clone()).await;
    intake.submit(vote(poll, "a")).await.unwrap();
    let other_ballot = Vote {
        choices: vec![2],
        ..vote(poll, "a")
    };
    let refused = intake.submit(other_ballot).await;
    assert!(
        matches!(
            refused,
            Err(VoteError::Rejected(VoteRejection::VoteIdReused(_)))
        ),
        "{refused:?}"
    );
    intake.submit(vote(poll, "a")).await.expect("a retry");
}
