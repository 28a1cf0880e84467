-- flowdesk schema 6: observability.

-- The W3C traceparent of the run's root span: every later execution segment of the run
-- (after a wait, on any worker) is a child of it, so the whole run is one trace.
ALTER TABLE runs ADD COLUMN trace_context TEXT;
-- The status the run had when it was last claimed: 'running' means its lease had expired
-- and a worker recovered it (the lease-recovery metric reads it from the claim).
ALTER TABLE runs ADD COLUMN claimed_from TEXT;
