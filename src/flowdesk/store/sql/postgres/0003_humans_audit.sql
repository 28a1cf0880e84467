-- flowdesk schema 3: people (users, API tokens), human tasks, and the audit chain.

ALTER TABLE runs ADD COLUMN initiator TEXT;
-- set by the retention job once a finished run's payloads were deleted
ALTER TABLE runs ADD COLUMN purged_at BIGINT;
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- JSON arrays of names
    roles         TEXT NOT NULL,
    user_groups   TEXT NOT NULL,
    manager       TEXT,
    disabled      INTEGER NOT NULL DEFAULT 0,
    password_hash TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    -- SHA-256 of the secret: the secret itself is shown once and never stored
    secret_hash  TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX tokens_user ON tokens (user_id);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    title            TEXT NOT NULL,
    -- open | claimed | completed | cancelled
    status           TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    labels           TEXT NOT NULL,
    form_schema      TEXT NOT NULL,
    form_ref         TEXT,
    context          TEXT,
    candidates       TEXT NOT NULL,
    assignee         TEXT,
    initiator        TEXT,
    four_eyes        INTEGER NOT NULL DEFAULT 0,
    due_at           BIGINT,
    follow_up_at     BIGINT,
    escalation       TEXT,
    escalation_level INTEGER NOT NULL DEFAULT 0,
    escalate_at      BIGINT,
    draft            TEXT,
    result           TEXT,
    completed_by     TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    completed_at     BIGINT
);
CREATE INDEX tasks_status ON tasks (status, priority, created_at);
CREATE INDEX tasks_run ON tasks (run_id);
CREATE INDEX tasks_assignee ON tasks (assignee, status);
CREATE INDEX tasks_escalate ON tasks (escalate_at) WHERE escalate_at IS NOT NULL;

-- who may act on a task: one row per candidate user, group or role
CREATE TABLE task_candidates (
    task_id TEXT NOT NULL,
    kind    TEXT NOT NULL,
    name    TEXT NOT NULL,
    PRIMARY KEY (task_id, kind, name)
);
CREATE INDEX task_candidates_name ON task_candidates (kind, name);

-- what happened to a task, for its page: claims, comments, delegations, escalations
CREATE TABLE task_events (
    id      BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT
);
CREATE INDEX task_events_task ON task_events (task_id, id);

-- The audit chain: record n carries the hash of record n-1. data_hash commits to the
-- record's data (data itself may be cleared by retention; the chain still verifies).
CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    data      TEXT,
    data_hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_subject ON audit (subject, seq);

-- the chain's head, updated with every append: a tail cut off the chain no longer matches it
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- signed statements "the chain up to seq has this hash" (Ed25519)
CREATE TABLE audit_checkpoints (
    seq       BIGINT PRIMARY KEY,
    hash      TEXT NOT NULL,
    at        BIGINT NOT NULL,
    key_id    TEXT NOT NULL,
    signature TEXT NOT NULL
);
