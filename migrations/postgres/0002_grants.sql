-- API keys for workers and read-only share tokens for one task, stored only as hashes of
-- their secrets; and the answers of idempotent requests (kept 24 h by retention).
CREATE TABLE api_keys (
    id           TEXT   COLLATE "C" PRIMARY KEY,
    user_id      BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT   NOT NULL,
    scopes       TEXT   NOT NULL,
    secret_hash  TEXT   NOT NULL,
    created_at   TEXT   COLLATE "C" NOT NULL,
    last_used_at TEXT   COLLATE "C",
    revoked_at   TEXT   COLLATE "C"
);
CREATE INDEX api_keys_by_user ON api_keys (user_id);

CREATE TABLE share_tokens (
    id          TEXT   COLLATE "C" PRIMARY KEY,
    task_id     TEXT   COLLATE "C" NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    secret_hash TEXT   NOT NULL,
    created_at  TEXT   COLLATE "C" NOT NULL,
    expires_at  TEXT   COLLATE "C" NOT NULL,
    revoked_at  TEXT   COLLATE "C"
);
CREATE INDEX share_tokens_by_task ON share_tokens (task_id);

CREATE TABLE idempotency_keys (
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key         TEXT   COLLATE "C" NOT NULL,
    fingerprint TEXT   NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT   NOT NULL,
    created_at  TEXT   COLLATE "C" NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);
