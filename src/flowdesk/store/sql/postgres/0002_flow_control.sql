-- flowdesk schema 2: flow control. Queue limits count running runs and recent starts per
-- queue; schedules fire once per tick; deduplicated starts find their queued run.

CREATE INDEX runs_running ON runs (queue, concurrency_key) WHERE status = 'running';
CREATE INDEX runs_started ON runs (queue, started_at);
CREATE INDEX runs_dedupe ON runs (dedupe_key) WHERE status = 'queued' AND dedupe_key IS NOT NULL;
CREATE INDEX runs_deadline ON runs (deadline_at) WHERE deadline_at IS NOT NULL AND status IN ('queued', 'waiting');

CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    workflow   TEXT NOT NULL,
    cron       TEXT NOT NULL,
    -- skip: after downtime only the latest missed tick runs; all: every missed tick runs
    catchup    TEXT NOT NULL,
    paused     INTEGER NOT NULL DEFAULT 0,
    last_tick  BIGINT,
    next_tick  BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
