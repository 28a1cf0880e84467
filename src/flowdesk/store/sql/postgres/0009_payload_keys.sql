-- flowdesk schema 9: payload encryption (flowdesk.store.payloads). Payload columns keep
-- their names and hold sealed envelopes "$fd1$<key id>$<nonce+ciphertext, base64>".

-- Data keys, each wrapped (AES-256-GCM) by a master key or by the keys of a run's data
-- subjects. kind: run (one per run: its payloads), subject (one per live data subject),
-- index (keyed hashes, e.g. of idempotent inputs). Destroying a key sets wrapped to NULL:
-- everything sealed under it is gone for good (erasure, retention).
CREATE TABLE data_keys (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    owner            TEXT NOT NULL,
    -- the master key id (mk-...), or "subjects:" and the subject key ids, comma separated
    wrapped_by       TEXT NOT NULL,
    wrapped          TEXT,
    created_at       BIGINT NOT NULL,
    rotated_at       BIGINT,
    destroyed_at     BIGINT,
    destroyed_reason TEXT
);
CREATE UNIQUE INDEX data_keys_live ON data_keys (kind, owner) WHERE wrapped IS NOT NULL;
CREATE INDEX data_keys_owner ON data_keys (owner, kind);
CREATE INDEX data_keys_wrapped_by ON data_keys (wrapped_by) WHERE wrapped IS NOT NULL;

-- which data subjects a run's payloads are about
CREATE TABLE run_subjects (
    run_id  TEXT NOT NULL,
    subject TEXT NOT NULL,
    PRIMARY KEY (run_id, subject)
);
CREATE INDEX run_subjects_subject ON run_subjects (subject, run_id);

-- per workflow: how long a finished run's payload keys are kept (retention by policy)
CREATE TABLE retention_policies (
    workflow   TEXT PRIMARY KEY,
    keep_ms    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
