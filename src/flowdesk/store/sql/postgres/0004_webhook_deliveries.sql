-- flowdesk schema 4: signed webhook deliveries, remembered so that a replayed delivery
-- maps to the run it started (or signalled) instead of starting another.

CREATE TABLE webhook_deliveries (
    hook          TEXT NOT NULL,
    -- the sender's X-Flowdesk-Delivery header
    delivery_id   TEXT NOT NULL,
    -- SHA-256 of the body: the same delivery id with another body is refused
    body_sha256   TEXT NOT NULL,
    -- SHA-256 of the signed text (timestamp "." body): one signed request, one delivery
    signed_sha256 TEXT NOT NULL,
    -- start | signal
    mode          TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    received_at   BIGINT NOT NULL,
    PRIMARY KEY (hook, delivery_id)
);
CREATE UNIQUE INDEX webhook_deliveries_signed ON webhook_deliveries (hook, signed_sha256);
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
