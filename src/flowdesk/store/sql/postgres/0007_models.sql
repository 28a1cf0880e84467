-- flowdesk schema 7: model usage and cost, budgets and shared rate limits, feature flags,
-- shadow comparisons, drift samples and alerts (flowdesk.models: ledger, budgets,
-- rollout, drift). Accounting and telemetry rows carry no audit record; flag changes,
-- drift alerts and reference resets do.

-- One row per provider call the gateway made: the answer's, a fallback's, a canary's, a
-- shadow's (a cached answer made none).
CREATE TABLE model_ledger (
    id         BIGSERIAL PRIMARY KEY,
    at         BIGINT NOT NULL,
    run_id     TEXT,
    seq        BIGINT,
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
    tokens_in  BIGINT NOT NULL,
    tokens_out BIGINT NOT NULL,
    cost_usd   DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION
);
CREATE INDEX model_ledger_run ON model_ledger (run_id, seq);
CREATE INDEX model_ledger_workflow ON model_ledger (workflow, at);
CREATE INDEX model_ledger_task ON model_ledger (task, at);

-- Spend per budget scope and window in nano-dollars: integers, so the conditional
-- "spent + estimate <= limit" is exact. A call reserves its estimate before it goes out
-- and settles to its real cost after.
CREATE TABLE model_budget_usage (
    scope        TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    spent_nusd   BIGINT NOT NULL,
    calls        BIGINT NOT NULL,
    limit_nusd   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (scope, window_start)
);

-- Shared rate limits: a sliding-window log per key. Upserting the key's row first
-- serializes the count and the insert (a row lock on PostgreSQL; SQLite serializes
-- writers anyway).
CREATE TABLE model_rate_keys (
    key        TEXT PRIMARY KEY,
    updated_at BIGINT NOT NULL
);
CREATE TABLE model_rate_events (
    id  BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL,
    at  BIGINT NOT NULL
);
CREATE INDEX model_rate_events_key ON model_rate_events (key, at);

-- Runtime switches of a task's routes (a model of its chain, its canary, its shadow);
-- they win over the config's [flags].
CREATE TABLE model_flags (
    task       TEXT NOT NULL,
    route      TEXT NOT NULL,
    enabled    BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (task, route)
);

-- One row per answer a shadow version answered beside: did it agree, how sure, how fast.
CREATE TABLE model_shadow_samples (
    id                BIGSERIAL PRIMARY KEY,
    at                BIGINT NOT NULL,
    run_id            TEXT,
    seq               BIGINT,
    task              TEXT NOT NULL,
    model             TEXT NOT NULL,
    version           TEXT NOT NULL,
    shadow_version    TEXT NOT NULL,
    -- 1 agreed, 0 disagreed, NULL unknown (the shadow failed)
    agree             BIGINT,
    confidence        DOUBLE PRECISION,
    shadow_confidence DOUBLE PRECISION,
    shadow_latency_ms DOUBLE PRECISION,
    shadow_error      TEXT
);
CREATE INDEX model_shadow_samples_task ON model_shadow_samples (task, model, at);

-- Drift: per task, a reference window (the first reference_size answers, or the live
-- window at a rebase) and a ring buffer of the latest live_size answers. A sample holds
-- the input's length and its hashed token buckets, never the text.
CREATE TABLE model_drift_state (
    task       TEXT PRIMARY KEY,
    ref_count  BIGINT NOT NULL,
    live_count BIGINT NOT NULL,
    -- none | moderate | major
    level      TEXT NOT NULL,
    since      BIGINT,
    report     TEXT,
    checked_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE model_drift_samples (
    task       TEXT NOT NULL,
    -- ref | live
    win        TEXT NOT NULL,
    slot       BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    length     BIGINT NOT NULL,
    -- JSON array of hashed token buckets
    tokens     TEXT NOT NULL,
    label      TEXT,
    confidence DOUBLE PRECISION,
    PRIMARY KEY (task, win, slot)
);
