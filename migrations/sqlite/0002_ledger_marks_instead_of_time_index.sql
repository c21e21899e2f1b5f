-- The ledger's index on voted_at served one query: the voters of the duplicate guard's
-- time to live (a day by default), read once at start to warm an in-process guard. It
-- cost every ballot an entry, and a backlog over many polls inserts those entries all over
-- the index (each poll's flush spans the whole backlog's times): about half the SQLite
-- writer's CPU counting 1,000,000 votes over 100 polls (docs/BENCHMARKS.md, "Catch-up").
-- Instead, the first flush of each hour (by the database's clock) notes the ledger's next
-- row id: every row below it was inserted, so voted, before then, and the warm-up reads
-- the rows above the last mark of an hour that ended, with an hour to spare for clocks,
-- before the time it wants (`sql_common::LedgerMarks`).
DROP INDEX votes_by_time;

CREATE TABLE ledger_marks (
    -- Hours since the Unix epoch, by the database's clock.
    hour      INTEGER PRIMARY KEY,
    -- The ledger's next row id when that hour's first flush began.
    first_row INTEGER NOT NULL
);

-- The rows already in the ledger were inserted before now.
INSERT INTO ledger_marks (hour, first_row)
SELECT unixepoch() / 3600, COALESCE(MAX(row_id), 0) + 1 FROM votes;
