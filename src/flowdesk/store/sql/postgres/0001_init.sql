-- flowdesk schema 1: runs, their recorded steps, signals, version markers, workers.
-- Timestamps are epoch milliseconds (BIGINT), the same values as on SQLite.

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    workflow         TEXT NOT NULL,
    queue            TEXT NOT NULL DEFAULT 'default',
    priority         INTEGER NOT NULL DEFAULT 0,
    -- queued | running | waiting | succeeded | failed | cancelled
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    output           TEXT,
    error            TEXT,
    idempotency_key  TEXT UNIQUE,
    input_hash       TEXT,
    dedupe_key       TEXT,
    concurrency_key  TEXT,
    parent_id        TEXT,
    parent_seq       INTEGER,
    forked_from      TEXT,
    forked_seq       INTEGER,
    -- when the run may next be claimed: queued -> available at; running -> lease expiry;
    -- waiting -> timer (NULL while it waits only for a signal); NULL once finished
    due_at           BIGINT,
    deadline_at      BIGINT,
    lease_owner      TEXT,
    waiting_for      TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    failed_seq       INTEGER,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    updated_at       BIGINT NOT NULL,
    finished_at      BIGINT
);
CREATE INDEX runs_due ON runs (queue, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX runs_created ON runs (created_at, id);
CREATE INDEX runs_status ON runs (status, created_at);
CREATE INDEX runs_workflow ON runs (workflow, created_at);
CREATE INDEX runs_parent ON runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_owner ON runs (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE steps (
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    output      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 1,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE signals (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       TEXT NOT NULL,
    name         TEXT NOT NULL,
    payload      TEXT,
    sent_at      BIGINT NOT NULL,
    consumed_seq INTEGER
);
CREATE INDEX signals_pending ON signals (run_id, name, id) WHERE consumed_seq IS NULL;

CREATE TABLE versions (
    run_id    TEXT NOT NULL,
    change_id TEXT NOT NULL,
    version   INTEGER NOT NULL,
    PRIMARY KEY (run_id, change_id)
);

CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
