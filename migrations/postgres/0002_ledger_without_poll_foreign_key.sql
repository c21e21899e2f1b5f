-- The ledger's foreign key to polls is checked for every ballot inserted: an after-row
-- trigger that looks up and key-share-locks the poll's row, once per vote. Measured on
-- 500,000 ballots in flushes of 20,000, it was 5.2 of 17 µs of Postgres CPU per ballot
-- (docs/BENCHMARKS.md, "Catch-up"). It guarded nothing the flush does not: every flush
-- locks its poll's row before it inserts (`PostgresStore::lock_poll` fails when the poll
-- does not exist), and polls are never deleted.
ALTER TABLE votes DROP CONSTRAINT votes_poll_id_fkey;
