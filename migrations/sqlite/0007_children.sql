-- Parent and child tasks, and the rate and ETA of every progress event.
-- parent_id, weight, depth and finish (0: by its owner, 1: auto_finish, 2: auto_finish
-- with fail_fast) are set at creation; tree holds a parent's child counts and weighted
-- sums (JSON, NULL until it has a child); meter the rate's smoothing state (JSON).
ALTER TABLE tasks ADD COLUMN parent_id TEXT;
ALTER TABLE tasks ADD COLUMN weight NUMERIC NOT NULL DEFAULT 1;
ALTER TABLE tasks ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN finish INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN tree TEXT;
ALTER TABLE tasks ADD COLUMN rate REAL;
ALTER TABLE tasks ADD COLUMN eta_s REAL;
ALTER TABLE tasks ADD COLUMN meter TEXT;
CREATE INDEX tasks_by_parent ON tasks (parent_id, created_at DESC) WHERE parent_id IS NOT NULL;

ALTER TABLE task_events ADD COLUMN rate REAL;
ALTER TABLE task_events ADD COLUMN eta_s REAL;
ALTER TABLE task_events ADD COLUMN child TEXT;           -- JSON {id, seq, status, progress}
