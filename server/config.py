"""Server configuration: one declaration per setting, from which the parser and checks come.

Each field of `Config` is declared once with `setting(...)`: its default, flag, environment
variable, help text and check. `build_parser` and `from_args` read those declarations; a
flag given on the command line wins over the variable, the variable over the default.
The checks run in `Config.__post_init__`, so a Config built in code (tests, embedding) is
held to the same rules as one built from flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import largest_message_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Check = Callable[[Any], str | None]
Parse = Callable[[str], Any]


class ConfigError(ValueError):
    """A setting (or a combination of settings) that the server cannot run with."""


# -- checks: each returns None when the value is fine, else what is wrong ----------------


def positive(value: Any) -> str | None:
    ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
    return None if ok else "must be a positive number"


def non_negative(value: Any) -> str | None:
    ok = isinstance(value, int | float) and math.isfinite(value) and value >= 0
    return None if ok else "must be a number >= 0"


def at_least(minimum: float) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int | float) and math.isfinite(value) and value >= minimum
        return None if ok else f"must be at least {minimum:g}"

    return check


def between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int | float) and low <= value <= high
        return None if ok else f"must be between {low:g} and {high:g}"

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def min_length(n: int) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        return None if len(str(value).encode()) >= n else f"must be at least {n} bytes"

    return check


def _networks(value: Any) -> str | None:
    try:
        for item in value:
            ipaddress.ip_network(item, strict=False)
    except (TypeError, ValueError) as exc:
        return f"must be IP addresses or networks ({exc})"
    return None


def _store_url(value: Any) -> str | None:
    if value is None:
        return None
    from .store import parse_store_url

    try:
        parse_store_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def _broker_url(value: Any) -> str | None:
    from .broker import broker_kind

    try:
        if broker_kind(value) == "redis":
            from .broker.redis import parse_url  # also says so if redis-py is missing

            parse_url(value)
    except (ValueError, ImportError) as exc:
        return str(exc)
    return None


def _lease_ttl(value: Any) -> str | None:
    # Renewed every third of it through the store: under 1 s, a slow commit or a pause of
    # the event loop would lose leases of live nodes; over an hour, a dead node's jobs
    # would sit that long before anyone resumes them.
    ok = isinstance(value, int | float) and math.isfinite(value) and 1 < value <= 3600
    return None if ok else "must be more than 1 and at most 3600 seconds"


def _node_id(value: Any) -> str | None:
    if value is None:
        return None
    ok = (
        isinstance(value, str)
        and 1 <= len(value) <= 64
        and value.isprintable()
        and " " not in value
    )
    return None if ok else "must be 1-64 printable characters without spaces"


# -- parsers for flag and environment text ------------------------------------------------


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip().rstrip("/") for item in text.split(",") if item.strip())


def _upper(text: str) -> str:
    return text.strip().upper()


def _lower(text: str) -> str:
    return text.strip().lower()


def setting(
    default: Any,
    flag: str,
    env: str,
    help: str,
    *,
    check: Check | None = None,
    parse: Parse | None = None,
    shown: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare one setting: a dataclass field carrying its flag, variable, help and check."""
    if parse is None:
        kind = type(default)
        parse = {int: int, float: _float, str: str, tuple: _comma_list}.get(kind, str)
    return field(
        default=default,
        repr=not secret,
        metadata={
            "flag": flag,
            "env": env,
            "help": help,
            "check": check,
            "parse": parse,
            "shown": shown,
        },
    )


KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start; tests build one directly."""

    # -- where ---------------------------------------------------------------------------
    host: str = setting("127.0.0.1", "--host", "PROGRESS_HOST", "interface to listen on")
    port: int = setting(8080, "--port", "PROGRESS_PORT", "TCP port", check=between(0, 65535))
    db_path: Path = setting(
        Path("data/app.db"),
        "--db",
        "PROGRESS_DB",
        "SQLite database file (created with its folder); shorthand for --store sqlite:///PATH",
        parse=Path,
    )
    store: str | None = setting(
        None,
        "--store",
        "PROGRESS_STORE",
        "sqlite:///PATH (one process) or postgresql://user:password@host:port/db (many nodes)",
        check=_store_url,
        shown="sqlite:///data/app.db (from --db)",
    )
    broker: str = setting(
        "memory://",
        "--broker",
        "PROGRESS_BROKER",
        "memory:// (one process) or redis://host:port/N (fan-out between nodes)",
        check=_broker_url,
    )
    node_id: str | None = setting(
        None,
        "--node-id",
        "PROGRESS_NODE_ID",
        "this node's name in leases, logs and metrics",
        check=_node_id,
        shown="hostname-pid",
    )
    # -- the built-in job ----------------------------------------------------------------
    # 5 s: the demo's six steps take about half a minute, time enough to try a reload or a
    # restart mid-task; tests and benchmarks pass their own.
    job_step_delay: float = setting(
        5.0,
        "--job-step-delay",
        "PROGRESS_JOB_STEP_DELAY",
        "seconds between the built-in job's six steps",
        check=non_negative,
    )
    job_lease_ttl: float = setting(
        15.0,
        "--job-lease-ttl",
        "PROGRESS_JOB_LEASE_TTL",
        "seconds a node's lease on a built-in job lasts unless renewed (every third of it);"
        " another node takes the jobs of a dead node over after this long",
        check=_lease_ttl,
    )
    max_running_jobs: int = setting(
        64,
        "--max-running-jobs",
        "PROGRESS_MAX_RUNNING_JOBS",
        "built-in jobs running at once on this node; the rest wait as pending, in order"
        " (0 = no limit)",
        check=non_negative,
    )
    max_running_jobs_per_user: int = setting(
        8,
        "--max-running-jobs-per-user",
        "PROGRESS_MAX_RUNNING_JOBS_PER_USER",
        "built-in jobs one user may have running at once on this node (0 = no limit)",
        check=non_negative,
    )
    # -- accounts and tokens -------------------------------------------------------------
    jwt_secret: str | None = setting(
        None,
        "--jwt-secret",
        "JWT_SECRET",
        "HS256 secret, at least 32 bytes",
        check=min_length(32),
        shown="generated once, stored beside the database",
        secret=True,
    )
    token_ttl: int = setting(
        3600,
        "--token-ttl",
        "PROGRESS_TOKEN_TTL",
        "access token lifetime in seconds",
        check=positive,
    )
    session_max_age: int = setting(
        7 * 24 * 3600,
        "--session-max-age",
        "PROGRESS_SESSION_MAX_AGE",
        "seconds a login may be refreshed for, counted from the login",
        check=positive,
    )
    registration: str = setting(
        "open",
        "--registration",
        "PROGRESS_REGISTRATION",
        "open: anyone may register; closed: accounts come from `run.py users add`",
        check=one_of("open", "closed"),
        parse=_lower,
    )
    password_hash_cost: int = setting(
        19,
        "--password-hash-cost",
        "PROGRESS_PASSWORD_HASH_COST",
        "argon2id memory per password hash in MiB (time cost 2, one lane; OWASP: 19)",
        check=between(1, 1024),
    )
    password_hash_workers: int = setting(
        0,
        "--password-hash-workers",
        "PROGRESS_PASSWORD_HASH_WORKERS",
        "password hashes computed at once, on low-priority threads (0 = one per core but one)",
        check=non_negative,
    )
    password_hash_queue: int = setting(
        64,
        "--password-hash-queue",
        "PROGRESS_PASSWORD_HASH_QUEUE",
        "password hashes that may wait for a thread; more get 503 overloaded",
        check=non_negative,
    )
    auth_rate: float = setting(
        20.0,
        "--auth-rate",
        "PROGRESS_AUTH_RATE",
        "login, register and password-change attempts per client address per minute, on this node"
        " (0 = no limit)",
        check=non_negative,
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "--trusted-proxies",
        "PROGRESS_TRUSTED_PROXIES",
        "comma-separated addresses or networks whose X-Forwarded-For is believed",
        check=_networks,
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "--allowed-origins",
        "PROGRESS_ALLOWED_ORIGINS",
        "comma-separated extra origins allowed for WebSocket and CORS",
    )
    # -- WebSocket connections -----------------------------------------------------------
    heartbeat_interval: float = setting(
        20.0,
        "--heartbeat-interval",
        "PROGRESS_HEARTBEAT_INTERVAL",
        "seconds of peer silence before a ping",
        check=positive,
    )
    heartbeat_timeout: float = setting(
        10.0,
        "--heartbeat-timeout",
        "PROGRESS_HEARTBEAT_TIMEOUT",
        "seconds to answer a ping before the peer is dropped",
        check=positive,
    )
    max_frame_bytes: int = setting(
        64 * KIB,
        "--max-frame-bytes",
        "PROGRESS_MAX_FRAME_BYTES",
        "largest client WebSocket frame (close 1009 beyond)",
        check=positive,
    )
    send_queue_messages: int = setting(
        1000,
        "--send-queue-messages",
        "PROGRESS_SEND_QUEUE_MESSAGES",
        "messages queued per connection before it is dropped as slow (4008)",
        check=positive,
    )
    send_queue_bytes: int = setting(
        MIB,
        "--send-queue-bytes",
        "PROGRESS_SEND_QUEUE_BYTES",
        "bytes queued per connection before it is dropped as slow (4008)",
        check=positive,
    )
    ws_rate: float = setting(
        100.0,
        "--ws-rate",
        "PROGRESS_WS_RATE",
        "client messages per second per connection (0 = no limit)",
        check=non_negative,
    )
    ws_burst: int = setting(
        500,
        "--ws-burst",
        "PROGRESS_WS_BURST",
        "client messages a connection may send at once",
        check=at_least(1),
    )
    ws_flood_limit: int = setting(
        100,
        "--ws-flood-limit",
        "PROGRESS_WS_FLOOD_LIMIT",
        "rate-limited messages within 10 s answered with an error; the next closes 1008",
        check=non_negative,
    )
    max_subscriptions: int = setting(
        100,
        "--max-subscriptions",
        "PROGRESS_MAX_SUBSCRIPTIONS",
        "subscriptions per connection (0 = no limit)",
        check=non_negative,
    )
    max_connections_per_user: int = setting(
        64,
        "--max-connections-per-user",
        "PROGRESS_MAX_CONNECTIONS_PER_USER",
        "open WebSocket and SSE connections per user on this node (share-token viewers count"
        " apart from the owner's own), more get 429 (0 = no limit)",
        check=non_negative,
    )
    max_connections: int = setting(
        20000,
        "--max-connections",
        "PROGRESS_MAX_CONNECTIONS",
        "open WebSocket connections on this node, more get 503 (0 = no limit)",
        check=non_negative,
    )
    shed_lag: float = setting(
        0.25,
        "--shed-lag",
        "PROGRESS_SHED_LAG",
        "this node's event-loop lag in seconds at which new WebSockets get 503 (0 = never)",
        check=non_negative,
    )
    # -- HTTP ----------------------------------------------------------------------------
    max_body_bytes: int = setting(
        MIB,
        "--max-body-bytes",
        "PROGRESS_MAX_BODY_BYTES",
        "largest HTTP body (413 beyond)",
        check=positive,
    )
    max_http_connections: int = setting(
        24576,
        "--max-http-connections",
        "PROGRESS_MAX_HTTP_CONNECTIONS",
        "open TCP connections of any kind on this node, WebSockets included; more get 503"
        " (0 = no limit; lowered to fit the open-files limit)",
        check=non_negative,
    )
    keepalive_timeout: float = setting(
        30.0,
        "--keepalive-timeout",
        "PROGRESS_KEEPALIVE_TIMEOUT",
        "seconds an idle keep-alive HTTP connection is kept open",
        check=positive,
    )
    header_timeout: float = setting(
        20.0,
        "--header-timeout",
        "PROGRESS_HEADER_TIMEOUT",
        "seconds a client has to send a request's headers, and to send its body",
        check=positive,
    )
    # -- task data and quotas ------------------------------------------------------------
    max_json_bytes: int = setting(
        64 * KIB,
        "--max-json-bytes",
        "PROGRESS_MAX_JSON_BYTES",
        "largest params, result or progress message, in UTF-8 bytes of its wire form",
        check=at_least(1024),
    )
    max_json_depth: int = setting(
        32,
        "--max-json-depth",
        "PROGRESS_MAX_JSON_DEPTH",
        "deepest nesting of params or result",
        check=between(1, 256),
    )
    max_unfinished_tasks_per_user: int = setting(
        1000,
        "--max-unfinished-tasks-per-user",
        "PROGRESS_MAX_UNFINISHED_TASKS_PER_USER",
        "pending or running tasks per user; one more is refused with 429 (0 = no limit)",
        check=non_negative,
    )
    task_create_rate: float = setting(
        600.0,
        "--task-create-rate",
        "PROGRESS_TASK_CREATE_RATE",
        "tasks one user may create per minute, on this node (0 = no limit)",
        check=non_negative,
    )
    max_stored_bytes_per_user: int = setting(
        256 * MIB,
        "--max-stored-bytes-per-user",
        "PROGRESS_MAX_STORED_BYTES_PER_USER",
        "bytes of tasks and events one user may have stored (0 = no limit)",
        check=non_negative,
    )
    task_rate: float = setting(
        1000.0,
        "--task-rate",
        "PROGRESS_TASK_RATE",
        "progress posts per second per task, on this node; more get 429 (0 = no limit)",
        check=non_negative,
    )
    task_burst: int = setting(
        2000,
        "--task-burst",
        "PROGRESS_TASK_BURST",
        "progress posts a task may make at once",
        check=at_least(1),
    )
    # -- storage -------------------------------------------------------------------------
    sqlite_synchronous: str = setting(
        "FULL",
        "--sqlite-synchronous",
        "PROGRESS_SQLITE_SYNCHRONOUS",
        "SQLite synchronous mode: FULL, EXTRA or NORMAL",
        check=one_of("FULL", "NORMAL", "EXTRA"),
        parse=_upper,
    )
    db_readers: int = setting(
        4,
        "--db-readers",
        "PROGRESS_DB_READERS",
        "read connections; half of them at most serve replays and long lists",
        check=between(2, 64),
    )
    commit_batch_max: int = setting(
        512,
        "--commit-batch-max",
        "PROGRESS_COMMIT_BATCH_MAX",
        "most events per transaction (group commit; 1 = one transaction per event)",
        check=at_least(1),
    )
    commit_queue_max: int = setting(
        10000,
        "--commit-queue-max",
        "PROGRESS_COMMIT_QUEUE_MAX",
        "writes waiting for the store on this node; more get 503 with Retry-After",
        check=at_least(1),
    )
    # -- retention -----------------------------------------------------------------------
    event_retention: int = setting(
        7 * 24 * 3600,
        "--event-retention",
        "PROGRESS_EVENT_RETENTION",
        "seconds a finished task keeps its event history (0 = forever)",
        check=non_negative,
    )
    task_retention: int = setting(
        30 * 24 * 3600,
        "--task-retention",
        "PROGRESS_TASK_RETENTION",
        "seconds a finished task is kept before it is deleted (0 = forever)",
        check=non_negative,
    )
    max_events_per_task: int = setting(
        10_000,
        "--max-events-per-task",
        "PROGRESS_MAX_EVENTS_PER_TASK",
        "most events kept per task, the newest (0 = no limit)",
        check=non_negative,
    )
    retention_interval: float = setting(
        60.0,
        "--retention-interval",
        "PROGRESS_RETENTION_INTERVAL",
        "seconds between runs of the retention job",
        check=positive,
    )
    # -- operations ----------------------------------------------------------------------
    shutdown_timeout: float = setting(
        3.0,
        "--shutdown-timeout",
        "PROGRESS_SHUTDOWN_TIMEOUT",
        "seconds given to clients and writers at shutdown",
        check=non_negative,
    )
    log_level: str = setting(
        "INFO",
        "--log-level",
        "PROGRESS_LOG_LEVEL",
        "DEBUG, INFO, WARNING or ERROR",
        check=one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        parse=_upper,
    )
    log_format: str = setting(
        "kv",
        "--log-format",
        "PROGRESS_LOG_FORMAT",
        "kv (key=value lines) or json",
        check=one_of("kv", "json"),
        parse=_lower,
    )
    metrics_token: str | None = setting(
        None,
        "--metrics-token",
        "PROGRESS_METRICS_TOKEN",
        "bearer token required by GET /metrics, at least 16 characters",
        check=min_length(16),
        shown="none: /metrics is open",
        secret=True,
    )
    # -- not settings: where the server finds its files ---------------------------------
    migrations_dir: Path = field(default=PROJECT_ROOT / "migrations" / "sqlite")
    static_dir: Path = field(default=PROJECT_ROOT / "static")

    def __post_init__(self) -> None:
        problems = [
            f"{f.metadata['flag']} ({f.metadata['env']}) {problem}"
            for f in settings()
            if f.metadata["check"] is not None
            and (problem := f.metadata["check"](getattr(self, f.name))) is not None
        ]
        problems += _check_together(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def store_url(self) -> str:
        """--store, or the SQLite file of --db."""
        if self.store is not None:
            return self.store
        path = self.db_path
        return f"sqlite:///{path}"  # an absolute path gives the four slashes of sqlite:////

    @property
    def store_label(self) -> str:
        """The store's URL for logs: a password is never shown."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.store_url)
        if parts.password is None:
            return self.store_url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file in use, or None for a PostgreSQL store."""
        from .store import parse_store_url

        return parse_store_url(self.store_url).path

    @property
    def node(self) -> str:
        """--node-id, or this host's name and this process's id."""
        return self.node_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def secret_path(self) -> Path:
        """Where a generated JWT secret is kept (beside the database)."""
        path = self.sqlite_path or self.db_path
        return path.parent / (path.name + ".jwt-secret")

    @property
    def lock_path(self) -> Path:
        """The single-instance lock file beside the SQLite database."""
        path = self.sqlite_path or self.db_path
        return path.parent / (path.name + ".lock")


def _check_together(config: Config) -> list[str]:
    """Checks that involve more than one setting."""
    problems = []
    if config.max_http_connections and config.max_connections > config.max_http_connections:
        problems.append(
            "--max-connections must not exceed --max-http-connections (WebSockets are"
            " TCP connections too)"
        )
    from .broker import broker_kind
    from .store import parse_store_url

    try:
        shared = parse_store_url(config.store_url).kind != "sqlite"
        if broker_kind(config.broker) != "memory" and not shared:
            problems.append(
                f"--broker {config.broker} needs a store that several processes share"
                " (--store postgresql://…): a SQLite file is one process's"
            )
    except ValueError:
        pass  # reported by the settings' own checks
    largest = largest_message_bytes(config.max_json_bytes)
    if largest > config.send_queue_bytes:
        problems.append(
            f"--send-queue-bytes ({config.send_queue_bytes}) must hold the largest event or"
            f" snapshot the other limits allow ({largest} bytes with --max-json-bytes"
            f" {config.max_json_bytes}): raise it, or lower --max-json-bytes"
        )
    if config.max_http_connections and config.max_connections == 0:
        problems.append("--max-connections 0 (no limit) needs --max-http-connections 0 too")
    return problems


def settings() -> list[dataclasses.Field[Any]]:
    """The declared settings (fields with a flag), in declaration order."""
    return [f for f in dataclasses.fields(Config) if "flag" in f.metadata]


def flags() -> list[tuple[str, str]]:
    """(flag, environment variable) of every setting."""
    return [(f.metadata["flag"], f.metadata["env"]) for f in settings()]


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.metadata["shown"] is not None:
        return str(f.metadata["shown"])
    default = f.default
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return "none" if default is None else str(default)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every flag defaults to None (from_args fills the rest)."""
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Real-time task-progress server (aiohttp + SQLite).",
        epilog="Commands: `run.py users add|remove|list` manages accounts (see --help there).",
    )
    for f in settings():
        meta = f.metadata
        parser.add_argument(
            meta["flag"],
            dest=f.name,
            type=meta["parse"],
            default=None,
            help=f"{meta['help']} [env {meta['env']}, default {_shown_default(f)}]",
        )
    return parser


def from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from command-line flags, then environment variables, then defaults.

    Exits with a usage error (status 2) naming the flag for a value that does not parse or
    does not pass its check.
    """
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    return config_from(parser, vars(args), env)


def config_from(
    parser: argparse.ArgumentParser, given: Mapping[str, Any], env: Mapping[str, str]
) -> Config:
    """The Config for parsed flags `given` (None: not given) and `env`; errors via parser."""
    values: dict[str, Any] = {}
    for f in settings():
        meta = f.metadata
        value = given.get(f.name)
        if value is None and env.get(meta["env"], "") != "":
            try:
                value = meta["parse"](env[meta["env"]])
            except (TypeError, ValueError):
                parser.error(f"environment variable {meta['env']} is not valid for {meta['flag']}")
        if value is not None:
            values[f.name] = value
    try:
        return Config(**values)
    except ConfigError as exc:
        parser.error(str(exc))
