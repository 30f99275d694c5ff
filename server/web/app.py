"""The aiohttp application: services in cleanup contexts, routes, error shape, shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp_cors
from aiohttp import web

from .. import protocol
from ..admission import Admission, LoopLag
from ..auth import LoginThrottle, Passwords, TokenService, load_or_create_secret
from ..broker import open_broker
from ..config import Config
from ..credentials import CACHE_TTL as CREDENTIALS_CACHE_TTL
from ..credentials import Credentials
from ..errors import ApiError
from ..hub import Hub
from ..jobs import JobRunner
from ..jobs.prices import SyntheticPriceProvider
from ..lifecycle import Quotas
from ..limits import KeyedBuckets
from ..relay import CHECK_INTERVAL, Relay
from ..replay import Replayer
from ..retention import Retention
from ..sessions import SessionService
from ..store import StoreUnavailable, open_store
from ..subscription_log import SubscriptionHistory
from ..tracker import Tracker
from . import account, api, grants, openapi, sse, ws
from .guards import parse_networks
from .keys import (
    accounts_key,
    admission_key,
    auth_rate_key,
    broker_key,
    config_key,
    create_rate_key,
    credentials_key,
    db_key,
    history_key,
    hub_key,
    jobs_key,
    login_throttle_key,
    metrics_key,
    openapi_key,
    passwords_key,
    relay_key,
    replayer_key,
    resumed_jobs_key,
    retention_key,
    sessions_key,
    store_key,
    task_rate_key,
    tokens_key,
    tracker_key,
    trusted_proxies_key,
)
from .logs import log_path
from .metrics import Metrics, metrics_handler, response_counter
from .middleware import request_deadline, security_headers

log = logging.getLogger(__name__)

#: Seconds /healthz waits for the store before calling it down.
HEALTH_TIMEOUT = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def _error_response(
    status: int,
    code: str,
    message: str,
    fields: dict | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "fields": fields or {}}},
        status=status,
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as {"error": {"code", "message", "fields"}}: no HTML, no traceback."""
    try:
        return await handler(request)
    except StoreUnavailable:
        return _error_response(
            503,
            "unavailable",
            "the database cannot be reached right now; nothing was stored",
            headers={"Retry-After": "1"},
        )
    except ApiError as exc:
        if exc.status in (401, 403):
            _auth_failed(request, exc)
        return _error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        code = _HTTP_CODES.get(exc.status, "http_error")
        return _error_response(exc.status, code, exc.reason, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("http.internal_error method=%s path=%s", request.method, log_path(request))
        return _error_response(500, "internal", "internal server error")


def _auth_failed(request: web.Request, exc: ApiError) -> None:
    """Log and count a refused credential (HTTP 401/403, WebSocket handshakes included).

    Never the token, the password or the username (people type passwords there), only
    where and why; there is no connection id yet, the peer address stands in for it.
    """
    metrics = request.app[metrics_key]
    metrics.requests.auth_failures[exc.code] += 1
    # Logged once a minute per (code, peer, route): a flood of bad tokens or passwords is a
    # count, not a log flood.
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    held_back = metrics.auth_log.allow((exc.code, request.remote, route))
    if held_back is None:
        return
    log.info(
        "auth.failed method=%s path=%s status=%d code=%s peer=%s%s",
        request.method,
        log_path(request),
        exc.status,
        exc.code,
        request.remote,
        f" held_back={held_back}" if held_back else "",
    )


async def healthz(request: web.Request) -> web.Response:
    """Each dependency's state; 200 while the node can serve (the store answers), else 503.

    A broker that is down does not stop a node from serving: it commits, serves its own
    subscribers, and the others catch up from the store.
    """
    app = request.app
    store_ok = True
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await app[store_key].ping()
    except (StoreUnavailable, TimeoutError, OSError):
        store_ok = False
    broker = app[broker_key]
    body = {
        "status": "ok" if store_ok else "unavailable",
        "store": "ok" if store_ok else "down",
        "broker": "ok" if broker.healthy else "down",
        "node": app[relay_key].node_id,
    }
    return web.json_response(body, status=200 if store_ok else 503)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(request.app[config_key].static_dir / "index.html")


def _services(
    config: Config, secret: str | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def services(app: web.Application) -> AsyncIterator[None]:
        backend = await open_store(
            config.store_url,
            migrations_root=config.migrations_dir.parent,
            synchronous=config.sqlite_synchronous,
            readers=config.db_readers,
        )
        store, accounts = backend.store, backend.accounts
        app[accounts_key] = accounts
        # A shared store without --jwt-secret: its nodes share the one kept in it.
        key = secret if secret is not None else await accounts.shared_secret()
        # Tokens name this database's instance id: none minted for another one passes.
        app[tokens_key] = TokenService(key, config.token_ttl, await accounts.instance_id())
        sessions = SessionService(accounts, config.session_max_age)
        sessions.add_listener(_session_closer(app))
        app[sessions_key] = sessions
        credentials = Credentials(backend.grants)
        credentials.add_listener(_session_closer(app))
        app[credentials_key] = credentials
        passwords = Passwords(
            config.password_hash_cost,
            workers=config.password_hash_workers,
            queue=config.password_hash_queue,
            on_refused=app[metrics_key].refusals.note,
        )
        app[passwords_key] = passwords
        await passwords.start()
        tracker = Tracker(
            store,
            max_batch=config.commit_batch_max,
            queue_max=config.commit_queue_max,
            quotas=Quotas(
                max_unfinished_tasks=config.max_unfinished_tasks_per_user,
                max_stored_bytes=config.max_stored_bytes_per_user,
            ),
            refusals=app[metrics_key].refusals,
        )
        hub = Hub(
            encode=protocol.event_message,
            buffer_messages=config.send_queue_messages,
            buffer_bytes=config.send_queue_bytes,
        )
        replayer = Replayer(store, hub)
        node = config.node
        broker = await open_broker(config.broker, node)
        # One process (memory://) loses nothing on the way: no periodic gap check there.
        relay = Relay(
            node,
            broker,
            hub,
            replayer,
            store,
            check_interval=None if broker.kind == "memory" else CHECK_INTERVAL,
        )
        tracker.add_listener(relay.committed)
        history = SubscriptionHistory(store, node)
        jobs = JobRunner(
            tracker,
            SyntheticPriceProvider(),
            config.job_step_delay,
            store=store,
            node_id=node,
            lease_ttl=config.job_lease_ttl,
            max_running=config.max_running_jobs,
            max_per_user=config.max_running_jobs_per_user,
        )
        relay.add_listener(jobs.on_event)
        retention = Retention(
            store,
            event_retention=config.event_retention,
            task_retention=config.task_retention,
            max_events_per_task=config.max_events_per_task,
            interval=config.retention_interval,
            grants=backend.grants,
        )
        relay.add_listener(retention.on_event)
        if backend.sqlite is not None:
            app[db_key] = backend.sqlite  # type: ignore[assignment]
        app[store_key], app[tracker_key] = store, tracker
        app[hub_key], app[history_key], app[jobs_key] = hub, history, jobs
        app[retention_key], app[broker_key], app[relay_key] = retention, broker, relay
        app[replayer_key] = replayer
        app[metrics_key].bind(
            store=store,
            tracker=tracker,
            hub=hub,
            jobs=jobs,
            broker=broker,
            relay=relay,
            loop_lag=app[admission_key].lag.histogram,
        )
        tracker.start()
        lag = app[admission_key].lag
        lag.start()
        await history.start()
        retention.start()
        sessions.start(lambda: _open_sessions(hub, login=True))
        await relay.start()
        # Resumed gradually in the background; server.ready (serve.py, once bound) says how
        # many are queued.
        app[resumed_jobs_key] = await store.count_unfinished(jobs.kinds)
        jobs.resume_unfinished()
        background = [
            asyncio.create_task(_heartbeat_loop(hub, config), name="heartbeat"),
            asyncio.create_task(_credential_sweep_loop(credentials, hub), name="credentials"),
        ]
        if backend.sqlite is not None:
            background.append(
                asyncio.create_task(backend.sqlite.run_checkpoints(), name="wal-checkpoints")
            )
        log.info("server.node node=%s store=%s broker=%s", node, backend.kind, broker.kind)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await lag.stop()
            await retention.stop()
            await sessions.stop()
            await jobs.stop()
            await tracker.stop()  # commits everything already accepted
            await relay.stop()  # and publishes it
            await history.stop()
            await backend.close()
            passwords.close()
            log.info("server.stopped")

    return services


def _open_sessions(hub: Hub, *, login: bool) -> set[str]:
    """The `session_id`s of open sockets: of login sessions, or of API keys and shares."""
    ids = {getattr(peer, "session_id", "") for peer in hub.peers()}
    return {i for i in ids if i and (":" not in i) == login}


async def _credential_sweep_loop(credentials: Credentials, hub: Hub) -> None:
    """Close the sockets of API keys and share tokens revoked on another node, or expired."""
    while True:
        await asyncio.sleep(CREDENTIALS_CACHE_TTL)
        try:
            await credentials.sweep(_open_sessions(hub, login=False))
        except Exception:  # a busy database: try again next time
            log.exception("credentials.sweep_failed")


def _session_closer(app: web.Application) -> Callable[[set[str]], None]:
    """Close the WebSockets of sessions that ended (logout, password change) with 4401."""

    def close(ended: set[str]) -> None:
        for conn in app[hub_key].peers():
            if getattr(conn, "session_id", None) in ended:
                conn.close(protocol.CLOSE_TOKEN_EXPIRED, "session ended", None)

    return close


async def _heartbeat_loop(hub: Hub, config: Config) -> None:
    """Ping silent peers and drop those that do not answer (interval + timeout)."""
    loop = asyncio.get_running_loop()
    tick = max(0.05, min(1.0, config.heartbeat_interval / 4, config.heartbeat_timeout / 4))
    while True:
        await asyncio.sleep(tick)
        hub.check_liveness(loop.time(), config.heartbeat_interval, config.heartbeat_timeout)


async def _close_websockets(app: web.Application) -> None:
    """Shutdown: tell every client, close with 1001, and drop whoever does not go in time."""
    conns = app[hub_key].peers() if hub_key in app else []
    if not conns:
        return
    notice = protocol.notice_message(
        "server_shutdown", "server is shutting down; reconnect and resume"
    )
    for conn in conns:
        conn.close(protocol.CLOSE_GOING_AWAY, "server shutdown", notice)
    await asyncio.gather(*(c.wait_writer(app[config_key].shutdown_timeout) for c in conns))
    for conn in conns:
        if not conn.writer_done:
            conn.abort("shutdown timeout")
    log.info("server.websockets_closed count=%d", len(conns))


def create_app(config: Config) -> web.Application:
    """Build the application; services start in a cleanup context when it starts."""
    app = web.Application(
        middlewares=[error_middleware, request_deadline(config.header_timeout)],
        client_max_size=config.max_body_bytes,
    )
    app[config_key] = config
    app[metrics_key] = metrics = Metrics()
    app.on_response_prepare.append(response_counter(metrics.requests))
    app.on_response_prepare.append(security_headers)
    # SQLite keeps a generated secret in a file beside the database; a shared store keeps
    # it in the database, read once it is open (see services).
    secret = config.jwt_secret
    if secret is None and config.sqlite_path is not None:
        secret = load_or_create_secret(config.secret_path)
    app[task_rate_key] = KeyedBuckets(config.task_rate, config.task_burst)
    per_minute = config.task_create_rate
    app[create_rate_key] = KeyedBuckets(per_minute / 60, max(1, math.ceil(per_minute / 10)))
    app[admission_key] = Admission(LoopLag(), config.shed_lag, config.max_connections)
    # --auth-rate per minute, bursts of as many: a login page's retries pass, a script's don't.
    app[auth_rate_key] = KeyedBuckets(config.auth_rate / 60, max(1, math.ceil(config.auth_rate)))
    app[login_throttle_key] = LoginThrottle()
    app[trusted_proxies_key] = parse_networks(config.trusted_proxies)
    app[openapi_key] = openapi.encoded_document()
    app.cleanup_ctx.append(_services(config, secret))
    app.on_shutdown.append(_close_websockets)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler(metrics, config.metrics_token))
    app.router.add_get("/api/v1/ws", ws.multi_task_socket)
    app.router.add_get("/api/v1/stock/ws/analyze/{task_id}", ws.task_socket)
    api_routes = [
        *app.router.add_routes(account.routes),
        *app.router.add_routes(api.routes),
        *app.router.add_routes(grants.routes),
        *app.router.add_routes(sse.routes),
        *app.router.add_routes(openapi.routes),
    ]
    app.router.add_get("/", index)
    if config.static_dir.is_dir():
        app.router.add_static("/static/", config.static_dir, name="static")

    # CORS for the HTTP API only, from the same allowed-origins list as the WebSocket check.
    cors = aiohttp_cors.setup(
        app,
        defaults={
            origin: aiohttp_cors.ResourceOptions(
                allow_credentials=False,
                expose_headers=("Retry-After", "Idempotent-Replayed"),
                allow_headers=("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"),
                allow_methods=("GET", "POST", "DELETE"),
                max_age=600,
            )
            for origin in config.allowed_origins
        },
    )
    for route in api_routes:
        cors.add(route)
    return app
