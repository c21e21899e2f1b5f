-- The ledger's index on voted_at served one query: the voters of the duplicate guard's
-- time to live (a day by default), read once at start to warm an in-process guard. It
-- cost every ballot an index entry: 1 of 4.1 WAL records and 7.5-8.0 against 5.5-6.9 us of
-- Postgres CPU per vote (docs/BENCHMARKS.md, "What one vote costs"). Instead, the first
-- flush of each hour (by the database's clock) notes the ledger's next row id: every row
-- below it was inserted, so voted, before then, and the warm-up reads the rows above the
-- last mark of an hour that ended, with an hour to spare for clocks, before the time it
-- wants (`sql_common::LedgerMarks`). This holds while row ids are handed out in order:
-- keep votes_row_id_seq without a cache (CACHE 1, the default).
DROP INDEX votes_by_time;

CREATE TABLE ledger_marks (
    -- Hours since the Unix epoch, by the database's clock.
    hour      BIGINT PRIMARY KEY,
    -- The ledger's next row id when that hour's first flush began.
    first_row BIGINT NOT NULL
);

-- The rows already in the ledger were inserted before now.
INSERT INTO ledger_marks (hour, first_row)
SELECT floor(extract(epoch FROM clock_timestamp()) / 3600)::bigint, COALESCE(MAX(row_id), 0) + 1
FROM votes;
