//! The embedded store's single writer: every flush waiting at that moment is applied in one
//! transaction (one fsync per group), with a fast path for the first ballots of polls that
//! allow no change. Both paths apply the ballot rule of `pollcast_actors::ballot`; the store
//! contract's random histories check the fast path against it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use pollcast_actors::ballot;
use pollcast_actors::domain::now_millis;
use pollcast_actors::{FlushOutcome, OptionId, PollId, StoreError, Vote};
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::SqliteStore;
use super::statements::*;
use crate::adapters::sql_common::{self, LedgerMarks, err};
use crate::background::next_batch;

/// Flushes waiting for the group commit, at most, per transaction.
pub(super) const GROUP_MAX: usize = 512;

/// A flush waiting for the group commit.
pub(super) struct FlushJob {
    pub(super) poll: PollId,
    pub(super) allow_change: bool,
    pub(super) votes: Arc<[Vote]>,
    pub(super) reply: oneshot::Sender<Result<FlushOutcome, StoreError>>,
}

/// The embedded store's writer: applies every flush waiting at that moment in one
/// transaction, so 10,000 active polls cost one fsync per group, not 10,000 per flush
/// interval. Runs until every store handle is gone or `stop` is cancelled; either way it
/// answers every flush already queued first.
pub(super) async fn group_commit(
    writer: SqlitePool,
    mut jobs: mpsc::Receiver<FlushJob>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(GROUP_MAX);
    let marks = LedgerMarks::default();
    while next_batch(&mut jobs, &mut batch, GROUP_MAX, &stop).await > 0 {
        marks.before_flush(&writer, LedgerMarks::MARK_SQLITE).await;
        let results = match commit_group(&writer, &batch).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            // Why one by one then: a failure is rare (the aggregators validated the votes),
            // and one poll's failure must not fail the others.
            Err(e) => {
                tracing::debug!(error = %e, "flush group failed; applying its flushes one by one");
                let mut results = Vec::with_capacity(batch.len());
                for job in &batch {
                    results.push(commit_one(&writer, job).await);
                }
                results
            }
        };
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Every flush of the group in one transaction; all or nothing. Why no savepoint each: two
/// more statements per poll is what 10,000 active polls cannot afford.
pub(super) async fn commit_group(
    writer: &SqlitePool,
    batch: &[FlushJob],
) -> Result<Vec<FlushOutcome>, StoreError> {
    let mut tx = writer.begin().await.map_err(err("begin flush"))?;
    let mut reused = Vec::new();
    let mut outcomes: Vec<Option<FlushOutcome>> = vec![None; batch.len()];
    let fixed: Vec<usize> = (0..batch.len())
        .filter(|i| !batch[*i].allow_change)
        .collect();
    // Why only with distinct polls: the statements below cannot tell two flushes of one
    // poll apart (a restarted aggregator's flush may still be queued behind its old one).
    let distinct: HashSet<PollId> = fixed.iter().map(|i| batch[*i].poll).collect();
    if distinct.len() == fixed.len() {
        let many = apply_first_ballots_of_many(&mut tx, batch, &fixed, &mut reused).await?;
        for (i, outcome) in fixed.iter().zip(many) {
            outcomes[*i] = Some(outcome);
        }
    }
    let mut done = Vec::with_capacity(batch.len());
    for (job, outcome) in batch.iter().zip(outcomes) {
        done.push(match outcome {
            Some(outcome) => outcome,
            None => apply_in(&mut tx, job, &mut reused).await?,
        });
    }
    tx.commit().await.map_err(err("commit flush"))?;
    sql_common::report_reused(reused.iter().map(|(poll, vote)| (*poll, vote)));
    Ok(done)
}

/// Adds up, per poll and option, the ballots the ledger recorded above `watermark`.
pub(super) async fn count_recorded(
    tx: &mut SqliteConnection,
    watermark: i64,
    inserted: &mut HashMap<PollId, i64>,
    deltas: &mut HashMap<PollId, BTreeMap<OptionId, i64>>,
) -> Result<(), StoreError> {
    // One row per poll, its ballots packed as `n:choices;…` (see `packed_pairs`). Why NOT
    // INDEXED: it pins the row id range; SQLite 3.40 planned this as a scan of the whole
    // ledger through its unique index (to group without sorting), a cost that grows with
    // every vote ever taken.
    let counted: Vec<(PollId, String)> = sqlx::query_as(
        "SELECT poll_id, group_concat(n || ':' || choices, ';') FROM \
         (SELECT poll_id, choices, COUNT(*) AS n FROM votes NOT INDEXED WHERE row_id > ? \
          GROUP BY poll_id, choices) GROUP BY poll_id",
    )
    .bind(watermark)
    .fetch_all(&mut *tx)
    .await
    .map_err(err("count the inserted votes"))?;
    for (poll, packed) in counted {
        for (n, choices) in packed_pairs::<i64, String>(&packed, ';')? {
            tally(inserted, deltas, poll, ballot::decode_choices(&choices), n);
        }
    }
    Ok(())
}

/// Finds, among votes the ledger did not take (`DO NOTHING`), those whose (poll, user, vote
/// id) it holds with another ballot: [`ballot::plan`]'s `reused`, for the flushes that skip
/// it. Why only here: when every vote was new none can be (the usual case reads nothing).
/// Why only current ballots: these polls' ballots never change, so every one is current.
pub(super) async fn find_reused(
    tx: &mut SqliteConnection,
    rows: &[(PollId, &Vote)],
    reused: &mut Reused,
) -> Result<(), StoreError> {
    let mut held: HashMap<(PollId, String, String), String> = HashMap::new();
    for chunk in sized_chunks(rows) {
        let mut q = sqlx::query_as(CURRENT_BALLOTS.sql(chunk.len()));
        for (poll, vote) in chunk {
            q = q.bind(*poll).bind(&vote.user_id);
        }
        let found: Vec<(PollId, String, String, String)> = q
            .fetch_all(&mut *tx)
            .await
            .map_err(err("read the ledger's vote ids"))?;
        held.extend(found.into_iter().map(|(p, u, i, c)| ((p, u, i), c)));
    }
    for (poll, vote) in rows {
        let key = (*poll, vote.user_id.clone(), vote.ledger_id().to_owned());
        if let Some(choices) = held.get(&key)
            && !ballot::same_ballot(&ballot::decode_choices(choices), &vote.choices)
        {
            reused.push((*poll, (*vote).clone()));
        }
    }
    Ok(())
}

/// Records `n` ballots of `poll` choosing `options`.
pub(super) fn tally(
    inserted: &mut HashMap<PollId, i64>,
    deltas: &mut HashMap<PollId, BTreeMap<OptionId, i64>>,
    poll: PollId,
    options: impl IntoIterator<Item = OptionId>,
    n: i64,
) {
    *inserted.entry(poll).or_default() += n;
    let poll_deltas = deltas.entry(poll).or_default();
    for option in options {
        *poll_deltas.entry(option).or_default() += n;
    }
}

/// The flushes `which` of polls where voters cannot change their vote. There
/// [`ballot::plan`] comes down to "insert, unless the voter has a ballot or the vote is in
/// the ledger": exactly what `ON CONFLICT DO NOTHING` on the ledger's two unique keys does,
/// without reading first. And all of them at once: a handful of statements for the whole
/// group instead of 3 + k for each poll, which is what 10,000 active polls spend their time
/// on.
pub(super) async fn apply_first_ballots_of_many(
    tx: &mut SqliteConnection,
    batch: &[FlushJob],
    which: &[usize],
    reused: &mut Reused,
) -> Result<Vec<FlushOutcome>, StoreError> {
    let now = now_millis();
    let rows: Vec<(PollId, &Vote)> = which
        .iter()
        .flat_map(|i| batch[*i].votes.iter().map(move |v| (batch[*i].poll, v)))
        .collect();
    let mut deltas: HashMap<PollId, BTreeMap<OptionId, i64>> = HashMap::new();
    let mut inserted: HashMap<PollId, i64> = HashMap::new();
    // Why a watermark rather than `RETURNING`: returning every inserted row streamed each
    // one back through sqlx's worker channel (a string allocation and often a thread
    // wake-up per vote). Row ids only grow (AUTOINCREMENT) and this connection is the only
    // writer, so the rows above the watermark are exactly the ones this flush inserted.
    let watermark: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(row_id), 0) FROM votes")
        .fetch_one(&mut *tx)
        .await
        .map_err(err("read the ledger's last row"))?;
    let mut recorded = 0;
    for chunk in sized_chunks(&rows) {
        let mut q = sqlx::query(INSERT_FIRST_BALLOTS.sql(chunk.len()));
        for (poll, v) in chunk {
            q = q
                .bind(*poll)
                .bind(&v.user_id)
                .bind(v.ledger_id())
                .bind(ballot::encode_choices(&v.choices))
                .bind(v.voted_at.unwrap_or(now))
                .bind(true);
        }
        recorded += q
            .execute(&mut *tx)
            .await
            .map_err(err("insert votes into the ledger"))?
            .rows_affected();
    }
    if recorded == rows.len() as u64 {
        // Every vote was new, the usual case: they are the deltas, and the ledger need not
        // be read back (that query was a sixth of a many-poll flush group's time).
        for (poll, vote) in &rows {
            tally(
                &mut inserted,
                &mut deltas,
                *poll,
                vote.choices.iter().copied(),
                1,
            );
        }
    } else {
        // Some were repeats or replays (`DO NOTHING`): count what the ledger took.
        count_recorded(tx, watermark, &mut inserted, &mut deltas).await?;
        find_reused(tx, &rows, reused).await?;
    }
    let moves: Vec<(PollId, OptionId, i64)> = deltas
        .iter()
        .flat_map(|(poll, d)| d.iter().map(move |(option, n)| (*poll, *option, *n)))
        .collect();
    for chunk in sized_chunks(&moves) {
        let mut q = sqlx::query(ADD_TO_COUNTS.sql(chunk.len()));
        for (poll, option, n) in chunk {
            q = q.bind(*poll).bind(*option).bind(*n);
        }
        q.execute(&mut *tx).await.map_err(err("update counts"))?;
    }
    let bumps: Vec<(PollId, i64)> = inserted.iter().map(|(p, n)| (*p, *n)).collect();
    for chunk in sized_chunks(&bumps) {
        let mut q = sqlx::query(BUMP_VERSIONS.sql(chunk.len()));
        for (poll, n) in chunk {
            q = q.bind(*poll).bind(*n);
        }
        q.execute(&mut *tx)
            .await
            .map_err(err("bump poll versions"))?;
    }
    let polls: Vec<PollId> = which.iter().map(|i| batch[*i].poll).collect();
    let mut versions: HashMap<PollId, i64> = HashMap::new();
    let mut counts: HashMap<PollId, Vec<(OptionId, i64)>> = HashMap::new();
    for ids in sized_chunks(&polls) {
        let mut q = sqlx::query_as(READ_COUNTS.sql(ids.len()));
        for id in ids {
            q = q.bind(*id);
        }
        let found: Vec<(PollId, i64, Option<String>)> =
            q.fetch_all(&mut *tx).await.map_err(err("read counts"))?;
        for (poll, version, packed) in found {
            versions.insert(poll, version);
            let mut options = packed_pairs(packed.as_deref().unwrap_or(""), ',')?;
            // group_concat's order is unspecified; subscribers get the options in order.
            options.sort_unstable_by_key(|(option, _)| *option);
            counts.insert(poll, options);
        }
    }
    let none = BTreeMap::new();
    polls
        .iter()
        .map(|poll| {
            let seq = *versions
                .get(poll)
                .ok_or_else(|| StoreError::new("flush", format!("poll {poll} does not exist")))?;
            let all = sql_common::option_counts(counts.remove(poll).unwrap_or_default());
            let inserted = inserted.get(poll).copied().unwrap_or(0) as u64;
            Ok(sql_common::outcome(
                deltas.get(poll).unwrap_or(&none),
                inserted,
                seq,
                all,
            ))
        })
        .collect()
}

pub(super) async fn commit_one(
    writer: &SqlitePool,
    job: &FlushJob,
) -> Result<FlushOutcome, StoreError> {
    let mut tx = writer.begin().await.map_err(err("begin flush"))?;
    let mut reused = Vec::new();
    let outcome = apply_in(&mut tx, job, &mut reused).await?;
    tx.commit().await.map_err(err("commit flush"))?;
    sql_common::report_reused(reused.iter().map(|(poll, vote)| (*poll, vote)));
    Ok(outcome)
}

/// Votes whose vote id the ledger held with another ballot (see [`ballot::BallotPlan::reused`]),
/// reported once their flush has committed.
pub(super) type Reused = Vec<(PollId, Vote)>;

/// One poll's flush, inside a transaction (see [`group_commit`]).
pub(super) async fn apply_in(
    tx: &mut SqliteConnection,
    job: &FlushJob,
    reused: &mut Reused,
) -> Result<FlushOutcome, StoreError> {
    if job.allow_change {
        apply_changes(tx, job.poll, &job.votes, reused).await
    } else {
        let job = std::slice::from_ref(job);
        let mut one = apply_first_ballots_of_many(tx, job, &[0], reused).await?;
        Ok(one.pop().expect("one outcome per flush"))
    }
}

/// Where voters may change their vote: read their ballots, plan, write.
pub(super) async fn apply_changes(
    tx: &mut SqliteConnection,
    poll: PollId,
    votes: &[Vote],
    reused: &mut Reused,
) -> Result<FlushOutcome, StoreError> {
    let now = now_millis();
    let mut rows = Vec::new();
    for users in sized_chunks(&sql_common::voters_of(votes)) {
        let mut q = sqlx::query_as(BALLOTS_OF_VOTERS.sql(users.len()));
        for user in users {
            q = q.bind(*user);
        }
        let found: Vec<(String, String, String, bool)> = q
            .bind(poll)
            .fetch_all(&mut *tx)
            .await
            .map_err(err("read ballots"))?;
        rows.extend(found);
    }
    let plan = ballot::plan(true, &sql_common::ledger_view(rows), votes);
    reused.extend(plan.reused.iter().map(|v| (poll, (*v).clone())));
    // Why first: the partial unique index allows one current ballot per voter.
    for user in &plan.replaced {
        sqlx::query(
            "UPDATE votes SET current = FALSE WHERE poll_id = ? AND user_id = ? AND current",
        )
        .bind(poll)
        .bind(*user)
        .execute(&mut *tx)
        .await
        .map_err(err("replace ballots"))?;
    }
    for chunk in sized_chunks(&plan.inserts) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO votes (poll_id, user_id, vote_id, choices, voted_at, current) ",
        );
        q.push_values(chunk, |mut row, insert| {
            let v = insert.vote;
            row.push_bind(poll)
                .push_bind(&v.user_id)
                .push_bind(v.ledger_id())
                .push_bind(ballot::encode_choices(&v.choices))
                .push_bind(v.voted_at.unwrap_or(now))
                .push_bind(insert.current);
        });
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(err("insert votes into the ledger"))?;
    }
    let inserted = plan.inserts.len() as u64;
    finish_flush(tx, poll, &plan.deltas, inserted, plan.new_voters).await
}

/// Applies the count deltas, bumps the poll's version (when anything was recorded), and
/// reads every count back.
pub(super) async fn finish_flush(
    tx: &mut SqliteConnection,
    poll: PollId,
    deltas: &BTreeMap<OptionId, i64>,
    inserted: u64,
    new_voters: i64,
) -> Result<FlushOutcome, StoreError> {
    for (option, n) in deltas {
        sqlx::query("UPDATE poll_options SET votes = votes + ? WHERE poll_id = ? AND id = ?")
            .bind(n)
            .bind(poll)
            .bind(option)
            .execute(&mut *tx)
            .await
            .map_err(err("update counts"))?;
    }
    let seq: i64 = if inserted > 0 {
        sqlx::query_scalar(
            "UPDATE polls SET version = version + 1, voters = voters + ? WHERE id = ? \
             RETURNING version",
        )
        .bind(new_voters)
        .bind(poll)
        .fetch_one(&mut *tx)
        .await
    } else {
        sqlx::query_scalar("SELECT version FROM polls WHERE id = ?")
            .bind(poll)
            .fetch_one(&mut *tx)
            .await
    }
    .map_err(err("bump poll version"))?;
    let all = SqliteStore::counts(tx, poll).await?;
    Ok(sql_common::outcome(deltas, inserted, seq, all))
}
