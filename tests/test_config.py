"""Config.from_args: defaults, flags, environment variables, precedence, usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import PROJECT_ROOT, Config, ConfigError, build_parser, flags, from_args

from .helpers import SECRET


def test_defaults_without_flags_or_environment() -> None:
    """No flags and an empty environment give the documented defaults."""
    config = from_args([], env={})
    assert config == Config()
    assert (config.host, config.port, config.db_path) == ("127.0.0.1", 8080, Path("data/app.db"))
    assert config.job_step_delay == 5.0  # the demo's analysis takes about half a minute
    assert config.jwt_secret is None
    assert config.migrations_dir == PROJECT_ROOT / "migrations" / "sqlite"
    # Defaults for a server open to the internet (issue 8): tens of sockets per user.
    assert (config.max_connections_per_user, config.max_unfinished_tasks_per_user) == (64, 1000)
    assert (config.max_json_bytes, config.max_json_depth) == (64 * 1024, 32)


def test_flags_set_every_field() -> None:
    """Each flag lands in its field, converted to the field's type."""
    config = from_args(
        [
            "--host", "0.0.0.0",
            "--port", "9001",
            "--db", "/tmp/x/app.db",
            "--job-step-delay", "0.25",
            "--jwt-secret", SECRET,
            "--token-ttl", "60",
            "--allowed-origins", "https://a.example/, http://b.example:8000",
            "--heartbeat-interval", "2.5",
            "--heartbeat-timeout", "1.5",
            "--max-frame-bytes", "1024",
            "--max-body-bytes", "2048",
            "--send-queue-messages", "10",
            "--send-queue-bytes", "16384",
            "--max-json-bytes", "2048",
            "--sqlite-synchronous", "normal",
            "--shutdown-timeout", "0.5",
            "--log-level", "DEBUG",
        ],
        env={},
    )  # fmt: skip
    assert config == Config(
        host="0.0.0.0",
        port=9001,
        db_path=Path("/tmp/x/app.db"),
        job_step_delay=0.25,
        jwt_secret=SECRET,
        token_ttl=60,
        allowed_origins=("https://a.example", "http://b.example:8000"),
        heartbeat_interval=2.5,
        heartbeat_timeout=1.5,
        max_frame_bytes=1024,
        max_body_bytes=2048,
        send_queue_messages=10,
        send_queue_bytes=16384,
        max_json_bytes=2048,
        sqlite_synchronous="NORMAL",
        shutdown_timeout=0.5,
        log_level="DEBUG",
    )


def test_environment_variables_apply_without_flags() -> None:
    """PROGRESS_* and JWT_SECRET fill the fields when no flag is given."""
    env = {
        "PROGRESS_HOST": "::1",
        "PROGRESS_PORT": "7000",
        "PROGRESS_DB": "elsewhere/p.db",
        "PROGRESS_JOB_STEP_DELAY": "0",
        "JWT_SECRET": SECRET,
        "PROGRESS_ALLOWED_ORIGINS": "https://ui.example",
        "PROGRESS_HEARTBEAT_INTERVAL": "3",
    }
    config = from_args([], env=env)
    assert (config.host, config.port, config.db_path) == ("::1", 7000, Path("elsewhere/p.db"))
    assert (config.job_step_delay, config.jwt_secret) == (0.0, SECRET)
    assert config.allowed_origins == ("https://ui.example",)
    assert config.heartbeat_interval == 3.0


def test_flag_beats_environment_variable() -> None:
    """A flag on the command line wins over its environment variable."""
    env = {"PROGRESS_PORT": "7000", "PROGRESS_DB": "env.db", "PROGRESS_JOB_STEP_DELAY": "5"}
    config = from_args(["--port", "7100", "--db", "flag.db"], env=env)
    assert (config.port, config.db_path) == (7100, Path("flag.db"))
    assert config.job_step_delay == 5.0  # no flag: the variable still applies


def test_empty_environment_variable_is_ignored() -> None:
    """An empty variable counts as unset."""
    assert from_args([], env={"PROGRESS_PORT": "", "JWT_SECRET": ""}) == Config()


def test_every_flag_has_an_environment_variable() -> None:
    """Each flag's help names its environment variable."""
    text = build_parser().format_help()
    for flag, env_name in flags():
        assert flag in text and env_name in text


def test_secret_path_is_beside_the_database() -> None:
    """A generated secret is kept next to the database file."""
    config = from_args(["--db", "/srv/p/app.db"], env={})
    assert config.secret_path == Path("/srv/p/app.db.jwt-secret")


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--port", "eighty"], {}),
        (["--port", "70000"], {}),
        (["--port", "-1"], {}),
        ([], {"PROGRESS_PORT": "eighty"}),
        ([], {"PROGRESS_JOB_STEP_DELAY": "soon"}),
        (["--job-step-delay", "-1"], {}),
        (["--heartbeat-interval", "0"], {}),
        (["--heartbeat-timeout", "-2"], {}),
        (["--sqlite-synchronous", "OFF"], {}),
        (["--jwt-secret", "too-short"], {}),
        ([], {"JWT_SECRET": "too-short"}),
        (["--token-ttl", "0"], {}),
        (["--max-frame-bytes", "0"], {}),
        (["--log-level", "LOUD"], {}),
        (["--heartbeat-interval", "nan"], {}),
        (["--shutdown-timeout", "inf"], {}),
        ([], {"PROGRESS_KEEPALIVE_TIMEOUT": "NaN"}),
        (["--registration", "maybe"], {}),
        (["--trusted-proxies", "not-an-address"], {}),
        (["--max-connections", "30000", "--max-http-connections", "20000"], {}),
        (["--send-queue-bytes", "100000"], {}),  # cannot hold a snapshot of 64 KiB params
        (["--no-such-flag"], {}),
    ],
)
def test_bad_values_are_usage_errors(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag or variable exits with argparse's usage error (status 2), no traceback."""
    with pytest.raises(SystemExit) as exc_info:
        from_args(argv, env=env)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: run.py")
    assert "error:" in err


def test_retention_flags_and_variables() -> None:
    """The retention settings come from flags or PROGRESS_* variables; 0 keeps forever."""
    defaults = Config()
    assert (defaults.event_retention, defaults.task_retention) == (7 * 86400, 30 * 86400)
    assert (defaults.max_events_per_task, defaults.retention_interval) == (10_000, 60.0)
    config = from_args(
        ["--event-retention", "0", "--task-retention", "86400", "--retention-interval", "0.5"],
        env={"PROGRESS_MAX_EVENTS_PER_TASK": "50", "PROGRESS_TASK_RETENTION": "1"},
    )
    assert (config.event_retention, config.task_retention) == (0, 86400)
    assert (config.max_events_per_task, config.retention_interval) == (50, 0.5)


def test_job_lease_ttl_flag_and_variable() -> None:
    """--job-lease-ttl / PROGRESS_JOB_LEASE_TTL set the built-in jobs' lease, 15 s by default."""
    assert Config().job_lease_ttl == 15.0
    assert from_args(["--job-lease-ttl", "3"], env={}).job_lease_ttl == 3.0
    assert from_args([], env={"PROGRESS_JOB_LEASE_TTL": "2.5"}).job_lease_ttl == 2.5
    assert from_args(["--job-lease-ttl", "3600"], env={}).job_lease_ttl == 3600.0


@pytest.mark.parametrize("value", ["1", "0.5", "0", "-3", "3601"])
def test_bad_job_lease_ttls_are_usage_errors(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lease of 1 s or less, or over an hour, is refused at start, saying the bounds."""
    with pytest.raises(SystemExit) as exc_info:
        from_args(["--job-lease-ttl", value], env={})
    assert exc_info.value.code == 2
    assert "more than 1 and at most 3600" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--event-retention", "-1"],
        ["--task-retention", "-5"],
        ["--max-events-per-task", "-1"],
        ["--retention-interval", "0"],
        ["--retention-interval", "nan"],
        ["--event-retention", "1.5"],
    ],
)
def test_bad_retention_values_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Negative ages or caps and a non-positive interval are refused at start."""
    with pytest.raises(SystemExit) as exc_info:
        from_args(argv, env={})
    assert exc_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes",
    [
        {"heartbeat_interval": float("nan")},
        {"shutdown_timeout": float("inf")},
        {"port": 70000},
        {"jwt_secret": "short"},
        {"max_json_depth": 0},
        {"registration": "sometimes"},
        {"job_lease_ttl": 1.0},
        {"job_lease_ttl": float("nan")},
    ],
)
def test_a_config_built_in_code_is_checked_too(changes: dict[str, object]) -> None:
    """The same checks hold for a Config made without flags (tests, embedding)."""
    with pytest.raises(ConfigError):
        Config(**changes)  # type: ignore[arg-type]
