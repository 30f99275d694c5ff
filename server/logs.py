"""Logging set-up: one key=value line per event, and an access log that never shows a query.

Query strings are left out of the access log because WebSocket clients may pass their
token as `?token=`; URIs end up in logs.
"""

from __future__ import annotations

import logging
import sys

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=LOG_FORMAT, force=True)


class AccessLogger(AbstractAccessLogger):
    """`http.request method=GET path=/x status=200 ms=1.2` — path only, never the query."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "http.request method=%s path=%s status=%s ms=%.1f peer=%s",
            request.method,
            request.path,
            response.status,
            time * 1000,
            request.remote,
        )
