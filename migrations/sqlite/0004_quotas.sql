-- Per-user quotas: stored bytes per user, counted per task row and per event.
--
-- The write path (server/store/sqlite_writes.py) adds each batch's bytes to
-- users.stored_bytes itself, in the same transaction (one UPDATE per user per batch);
-- deletes (retention, removing a user) are counted by the triggers below, whoever does them.
ALTER TABLE users ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_events ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;

-- Existing rows: the same measure as models.Event.stored_bytes and lifecycle.TASK_ROW_BYTES.
UPDATE task_events SET bytes = 96 + length(ts)
    + coalesce(length(CAST(step AS BLOB)), 0) + coalesce(length(CAST(message AS BLOB)), 0)
    + coalesce(length(CAST(result AS BLOB)), 0) + coalesce(length(CAST(error AS BLOB)), 0);
UPDATE tasks SET bytes = 256 + length(CAST(params AS BLOB))
    + coalesce(length(CAST(result AS BLOB)), 0);
UPDATE users SET stored_bytes =
    (SELECT coalesce(sum(t.bytes), 0) FROM tasks t WHERE t.user_id = users.id)
    + (SELECT coalesce(sum(e.bytes), 0) FROM task_events e JOIN tasks t ON t.id = e.task_id
       WHERE t.user_id = users.id);

CREATE TRIGGER task_events_uncount AFTER DELETE ON task_events BEGIN
    UPDATE users SET stored_bytes = stored_bytes - OLD.bytes
    WHERE id = (SELECT user_id FROM tasks WHERE id = OLD.task_id);
END;
CREATE TRIGGER tasks_uncount AFTER DELETE ON tasks BEGIN
    UPDATE users SET stored_bytes = stored_bytes - OLD.bytes WHERE id = OLD.user_id;
END;

-- The unfinished-task quota counts a user's pending and running tasks.
CREATE INDEX tasks_unfinished ON tasks (user_id) WHERE status IN ('pending', 'running');
