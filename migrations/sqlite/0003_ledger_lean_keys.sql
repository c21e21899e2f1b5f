-- The ledger's keys made lean. `UNIQUE (poll_id, user_id, vote_id)` put every ballot's
-- voter and vote id (34 characters when the server made it) in an index of their own: a
-- third of the SQLite writer's work per ballot and a third of the database's size
-- (docs/BENCHMARKS.md, "The ledger's lean keys"). It kept one row per vote id for each voter,
-- which only the ballots that are no longer current need from an index:
-- - a current ballot is unique per (poll, user) already (`votes_one_ballot`), so its vote id
--   is too;
-- - a replaced ballot keeps its key in `votes_replaced`, a partial index that a poll whose
--   ballots cannot change never writes to;
-- - whether a vote id is current or replaced, the single writer reads both before it
--   inserts (`ballot::plan`), and never inserts a vote id that the voter already used.
-- The ledger's export reads a poll's rows in order through `votes_by_poll`, whose entries
-- (the poll and the row id) only ever grow at the end of each poll's run.
-- The foreign key to polls goes too, as it went on Postgres: it looked the poll up for
-- every ballot, and guarded nothing the flush does not (a flush fails when its poll's row
-- is missing, and polls are never deleted).
--
-- SQLite cannot drop a table's constraint: the table is built again, its row ids and its
-- AUTOINCREMENT counter kept.
CREATE TABLE votes_lean (
    row_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    poll_id  INTEGER NOT NULL,
    user_id  TEXT    NOT NULL,
    -- The voter's idempotency key ('' when the vote had none): a retried or replayed vote
    -- finds its row and is not applied again.
    vote_id  TEXT    NOT NULL,
    -- Options chosen, comma-separated.
    choices  TEXT    NOT NULL,
    voted_at INTEGER NOT NULL,
    -- The voter's ballot now; false once replaced by a change.
    current  BOOLEAN NOT NULL
);

INSERT INTO votes_lean (row_id, poll_id, user_id, vote_id, choices, voted_at, current)
SELECT row_id, poll_id, user_id, vote_id, choices, voted_at, current FROM votes ORDER BY row_id;

-- The counter may stand above the highest row id; the new table continues from it.
DELETE FROM sqlite_sequence WHERE name = 'votes_lean';
INSERT INTO sqlite_sequence (name, seq) SELECT 'votes_lean', seq FROM sqlite_sequence WHERE name = 'votes';

DROP TABLE votes;
ALTER TABLE votes_lean RENAME TO votes;

-- The exactly-once rule: at most one current ballot per (poll, user).
CREATE UNIQUE INDEX votes_one_ballot ON votes (poll_id, user_id) WHERE current;
CREATE UNIQUE INDEX votes_replaced ON votes (poll_id, user_id, vote_id) WHERE NOT current;
CREATE INDEX votes_by_poll ON votes (poll_id);
