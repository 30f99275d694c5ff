-- API keys for workers and read-only share tokens for one task, stored only as hashes of
-- their secrets; and the answers of idempotent requests (kept 24 h by retention).
CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,            -- the public part of pk_<id>_<secret>
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,               -- space-separated: tasks:read tasks:write
    secret_hash  TEXT    NOT NULL,               -- sha256 of the secret, hex
    created_at   TEXT    NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
) WITHOUT ROWID;
CREATE INDEX api_keys_by_user ON api_keys (user_id);

CREATE TABLE share_tokens (
    id          TEXT    PRIMARY KEY,             -- the public part of st_<id>_<secret>
    task_id     TEXT    NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    secret_hash TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    expires_at  TEXT    NOT NULL,
    revoked_at  TEXT
) WITHOUT ROWID;
CREATE INDEX share_tokens_by_task ON share_tokens (task_id);

CREATE TABLE idempotency_keys (
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,                -- sha256 of method, path and body
    status      INTEGER NOT NULL,
    body        TEXT    NOT NULL,                -- the first answer, sent again on a retry
    created_at  TEXT    NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);
