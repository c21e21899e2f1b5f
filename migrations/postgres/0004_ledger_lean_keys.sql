-- The ledger's keys made lean, as on SQLite (migrations/sqlite/0003_ledger_lean_keys.sql).
-- `UNIQUE (poll_id, user_id, vote_id)` indexed every ballot's voter and vote id (34
-- characters when the server made it), though a current ballot is already unique per
-- (poll, user) through `votes_one_ballot`. What needs the vote id from an index are the
-- replaced ballots: `votes_replaced` holds theirs, and a poll whose ballots cannot change
-- never writes to it. Every flush of a poll locks the poll's row first
-- (`PostgresStore::lock_poll`) and reads the voters' ballots, current and replaced, before
-- it inserts, so no vote id is inserted twice for a voter (`ballot::plan`).
-- The ledger's export reads a poll's rows in order through `votes_by_poll`, whose entries
-- (two integers) only ever grow at the end of each poll's run.
CREATE UNIQUE INDEX votes_replaced ON votes (poll_id, user_id, vote_id) WHERE NOT current;
CREATE INDEX votes_by_poll ON votes (poll_id, row_id);
ALTER TABLE votes DROP CONSTRAINT votes_poll_id_user_id_vote_id_key;
