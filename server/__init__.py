"""Self-hosted real-time task-progress server."""
