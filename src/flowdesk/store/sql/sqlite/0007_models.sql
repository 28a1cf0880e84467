-- flowdesk schema 7: model usage and cost, budgets and shared rate limits, feature flags,
-- shadow comparisons, drift samples and alerts (flowdesk.models: ledger, budgets,
-- rollout, drift). Accounting and telemetry rows carry no audit record; flag changes,
-- drift alerts and reference resets do.

-- One row per provider call the gateway made: the answer's, a fallback's, a canary's, a
-- shadow's (a cached answer made none).
CREATE TABLE model_ledger (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    run_id     TEXT,
    seq        INTEGER,
    workflow   TEXT,
    task       TEXT NOT NULL,
    model      TEXT NOT NULL,
    provider   TEXT NOT NULL,
    version    TEXT NOT NULL,
    -- current | canary | shadow
    role       TEXT NOT NULL,
    -- ok | error
    status     TEXT NOT NULL,
    error      TEXT,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost_usd   REAL NOT NULL,
    latency_ms REAL NOT NULL,
    confidence REAL
);
CREATE INDEX model_ledger_run ON model_ledger (run_id, seq);
CREATE INDEX model_ledger_workflow ON model_ledger (workflow, at);
CREATE INDEX model_ledger_task ON model_ledger (task, at);

-- Spend per budget scope and window in nano-dollars: integers, so the conditional
-- "spent + estimate <= limit" is exact. A call reserves its estimate before it goes out
-- and settles to its real cost after.
CREATE TABLE model_budget_usage (
    scope        TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    spent_nusd   INTEGER NOT NULL,
    calls        INTEGER NOT NULL,
    limit_nusd   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, window_start)
);

-- Shared rate limits: a sliding-window log per key. Upserting the key's row first
-- serializes the count and the insert (a row lock on PostgreSQL; SQLite serializes
-- writers anyway).
CREATE TABLE model_rate_keys (
    key        TEXT PRIMARY KEY,
    updated_at INTEGER NOT NULL
);
CREATE TABLE model_rate_events (
    id  INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    at  INTEGER NOT NULL
);
CREATE INDEX model_rate_events_key ON model_rate_events (key, at);

-- Runtime switches of a task's routes (a model of its chain, its canary, its shadow);
-- they win over the config's [flags].
CREATE TABLE model_flags (
    task       TEXT NOT NULL,
    route      TEXT NOT NULL,
    enabled    INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (task, route)
);

-- One row per answer a shadow version answered beside: did it agree, how sure, how fast.
CREATE TABLE model_shadow_samples (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    at                INTEGER NOT NULL,
    run_id            TEXT,
    seq               INTEGER,
    task              TEXT NOT NULL,
    model             TEXT NOT NULL,
    version           TEXT NOT NULL,
    shadow_version    TEXT NOT NULL,
    -- 1 agreed, 0 disagreed, NULL unknown (the shadow failed)
    agree             INTEGER,
    confidence        REAL,
    shadow_confidence REAL,
    shadow_latency_ms REAL,
    shadow_error      TEXT
);
CREATE INDEX model_shadow_samples_task ON model_shadow_samples (task, model, at);

-- Drift: per task, a reference window (the first reference_size answers, or the live
-- window at a rebase) and a ring buffer of the latest live_size answers. A sample holds
-- the input's length and its hashed token buckets, never the text.
CREATE TABLE model_drift_state (
    task       TEXT PRIMARY KEY,
    ref_count  INTEGER NOT NULL,
    live_count INTEGER NOT NULL,
    -- none | moderate | major
    level      TEXT NOT NULL,
    since      INTEGER,
    report     TEXT,
    checked_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE model_drift_samples (
    task       TEXT NOT NULL,
    -- ref | live
    win        TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    -- JSON array of hashed token buckets
    tokens     TEXT NOT NULL,
    label      TEXT,
    confidence REAL,
    PRIMARY KEY (task, win, slot)
);
