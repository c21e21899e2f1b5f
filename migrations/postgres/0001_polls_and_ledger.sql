-- Polls, their options with counts, and the vote ledger that makes counting idempotent.
-- Timestamps are milliseconds since the Unix epoch.

CREATE TABLE polls (
    id                   BIGSERIAL PRIMARY KEY,
    question             TEXT    NOT NULL,
    created_at           BIGINT  NOT NULL,
    closed_at            BIGINT,
    -- When the poll closes by itself (NULL: only when closed by hand).
    closes_at            BIGINT,
    max_choices          BIGINT  NOT NULL DEFAULT 1 CHECK (max_choices >= 1),
    hide_results         BOOLEAN NOT NULL DEFAULT FALSE,
    allow_change         BOOLEAN NOT NULL DEFAULT FALSE,
    webhook_url          TEXT,
    webhook_secret       TEXT,
    webhook_results_secs BIGINT,
    -- Incremented by every flush that changed the counts; sent to clients as `seq`.
    version              BIGINT  NOT NULL DEFAULT 0,
    -- Voters with a ballot.
    voters               BIGINT  NOT NULL DEFAULT 0,
    -- When the last close marker was appended (to re-send one that was lost).
    marker_at            BIGINT ,
    -- The final counts of the closed poll were published.
    sealed               BOOLEAN NOT NULL DEFAULT FALSE
);

-- The closing scheduler looks for open polls that are due.
CREATE INDEX polls_due ON polls (closes_at) WHERE closed_at IS NULL;

CREATE TABLE poll_options (
    poll_id BIGINT NOT NULL REFERENCES polls (id),
    id      BIGINT NOT NULL,
    text    TEXT   NOT NULL,
    votes   BIGINT NOT NULL DEFAULT 0 CHECK (votes >= 0),
    PRIMARY KEY (poll_id, id)
);

-- The ledger: one row per counted vote, kept when a voter changes their ballot.
CREATE TABLE votes (
    row_id   BIGSERIAL PRIMARY KEY,
    poll_id  BIGINT  NOT NULL REFERENCES polls (id),
    user_id  TEXT    NOT NULL,
    -- The voter's idempotency key ('' when the vote had none): a retried or replayed vote
    -- finds its row and is not applied again.
    vote_id  TEXT    NOT NULL,
    -- Options chosen, comma-separated.
    choices  TEXT    NOT NULL,
    voted_at BIGINT  NOT NULL,
    -- The voter's ballot now; false once replaced by a change.
    current  BOOLEAN NOT NULL,
    UNIQUE (poll_id, user_id, vote_id)
);

-- The exactly-once rule: at most one current ballot per (poll, user).
CREATE UNIQUE INDEX votes_one_ballot ON votes (poll_id, user_id) WHERE current;
CREATE INDEX votes_by_time ON votes (voted_at);
