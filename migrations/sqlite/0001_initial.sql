-- Users, tasks, their event history, and who watched which task.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT    NOT NULL,
    created_at    TEXT    NOT NULL
);

CREATE TABLE tasks (
    id          TEXT    PRIMARY KEY,           -- uuid4 hex: unguessable
    user_id     INTEGER NOT NULL REFERENCES users(id),
    kind        TEXT    NOT NULL,
    params      TEXT    NOT NULL,              -- JSON object
    status      TEXT    NOT NULL,
    progress    NUMERIC NOT NULL DEFAULT 0,    -- NUMERIC keeps 50 as 50, 12.5 as 12.5
    step        TEXT,
    message     TEXT,
    result      TEXT,                          -- JSON object or NULL
    error       TEXT,
    seq         INTEGER NOT NULL,              -- seq of the latest event
    checkpoint  TEXT,                          -- JSON; built-in jobs resume from it
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE INDEX tasks_by_user ON tasks (user_id, created_at DESC);
CREATE INDEX tasks_by_status ON tasks (status, kind);

CREATE TABLE task_events (
    task_id  TEXT    NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    event    TEXT    NOT NULL,
    status   TEXT    NOT NULL,
    progress NUMERIC NOT NULL,
    step     TEXT,
    message  TEXT,
    result   TEXT,
    error    TEXT,
    ts       TEXT    NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

CREATE TABLE subscriptions (
    id              INTEGER PRIMARY KEY,
    connection_id   TEXT    NOT NULL,
    user_id         INTEGER NOT NULL REFERENCES users(id),
    task_id         TEXT    NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    subscribed_at   TEXT    NOT NULL,
    unsubscribed_at TEXT
);
CREATE INDEX subscriptions_by_user ON subscriptions (user_id, subscribed_at DESC);
CREATE INDEX subscriptions_open ON subscriptions (connection_id, task_id) WHERE unsubscribed_at IS NULL;
