-- Polls, their options with counts, and the vote ledger that makes counting idempotent.
-- Timestamps are milliseconds since the Unix epoch.

CREATE TABLE polls (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    question             TEXT    NOT NULL,
    created_at           INTEGER NOT NULL,
    closed_at            INTEGER,
    -- When the poll closes by itself (NULL: only when closed by hand).
    closes_at            INTEGER,
    max_choices          INTEGER NOT NULL DEFAULT 1 CHECK (max_choices >= 1),
    hide_results         BOOLEAN NOT NULL DEFAULT FALSE,
    allow_change         BOOLEAN NOT NULL DEFAULT FALSE,
    webhook_url          TEXT,
    webhook_secret       TEXT,
    webhook_results_secs INTEGER,
    -- Incremented by every flush that changed the counts; sent to clients as `seq`.
    version              INTEGER NOT NULL DEFAULT 0,
    -- Voters with a ballot.
    voters               INTEGER NOT NULL DEFAULT 0,
    -- When the last close marker was appended (to re-send one that was lost).
    marker_at            INTEGER,
    -- The final counts of the closed poll were published.
    sealed               BOOLEAN NOT NULL DEFAULT FALSE
);

-- The closing scheduler looks for open polls that are due.
CREATE INDEX polls_due ON polls (closes_at) WHERE closed_at IS NULL;

CREATE TABLE poll_options (
    poll_id INTEGER NOT NULL REFERENCES polls (id),
    id      INTEGER NOT NULL,
    text    TEXT    NOT NULL,
    votes   INTEGER NOT NULL DEFAULT 0 CHECK (votes >= 0),
    PRIMARY KEY (poll_id, id)
) WITHOUT ROWID;

-- The ledger: one row per counted vote, kept when a voter changes their ballot.
CREATE TABLE votes (
    row_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    poll_id  INTEGER NOT NULL REFERENCES polls (id),
    user_id  TEXT    NOT NULL,
    -- The voter's idempotency key ('' when the vote had none): a retried or replayed vote
    -- finds its row and is not applied again.
    vote_id  TEXT    NOT NULL,
    -- Options chosen, comma-separated.
    choices  TEXT    NOT NULL,
    voted_at INTEGER NOT NULL,
    -- The voter's ballot now; false once replaced by a change.
    current  BOOLEAN NOT NULL,
    UNIQUE (poll_id, user_id, vote_id)
);

-- The exactly-once rule: at most one current ballot per (poll, user).
CREATE UNIQUE INDEX votes_one_ballot ON votes (poll_id, user_id) WHERE current;
CREATE INDEX votes_by_time ON votes (voted_at);
