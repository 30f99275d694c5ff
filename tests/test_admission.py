"""Load shedding of new WebSockets: 503 + Retry-After while the loop lags or the server is full."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import WSServerHandshakeError

from server.admission import Admission, LoopLag
from server.web.keys import admission_key

from .helpers import auth_headers, receive_json, register, ws_connect


def test_refusal_rules():
    """Lag at or over the limit sheds, a full server sheds, 0 turns each rule off."""
    lag = LoopLag()
    admission = Admission(lag, max_lag=0.2, max_connections=10)
    assert admission.refusal(0) is None
    lag.lag = 0.2
    reason, retry = admission.refusal(0)
    assert reason == "overloaded" and 1 <= retry <= 3
    lag.lag = 0.0
    reason, retry = admission.refusal(10)
    assert reason == "server_full" and retry >= 2
    off = Admission(lag, max_lag=0, max_connections=0)
    lag.lag = 99
    assert off.refusal(10**6) is None


async def test_loop_lag_sees_a_blocked_loop():
    """Blocking the event loop shows up as lag; an idle loop shows (almost) none."""
    lag = LoopLag(interval=0.01, smoothing=1.0)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # block the loop on purpose
        for _ in range(10):  # let the late probe run
            await asyncio.sleep(0)
        assert lag.lag > 0.1
        for _ in range(20):
            await asyncio.sleep(0.02)
        assert lag.lag < 0.1
    finally:
        await lag.stop()


async def test_overloaded_server_sheds_new_sockets_only(aiohttp_client, make_app):
    """While the loop lags, handshakes get 503 + Retry-After; open sockets keep working."""
    client = await aiohttp_client(make_app(shed_lag=0.5), server_kwargs={"shutdown_timeout": 0.5})
    token = await register(client, "alice")
    open_ws = await ws_connect(client, token)
    lag = client.app[admission_key].lag
    await lag.stop()  # hold the measurement still for the test
    lag.lag = 1.0
    with pytest.raises(WSServerHandshakeError) as info:
        await ws_connect(client, token)
    assert info.value.status == 503
    assert 1 <= int(info.value.headers["Retry-After"]) <= 3
    resp = await client.get("/api/v1/ws", headers=auth_headers(token))
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "overloaded"
    await open_ws.send_json({"action": "ping", "id": 1})
    assert (await receive_json(open_ws)) == {"type": "pong", "id": 1}
    lag.lag = 0.0
    again = await ws_connect(client, token)
    await again.close()
    await open_ws.close()
    metrics = await (await client.get("/metrics")).text()
    assert "progress_ws_handshakes_shed_total 2.0" in metrics


async def test_full_server_refuses_with_503(aiohttp_client, make_app):
    """Past --max-connections a new socket gets 503 server_full; closing one makes room."""
    client = await aiohttp_client(
        make_app(max_connections=2), server_kwargs={"shutdown_timeout": 0.5}
    )
    alice, bob = await register(client, "alice"), await register(client, "bobby")
    first, second = await ws_connect(client, alice), await ws_connect(client, bob)
    resp = await client.get("/api/v1/ws", headers=auth_headers(bob))
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "server_full"
    assert int(resp.headers["Retry-After"]) >= 2
    await first.close()
    for _ in range(100):  # the server notices the close asynchronously
        resp = await client.get("/api/v1/ws", headers=auth_headers(bob))
        if resp.status != 503:
            break
        await asyncio.sleep(0.01)
    third = await ws_connect(client, bob)
    await third.close()
    await second.close()
