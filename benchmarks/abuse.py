"""The abuse scenario: a well-behaved load, first alone, then beside seven attackers.

Phase 1 (quiet): subscribers on several users watch tasks while a few workers post
progress at a steady rate. Phase 2: the same load while attackers run at the same time,
each in its own process (niced, so that on a 2-core machine the attackers' own CPU does not
starve the server or the well-behaved clients more than the attack itself does):

- json bombs: params / result nested hundreds deep, a 1 MiB body of nested empty lists,
  progress messages of 65,536 emoji;
- 1 MiB form-encoded logins;
- a password-hashing flood: concurrent wrong-password logins and registrations;
- two free accounts opening WebSockets until refused;
- thousands of idle TCP connections, and slowloris connections dribbling headers;
- a job-creation loop (POST /api/v1/stock/analyze as fast as one account can);
- slow replays: subscribers with last_seq 0 reading very slowly while 16 KiB events
  are posted to their task.

Every attacker records what it got (status and error code, close code, or what happened
to the socket). The well-behaved clients' delivery latency, disconnects and errors, the
workers' post latency, the server's RSS and its commit-time histogram are reported for
both phases, and each attack's answers are judged against the error the docs promise.

Client addresses are told to the server with X-Forwarded-For (it runs with
`--trusted-proxies 127.0.0.1`). They come from the RFC 5737 documentation ranges and only
ever appear in that header: all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .attackers import (
    ATTACKERS,
    BAD_NET,
    BIG_EVENT,
    BIG_LOGIN_ADDRESSES,
    DEFAULTS,
    EMOJI_COUNT,
    FLOOD_CONCURRENCY,
    GOOD_NET,
    MIB,
    NESTED_DEPTH,
    SLOW_POST_RATE,
    SLOW_READ_BPS,
    STOP_GRACE_S,
    Account,
    Children,
    Plan,
    create_task,
    json_headers,
    run_attacker,
    run_posters,
    until,
)
from .clients import WorkerPool, WorkerSpec
from .scenarios import Sizes, percentile
from .targets import Target, cpu_seconds

Figures = dict[str, Any]
#: Seconds the well-behaved subscribers keep reading after the last post.
SETTLE_S = 3.0


# -- what each attack should get ------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One attack and the answers the docs promise for it.

    An answer is "<status> <error code>" (HTTP), a close code, or what happened to a raw
    socket ("closed", "reset", "open_at_end", ...). A pattern matches an answer exactly or
    as its first word ("429" matches "429 rate_limited").
    """

    name: str
    what: str
    #: The documented refusals: at least one must be seen.
    documented: tuple[str, ...]
    #: Answers a well-defended server still gives within its allowance (a rate's worth of
    #: normal answers before it refuses).
    normal: tuple[str, ...] = ()
    #: Most normal answers allowed, from the sizes (None: no bound).
    allowance: Callable[[Sizes], float] | None = None
    #: Answers fine in any number: a handshake shed with 503 while the server is loaded, a
    #: connection not yet old enough to be due its answer. Anything else is undocumented.
    tolerated: tuple[str, ...] = ()


def _per_minute(
    rate: float, sources: Callable[[Sizes], int] = lambda _z: 1
) -> Callable[[Sizes], float]:
    """A per-minute rate's worth for each source over the attack: a minute's burst (at most)
    plus the refill."""
    return lambda z: math.ceil(rate * sources(z) * (1 + z.abuse_attack_s / 60))


_SHED = ("503 overloaded", "503 server_full")

ATTACKS: tuple[Attack, ...] = (
    Attack(
        "nested_params",
        f"POST /api/v1/tasks, params nested {NESTED_DEPTH} deep",
        ("422 validation_error",),
    ),
    Attack(
        "nested_result",
        f"POST /api/v1/tasks/{{id}}/complete, result nested {NESTED_DEPTH} deep",
        ("422 validation_error",),
    ),
    Attack(
        "nested_lists_1mib",
        "POST /api/v1/tasks, a 1 MiB body of nested empty lists in params",
        # Nested deeper than the JSON parser reads: refused as unreadable JSON (400).
        ("400 invalid_json", "422 validation_error", "413 payload_too_large"),
    ),
    Attack(
        "emoji_message",
        f"POST /api/v1/tasks/{{id}}/progress, a message of {EMOJI_COUNT} emoji",
        ("422 validation_error", "413 payload_too_large"),
    ),
    Attack(
        "login_form_1mib",
        f"POST /api/v1/auth/login, 1 MiB form body, from {BIG_LOGIN_ADDRESSES} addresses",
        ("413 payload_too_large",),
    ),
    Attack(
        "hash_flood",
        f"wrong-password logins + registrations, {FLOOD_CONCURRENCY} at once, from a few"
        " addresses in turn (--abuse-flood-addresses)",
        ("429", "503"),
        ("401 invalid_credentials", "201"),
        _per_minute(DEFAULTS.auth_rate, lambda z: z.abuse_flood_addresses),
    ),
    Attack(
        "socket_hoarding",
        "2 free accounts open WebSockets until refused",
        ("429 too_many_connections",),
        ("101",),
        lambda _z: 2 * DEFAULTS.max_connections_per_user,
        _SHED,
    ),
    Attack(
        "idle_connections",
        "raw TCP connections that send nothing",
        ("closed", "reset", "503 server_full"),
        tolerated=("open_young",),
    ),
    Attack(
        "slowloris",
        "raw TCP connections dribbling one header byte every 0.5 s",
        ("closed", "reset", "408", "400", "503 server_full"),
        tolerated=("open_young",),
    ),
    Attack(
        "job_loop",
        "POST /api/v1/stock/analyze as fast as one account can (4 at once)",
        ("429",),
        ("201",),
        _per_minute(DEFAULTS.task_create_rate),
    ),
    Attack(
        "slow_replay",
        f"subscribe with last_seq 0, read {SLOW_READ_BPS // 1024} KiB/s, "
        f"{BIG_EVENT // 1024} KiB events posted at {SLOW_POST_RATE:g}/s",
        # A reader too far behind to read its 4008 sees the reset that drops it (documented).
        ("4008", "1006", "reset", "snapshot recovered=false"),
        # Reconnected after its 4008, a replayer may still be within its limits when the
        # run ends: bounded by its send queue, that costs the others nothing.
        tolerated=(*_SHED, "open_at_end"),
    ),
)


def _matches(answer: str, patterns: tuple[str, ...]) -> bool:
    return any(answer == p or answer.startswith(p + " ") for p in patterns)


def judge(
    attack: Attack, answers: dict[str, int], sizes: Sizes, server_alive: bool = True
) -> dict[str, Any]:
    """Met when a documented refusal was seen, nothing undocumented, normal answers stayed
    within the allowance, and the server was still up at the end."""
    documented = sum(n for a, n in answers.items() if _matches(a, attack.documented))
    rest = {a: n for a, n in answers.items() if not _matches(a, attack.documented)}
    normal = sum(n for a, n in rest.items() if _matches(a, attack.normal))
    other = {
        a: n
        for a, n in rest.items()
        if not _matches(a, attack.normal) and not _matches(a, attack.tolerated)
    }
    allowance = attack.allowance(sizes) if attack.allowance else None
    why = []
    if not documented:
        why.append("no documented refusal")
    if other:
        why.append("undocumented answers")
    if allowance is not None and normal > allowance:
        why.append(f"{normal} normal answers > allowance {allowance}")
    if not server_alive:
        why.append("the server died")
    return {
        "documented": documented,
        "normal": normal,
        "undocumented": sum(other.values()),
        "allowance": allowance,
        "expected": " | ".join(attack.documented),
        "met": not why,
        "why": "; ".join(why),
    }


# -- setup ----------------------------------------------------------------------------------


async def _account(session: aiohttp.ClientSession, base: str, name: str, address: str) -> Account:
    creds = json.dumps({"username": name, "password": "abuse-password"}).encode()
    headers = {"Content-Type": "application/json", "X-Forwarded-For": address}
    async with session.post(f"{base}/api/v1/auth/register", data=creds, headers=headers) as r:
        if r.status != 201:
            raise RuntimeError(f"register {name}: {r.status} {await r.text()}")
        user_id = (await r.json())["id"]
    async with session.post(f"{base}/api/v1/auth/login", data=creds, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"login {name}: {r.status} {await r.text()}")
        token = (await r.json())["access_token"]
    return Account(name, user_id, token, address)


async def _post(
    session: aiohttp.ClientSession, base: str, account: Account, task: str, message: str
) -> None:
    body = json.dumps({"progress": 0, "message": message}).encode()
    url = f"{base}/api/v1/tasks/{task}/progress"
    async with session.post(url, data=body, headers=json_headers(account)) as r:
        if r.status != 200:
            raise RuntimeError(f"post: {r.status} {await r.text()}")


#: Attackers' accounts (the hash flood's and the 1 MiB logins' need none).
ATTACK_ACCOUNTS = (
    "nested_params",
    "nested_result",
    "nested_lists_1mib",
    "emoji",
    "sockets_1",
    "sockets_2",
    "job_loop",
    "slow_replay",
    "hash",
)


async def _setup(target: Target, plan: Plan) -> None:
    """Accounts (each from its own address), tasks, and the slow replayers' history."""
    sizes = plan.sizes
    base = target.base
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(sizes.abuse_users):
            plan.good.append(await _account(session, base, f"good-{i}", f"{GOOD_NET}{10 + i}"))
        for _ in range(sizes.abuse_tasks_per_user):
            for u, account in enumerate(plan.good):
                task = await create_task(session, base, account, "abuse-good")
                if task is None:
                    raise RuntimeError("could not create a well-behaved task")
                await _post(session, base, account, task, "start")
                plan.good_tasks.append((task, u))
        for i, name in enumerate(ATTACK_ACCOUNTS):
            plan.accounts[name] = await _account(
                session, base, f"atk-{name.replace('_', '-')}", f"{BAD_NET}{30 + i}"
            )
        for role, owner in (
            ("nested_result", "nested_result"),
            ("emoji", "emoji"),
            ("slow_replay", "slow_replay"),
        ):
            task = await create_task(session, base, plan.accounts[owner], "abuse")
            if task is None:
                raise RuntimeError(f"could not create the {role} task")
            plan.tasks[role] = task
        big = "h" * BIG_EVENT
        gate = asyncio.Semaphore(8)

        async def fill(_i: int) -> None:
            async with gate:
                await _post(
                    session, base, plan.accounts["slow_replay"], plan.tasks["slow_replay"], big
                )

        await asyncio.gather(*(fill(i) for i in range(sizes.abuse_replay_history)))


# -- watching the server --------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


async def _scrape(target: Target) -> dict[str, Any]:
    """/metrics as {name: value} and {name: {labels: value}}; {} when it does not answer."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{target.base}/metrics") as resp:
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        if labels is None:
            out[name] = number
        else:
            out.setdefault(name, {})[labels] = number
    return out


Buckets = list[tuple[float, float]]


def _buckets(metrics: dict[str, Any], name: str) -> Buckets:
    """A histogram's cumulative (le, count) pairs from a scrape."""
    found = metrics.get(f"{name}_bucket", {})
    out = []
    for labels, count in found.items():
        m = re.search(r'le="([^"]+)"', labels)
        if m:
            out.append((float(m.group(1)), count))
    return sorted(out)


def histogram_quantile(q: float, before: Buckets, after: Buckets) -> float:
    """Prometheus-style quantile of the observations between two scrapes (linear within a
    bucket; the +Inf bucket answers its lower bound)."""
    if not after:
        return float("nan")
    start = dict(before)
    buckets = [(le, count - start.get(le, 0.0)) for le, count in after]
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    low, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return low
            return low + (le - low) * ((rank - below) / (count - below) if count > below else 1)
        low, below = le, count
    return low


_KV = re.compile(r"(\w+)=(\S+)")
#: (time.monotonic() of the line, event name, fields)
LogLine = tuple[float, str, dict[str, str]]


def _log_events(path: Path | None, wall_offset: float) -> list[LogLine]:
    """Every kv- or json-format line of the server's log, placed on the monotonic clock."""
    events: list[LogLine] = []
    if path is None or not path.exists():
        return events
    with open(path, errors="replace") as fh:
        for line in fh:
            line = line.strip()
            try:
                if line.startswith("{"):
                    record = json.loads(line)
                    event, fields = record.get("event", ""), {k: str(v) for k, v in record.items()}
                else:
                    fields = dict(_KV.findall(line))
                    event = next((w for w in line.split(" ") if w and "=" not in w), "")
                ts = datetime.fromisoformat(fields["ts"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
            events.append((ts - wall_offset, event, fields))
    return events


def _user(fields: dict[str, str]) -> int:
    user = fields.get("user", "")
    return int(user) if user.isdigit() else -1


# -- the scenario ---------------------------------------------------------------------------


def _phase(t: float, plan: Plan) -> str | None:
    if plan.quiet_start <= t < plan.attack_start:
        return "quiet"
    if plan.attack_start <= t < plan.attack_stop:
        return "attack"
    return None


PHASES = ("quiet", "attack")


def _empty_figures() -> Figures:
    nan = float("nan")
    figures: Figures = {}
    for phase in PHASES:
        figures.update(
            {
                f"{phase}_p50_ms": nan,
                f"{phase}_p99_ms": nan,
                f"{phase}_max_ms": nan,
                f"{phase}_deliveries": 0,
                f"{phase}_disconnects": 0,
                f"{phase}_heartbeat_drops": 0,
                f"{phase}_dropped_clients": 0,
                f"{phase}_post_p50_ms": nan,
                f"{phase}_post_p99_ms": nan,
                f"{phase}_post_failures": 0,
                f"{phase}_commit_p99_ms": nan,
                f"{phase}_loop_lag_p99_ms": nan,
                f"{phase}_rss_peak_mib": nan,
                f"{phase}_server_cpu_s": nan,
            }
        )
    figures.update(
        {
            "p99_ratio": nan,
            "dropped_clients": 0,
            "errors": 0,
            "lost": 0,
            "gaps": 0,
            "dups": 0,
            "rss_hwm_mib": nan,
            "server_alive": True,
            "client_cpu_s": 0.0,
            "attacker_cpu_s": 0.0,
            "disconnect_codes": {},
            "post_answers": {},
            "refused": {},
            "attacks": {},
            "error": "",
        }
    )
    return figures


async def abuse(target: Target, sizes: Sizes) -> Figures:
    """The quiet baseline, then the same load under attack; figures for both."""
    figures = _empty_figures()
    chosen = [a.strip() for a in sizes.abuse_attacks.split(",") if a.strip()] or list(ATTACKERS)
    unknown = set(chosen) - set(ATTACKERS)
    if unknown:
        raise ValueError(f"unknown attackers {sorted(unknown)}; known: {', '.join(ATTACKERS)}")
    plan = Plan(host="127.0.0.1", port=target.port, sizes=sizes)
    if sizes.abuse_header_timeout:
        plan.header_timeout = sizes.abuse_header_timeout
    await _setup(target, plan)
    pool = WorkerPool(_subscriber_specs(plan))
    pool.start(timeout=120)

    plan.quiet_start = time.monotonic() + 1.0
    plan.attack_start = plan.quiet_start + sizes.abuse_quiet_s
    plan.attack_stop = plan.attack_start + sizes.abuse_attack_s
    children = Children()
    children.start("posters", run_posters, plan)
    for name in chosen:
        children.start(name, run_attacker, name, plan)
    watch = await _watch(target, plan)

    pool.stop.set()
    try:
        subscribers = pool.collect(timeout=90)
    except Exception as exc:  # a worker failed: report what there is
        subscribers = []
        figures["error"] = f"subscribers: {exc!r}"
    others = children.collect(plan.attack_stop + STOP_GRACE_S + 20)
    alive = target.proc is not None and target.proc.poll() is None
    figures["server_alive"] = alive
    final = await _scrape(target) if alive else {}
    hwm = _proc_status(target.pid).get("VmHWM", 0) if alive else 0
    log = _log_events(target.log_path, watch.wall_offset)

    _subscriber_figures(figures, plan, subscribers, log)
    if alive and subscribers:
        figures["lost"] = await _behind(target, plan, subscribers)
    _poster_figures(figures, plan, others.pop("posters", {}))
    _server_figures(figures, watch, final, hwm)
    _attack_figures(figures, plan, others, log, alive)
    return figures


def _subscriber_specs(plan: Plan) -> list[WorkerSpec]:
    """The well-behaved subscribers, round-robin over the users (each under the per-user
    socket limit) and over each user's tasks, in `sizes.workers` processes."""
    sizes = plan.sizes
    users = len(plan.good)
    clients, urls, headers = [], [], []
    for c in range(sizes.abuse_subs):
        user = c % users
        own = [t for t, u in plan.good_tasks if u == user]
        clients.append([own[(c // users) % len(own)]])
        urls.append(f"ws://{plan.host}:{plan.port}/api/v1/ws?token={plan.good[user].token}")
        headers.append({"X-Forwarded-For": plan.good[user].address})
    deadline = time.monotonic() + sizes.abuse_quiet_s + sizes.abuse_attack_s + 120
    specs = []
    for w in range(sizes.workers):
        picked = list(range(w, sizes.abuse_subs, sizes.workers))
        if picked:
            specs.append(
                WorkerSpec(
                    url=urls[0],
                    clients=[clients[i] for i in picked],
                    expected_per_task=0,
                    deadline=deadline,
                    hold=True,
                    port=plan.port,
                    urls=[urls[i] for i in picked],
                    headers=[headers[i] for i in picked],
                    timeline=True,
                )
            )
    return specs


@dataclass
class Watch:
    """What was seen of the server while the phases ran."""

    #: time.time() - time.monotonic(), to place log lines in the phases.
    wall_offset: float
    #: Highest VmRSS sampled per phase, bytes.
    peaks: dict[str, int]
    #: At the start of each phase and at the end: {"cpu": seconds, "metrics": scrape}.
    marks: dict[str, dict[str, Any]]


async def _watch(target: Target, plan: Plan) -> Watch:
    """Until the phases are over: sample the server's RSS, and its CPU time and /metrics at
    each boundary."""
    watch = Watch(time.time() - time.monotonic(), {p: 0 for p in PHASES}, {})
    watching = True

    async def sample_rss() -> None:
        while watching:
            phase = _phase(time.monotonic(), plan)
            rss = _proc_status(target.pid).get("VmRSS", 0)
            if phase:
                watch.peaks[phase] = max(watch.peaks[phase], rss)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss())
    try:
        for mark, when in (
            ("quiet", plan.quiet_start),
            ("attack", plan.attack_start),
            ("end", plan.attack_stop),
        ):
            await until(when)
            alive = target.proc is not None and target.proc.poll() is None
            watch.marks[mark] = {
                "cpu": cpu_seconds(target.pid) if alive else math.nan,
                "metrics": await _scrape(target) if alive else {},
            }
        await until(plan.attack_stop + SETTLE_S)
    finally:
        watching = False
        await sampler
    return watch


def _subscriber_figures(
    figures: Figures, plan: Plan, subscribers: list[dict[str, Any]], log: list[LogLine]
) -> None:
    """Delivery latency by the phase an event was sent in; disconnects, drops, errors."""
    latencies: dict[str, list[float]] = {p: [] for p in PHASES}
    dropped: dict[str, set[tuple[int, int]]] = {p: set() for p in PHASES}
    codes: Counter[str] = Counter()
    for w, r in enumerate(subscribers):
        for sent, latency in zip(r["sent_at"], r["latencies"], strict=True):
            phase = _phase(sent, plan)
            if phase:
                latencies[phase].append(latency)
        for index, at, code in r["disconnects"]:
            phase = _phase(at, plan) or "attack"  # the settling seconds count as the attack's
            figures[f"{phase}_disconnects"] += 1
            dropped[phase].add((w, index))
            codes[str(code)] += 1
        figures["errors"] += r["connect_errors"] + r["error_messages"] + r["shed"]
        figures["gaps"] += r["gaps"]
        figures["dups"] += r["dups"]
        figures["client_cpu_s"] += r["cpu_seconds"]
    for phase in PHASES:
        figures[f"{phase}_deliveries"] = len(latencies[phase])
        figures[f"{phase}_p50_ms"] = percentile(latencies[phase], 50) * 1000
        figures[f"{phase}_p99_ms"] = percentile(latencies[phase], 99) * 1000
        figures[f"{phase}_max_ms"] = max(latencies[phase], default=math.nan) * 1000
        figures[f"{phase}_dropped_clients"] = len(dropped[phase])
    figures["dropped_clients"] = len(dropped["quiet"] | dropped["attack"])
    figures["disconnect_codes"] = dict(codes)
    figures["p99_ratio"] = figures["attack_p99_ms"] / figures["quiet_p99_ms"]
    # The server's side: heartbeat drops (the client sees only a vanished socket).
    good = {a.user_id for a in plan.good}
    for at, event, fields in log:
        if event == "ws.abort" and fields.get("reason") == "heartbeat_timeout":
            if _user(fields) in good:
                figures[f"{_phase(at, plan) or 'attack'}_heartbeat_drops"] += 1


def _poster_figures(figures: Figures, plan: Plan, posters: dict[str, Any]) -> None:
    """The well-behaved workers' post latency (successes) and failures, by phase."""
    answers: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {p: [] for p in PHASES}
    for sent, seconds, answer in posters.get("samples", []):
        answers[answer] += 1
        phase = _phase(sent, plan)
        if phase is None:
            continue
        if answer.startswith("2"):
            latencies[phase].append(seconds)
        else:
            figures[f"{phase}_post_failures"] += 1
    if posters.get("skipped"):
        answers["skipped (too many in flight)"] = posters["skipped"]
    if "error" in posters:
        answers[f"error {posters['error']}"] += 1
    figures["post_answers"] = dict(answers)
    figures["client_cpu_s"] += posters.get("cpu_s", 0.0)
    for phase in PHASES:
        figures[f"{phase}_post_p50_ms"] = percentile(latencies[phase], 50) * 1000
        figures[f"{phase}_post_p99_ms"] = percentile(latencies[phase], 99) * 1000


def _server_figures(figures: Figures, watch: Watch, final: dict[str, Any], hwm: int) -> None:
    """Server CPU, commit p99 (from /metrics) and RSS peak by phase; refusals by reason."""
    histograms = {
        "commit": "progress_commit_duration_seconds",
        "loop_lag": "progress_event_loop_lag_seconds",
    }
    for phase, (start, end) in (("quiet", ("quiet", "attack")), ("attack", ("attack", "end"))):
        a, b = watch.marks.get(start, {}), watch.marks.get(end, {})
        figures[f"{phase}_server_cpu_s"] = b.get("cpu", math.nan) - a.get("cpu", math.nan)
        for short, name in histograms.items():
            before = _buckets(a.get("metrics", {}), name)
            after = _buckets(b.get("metrics", {}), name)
            figures[f"{phase}_{short}_p99_ms"] = histogram_quantile(0.99, before, after) * 1000
        peak = watch.peaks[phase]
        figures[f"{phase}_rss_peak_mib"] = peak / MIB if peak else math.nan
    # VmHWM is the true peak; once the server is gone, the highest sample is all there is.
    peak = hwm or max(watch.peaks.values())
    figures["rss_hwm_mib"] = peak / MIB if peak else math.nan
    figures["refused"] = {
        re.sub(r'reason="([^"]*)"', r"\1", k): int(v)
        for k, v in final.get("progress_refused_total", {}).items()
    }


def _attack_figures(
    figures: Figures,
    plan: Plan,
    results: dict[str, dict[str, Any]],
    log: list[LogLine],
    alive: bool,
) -> None:
    """Each attack's tally, judged against its documented answer."""
    tallies: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        figures["attacker_cpu_s"] += result.get("cpu_s", 0.0)
        for attack in ATTACKERS[name][1]:
            tallies[attack] = result.get("tallies", {}).get(
                attack, {"attempts": 0, "answers": {}, "error": result.get("error", "")}
            )
    if "slow_replay" in tallies:
        slow = plan.accounts["slow_replay"].user_id
        closes = Counter(
            fields.get("code", "none")
            for at, event, fields in log
            # Only while the attack ran: once a replayer has given up and closed its end,
            # the server may still call it slow, but that is no answer the attacker got.
            if event == "ws.disconnect" and _user(fields) == slow and _phase(at, plan)
        )
        _confirm_slow_closes(tallies["slow_replay"], closes)
    for attack in ATTACKS:
        if attack.name not in tallies:
            continue  # its attacker was not chosen (--abuse-attacks)
        tally = tallies[attack.name]
        tally.update(judge(attack, tally["answers"], plan.sizes, alive))
        tally["what"] = attack.what
        figures["attacks"][attack.name] = tally


def _confirm_slow_closes(tally: dict[str, Any], closes: Counter[str]) -> None:
    """Name the slow replayers' resets that the server's log shows were its 4008s, or its
    heartbeat drops (1006: a reader this slow answers a ping only once it has read
    everything sent before it).

    A slow reader often cannot see its 4008: the close frame sits behind the data it has
    not read when the server drops the socket (with a TCP reset, which discards that
    data), and all it sees is the reset or the end.
    """
    tally["server_log_close_codes"] = dict(closes)
    answers = tally["answers"]
    for code in ("4008", "1006"):
        left = closes.get(code, 0)
        for how in ("reset", "eof"):
            take = min(answers.get(how, 0), left)
            if take:
                answers[how] -= take
                label = f"{code} (server log; client saw {how})"
                answers[label] = answers.get(label, 0) + take
                left -= take
                if not answers[how]:
                    del answers[how]


async def _behind(target: Target, plan: Plan, subscribers: list[dict[str, Any]]) -> int:
    """Events the well-behaved subscribers had not received when they stopped."""
    final: dict[str, int] = {}
    owners = {t: plan.good[u] for t, u in plan.good_tasks}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for task, owner in owners.items():
            try:
                async with session.get(
                    f"{target.base}/api/v1/tasks/{task}", headers=owner.headers()
                ) as r:
                    final[task] = (await r.json())["seq"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                return -1
    return sum(
        max(0, final[t] - seen.get(t, 0))
        for r in subscribers
        for seen in r["last_seqs"]
        for t in seen
        if t in final
    )


# -- report ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != value:
        return "nan"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2f}"


#: (label, figure of the quiet phase or of the whole run, figure under attack)
_ROWS = (
    ("delivery p50 ms", "quiet_p50_ms", "attack_p50_ms"),
    ("delivery p99 ms", "quiet_p99_ms", "attack_p99_ms"),
    ("delivery max ms", "quiet_max_ms", "attack_max_ms"),
    ("deliveries", "quiet_deliveries", "attack_deliveries"),
    ("disconnects", "quiet_disconnects", "attack_disconnects"),
    ("clients dropped", "quiet_dropped_clients", "attack_dropped_clients"),
    ("heartbeat drops", "quiet_heartbeat_drops", "attack_heartbeat_drops"),
    ("worker post p50 ms", "quiet_post_p50_ms", "attack_post_p50_ms"),
    ("worker post p99 ms", "quiet_post_p99_ms", "attack_post_p99_ms"),
    ("worker post failures", "quiet_post_failures", "attack_post_failures"),
    ("commit p99 ms (/metrics)", "quiet_commit_p99_ms", "attack_commit_p99_ms"),
    ("event-loop lag p99 ms", "quiet_loop_lag_p99_ms", "attack_loop_lag_p99_ms"),
    ("server RSS peak MiB", "quiet_rss_peak_mib", "attack_rss_peak_mib"),
    ("server CPU s", "quiet_server_cpu_s", "attack_server_cpu_s"),
)


def _median(stats: dict[str, Any]) -> Any:
    return stats["median"] if "median" in stats else stats["runs"][-1]


def print_report(figures: dict[str, dict[str, Any]]) -> None:
    """The abuse scenario's figures (medians over runs), quiet beside under attack."""
    runs = len(figures["attacks"]["runs"])
    print(f"\nabuse: the well-behaved load, quiet vs under attack (median of {runs} run(s))")
    print(f"  {'figure':28} {'quiet':>10} {'attack':>10}")
    for label, quiet, attack in _ROWS:
        q, a = _fmt(_median(figures[quiet])), _fmt(_median(figures[attack]))
        print(f"  {label:28} {q:>10} {a:>10}")
    for key in (
        "p99_ratio",
        "dropped_clients",
        "errors",
        "lost",
        "gaps",
        "dups",
        "rss_hwm_mib",
        "client_cpu_s",
        "attacker_cpu_s",
    ):
        print(f"  {key:28} {_fmt(_median(figures[key])):>10}")
    print(f"  server alive at the end: {figures['server_alive']['runs']}")
    for key in ("disconnect_codes", "post_answers", "refused", "error"):
        last = figures[key]["runs"][-1]
        if last:
            print(f"  {key}: {last}")
    print("\n  attack               attempts  verdict  answers (last run)  [documented]")
    for run in figures["attacks"]["runs"][-1:]:
        for name, tally in run.items():
            verdict = "met" if tally["met"] else "MISSED"
            print(
                f"  {name:20} {tally['attempts']:>8}  {verdict:7}  {tally['answers']}  "
                f"[{tally['expected']}]"
            )
            extra = {
                k: v
                for k, v in tally.items()
                if k
                not in (
                    "attempts",
                    "answers",
                    "documented",
                    "normal",
                    "undocumented",
                    "allowance",
                    "expected",
                    "met",
                    "why",
                    "what",
                )
            }
            if tally["why"] or extra:
                print(f"  {'':20} {'':8}  {tally['why']}  {extra if extra else ''}")


def targets(figures: dict[str, dict[str, Any]]) -> list[str]:
    """The abuse targets, each MET or MISSED."""
    ratio = _median(figures["p99_ratio"])
    quiet, attack = _median(figures["quiet_p99_ms"]), _median(figures["attack_p99_ms"])
    dropped = max(figures["dropped_clients"]["runs"])
    hwm = max((v for v in figures["rss_hwm_mib"]["runs"] if v == v), default=float("nan"))
    runs = figures["attacks"]["runs"]
    missed = sorted({n for run in runs for n, t in run.items() if not t["met"]})
    total = len(runs[-1]) if runs else 0
    ok = lambda good: "MET" if good else "MISSED"  # noqa: E731
    return [
        f"target abuse p99: {_fmt(attack)} ms under attack vs {_fmt(quiet)} ms quiet = "
        f"{ratio:.2f}x (want <= 2x) {ok(ratio <= 2)}",
        f"target abuse dropped: {dropped} well-behaved clients dropped (want 0) {ok(dropped == 0)}",
        f"target abuse rss: peak {_fmt(hwm)} MiB (want < 512) {ok(hwm < 512)}",
        f"target abuse answers: {total - len(missed)} of {total} attacks answered as documented"
        f" {ok(not missed and total > 0)}" + (f"; missed: {', '.join(missed)}" if missed else ""),
    ]
