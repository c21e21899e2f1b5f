-- The ledger's index on voted_at served one query: the voters of the last day, read once
-- at start to warm an in-process duplicate guard. It cost every ballot an entry, and a
-- backlog over many polls inserts those entries all over the index (each poll's flush
-- spans the whole backlog's times): a third of the SQLite writer's CPU counting 1,000,000
-- votes over 100 polls (docs/BENCHMARKS.md, "Catch-up"). Instead, the first flush of each
-- hour notes the ledger's next row id: every row below it was inserted, so voted, before
-- that hour ended, and the warm-up reads the rows above the last mark of an hour that
-- ended before the day it wants (`sql_common::LedgerMarks`).
DROP INDEX votes_by_time;

CREATE TABLE ledger_marks (
    -- Hours since the Unix epoch (milliseconds / 3,600,000).
    hour      INTEGER PRIMARY KEY,
    -- The ledger's next row id when that hour's first flush began.
    first_row INTEGER NOT NULL
);
