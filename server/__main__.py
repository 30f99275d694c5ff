"""`python -m server` (and `python run.py`): parse the settings, then serve; or `users ...`,
or `migrate-store ...`."""

from __future__ import annotations

import sys
from contextlib import nullcontext

from .auth import SecretFileError
from .config import from_args
from .process import AlreadyRunning, InstanceLock, StartupError, fit_open_files
from .store.sqlite_db import DatabaseError
from .web.app import create_app
from .web.logs import setup_logging
from .web.serve import ListenError, listen, serve


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM (0); 1: cannot listen, 2: cannot use its files, 3: locked."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:  # `run.py users add|remove|list`: see server/admin.py
        from .admin import main as users

        return users(argv[1:])
    if argv[:1] == ["migrate-store"]:  # SQLite to PostgreSQL: see server/store/migrate.py
        try:
            from .store.migrate import main as migrate_store
        except ModuleNotFoundError as exc:  # the default install has no PostgreSQL driver
            if exc.name != "asyncpg":
                raise
            return _fail("migrate-store needs asyncpg: pip install -e '.[postgres]'", 2)
        return migrate_store(argv[1:])
    config = from_args(argv)
    setup_logging(config.log_level, config.log_format)
    try:
        config = fit_open_files(config)
        # Before anything is touched: a second server on this SQLite file stops here (a
        # shared store has no such limit: that is what it is for).
        path = config.sqlite_path
        lock = InstanceLock(config.lock_path, path) if path is not None else nullcontext()
        with lock:
            # Bound before the app starts, so a taken port leaves the database alone.
            sockets = listen(config.host, config.port)
            try:
                serve(create_app(config), sockets)
            finally:
                for sock in sockets:
                    sock.close()
    except AlreadyRunning as exc:
        return _fail(str(exc), 3)
    except (StartupError, DatabaseError, SecretFileError) as exc:
        return _fail(str(exc), 2)
    except ListenError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:  # e.g. the database folder is not writable
        return _fail(f"cannot start the server: {exc}", 1)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
