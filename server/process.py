"""What the server process claims before serving: open files, the database to itself,
and a garbage collector tuned for thousands of long-lived connections.

`fit_open_files` raises the open-files soft limit to the hard limit, then lowers the
connection caps to what that limit can hold: a connection is a file descriptor, and a
process out of descriptors can no longer accept (asyncio stops accepting for a second at
a time), open its database or write its logs. `tune_garbage_collector` runs once the
server is set up (see its docstring). `InstanceLock` is a lock file beside the
database, so that a second server on the same file exits before it opens it, resumes the
first one's jobs (running them twice) or closes its subscription rows.

No aiohttp here: `__main__` calls these before the web shell exists.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import gc
import logging
import os
import resource
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

#: Descriptors kept for everything that is not a client connection: the SQLite writer
#: and readers (database and WAL files), logs, the lock file, listening sockets, the
#: event loop's own, static files being sent, refused connections being answered.
FD_RESERVE = 64
#: Fewest client connections worth starting with; below, the limit is a mistake.
MIN_CONNECTIONS = 16
#: When the caps are lowered, at most 1/HTTP_SHARE of the connections is kept for plain
#: HTTP, out of the room --max-http-connections left above --max-connections.
HTTP_SHARE = 5
#: Tried as the soft limit when the hard limit is "unlimited" (Linux caps it at nr_open).
UNLIMITED_TARGET = 1 << 20


#: Allocations (of objects the cyclic collector tracks) between two young collections.
#: CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Freeze what start-up built, and collect the young generation less often.

    Every connection holds a few dozen objects the cyclic collector tracks, and each of
    its older-generation passes walks all of them. Measured on 5,000 WebSocket clients
    connecting and subscribing (benchmarks B4), the collector took 1.24 s of the 4.7 s
    the server spent, and 0.27 s after this: connects/s rose from 830 to 1,080-1,400. Freezing
    moves the modules, schemas and routes built at start-up out of every later pass; a
    young threshold of 10,000 instead of 700 makes passes rarer at no cost in memory
    worth counting (garbage cycles wait for at most 10,000 allocations).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says why, for the operator."""


class AlreadyRunning(StartupError):
    """Another server holds the lock of this database (exit status 3)."""


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit as far as the hard limit allows; return the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. above nr_open, or macOS's OPEN_MAX
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def fit_open_files(config: Config) -> Config:
    """`config` with its connection caps lowered to fit the open-files limit (one WARNING).

    Raises:
        StartupError: the limit leaves room for fewer than MIN_CONNECTIONS connections.
    """
    limit = raise_open_files_limit()
    room = limit - FD_RESERVE
    if room < MIN_CONNECTIONS:
        raise StartupError(
            f"the open-files limit ({limit}) leaves room for {max(room, 0)} connections;"
            f" raise it (ulimit -n) to at least {MIN_CONNECTIONS + FD_RESERVE}"
        )
    # 0 means "no limit" and stays so: the operator chose it.
    asked_http, asked_ws = config.max_http_connections, config.max_connections
    http = min(asked_http, room) if asked_http else 0
    ws = asked_ws
    if ws:
        tcp = http or room
        # WebSockets are TCP connections too: when the caps shrink, keep the room for
        # plain HTTP (workers' posts) that the settings left, up to a fifth of the total.
        http_room = min(max(asked_http - asked_ws, 0), tcp // HTTP_SHARE) if asked_http else 0
        ws = min(ws, tcp - http_room)
    if (http, ws) == (config.max_http_connections, config.max_connections):
        return config
    log.warning(
        "server.fd_limit open_files=%d reserve=%d max_http_connections=%d max_connections=%d"
        " requested_http=%d requested_ws=%d hint=raise_the_hard_limit_to_allow_more",
        limit,
        FD_RESERVE,
        http,
        ws,
        config.max_http_connections,
        config.max_connections,
    )
    return dataclasses.replace(config, max_http_connections=http, max_connections=ws)


class InstanceLock:
    """An exclusive flock on `<db>.lock`, holding the owner's pid, for the process's life.

    The kernel drops a flock when its holder exits, however it exits (SIGKILL too), so a
    stale file never blocks the next start. The file is never deleted: unlinking a lock
    file while another process waits on it lets two processes hold "the" lock.
    """

    def __init__(self, path: Path, db_path: Path) -> None:
        self.path = path
        self._db_path = db_path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning (naming the holder's pid when known)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise AlreadyRunning(
                f"another server is using {self._db_path} (pid {holder or 'unknown'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
