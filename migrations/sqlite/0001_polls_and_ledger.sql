-- Polls, their options with counts, and the vote ledger that makes counting idempotent.
-- Timestamps are milliseconds since the Unix epoch.

CREATE TABLE polls (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    question   TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    closed_at  INTEGER,
    -- Incremented by every flush that changed the counts; sent to clients as `seq`.
    version    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE poll_options (
    poll_id INTEGER NOT NULL REFERENCES polls (id),
    id      INTEGER NOT NULL,
    text    TEXT    NOT NULL,
    votes   INTEGER NOT NULL DEFAULT 0 CHECK (votes >= 0),
    PRIMARY KEY (poll_id, id)
) WITHOUT ROWID;

-- One row per counted vote. The primary key is the exactly-once rule: a (poll, user) pair is
-- counted at most once, however often the vote log replays it.
CREATE TABLE votes (
    poll_id   INTEGER NOT NULL,
    user_id   TEXT    NOT NULL,
    option_id INTEGER NOT NULL,
    voted_at  INTEGER NOT NULL,
    PRIMARY KEY (poll_id, user_id),
    FOREIGN KEY (poll_id, option_id) REFERENCES poll_options (poll_id, id)
) WITHOUT ROWID;
