"""`run.py migrate-store`: copy a SQLite database into an empty PostgreSQL one, all or nothing.

What is copied, table by table (`TABLES`, column by column with an explicit conversion):
users with their password hashes, sessions, tasks, every event, subscription rows, API
keys, share tokens, idempotency keys, and the meta rows (the instance id, which tokens
name); the JWT secret kept beside the SQLite file goes into meta as `jwt_secret`, where
nodes started without --jwt-secret find it (`PostgresAccounts.shared_secret`). So the
tokens issued before the move stay valid.

Not copied: `job_leases`, which are stale once the SQLite server has stopped (the SQLite
store itself deletes them at start): the first node to start takes the jobs over at once.
Subscription rows left open by a server that did not stop cleanly are closed at the time
of the copy, as the SQLite store would close them at its next start.

How: the source is opened and migrated with `sqlite_db.open_database`, and its write lock
is held for the whole copy, so nothing (a `run.py users` command) changes it meanwhile;
the target is migrated with `postgres_db.migrate`, then one transaction on one connection
locks the tables, checks that the target holds no users and no tasks, streams each table
in chunks of `CHUNK_ROWS` through binary COPY, stores the meta rows, moves the identity
sequences past the copied ids, compares every table's row count with the source's, and
commits. Any failure rolls the whole transaction back: the target is left as it was.

The schemas differ (see migrations/sqlite and migrations/postgres): integers become
BIGINT (INTEGER for an idempotent answer's status), SQLite's NUMERIC progress becomes
DOUBLE PRECISION, rowids become the `row_no` identity columns that order tasks and
sessions (so list cursors given out before the move still work), timestamps and JSON stay
text. Each value is checked on the way (a SQLite column holds any type); text with a NUL
character, which PostgreSQL cannot store, stops the copy with the row to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ..models import utc_now
from .postgres_db import connect, is_unavailable, migrate, unavailable, where
from .records import StoreUnavailable
from .sqlite_db import Database, DatabaseError, open_database

#: Rows read from SQLite and sent to PostgreSQL at a time: a large database never sits in
#: memory (an event is at most about 200 KiB, most are a few hundred bytes).
CHUNK_ROWS = 1000

OK, FAILED, REFUSED, LOCKED = 0, 1, 2, 3


class MigrationError(Exception):
    """The copy cannot be made or failed; nothing was written to the target."""


class Refused(MigrationError):
    """What was given cannot be used as it is (exit status 2): the message says why."""


class TargetNotEmpty(Refused):
    """The target already holds users or tasks (exit status 2)."""


# -- conversions: SQLite values (any type in any column) to what PostgreSQL's column takes --


def _integer(value: object) -> int:
    if type(value) is not int:
        raise ValueError(f"{value!r} is not an integer")
    return value


def _int32(value: object) -> int:
    number = _integer(value)
    if not -(2**31) <= number < 2**31:
        raise ValueError(f"{number} does not fit a PostgreSQL INTEGER")
    return number


def _real(value: object) -> float:
    # SQLite's NUMERIC gives 50 for 50 and 12.5 for 12.5; PostgreSQL's column is float8.
    if type(value) not in (int, float):
        raise ValueError(f"{value!r} is not a number")
    return float(value)  # type: ignore[arg-type]


def _text(value: object) -> str:
    if type(value) is not str:
        raise ValueError(f"{value!r} is not text")
    if "\x00" in value:
        raise ValueError("holds a NUL character, which PostgreSQL text cannot store")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _optional_real(value: object) -> float | None:
    return None if value is None else _real(value)


Convert = Callable[[object], object]


@dataclass(frozen=True)
class Column:
    """One PostgreSQL column, where its value comes from in SQLite, and how it converts."""

    name: str
    convert: Convert
    #: The SQLite expression read (default: the column of the same name).
    read: str = ""
    #: The SQLite column it reads ("": the one of the same name; None: the rowid).
    sqlite: str | None = ""

    @property
    def select(self) -> str:
        return self.read or self.name

    @property
    def sqlite_column(self) -> str | None:
        return None if self.sqlite is None else self.sqlite or self.name


@dataclass(frozen=True)
class Table:
    """A table copied row by row, read in keyset order."""

    name: str
    columns: tuple[Column, ...]
    #: PostgreSQL names of the columns whose SQLite expressions order the chunks (unique).
    key: tuple[str, ...]
    #: PostgreSQL identity columns, advanced past the copied values.
    identities: tuple[str, ...] = ()

    @property
    def key_positions(self) -> tuple[int, ...]:
        names = [c.name for c in self.columns]
        return tuple(names.index(k) for k in self.key)


def _c(name: str, convert: Convert) -> Column:
    return Column(name, convert)


def _rowid(name: str) -> Column:
    """A PostgreSQL identity column that keeps the SQLite rowid's order (and values)."""
    return Column(name, _integer, "rowid", None)


#: Parents before children, so every foreign key finds its row.
TABLES: tuple[Table, ...] = (
    Table(
        "users",
        (
            _c("id", _integer),
            _c("username", _text),
            _c("password_hash", _text),
            _c("created_at", _text),
            _c("stored_bytes", _integer),
        ),
        key=("id",),
        identities=("id",),
    ),
    Table(
        "sessions",
        (
            _c("id", _text),
            _rowid("row_no"),  # orders a user's logins, as rowid does
            _c("user_id", _integer),
            _c("created_at", _text),
            _c("expires_at", _text),
            _c("revoked_at", _optional_text),
        ),
        key=("row_no",),
        identities=("row_no",),
    ),
    Table(
        "tasks",
        (
            _c("id", _text),
            _rowid("row_no"),  # the tie-break of list cursors
            _c("user_id", _integer),
            _c("kind", _text),
            _c("params", _text),
            _c("status", _text),
            _c("progress", _real),
            _c("step", _optional_text),
            _c("message", _optional_text),
            _c("result", _optional_text),
            _c("error", _optional_text),
            _c("seq", _integer),
            _c("checkpoint", _optional_text),
            _c("created_at", _text),
            _c("updated_at", _text),
            _c("started_at", _optional_text),
            _c("finished_at", _optional_text),
            _c("bytes", _integer),
            _c("parent_id", _optional_text),
            _c("weight", _real),
            _c("depth", _integer),
            _c("finish", _int32),
            _c("tree", _optional_text),
            _c("rate", _optional_real),
            _c("eta_s", _optional_real),
            _c("meter", _optional_text),
        ),
        key=("row_no",),
        identities=("row_no",),
    ),
    Table(
        "task_events",
        (
            _c("task_id", _text),
            _c("seq", _integer),
            _c("event", _text),
            _c("status", _text),
            _c("progress", _real),
            _c("step", _optional_text),
            _c("message", _optional_text),
            _c("result", _optional_text),
            _c("error", _optional_text),
            _c("ts", _text),
            _c("bytes", _integer),
            _c("rate", _optional_real),
            _c("eta_s", _optional_real),
            _c("child", _optional_text),
        ),
        key=("task_id", "seq"),
    ),
    Table(
        "subscriptions",
        (
            _c("id", _integer),
            _c("connection_id", _text),
            _c("user_id", _integer),
            _c("task_id", _text),
            _c("subscribed_at", _text),
            # Left open by a server that stopped without closing it: closed now (`:now`).
            Column("unsubscribed_at", _text, "coalesce(unsubscribed_at, :now)"),
            _c("node_id", _text),
        ),
        key=("id",),
        identities=("id",),
    ),
    Table(
        "api_keys",
        (
            _c("id", _text),
            _c("user_id", _integer),
            _c("name", _text),
            _c("scopes", _text),
            _c("secret_hash", _text),
            _c("created_at", _text),
            _c("last_used_at", _optional_text),
            _c("revoked_at", _optional_text),
        ),
        key=("id",),
    ),
    Table(
        "share_tokens",
        (
            _c("id", _text),
            _c("task_id", _text),
            _c("user_id", _integer),
            _c("secret_hash", _text),
            _c("created_at", _text),
            _c("expires_at", _text),
            _c("revoked_at", _optional_text),
        ),
        key=("id",),
    ),
    Table(
        "idempotency_keys",
        (
            _c("user_id", _integer),
            _c("key", _text),
            _c("fingerprint", _text),
            _c("status", _int32),
            _c("body", _text),
            _c("created_at", _text),
        ),
        key=("user_id", "key"),
    ),
)
#: Copied apart (upserted: the target's migration made an instance id of its own).
META = "meta"
_META_TABLE = Table(META, (_c("key", _text), _c("value", _text)), key=("key",))
#: Tables of both schemas that are deliberately not copied, and why.
NOT_COPIED = {
    "job_leases": "stale once the SQLite server stopped; the first node takes the jobs over",
    "schema_migrations": "each database records its own",
}
#: Target tables locked for the copy: nodes started meanwhile wait, and so does a second
#: migrate-store, which then finds the target full.
_LOCKED = ", ".join([t.name for t in TABLES] + [META])


@dataclass(frozen=True)
class Copied:
    """What happened to one table: rows copied, or a note."""

    table: str
    rows: int | None
    note: str = ""

    def line(self, width: int) -> str:
        if self.rows is None:
            return f"{self.table:<{width}}  {self.note}"
        text = f"{self.table:<{width}}  {self.rows:>9,} row{'' if self.rows == 1 else 's'}"
        return f"{text}  ({self.note})" if self.note else text


@dataclass(frozen=True)
class Report:
    tables: list[Copied]
    target: str
    seconds: float

    @property
    def rows(self) -> int:
        return sum(t.rows or 0 for t in self.tables)

    def lines(self, source: Path) -> list[str]:
        width = max(len(t.table) for t in self.tables)
        summary = (
            f"copied {self.rows:,} rows from {source} to PostgreSQL at {self.target}"
            f" in {self.seconds:.1f} s; every table's row count checked"
        )
        return [t.line(width) for t in self.tables] + [summary]


# -- the source -----------------------------------------------------------------------------


async def _sqlite_columns(db: Database, table: str) -> set[str]:
    return {row["name"] for row in await db.fetch(f"PRAGMA table_info({table})")}


async def _check_source(db: Database) -> None:
    """Refuse a source with a table or a column this version does not know how to copy."""
    rows = await db.fetch(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    known = {t.name for t in TABLES} | {META} | set(NOT_COPIED)
    unknown = sorted({row["name"] for row in rows} - known)
    if unknown:
        raise Refused(f"the SQLite database has tables migrate-store does not copy: {unknown}")
    for table in (*TABLES, _META_TABLE):
        expected = {c.sqlite_column for c in table.columns} - {None}
        found = await _sqlite_columns(db, table.name)
        if found != expected:
            raise Refused(
                f"the SQLite table {table.name} has columns {sorted(found)}, migrate-store"
                f" copies {sorted(expected)}: this version cannot copy that database"
            )


async def _count(db: Database, table: str, where: str = "") -> int:
    return int((await db.fetch(f"SELECT count(*) FROM {table} {where}"))[0][0])


async def _source_rows(
    db: Database, table: Table, chunk_rows: int, now: str
) -> AsyncGenerator[tuple[Any, ...], None]:
    """The table's rows, converted, read `chunk_rows` at a time in key order."""
    select = ", ".join(c.select for c in table.columns)
    keys = [table.columns[i].select for i in table.key_positions]
    order = ", ".join(keys)
    after = f"({order}) > ({', '.join(f':k{i}' for i in range(len(keys)))})"
    first = f"SELECT {select} FROM {table.name} ORDER BY {order} LIMIT :n"
    following = f"SELECT {select} FROM {table.name} WHERE {after} ORDER BY {order} LIMIT :n"
    params: dict[str, Any] = {"n": chunk_rows, "now": now}
    sql = first
    converts = [c.convert for c in table.columns]
    while True:
        rows = await db.fetch(sql, params, bulk=True)
        for row in rows:
            yield _converted(table, converts, row)
        if len(rows) < chunk_rows:
            return
        last = rows[-1]
        params.update({f"k{i}": last[p] for i, p in enumerate(table.key_positions)})
        sql = following


def _converted(table: Table, converts: Sequence[Convert], row: Any) -> tuple[Any, ...]:
    try:
        return tuple(convert(value) for convert, value in zip(converts, row, strict=True))
    except ValueError:
        pass
    # The slow path, only to say which value it was.
    key = ", ".join(f"{table.key[j]}={row[p]!r}" for j, p in enumerate(table.key_positions))
    for column, value in zip(table.columns, row, strict=True):
        try:
            column.convert(value)
        except ValueError as exc:
            hint = ""
            if isinstance(value, str) and "\x00" in value:
                hint = (
                    f"; remove it in the SQLite file first, e.g. UPDATE {table.name} SET"
                    f" {column.name} = replace({column.name}, char(0), '')"
                    f" WHERE instr({column.name}, char(0)) > 0"
                )
            raise MigrationError(
                f"{table.name}.{column.name} of the row {key} {exc}{hint}; nothing was copied"
            ) from None
    raise AssertionError("unreachable")


# -- the target -----------------------------------------------------------------------------


async def _check_target(conn: asyncpg.Connection) -> None:
    """Refuse a target whose tables are not the ones this version copies into."""
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
        [t.name for t in (*TABLES, _META_TABLE)],
    )
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["table_name"], set()).add(row["column_name"])
    for table in (*TABLES, _META_TABLE):
        expected = {c.name for c in table.columns}
        if found.get(table.name) != expected:
            raise Refused(
                f"the PostgreSQL table {table.name} has columns"
                f" {sorted(found.get(table.name, ()))}, migrate-store copies"
                f" {sorted(expected)}: this version cannot copy into that database"
            )


async def _refuse_if_full(conn: asyncpg.Connection, target: str) -> None:
    users, tasks = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM tasks)"
    )
    if users or tasks:
        raise TargetNotEmpty(
            f"PostgreSQL at {target} is not empty (users: {users}, tasks: {tasks});"
            " migrate-store copies only into a database without users or tasks;"
            " nothing was copied"
        )


async def _advance(conn: asyncpg.Connection, table: Table) -> None:
    """Move the table's identity sequences past the copied values: the next id is new."""
    for column in table.identities:
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column}'),"
            f" coalesce((SELECT max({column}) FROM {table.name}), 0) + 1, false)"
        )


async def _copy_meta(
    db: Database, conn: asyncpg.Connection, secret: str | None, secret_from: str
) -> Copied:
    rows = [(_text(r["key"]), _text(r["value"])) for r in await db.fetch("SELECT * FROM meta")]
    meta = dict(rows)
    if "instance_id" not in meta:
        raise MigrationError("the SQLite database has no meta.instance_id; nothing was copied")
    if secret is not None:
        meta["jwt_secret"] = secret
    # Replaces what the target's migration (and any node started on it) made.
    await conn.executemany(
        "INSERT INTO meta (key, value) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        list(meta.items()),
    )
    stored = dict(
        await conn.fetch("SELECT key, value FROM meta WHERE key = ANY($1::text[])", [*meta])
    )
    if stored != meta:
        raise MigrationError("meta differs in the target after the copy; nothing was copied")
    note = f"instance_id {meta['instance_id']}; "
    if secret is None:
        note += f"no JWT secret at {secret_from}: start every node with the old --jwt-secret"
    else:
        note += f"jwt_secret from {secret_from}"
    return Copied(META, None, note)


async def _copy_tables(
    db: Database,
    conn: asyncpg.Connection,
    counts: dict[str, int],
    chunk_rows: int,
    now: str,
) -> list[Copied]:
    done = []
    for table in TABLES:
        rows = _source_rows(db, table, chunk_rows, now)
        try:
            status = await conn.copy_records_to_table(
                table.name, records=rows, columns=[c.name for c in table.columns]
            )
        except asyncpg.PostgresError as exc:
            if is_unavailable(exc):
                raise
            # asyncpg's text has the DETAIL line (which row, which key) too.
            raise MigrationError(f"copying {table.name} failed: {exc}; nothing was copied") from exc
        finally:
            await rows.aclose()  # a COPY that failed half-way left it suspended
        copied = int(status.rsplit(" ", 1)[-1])
        if copied != counts[table.name]:
            raise MigrationError(
                f"{table.name}: {counts[table.name]} rows in SQLite, {copied} copied;"
                " nothing was copied"
            )
        await _advance(conn, table)
        note = ""
        if table.name == "subscriptions":
            left_open = await _count(db, table.name, "WHERE unsubscribed_at IS NULL")
            if left_open:
                note = f"{left_open} left open by the stopped server closed at {now}"
        done.append(Copied(table.name, copied, note))
    return done


async def _check_counts(conn: asyncpg.Connection, counts: dict[str, int]) -> None:
    for name, expected in counts.items():
        found = await conn.fetchval(f"SELECT count(*) FROM {name}")
        if found != expected:
            raise MigrationError(
                f"{name}: {expected} rows in SQLite, {found} in PostgreSQL; nothing was copied"
            )


async def copy_store(
    source: Path,
    target_url: str,
    *,
    migrations_root: Path,
    secret: str | None,
    secret_from: str = "",
    chunk_rows: int = CHUNK_ROWS,
) -> Report:
    """Copy the SQLite database at `source` into the PostgreSQL database at `target_url`.

    `secret` is the JWT secret of the SQLite server (None: it had none in a file), stored
    in the target's meta. The caller holds the source's lock file.

    Raises:
        Refused: the source is missing or not copyable, or the target's schema is not ours.
        TargetNotEmpty: the target holds users or tasks.
        MigrationError: the copy failed; nothing was written to the target.
        StoreUnavailable: PostgreSQL cannot be reached or stopped serving.
        DatabaseError: the SQLite file cannot be used, or the target's schema is newer.
    """
    if not source.is_file():
        raise Refused(f"no SQLite database at {source}")
    started = time.monotonic()
    target = where(target_url)
    db = await open_database(source, migrations_root / "sqlite", readers=1)
    try:
        await _hold_write_lock(db, source)
        try:
            await _check_source(db)
            counts = {t.name: await _count(db, t.name) for t in TABLES}
            await migrate(target_url, migrations_root / "postgres")
            conn = await connect(target_url, command_timeout=None)
            try:
                await _check_target(conn)
                now = utc_now()
                async with conn.transaction():
                    await conn.execute(f"LOCK TABLE {_LOCKED} IN EXCLUSIVE MODE")
                    await _refuse_if_full(conn, target)
                    copied = await _copy_tables(db, conn, counts, chunk_rows, now)
                    copied.append(await _copy_meta(db, conn, secret, secret_from))
                    await _check_counts(conn, counts)
            except Exception as exc:
                if is_unavailable(exc):
                    raise unavailable(exc, target_url) from exc
                raise
            finally:
                await conn.close()
        finally:
            await db.writer.run(_rollback, transaction=False)
    finally:
        await db.close()
    copied += [Copied(name, None, f"not copied: {why}") for name, why in NOT_COPIED.items()]
    return Report(copied, target, time.monotonic() - started)


async def _hold_write_lock(db: Database, source: Path) -> None:
    """BEGIN IMMEDIATE on the writer, left open: nobody writes the file until `_rollback`."""
    try:
        await db.writer.run(lambda conn: conn.execute("BEGIN IMMEDIATE"), transaction=False)
    except Exception as exc:  # sqlite3.OperationalError: database is locked
        raise MigrationError(
            f"{source} is being written by another process (a `run.py users` command?): {exc}"
        ) from exc


def _rollback(conn: Any) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# -- the command ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py migrate-store",
        description=(
            "Copy a SQLite database (users with their password hashes, sessions, tasks,"
            " every event, subscriptions, API keys, share tokens, idempotency keys, the"
            " instance id and the JWT secret kept beside the file) into an empty PostgreSQL"
            " database, in one transaction: all or nothing. Job leases are not copied (they"
            " are stale once the server stopped). Stop the server first: the SQLite lock file"
            " keeps this command from running beside it."
        ),
        epilog=(
            "Exit status: 0 copied; 1 failed (PostgreSQL unreachable, the copy failed:"
            " nothing was copied); 2 refused (bad arguments, no such SQLite database, a"
            " target that holds users or tasks, an unsafe secret file); 3 a server is using"
            " the SQLite database."
        ),
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="sqlite:///FILE",
        required=True,
        help="the SQLite database to copy (e.g. sqlite:///data/app.db)",
    )
    parser.add_argument(
        "--to",
        dest="target",
        metavar="postgresql://USER:PASSWORD@HOST:PORT/DB",
        required=True,
        help="the PostgreSQL database to copy into; its tables are created if needed",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """`run.py migrate-store --from sqlite:///… --to postgresql://…`; returns the exit status."""
    from ..auth import SecretFileError, read_secret
    from ..config import PROJECT_ROOT
    from ..process import AlreadyRunning, InstanceLock
    from . import parse_store_url

    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else REFUSED
    try:
        source, target = parse_store_url(args.source), parse_store_url(args.target)
    except ValueError as exc:
        return _fail(str(exc), REFUSED)
    if source.kind != "sqlite" or source.path is None:
        return _fail(f"--from must be sqlite:///FILE, not {args.source!r}", REFUSED)
    if target.kind != "postgresql":
        return _fail("--to must be postgresql://USER:PASSWORD@HOST:PORT/DB", REFUSED)
    path = source.path
    if not path.is_file():
        return _fail(f"no SQLite database at {path}", REFUSED)
    secret_path = path.parent / (path.name + ".jwt-secret")
    try:
        # Before the database is opened: a server on it (or another copy) stops this here.
        with InstanceLock(path.parent / (path.name + ".lock"), path):
            secret = read_secret(secret_path)
            report = asyncio.run(
                copy_store(
                    path,
                    target.url,
                    migrations_root=PROJECT_ROOT / "migrations",
                    secret=secret,
                    secret_from=str(secret_path),
                )
            )
    except AlreadyRunning as exc:
        return _fail(f"{exc}; stop it first", LOCKED)
    except (Refused, SecretFileError) as exc:
        return _fail(str(exc), REFUSED)
    except (MigrationError, StoreUnavailable) as exc:
        return _fail(str(exc), FAILED)
    except DatabaseError as exc:  # the file is not SQLite, a schema newer than ours
        return _fail(str(exc), REFUSED)
    for line in report.lines(path):
        print(line)
    return OK


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status
