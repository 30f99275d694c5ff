"""Durable storage of users, tasks and their event history; all SQL lives in this package."""
