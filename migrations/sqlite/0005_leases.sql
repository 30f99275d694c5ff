-- Built-in jobs run on one node at a time: the node running a job holds its lease and
-- renews it; another node may take over once it has expired (epoch seconds). With SQLite
-- there is one node, but the job runner works the same on every store.
CREATE TABLE job_leases (
    task_id    TEXT PRIMARY KEY REFERENCES tasks(id) ON DELETE CASCADE,
    node_id    TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;

-- Which node recorded a subscription (the PostgreSQL store closes only its own at start).
ALTER TABLE subscriptions ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
