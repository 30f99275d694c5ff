"""Typed application keys (aiohttp AppKey), one per shared service."""

from __future__ import annotations

from aiohttp import web

from ..admission import Admission
from ..auth import LoginThrottle, Passwords, TokenService
from ..broker import Broker
from ..config import Config
from ..credentials import Credentials
from ..hub import Hub
from ..jobs import JobRunner
from ..limits import KeyedBuckets
from ..relay import Relay
from ..replay import Replayer
from ..retention import Retention
from ..sessions import SessionService
from ..store import Accounts, Store
from ..store.sqlite_db import Database
from ..subscription_log import SubscriptionHistory
from ..tracker import Tracker
from .metrics import Metrics

config_key = web.AppKey("config", Config)
#: The SQLite database (SQLite stores only: tests and the SQLite-only tools).
db_key = web.AppKey("db", Database)
store_key = web.AppKey("store", Store)
tracker_key = web.AppKey("tracker", Tracker)
hub_key = web.AppKey("hub", Hub)
tokens_key = web.AppKey("tokens", TokenService)
history_key = web.AppKey("history", SubscriptionHistory)
jobs_key = web.AppKey("jobs", JobRunner)
retention_key = web.AppKey("retention", Retention)
#: The app's Prometheus registry and the plain counters behind it.
metrics_key = web.AppKey("metrics", Metrics)
#: Progress posts per (user, task): the --task-rate limit.
task_rate_key = web.AppKey("task_rate", KeyedBuckets)
#: Task creations per user: the --task-create-rate limit (per minute, as a token bucket).
create_rate_key = web.AppKey("create_rate", KeyedBuckets)
admission_key = web.AppKey("admission", Admission)
#: Built-in jobs resumed at start (for the server.ready line).
resumed_jobs_key = web.AppKey("resumed_jobs", int)
#: Users and sessions (same database as store_key).
accounts_key = web.AppKey("accounts", Accounts)
sessions_key = web.AppKey("sessions", SessionService)
#: API keys and share tokens.
credentials_key = web.AppKey("credentials", Credentials)
#: Password hashing on its own bounded threads.
passwords_key = web.AppKey("passwords", Passwords)
#: Login/register/password attempts per client address: the --auth-rate limit.
auth_rate_key = web.AppKey("auth_rate", KeyedBuckets)
#: Failed logins per username.
login_throttle_key = web.AppKey("login_throttle", LoginThrottle)
#: --trusted-proxies, parsed (see guards.client_address).
trusted_proxies_key = web.AppKey("trusted_proxies", tuple)
#: Fan-out to other nodes (memory:// for one process).
broker_key = web.AppKey("broker", Broker)
#: Committed events to this node's subscribers and job runner, with gap repair.
relay_key = web.AppKey("relay", Relay)
replayer_key = web.AppKey("replayer", Replayer)
#: The OpenAPI document as JSON bytes (web/openapi.py), built once per process.
openapi_key = web.AppKey("openapi", bytes)
