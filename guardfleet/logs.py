"""Logging for every guardfleet process: lines for people, or one JSON object per line
(`GUARDFLEET_LOG_FORMAT=json`) for log pipelines.

Each line carries the ids in scope where it was written: `request_id` (the API's X-Request-ID),
`job_id`, `batch_id` (a job of a batch, or the batch itself) and `worker` (the Celery node name
of a worker process). `scope()` sets them for a block; they live in a context variable, so each
asyncio task and each thread sees its own.

    {"time": "2026-11-30T03:12:09.412Z", "level": "INFO", "logger": "worker.service",
     "message": "job job_4f... succeeded (attempt 1)", "job_id": "job_4f...",
     "worker": "worker-cpu@host"}
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(name)s] %(message)s"

_ids: ContextVar[dict[str, str]] = ContextVar("guardfleet_log_ids")
_process: dict[str, str] = {}  # ids of the whole process (the worker's name)


@contextmanager
def scope(**ids: str | None) -> Iterator[None]:
    """Log lines written inside carry these ids (None leaves an id as it was)."""
    token = _ids.set({**_ids.get({}), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _ids.reset(token)


class _WithIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in {**_process, **_ids.get({})}.items():
            if not hasattr(record, name):  # an explicit `extra=` wins
                setattr(record, name, value)
        return True


class _Json(JsonFormatter):
    """UTC times with milliseconds, as log pipelines parse them without configuration."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure(fmt: LogFormat, level: str | int = "INFO", worker: str | None = None) -> None:
    """Send every log record (ours, Celery's, uvicorn's) to stderr in `fmt`, once per process."""
    if worker is not None:
        _process["worker"] = worker
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WithIds())
    if fmt == "json":
        handler.setFormatter(
            _Json(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
        # Uvicorn's own handlers print text; send its records through this one instead. Its
        # access lines go too: the API logs each request itself, with the request id.
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        logging.getLogger("uvicorn.access").disabled = True
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.captureWarnings(True)  # warnings.warn (Celery's root warning...) as records too
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
