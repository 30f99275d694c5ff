"""`python run.py users add|remove|list`: accounts for operators (e.g. `--registration closed`).

Works on the database file directly, also while the server runs (SQLite WAL): a removed
user's tokens and open sockets stop working within a few seconds (sessions.CACHE_TTL).

Exit status: 0 done, 1 refused (the user exists, is unknown, no database), 2 usage
(bad arguments, an invalid username or password).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import schemas
from .auth import Passwords
from .config import Config, ConfigError, config_from
from .models import utc_now
from .store import Backend, StoreUnavailable, UsernameTaken, open_store
from .store.sqlite_db import DatabaseError

OK, REFUSED, USAGE = 0, 1, 2


class _Refused(Exception):
    """Ends the command with status 1 and this message."""


class _Usage(Exception):
    """Ends the command with status 2 and this message."""


def _parser() -> argparse.ArgumentParser:
    # --db and --password-hash-cost are taken before or after the command; SUPPRESS keeps
    # a subparser's unset default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        dest="db_path",
        metavar="FILE",
        type=Path,
        default=argparse.SUPPRESS,
        help="SQLite database file [env PROGRESS_DB, default data/app.db]",
    )
    common.add_argument(
        "--store",
        dest="store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="sqlite:///FILE or postgresql://… [env PROGRESS_STORE, default from --db]",
    )
    common.add_argument(
        "--password-hash-cost",
        dest="password_hash_cost",
        metavar="MIB",
        type=int,
        default=argparse.SUPPRESS,
        help="argon2id MiB for `add` [env PROGRESS_PASSWORD_HASH_COST, default 19]",
    )
    parser = argparse.ArgumentParser(
        prog="run.py users", description="Manage accounts.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser(
        "add",
        parents=[common],
        help="create a user; the password is asked for (TTY) or read as one line of stdin",
    )
    add.add_argument("name")
    remove = commands.add_parser(
        "remove",
        parents=[common],
        help="delete a user with their sessions, tasks, events and subscriptions",
    )
    remove.add_argument("name")
    commands.add_parser("list", parents=[common], help="id, username, created_at, tasks")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
        given = {"db_path": getattr(args, "db_path", None), "store": getattr(args, "store", None)}
        given["password_hash_cost"] = getattr(args, "password_hash_cost", None)
        config = config_from(parser, given, os.environ)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        if args.command == "add":
            password = _new_password(args.name)
            return asyncio.run(_add(config, args.name, password))
        if args.command == "remove":
            return asyncio.run(_remove(config, args.name))
        return asyncio.run(_list(config))
    except _Usage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (_Refused, DatabaseError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return REFUSED


def _new_password(name: str) -> str:
    """The new user's password: asked twice on a terminal, else one line of stdin."""
    if schemas.USERNAME.match(name) is None:
        raise _Usage(f"invalid username {name!r}: 3-32 characters of A-Z, a-z, 0-9, _ . -")
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            raise _Usage("the passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    length = len(password)
    if not 8 <= length <= 1024:
        raise _Usage(f"the password must be 8 to 1024 characters (got {length})")
    return password


async def _open(config: Config, *, create: bool) -> Backend:
    path = config.sqlite_path
    if not create and path is not None and not path.exists():
        raise _Refused(f"no database at {path}")
    try:
        return await open_store(
            config.store_url,
            migrations_root=config.migrations_dir.parent,
            synchronous=config.sqlite_synchronous,
            readers=1,
        )
    except StoreUnavailable as exc:
        raise _Refused(f"cannot reach the store: {exc}") from None


async def _add(config: Config, name: str, password: str) -> int:
    backend = await _open(config, create=True)
    passwords = Passwords(config.password_hash_cost, workers=1)
    try:
        accounts = backend.accounts
        if await accounts.username_taken(name):
            raise _Refused(f"user {name} exists")
        password_hash = await asyncio.to_thread(passwords.hash_sync, password)
        try:
            user = await accounts.create_user(name, password_hash, utc_now())
        except UsernameTaken:
            raise _Refused(f"user {name} exists") from None
    finally:
        passwords.close()
        await backend.close()
    print(f"added user {user.username} (id {user.id})")
    return OK


async def _remove(config: Config, name: str) -> int:
    backend = await _open(config, create=False)
    try:
        accounts = backend.accounts
        user = await accounts.find_user(name)
        if user is None:
            raise _Refused(f"no user {name}")
        await accounts.remove_user(user.id, time.time())
    finally:
        await backend.close()
    print(f"removed user {user.username} (id {user.id}) with their sessions, tasks and events")
    return OK


async def _list(config: Config) -> int:
    backend = await _open(config, create=False)
    try:
        users = await backend.accounts.list_users()
    finally:
        await backend.close()
    rows = [("id", "username", "created_at", "tasks")]
    rows += [(str(u.id), u.username, u.created_at, str(u.tasks)) for u in users]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return OK
