"""Server configuration: one frozen dataclass, filled from flags and environment variables.

Every flag has an environment variable (named in its help text); a flag given on the
command line wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start; tests build one directly."""

    host: str = "127.0.0.1"
    port: int = 8080
    db_path: Path = Path("data/app.db")
    #: Seconds the built-in analysis job waits between steps (tests use ~0).
    job_step_delay: float = 1.0
    #: HS256 secret; None: generated once and kept in a file beside the database.
    jwt_secret: str | None = field(default=None, repr=False)
    #: Lifetime of an access token, in seconds.
    token_ttl: int = 3600
    #: Origins allowed besides the server's own (exact "scheme://host[:port]").
    allowed_origins: tuple[str, ...] = ()
    #: Seconds of silence from a peer before the server pings it.
    heartbeat_interval: float = 20.0
    #: Seconds a pinged peer has to answer before it is dropped.
    heartbeat_timeout: float = 10.0
    #: Largest WebSocket frame a client may send, in bytes (bigger: close 1009).
    max_frame_bytes: int = 64 * 1024
    #: Largest HTTP request body, in bytes (bigger: 413).
    max_body_bytes: int = 1024 * 1024
    #: Messages a connection may have queued for sending before it is a slow consumer.
    send_queue_messages: int = 1000
    #: Bytes a connection may have queued (own queue + transport buffer) before it is dropped.
    send_queue_bytes: int = 1024 * 1024
    #: Client messages per second per connection (token bucket; 0: no limit). Protocol
    #: pings are not counted. Over it: an error "rate_limited", the message is ignored.
    ws_rate: float = 100.0
    #: Messages a connection may send at once after a quiet spell (the bucket's size).
    ws_burst: int = 500
    #: Messages refused for the rate within 10 s that get an error; the next closes 1008.
    ws_flood_limit: int = 100
    #: Subscriptions per connection (0: no limit).
    max_subscriptions: int = 100
    #: Open WebSocket connections per user (0: no limit); one more is refused with 429.
    max_connections_per_user: int = 10000
    #: Most open WebSocket connections in all (0: no limit); more get 503 + Retry-After.
    max_connections: int = 20000
    #: New WebSocket connections get 503 + Retry-After while the event loop lags this
    #: many seconds (smoothed; 0: never shed for lag).
    shed_lag: float = 0.25
    #: Progress posts per second per task (token bucket; 0: no limit); over it: 429.
    task_rate: float = 1000.0
    #: Progress posts a task may make at once after a quiet spell.
    task_burst: int = 2000
    #: SQLite synchronous mode: FULL fsyncs every commit (survives power loss), NORMAL
    #: survives a process crash only.
    sqlite_synchronous: str = "FULL"
    #: Most events folded into one transaction (group commit); 1 commits each on its own.
    commit_batch_max: int = 512
    #: Seconds after a task finished before its history is deleted (all but its last
    #: event); 0 keeps it forever.
    event_retention: int = 7 * 24 * 3600
    #: Seconds after a task finished before the task itself is deleted; 0 keeps it forever.
    task_retention: int = 30 * 24 * 3600
    #: Most events kept per task, the newest (running tasks too); 0 keeps them all.
    max_events_per_task: int = 10_000
    #: Seconds between two runs of the retention job.
    retention_interval: float = 60.0
    #: Seconds given to clients and writers at shutdown.
    shutdown_timeout: float = 3.0
    log_level: str = "INFO"
    #: "kv" (key=value text) or "json" (one JSON object per line).
    log_format: str = "kv"
    #: Bearer token /metrics requires; None: /metrics is open (bind it to a private network).
    metrics_token: str | None = field(default=None, repr=False)
    migrations_dir: Path = field(default=PROJECT_ROOT / "migrations" / "sqlite")
    static_dir: Path = field(default=PROJECT_ROOT / "static")

    @property
    def secret_path(self) -> Path:
        """Where a generated JWT secret is kept (beside the database)."""
        return self.db_path.parent / (self.db_path.name + ".jwt-secret")


def _flag_specs() -> list[tuple[str, str, type, str]]:
    """(flag, environment variable, type, help) for every setting."""
    return [
        ("--host", "PROGRESS_HOST", str, "interface to listen on"),
        ("--port", "PROGRESS_PORT", int, "TCP port"),
        ("--db", "PROGRESS_DB", str, "SQLite database file (created with its folder)"),
        (
            "--job-step-delay",
            "PROGRESS_JOB_STEP_DELAY",
            float,
            "seconds between the built-in job's steps",
        ),
        (
            "--jwt-secret",
            "JWT_SECRET",
            str,
            "HS256 secret (default: generated once, stored beside the database)",
        ),
        ("--token-ttl", "PROGRESS_TOKEN_TTL", int, "access token lifetime in seconds"),
        (
            "--allowed-origins",
            "PROGRESS_ALLOWED_ORIGINS",
            str,
            "comma-separated extra origins allowed for WebSocket and CORS",
        ),
        (
            "--heartbeat-interval",
            "PROGRESS_HEARTBEAT_INTERVAL",
            float,
            "seconds of peer silence before a ping",
        ),
        (
            "--heartbeat-timeout",
            "PROGRESS_HEARTBEAT_TIMEOUT",
            float,
            "seconds to answer a ping before the peer is dropped",
        ),
        (
            "--max-frame-bytes",
            "PROGRESS_MAX_FRAME_BYTES",
            int,
            "largest client WebSocket frame (close 1009 beyond)",
        ),
        ("--max-body-bytes", "PROGRESS_MAX_BODY_BYTES", int, "largest HTTP body (413 beyond)"),
        (
            "--send-queue-messages",
            "PROGRESS_SEND_QUEUE_MESSAGES",
            int,
            "messages queued per connection before it is dropped as slow (4008)",
        ),
        (
            "--send-queue-bytes",
            "PROGRESS_SEND_QUEUE_BYTES",
            int,
            "bytes queued per connection before it is dropped as slow (4008)",
        ),
        (
            "--ws-rate",
            "PROGRESS_WS_RATE",
            float,
            "client messages per second per connection (0 = no limit)",
        ),
        ("--ws-burst", "PROGRESS_WS_BURST", int, "client messages a connection may send at once"),
        (
            "--ws-flood-limit",
            "PROGRESS_WS_FLOOD_LIMIT",
            int,
            "rate-limited messages within 10 s answered with an error; the next closes 1008",
        ),
        (
            "--max-subscriptions",
            "PROGRESS_MAX_SUBSCRIPTIONS",
            int,
            "subscriptions per connection (0 = no limit)",
        ),
        (
            "--max-connections-per-user",
            "PROGRESS_MAX_CONNECTIONS_PER_USER",
            int,
            "open WebSocket connections per user, more get 429 (0 = no limit)",
        ),
        (
            "--max-connections",
            "PROGRESS_MAX_CONNECTIONS",
            int,
            "open WebSocket connections in all, more get 503 (0 = no limit)",
        ),
        (
            "--shed-lag",
            "PROGRESS_SHED_LAG",
            float,
            "event-loop lag in seconds at which new WebSockets get 503 (0 = never)",
        ),
        (
            "--task-rate",
            "PROGRESS_TASK_RATE",
            float,
            "progress posts per second per task, more get 429 (0 = no limit)",
        ),
        ("--task-burst", "PROGRESS_TASK_BURST", int, "progress posts a task may make at once"),
        (
            "--sqlite-synchronous",
            "PROGRESS_SQLITE_SYNCHRONOUS",
            str,
            "SQLite synchronous mode: FULL or NORMAL",
        ),
        (
            "--commit-batch-max",
            "PROGRESS_COMMIT_BATCH_MAX",
            int,
            "most events per transaction (group commit; 1 = one transaction per event)",
        ),
        (
            "--event-retention",
            "PROGRESS_EVENT_RETENTION",
            int,
            "seconds a finished task keeps its event history (0 = forever)",
        ),
        (
            "--task-retention",
            "PROGRESS_TASK_RETENTION",
            int,
            "seconds a finished task is kept before it is deleted (0 = forever)",
        ),
        (
            "--max-events-per-task",
            "PROGRESS_MAX_EVENTS_PER_TASK",
            int,
            "most events kept per task, the newest (0 = no limit)",
        ),
        (
            "--retention-interval",
            "PROGRESS_RETENTION_INTERVAL",
            float,
            "seconds between runs of the retention job",
        ),
        (
            "--shutdown-timeout",
            "PROGRESS_SHUTDOWN_TIMEOUT",
            float,
            "seconds given to clients and writers at shutdown",
        ),
        ("--log-level", "PROGRESS_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
        ("--log-format", "PROGRESS_LOG_FORMAT", str, "kv (key=value lines) or json"),
        (
            "--metrics-token",
            "PROGRESS_METRICS_TOKEN",
            str,
            "bearer token required by GET /metrics (default: open)",
        ),
    ]


_FIELD_FOR_FLAG = {"db": "db_path"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; defaults are filled in by from_args, not here."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Real-time task-progress server (aiohttp + SQLite).",
    )
    for flag, env, kind, help_text in _flag_specs():
        dest = flag[2:].replace("-", "_")
        default = getattr(defaults, _FIELD_FOR_FLAG.get(dest, dest))
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        if default is None:
            default = "generated" if dest == "jwt_secret" else "none"
        shown = default
        parser.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=None,
            help=f"{help_text} [env {env}, default {shown}]",
        )
    return parser


def from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from command-line flags, then environment variables, then defaults."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for flag, env_name, kind, _ in _flag_specs():
        dest = flag[2:].replace("-", "_")
        raw = getattr(args, dest)
        if raw is None and env.get(env_name, "") != "":
            try:
                raw = kind(env.get(env_name))
            except ValueError:
                parser.error(f"environment variable {env_name} is not a valid {kind.__name__}")
        if raw is not None:
            values[_FIELD_FOR_FLAG.get(dest, dest)] = raw
    if "db_path" in values:
        values["db_path"] = Path(str(values["db_path"]))
    if "allowed_origins" in values:
        values["allowed_origins"] = tuple(
            o.strip().rstrip("/") for o in str(values["allowed_origins"]).split(",") if o.strip()
        )
    sync = str(values.get("sqlite_synchronous", "FULL")).upper()
    if sync not in ("FULL", "NORMAL", "EXTRA"):
        parser.error("--sqlite-synchronous must be FULL, NORMAL or EXTRA")
    values["sqlite_synchronous"] = sync
    if "log_format" in values:
        values["log_format"] = str(values["log_format"]).lower()
    config = Config(**values)  # type: ignore[arg-type]
    if config.heartbeat_interval <= 0 or config.heartbeat_timeout <= 0:
        parser.error("heartbeat interval and timeout must be positive")
    if config.job_step_delay < 0:
        parser.error("--job-step-delay must not be negative")
    # Caught here as usage errors, not as tracebacks from deep inside the start-up.
    if not 0 <= config.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if config.jwt_secret is not None and len(config.jwt_secret.encode()) < 32:
        parser.error("--jwt-secret (JWT_SECRET) must be at least 32 bytes")
    for name in (
        "commit_batch_max",
        "token_ttl",
        "max_frame_bytes",
        "max_body_bytes",
        "send_queue_messages",
    ):
        if getattr(config, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("event_retention", "task_retention", "max_events_per_task"):
        if getattr(config, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative (0 = keep forever)")
    if not config.retention_interval > 0:
        parser.error("--retention-interval must be positive")
    if config.send_queue_bytes <= 0 or config.shutdown_timeout < 0:
        parser.error("--send-queue-bytes must be positive, --shutdown-timeout not negative")
    for name in ("ws_rate", "task_rate"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a number >= 0 (0 = no limit)")
    for name in ("ws_burst", "task_burst"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(config.shed_lag) and config.shed_lag >= 0):
        parser.error("--shed-lag must be a number >= 0 (0 = never)")
    for name in (
        "ws_flood_limit",
        "max_subscriptions",
        "max_connections_per_user",
        "max_connections",
    ):
        if getattr(config, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        parser.error("--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if config.log_format not in ("kv", "json"):
        parser.error("--log-format must be kv or json")
    if config.metrics_token is not None and len(config.metrics_token) < 16:
        parser.error("--metrics-token must be at least 16 characters")
    return config
