"""The abuse scenario's client processes: the well-behaved workers and seven attackers.

Each attacker is a coroutine run in its own process until the attack ends; it tallies
every answer it gets ("<status> <error code>" for HTTP, a close code for a WebSocket, or
what happened to a raw socket) into a `Tally`. Every loop is bounded in count and time,
every request and handshake has a timeout, and a connection error is followed by a short
pause, so a server that falls over cannot make an attacker spin or hang.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import multiprocessing as mp
import os
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from server.config import Config

if TYPE_CHECKING:
    from .scenarios import Sizes

#: The server's defaults, which the attacks' allowances are computed from.
DEFAULTS = Config()
MIB = 1024 * 1024
#: Fake client addresses (only ever sent in X-Forwarded-For): well-behaved, attackers.
GOOD_NET = "198.51.100."
BAD_NET = "203.0.113."
#: Seconds any one request or handshake may take before it counts as "timeout".
REQUEST_TIMEOUT = 15.0
#: Seconds to wait for a TCP connection.
CONNECT_TIMEOUT = 10.0
#: Seconds an attacker process may run past the end of the attack before it is killed.
STOP_GRACE_S = 15.0
#: Added to the attackers' nice value: their CPU yields to the server and the good clients.
ATTACKER_NICE = 10
#: Pause between two requests of each json-bomb loop: the cost per request is the attack,
#: and staying under the task-creation rate keeps that limit from answering in its place.
BOMB_PAUSE_S = 0.2
#: Depth of the nested params / result (within Python's own parser limit, so they parse).
NESTED_DEPTH = 500
EMOJI_COUNT = 65536
#: The slow replayers read this many bytes per second, and their task gets 16 KiB events
#: at SLOW_POST_RATE per second.
SLOW_READ_BPS = 8 * 1024
SLOW_POST_RATE = 20.0
BIG_EVENT = 16 * 1024
#: Requests of the hash flood in flight at once.
FLOOD_CONCURRENCY = 16
#: Addresses the 1 MiB logins come from, in turn (the hash flood's: a size).
BIG_LOGIN_ADDRESSES = 64
#: Most sockets each hoarding account opens (the default per-user limit is 64).
HOARD_MAX = 4 * max(DEFAULTS.max_connections_per_user, 64)
#: Most posts one well-behaved worker has in flight; beyond, a post is skipped (counted).
MAX_IN_FLIGHT = 64


# -- what the processes share ---------------------------------------------------------------


@dataclass
class Account:
    """A registered user, logged in, and the fake address it speaks from."""

    username: str
    user_id: int
    token: str
    address: str

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "X-Forwarded-For": self.address, **extra}


@dataclass
class Plan:
    """Everything a client or attacker process needs: where, when, who."""

    host: str
    port: int
    sizes: Sizes
    #: time.monotonic() (system-wide) at which phase 1 starts, phase 2 starts and ends.
    quiet_start: float = 0.0
    attack_start: float = 0.0
    attack_stop: float = 0.0
    #: The server's header timeout, seconds.
    header_timeout: float = DEFAULTS.header_timeout
    accounts: dict[str, Account] = field(default_factory=dict)
    #: Well-behaved tasks: (task id, index of the owning user in `good`).
    good_tasks: list[tuple[str, int]] = field(default_factory=list)
    good: list[Account] = field(default_factory=list)
    #: Attackers' own tasks, by role.
    tasks: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


class Tally:
    """What one attack got: answers by kind, plus free-form notes."""

    def __init__(self) -> None:
        self.answers: Counter[str] = Counter()
        self.notes: dict[str, Any] = {}

    def add(self, answer: str) -> None:
        self.answers[answer] += 1

    def count(self, note: str, key: str) -> None:
        self.notes.setdefault(note, Counter())[key] += 1

    def to_dict(self) -> dict[str, Any]:
        notes = {k: dict(v) if isinstance(v, Counter) else v for k, v in self.notes.items()}
        return {"attempts": sum(self.answers.values()), "answers": dict(self.answers), **notes}


# -- HTTP and raw-socket helpers ------------------------------------------------------------


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)


async def _answer(resp: aiohttp.ClientResponse) -> str:
    """The answer as tallied: "201", or "<status> <error code>" ("non_json" if none)."""
    body = await resp.read()
    if resp.status < 400:
        return str(resp.status)
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "non_json"
    return f"{resp.status} {code}"


async def _http(
    session: aiohttp.ClientSession,
    tally: Tally | None,
    method: str,
    url: str,
    headers: dict[str, str],
    data: bytes | None = None,
) -> str:
    """One request; its answer (also added to `tally`). Never raises for the network."""
    try:
        async with session.request(
            method, url, data=data, headers=headers, timeout=_timeout()
        ) as resp:
            answer = await _answer(resp)
    except TimeoutError:
        answer = "timeout"
    except aiohttp.ClientConnectionError:
        answer = "connection_error"
    except aiohttp.ClientError as exc:
        answer = f"client_error {type(exc).__name__}"
    if tally is not None:
        tally.add(answer)
    if answer in ("timeout", "connection_error"):
        await asyncio.sleep(0.05)  # a dead server answers at once: do not spin
    return answer


def json_headers(account: Account) -> dict[str, str]:
    return account.headers(**{"Content-Type": "application/json"})


async def until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _loop(
    plan: Plan, workers: int, cap: int, attempt: Callable[[int], Awaitable[Any]], pause: float = 0
) -> None:
    """`workers` concurrent loops share at most `cap` attempts until the attack ends."""
    counter = itertools.count()

    async def one() -> None:
        while time.monotonic() < plan.attack_stop:
            i = next(counter)
            if i >= cap:
                return
            await attempt(i)
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(one() for _ in range(workers)))


async def _raw_connect(
    plan: Plan, rcvbuf: int = 0, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf:  # before connect: it sets the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (plan.host, plan.port)),
            CONNECT_TIMEOUT,
        )
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _ws_handshake(
    plan: Plan, account: Account, rcvbuf: int = 0, limit: int = 2**16
) -> tuple[str, asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """A WebSocket handshake by hand, so a refusal's error code can be read.

    Returns ("101", reader, writer) when upgraded, else (answer, None, None).
    """
    try:
        reader, writer = await _raw_connect(plan, rcvbuf, limit)
    except (OSError, TimeoutError):
        await asyncio.sleep(0.05)
        return "connect_error", None, None
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /api/v1/ws?token={account.token} HTTP/1.1\r\nHost: {plan.host}:{plan.port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nX-Forwarded-For: {account.address}\r\n\r\n".encode()
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        status, headers = _parse_head(head)
        if status == 101:
            return "101", reader, writer
        length = int(headers.get("content-length", "0") or 0)
        body = await asyncio.wait_for(reader.readexactly(min(length, 65536)), REQUEST_TIMEOUT)
        try:
            answer = f"{status} {json.loads(body)['error']['code']}"
        except (ValueError, KeyError, TypeError):
            answer = f"{status} non_json"
    except TimeoutError:
        answer = "timeout"
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
        answer = "connection_error"
    writer.close()
    return answer, None, None


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


def _close_code(payload: bytes) -> str:
    return str(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else "close_no_code"


# -- the attacks ----------------------------------------------------------------------------


async def json_bombs(plan: Plan, tallies: dict[str, Tally]) -> None:
    """Nested params and result, a 1 MiB body of nested lists, 65,536-emoji messages."""
    nested = '{"a":' * NESTED_DEPTH + "1" + "}" * NESTED_DEPTH
    params_body = f'{{"kind":"abuse","params":{nested}}}'.encode()
    result_body = f'{{"result":{nested}}}'.encode()
    prefix, suffix = b'{"kind":"abuse","params":{"deep":', b"}}"
    depth = (MIB - len(prefix) - len(suffix)) // 2
    lists_body = prefix + b"[" * depth + b"]" * depth + suffix
    lists_body += b" " * (MIB - len(lists_body))  # exactly 1 MiB: at the body limit, not over
    emoji_body = json.dumps(
        {"progress": 1, "message": "\U0001f600" * EMOJI_COUNT}, ensure_ascii=False
    ).encode()
    cap = plan.sizes.abuse_big_cap
    base = plan.base
    await until(plan.attack_start)
    async with aiohttp.ClientSession() as session:

        def poster(name: str, url: str, body: bytes, owner: str = "") -> Callable[[int], Any]:
            headers = json_headers(plan.accounts[owner or name])
            return lambda _i: _http(session, tallies[name], "POST", url, headers, body)

        result_account = plan.accounts["nested_result"]
        state = {"task": plan.tasks["nested_result"]}

        async def complete(_i: int) -> None:
            url = f"{base}/api/v1/tasks/{state['task']}/complete"
            answer = await _http(
                session,
                tallies["nested_result"],
                "POST",
                url,
                json_headers(result_account),
                result_body,
            )
            if answer.startswith("2") or answer.startswith("409"):
                # Accepted (or finished already): the next attempt needs a fresh task.
                created = await create_task(session, base, result_account, "abuse")
                tallies["nested_result"].count("fresh_tasks", "created" if created else "failed")
                if created:
                    state["task"] = created

        emoji_url = f"{base}/api/v1/tasks/{plan.tasks['emoji']}/progress"
        loops = [
            poster("nested_params", f"{base}/api/v1/tasks", params_body),
            complete,
            poster("nested_lists_1mib", f"{base}/api/v1/tasks", lists_body),
            poster("emoji_message", emoji_url, emoji_body, "emoji"),
        ]
        await asyncio.gather(*(_loop(plan, 1, cap, fn, BOMB_PAUSE_S) for fn in loops))


async def big_logins(plan: Plan, tallies: dict[str, Tally]) -> None:
    """1 MiB form-encoded logins, each address used a few times only (not the auth rate)."""
    prefix = b"grant_type=password&username=atk-form&password="
    body = prefix + b"x" * (MIB - len(prefix))
    tally = tallies["login_form_1mib"]
    await until(plan.attack_start)
    async with aiohttp.ClientSession() as session:

        async def attempt(i: int) -> None:
            headers = {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Forwarded-For": f"{BAD_NET}{128 + i % BIG_LOGIN_ADDRESSES}",
            }
            await _http(session, tally, "POST", f"{plan.base}/api/v1/auth/login", headers, body)

        await _loop(plan, 2, plan.sizes.abuse_big_cap, attempt, 0.05)


async def hash_flood(plan: Plan, tallies: dict[str, Tally]) -> None:
    """Wrong-password logins and registrations, each costing a password hash."""
    tally = tallies["hash_flood"]
    tag = os.getpid() % 10000
    await until(plan.attack_start)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def attempt(i: int) -> None:
            headers = {
                "Content-Type": "application/json",
                "X-Forwarded-For": f"{BAD_NET}{64 + i % plan.sizes.abuse_flood_addresses}",
            }
            if i % 2:
                path = "/api/v1/auth/login"
                creds = {"username": "atk-hash", "password": f"wrong-password-{i}"}
            else:
                path = "/api/v1/auth/register"
                creds = {"username": f"flood{tag}x{i}", "password": "flood-password"}
            body = json.dumps(creds).encode()
            await _http(session, tally, "POST", plan.base + path, headers, body)

        await _loop(plan, FLOOD_CONCURRENCY, plan.sizes.abuse_flood_cap, attempt)


async def _hold_socket(
    plan: Plan, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally
) -> None:
    """Keep a hoarded socket alive (answer pings) until the end; note how the server ended it."""
    try:
        while True:
            remaining = plan.attack_stop - time.monotonic()
            if remaining <= 0:
                return
            opcode, payload = await asyncio.wait_for(_read_frame(reader), remaining)
            if opcode == 0x9:
                writer.write(_client_frame(0xA, payload))
            elif opcode == 0x8:
                tally.count("closed_by_server", _close_code(payload))
                return
    except TimeoutError:
        return
    except (asyncio.IncompleteReadError, OSError):
        tally.count("closed_by_server", "eof_or_reset")
    finally:
        writer.close()


async def socket_hoarding(plan: Plan, tallies: dict[str, Tally]) -> None:
    """Two accounts open WebSockets until refused, then try again once a second."""
    tally = tallies["socket_hoarding"]
    holders: list[asyncio.Task[None]] = []
    await until(plan.attack_start)

    async def hoard(account: Account) -> None:
        opened = 0
        while time.monotonic() < plan.attack_stop and opened < HOARD_MAX:
            answer, reader, writer = await _ws_handshake(plan, account)
            tally.add(answer)
            if reader is not None and writer is not None:
                opened += 1
                holders.append(asyncio.create_task(_hold_socket(plan, reader, writer, tally)))
            else:
                await asyncio.sleep(1.0)  # refused: try again a second later
        tally.notes.setdefault("opened", {})[account.username] = opened

    await asyncio.gather(hoard(plan.accounts["sockets_1"]), hoard(plan.accounts["sockets_2"]))
    await asyncio.gather(*holders, return_exceptions=True)


async def _linger(
    plan: Plan, tally: Tally, close_after: list[float], dribble: bytes | None
) -> None:
    """One raw connection that sends nothing (or a header byte every 0.5 s) until the end."""
    opened = time.monotonic()
    try:
        reader, writer = await _raw_connect(plan)
    except (OSError, TimeoutError):
        tally.add("connect_error")
        return
    step = 0.5 if dribble is not None else None
    sent = 0
    got = b""
    try:
        if dribble is not None:
            writer.write(dribble[:64])  # the request line and the first headers
            sent = 64
        while True:
            remaining = plan.attack_stop - time.monotonic()
            if remaining <= 0:
                age = time.monotonic() - opened
                tally.add("open_at_end" if age >= plan.header_timeout + 2 else "open_young")
                return
            try:
                chunk = await asyncio.wait_for(reader.read(4096), min(remaining, step or remaining))
            except TimeoutError:
                if dribble is not None:
                    writer.write(dribble[sent % len(dribble) : sent % len(dribble) + 1])
                    sent += 1
                continue
            if chunk:
                got += chunk
                if len(got) < 65536:
                    continue  # read the answer to its end (the server closes after it)
            age = time.monotonic() - opened
            close_after.append(age)
            if got:
                try:
                    head, _, body = got.partition(b"\r\n\r\n")
                    status, _ = _parse_head(head)
                    try:
                        tally.add(f"{status} {json.loads(body)['error']['code']}")
                    except (ValueError, KeyError, TypeError):
                        tally.add(str(status))
                except (ValueError, IndexError):
                    tally.add("garbage")
            else:
                tally.add(_silent_end("closed", age, plan))
            return
    except (ConnectionError, OSError):
        age = time.monotonic() - opened
        close_after.append(age)
        tally.add(_silent_end("reset", age, plan))
    finally:
        writer.close()


def _silent_end(how: str, age: float, plan: Plan) -> str:
    """A connection ended without an answer: "closed" / "reset" at or after the header
    timeout (the documented end), "closed_early" / "reset_early" before it (a server
    falling over, say; one word, so that "closed" does not match it)."""
    return how if age >= plan.header_timeout - 1 else f"{how}_early"


async def idle_and_slowloris(plan: Plan, tallies: dict[str, Tally]) -> None:
    """Thousands of idle connections and some slowloris ones, opened at the attack's start."""
    sizes = plan.sizes
    headers = (
        f"GET /healthz HTTP/1.1\r\nHost: {plan.host}:{plan.port}\r\n"
        f"X-Forwarded-For: {BAD_NET}20\r\n"
    )
    dribble = (headers + "".join(f"X-Pad-{i}: {'y' * 8}\r\n" for i in range(1000))).encode()
    idle_times: list[float] = []
    slow_times: list[float] = []
    await until(plan.attack_start)
    lingering: list[asyncio.Task[None]] = []
    for i in range(sizes.abuse_slowloris):
        lingering.append(
            asyncio.create_task(_linger(plan, tallies["slowloris"], slow_times, dribble))
        )
    for start in range(0, sizes.abuse_idle, 100):  # batches: the listen backlog is finite
        for _ in range(start, min(start + 100, sizes.abuse_idle)):
            lingering.append(
                asyncio.create_task(_linger(plan, tallies["idle_connections"], idle_times, None))
            )
        await asyncio.sleep(0.05)
    await asyncio.gather(*lingering, return_exceptions=True)
    for name, times in (("idle_connections", idle_times), ("slowloris", slow_times)):
        if times:
            times.sort()
            tallies[name].notes["closed_after_s"] = {
                "min": round(times[0], 2),
                "median": round(times[len(times) // 2], 2),
                "max": round(times[-1], 2),
            }


async def job_loop(plan: Plan, tallies: dict[str, Tally]) -> None:
    """POST /api/v1/stock/analyze as fast as one account can, 4 at once."""
    account = plan.accounts["job_loop"]
    body = json.dumps({"code": "AAPL"}).encode()
    url = f"{plan.base}/api/v1/stock/analyze"
    await until(plan.attack_start)
    async with aiohttp.ClientSession() as session:
        headers = json_headers(account)
        await _loop(
            plan,
            4,
            plan.sizes.abuse_job_cap,
            lambda _i: _http(session, tallies["job_loop"], "POST", url, headers, body),
        )


async def _slow_subscriber(plan: Plan, tally: Tally) -> None:
    """Subscribe with last_seq 0 and read slowly; again after each answer, until the end."""
    account = plan.accounts["slow_replay"]
    subscribe = json.dumps(
        {"action": "subscribe", "task_id": plan.tasks["slow_replay"], "last_seq": 0}
    ).encode()
    while time.monotonic() < plan.attack_stop:
        answer, reader, writer = await _ws_handshake(plan, account, rcvbuf=4096, limit=4096)
        if reader is None or writer is None:
            tally.add(answer)
            await asyncio.sleep(1.0)
            continue
        writer.write(_client_frame(0x1, subscribe))
        answer = ""
        try:
            while not answer:
                remaining = plan.attack_stop - time.monotonic()
                if remaining <= 0:
                    answer = "open_at_end"
                    break
                opcode, payload = await asyncio.wait_for(_read_frame(reader), remaining)
                tally.notes["bytes_read"] = tally.notes.get("bytes_read", 0) + len(payload)
                if opcode == 0x8:
                    answer = _close_code(payload)
                elif opcode == 0x9:
                    writer.write(_client_frame(0xA, payload))
                elif opcode == 0x1:
                    message = json.loads(payload)
                    kind = message.get("type")
                    if kind == "snapshot" and message.get("recovered") is False:
                        answer = "snapshot recovered=false"
                    elif kind == "error":
                        answer = f"error {message.get('code')}"
                await asyncio.sleep(len(payload) / SLOW_READ_BPS)
        except TimeoutError:
            answer = "open_at_end"
        except asyncio.IncompleteReadError:
            answer = "eof"
        except (ConnectionError, OSError):
            answer = "reset"
        except ValueError:
            answer = "bad_frame"
        finally:
            writer.close()
        tally.add(answer)
        await asyncio.sleep(1.0)


async def slow_replay(plan: Plan, tallies: dict[str, Tally]) -> None:
    """Slow subscribers replaying a long history while big live events keep coming."""
    tally = tallies["slow_replay"]
    account = plan.accounts["slow_replay"]
    url = f"{plan.base}/api/v1/tasks/{plan.tasks['slow_replay']}/progress"
    poster_tally = Tally()
    await until(plan.attack_start)

    async def post_big() -> None:
        async with aiohttp.ClientSession() as session:
            for i in itertools.count():
                at = plan.attack_start + i / SLOW_POST_RATE
                if at >= plan.attack_stop:
                    return
                await until(at)
                body = json.dumps({"progress": i % 100, "message": "z" * BIG_EVENT}).encode()
                await _http(session, poster_tally, "POST", url, json_headers(account), body)

    await asyncio.gather(
        post_big(), *(_slow_subscriber(plan, tally) for _ in range(plan.sizes.abuse_slow_replayers))
    )
    tally.notes["poster_answers"] = dict(poster_tally.answers)


AttackFn = Callable[[Plan, dict[str, Tally]], Awaitable[None]]
#: process name -> (coroutine, the attacks it reports)
ATTACKERS: dict[str, tuple[AttackFn, tuple[str, ...]]] = {
    "json_bombs": (
        json_bombs,
        ("nested_params", "nested_result", "nested_lists_1mib", "emoji_message"),
    ),
    "big_logins": (big_logins, ("login_form_1mib",)),
    "hash_flood": (hash_flood, ("hash_flood",)),
    "socket_hoarding": (socket_hoarding, ("socket_hoarding",)),
    "idle": (idle_and_slowloris, ("idle_connections", "slowloris")),
    "job_loop": (job_loop, ("job_loop",)),
    "slow_replay": (slow_replay, ("slow_replay",)),
}


# -- the well-behaved workers ---------------------------------------------------------------


async def good_posters(plan: Plan) -> dict[str, Any]:
    """Workers posting progress at a steady rate to the well-behaved tasks, both phases.

    Each sample is (send time, seconds to the answer, answer). A post is not waited for
    before the next is due (a steady rate, like a worker's timer); at most MAX_IN_FLIGHT
    are in flight per worker, beyond which a post is skipped and counted.
    """
    sizes = plan.sizes
    samples: list[tuple[float, float, str]] = []
    skipped = 0

    async def worker(w: int) -> None:
        nonlocal skipped
        tasks = plan.good_tasks[w :: sizes.abuse_posters]
        if not tasks:
            return
        address = f"{GOOD_NET}{100 + w}"
        pending: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession() as session:

            async def post(task_id: str, owner: Account, i: int) -> None:
                t0 = time.monotonic()
                body = json.dumps({"progress": i % 100, "message": f"{t0:.6f}"}).encode()
                headers = owner.headers(**{"Content-Type": "application/json"})
                headers["X-Forwarded-For"] = address
                answer = await _http(
                    session,
                    None,
                    "POST",
                    f"{plan.base}/api/v1/tasks/{task_id}/progress",
                    headers,
                    body,
                )
                samples.append((t0, time.monotonic() - t0, answer))

            for i in itertools.count():
                at = plan.quiet_start + i / sizes.abuse_post_rate
                if at >= plan.attack_stop:
                    break
                await until(at)
                if len(pending) >= MAX_IN_FLIGHT:
                    skipped += 1
                    continue
                task_id, owner = tasks[i % len(tasks)]
                job = asyncio.create_task(post(task_id, plan.good[owner], i))
                pending.add(job)
                job.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=REQUEST_TIMEOUT + 1)

    await asyncio.gather(*(worker(w) for w in range(sizes.abuse_posters)))
    return {"samples": samples, "skipped": skipped}


# -- child processes ------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_attacker(name: str, plan: Plan) -> dict[str, Any]:
    fn, names = ATTACKERS[name]
    tallies = {n: Tally() for n in names}
    try:
        os.nice(ATTACKER_NICE)
    except OSError:
        pass

    async def main() -> None:
        budget = max(1.0, plan.attack_stop - time.monotonic() + STOP_GRACE_S)
        try:
            await asyncio.wait_for(fn(plan, tallies), budget)
        except TimeoutError:
            for t in tallies.values():
                t.notes["cut_short"] = True

    try:
        asyncio.run(main())
    except Exception as exc:  # report what was tallied, and why it stopped
        for t in tallies.values():
            t.notes["error"] = repr(exc)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tallies": {n: t.to_dict() for n, t in tallies.items()},
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def run_posters(plan: Plan) -> dict[str, Any]:
    result = asyncio.run(good_posters(plan))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def _child(name: str, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], out: Any) -> None:
    _raise_fd_limit()
    try:
        result = fn(*args)
    except Exception as exc:
        result = {"error": repr(exc)}
    out.put((name, result))


class Children:
    """Client and attacker processes, each reporting one result dict."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("fork")
        self._out = self._ctx.Queue()
        self._procs: dict[str, Any] = {}

    def start(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        proc = self._ctx.Process(target=_child, args=(name, fn, args, self._out), daemon=True)
        proc.start()
        self._procs[name] = proc

    def collect(self, deadline: float) -> dict[str, dict[str, Any]]:
        """Every result in by `deadline` (time.monotonic()); the rest are killed."""
        results: dict[str, dict[str, Any]] = {}
        while len(results) < len(self._procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                name, result = self._out.get(timeout=remaining)
            except Exception:  # queue.Empty
                break
            results[name] = result
        for name, proc in self._procs.items():
            proc.join(2 if name in results else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            results.setdefault(name, {"error": "no report before the deadline (killed)"})
        return results


async def create_task(
    session: aiohttp.ClientSession, base: str, account: Account, kind: str
) -> str | None:
    body = json.dumps({"kind": kind, "params": {}}).encode()
    try:
        async with session.post(
            f"{base}/api/v1/tasks", data=body, headers=json_headers(account), timeout=_timeout()
        ) as r:
            return (await r.json())["id"] if r.status == 201 else None
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        return None
