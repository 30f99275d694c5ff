"""Shared fixtures: a config on a temporary database, the app, an HTTP client, users."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.config import Config
from server.web.app import create_app

from .helpers import SECRET
from .pg import pg_server, pg_template, pg_url  # noqa: F401  (PostgreSQL fixtures)
from .redis_server import redis_server  # noqa: F401  (Redis fixture)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Fast settings: tiny job step delay, short heartbeats, a fixed 32+ byte secret.

    Passwords are hashed at 1 MiB (not 19) and logins are not rate-limited per address:
    tests register many users from 127.0.0.1. test_auth.py covers both at their defaults.
    """
    return Config(
        db_path=tmp_path / "test.db",
        job_step_delay=0.0,
        jwt_secret=SECRET,
        password_hash_cost=1,
        auth_rate=0,
        heartbeat_interval=5.0,
        heartbeat_timeout=5.0,
        shutdown_timeout=0.5,
    )


@pytest.fixture
def make_app(config: Config) -> Callable[..., web.Application]:
    """Build an app from `config` with some fields replaced."""

    def make(**changes: Any) -> web.Application:
        return create_app(dataclasses.replace(config, **changes))

    return make


@pytest.fixture
async def http() -> Any:
    """A plain aiohttp client session, for servers running as subprocesses."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> TestClient:
    return await aiohttp_client(create_app(config), server_kwargs={"shutdown_timeout": 0.5})
