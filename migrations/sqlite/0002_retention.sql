-- Retention: find finished tasks by age, and a task's subscription rows when it is deleted
-- (without this index every deleted task would scan the whole subscriptions table).
CREATE INDEX tasks_finished ON tasks (finished_at, id) WHERE finished_at IS NOT NULL;
CREATE INDEX subscriptions_by_task ON subscriptions (task_id);
