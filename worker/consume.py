"""Run a Celery worker in this process and return its exit status.

`Celery.worker_main` throws the worker's exit status away (it runs the CLI with click's
standalone mode off), so a worker that stopped on an unrecoverable error, or because its model
thread broke, would exit 0 and its supervisor would not know to restart it. Building the worker
as the `celery worker` command does keeps the status.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery


def run_worker(
    app: Celery, *, name: str, queues: Sequence[str], loglevel: str, quiet: bool = False
) -> int:
    """`quiet` leaves out Celery's start-up banner (plain text, for people)."""
    worker = app.Worker(
        hostname=name,
        queues=list(queues),
        loglevel=loglevel.upper(),
        without_gossip=True,
        quiet=quiet,
    )
    worker.start()
    return int(worker.exitcode or 0)
