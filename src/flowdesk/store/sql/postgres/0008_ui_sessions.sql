-- flowdesk schema 8: web UI sign-in sessions, and an index for its dashboard
-- (users.password_hash, there since schema 3, holds each user's argon2 password hash).

-- One row per browser session. The cookie carries a random secret; only its SHA-256 is
-- stored, so a stolen database opens no session. Expiry is decided here, not by the
-- browser: a session past expires_at, or ended (sign-out, password change, disabled
-- user), is refused whatever the cookie says.
CREATE TABLE ui_sessions (
    secret_hash TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    -- the token every form of this session posts back (CSRF)
    csrf        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    ended_at    BIGINT
);
CREATE INDEX ui_sessions_user ON ui_sessions (user_id);

-- The dashboard reads the model calls of a recent window, newest first.
CREATE INDEX model_ledger_at ON model_ledger (at);
