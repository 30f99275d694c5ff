"""`python -m server` (and `python run.py`): parse the settings, then serve; or `users ...`."""

from __future__ import annotations

import sys

from aiohttp import web

from .config import from_args
from .store.sqlite_db import DatabaseError
from .web.app import create_app
from .web.logs import AccessLogger, setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:  # `run.py users add|remove|list`: see server/admin.py
        from .admin import main as users

        return users(argv[1:])
    config = from_args(argv)
    setup_logging(config.log_level, config.log_format)
    try:
        app = create_app(config)
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            access_log_class=AccessLogger,
            shutdown_timeout=config.shutdown_timeout,
            print=None,
        )
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken, or the database folder is not writable
        print(f"error: cannot start the server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
