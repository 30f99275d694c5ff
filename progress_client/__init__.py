"""Python SDK for the task-progress server: `AsyncClient`, `Client` (sync), and the data.

    from progress_client import Client
    client = Client("http://127.0.0.1:8080", api_key="pk_...")
    task = client.create_task("import", {"file": "a.csv"})
    task.report(40, step="parse")
    task.complete({"rows": 5000})

See docs/sdk.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio import AsyncClient, AsyncTask  # noqa: E402
from .errors import ApiError, ProgressError, ServerUnreachable, WatchStopped  # noqa: E402
from .models import TERMINAL_STATUSES, ApiKey, Event, ShareLink, Task, Update  # noqa: E402
from .retry import Backoff, RetryNotice  # noqa: E402
from .sync import Client, SyncTask  # noqa: E402
from .watcher import WatchSettings  # noqa: E402

__all__ = [
    "TERMINAL_STATUSES",
    "ApiError",
    "ApiKey",
    "AsyncClient",
    "AsyncTask",
    "Backoff",
    "Client",
    "Event",
    "ProgressError",
    "RetryNotice",
    "ServerUnreachable",
    "ShareLink",
    "SyncTask",
    "Task",
    "Update",
    "WatchSettings",
    "WatchStopped",
    "__version__",
]
