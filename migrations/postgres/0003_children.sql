-- Parent and child tasks, and the rate and ETA of every progress event (as in SQLite's
-- 0007_children.sql).
ALTER TABLE tasks ADD COLUMN parent_id TEXT COLLATE "C";
ALTER TABLE tasks ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1;
ALTER TABLE tasks ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN finish INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN tree TEXT;
ALTER TABLE tasks ADD COLUMN rate DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN eta_s DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN meter TEXT;
CREATE INDEX tasks_by_parent ON tasks (parent_id, created_at DESC, row_no DESC)
    WHERE parent_id IS NOT NULL;

ALTER TABLE task_events ADD COLUMN rate DOUBLE PRECISION;
ALTER TABLE task_events ADD COLUMN eta_s DOUBLE PRECISION;
ALTER TABLE task_events ADD COLUMN child TEXT;
