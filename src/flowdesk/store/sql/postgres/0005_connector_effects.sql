-- flowdesk schema 5: what connectors did to targets that cannot recognise a repeat (SMTP).
-- One row per (connector, idempotency key), claimed before the call goes out:
--   started: the call went out and has not reported back, so its effect may have happened;
--   done:    it happened, and result holds the operation's output (JSON);
--   failed:  it did not happen (the target refused, or nothing was sent).
CREATE TABLE connector_effects (
    connector       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    result          TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (connector, idempotency_key)
);
