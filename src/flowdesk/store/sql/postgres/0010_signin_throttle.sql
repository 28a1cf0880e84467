-- flowdesk schema 10: failed web UI sign-ins, counted per account and per client address
-- (flowdesk.server.ui.throttle). Kept in the database so that every API server on it
-- counts the same failures and honours the same lockouts.

-- One row per key: "user:<user id>" (any id that was tried, known or not) or
-- "addr:<client address>" (an IPv6 address by its /64). failures counts the current
-- streak; locked_until (epoch ms, 0: never) refuses sign-ins to the key until then;
-- the row is forgotten at forget_at (one window after the streak began, or after the
-- lockout ends), and the next failure starts a new streak.
CREATE TABLE ui_signin_failures (
    key          TEXT PRIMARY KEY,
    failures     BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,
    forget_at    BIGINT NOT NULL
);
CREATE INDEX ui_signin_failures_forget ON ui_signin_failures (forget_at);
