"""The worker's Celery app: `celery -A worker.celery_app worker ...` (or `python -m worker`).

The model is loaded and warmed up in `worker_init`, before the consumer starts, so a worker
never takes a job it cannot run; the heartbeat starts at `worker_ready`.

Leaving is as deliberate as arriving:
- SIGTERM (Celery's warm shutdown) drains: the running batch finishes and is written, jobs not
  yet started are handed back to their queue (a `Reject` with requeue), never failed.
- A dead or stuck model thread makes the heartbeat leave the fleet, hands every job back and
  stops the worker with exit status 4 (forcibly if the warm shutdown itself hangs), so its
  supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state

from guardfleet.keys import TASK_RUN_JOB
from guardfleet.queueing import make_celery
from guardfleet.settings import get_settings
from worker.errors import HandBack
from worker.service import WorkerService

log = logging.getLogger(__name__)


def create_app() -> Celery:
    settings = get_settings()
    app = make_celery(settings)
    threads = settings.worker_threads or 2 * settings.max_batch_size
    app.conf.update(
        worker_pool="threads",
        # More task threads than the batch size, so that a full batch can be waiting on the
        # model thread while the next requests are already taken off the queue. A prefetch
        # multiplier of 1 takes at most one message per thread (acknowledged late, so a message
        # counts until its job has ended), and a thread starts its job as soon as it has one:
        # what a killed worker held is jobs under a lease, which come back when it lapses.
        worker_concurrency=threads,
        worker_prefetch_multiplier=1,
    )
    return app


app = create_app()
_service: WorkerService | None = None
EXIT_MODEL_FAILED = 4
FORCED_EXIT_AFTER_S = 30.0


def _stop_worker(reason: str) -> None:
    """Warm shutdown with a non-zero status, as SIGTERM would start it, from any thread; if
    that has not ended the process in time (a task thread stuck in torch), end it anyway."""
    log.critical("stopping the worker: %s", reason)
    state.should_stop = EXIT_MODEL_FAILED

    def force() -> None:
        log.critical("warm shutdown did not finish; exiting")
        logging.shutdown()
        os._exit(EXIT_MODEL_FAILED)

    timer = threading.Timer(FORCED_EXIT_AFTER_S, force)
    timer.daemon = True
    timer.start()


@worker_init.connect
def _load_model(**_: Any) -> None:
    global _service
    try:
        _service = WorkerService(get_settings(), app.send_task, on_problem=_stop_worker)
    except Exception:
        # Celery logs and swallows exceptions raised in signal handlers, which would leave a
        # worker consuming jobs with no model. Exit instead, so a supervisor sees the failure.
        log.critical("could not load the model; exiting", exc_info=True)
        logging.shutdown()
        os._exit(3)


@worker_ready.connect
def _announce(sender: Any, **_: Any) -> None:
    assert _service is not None
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    _service.announce(sender.hostname, queues)
    log.info("worker %s ready on %s", sender.hostname, _service.engine.device)


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    if _service is not None:
        _service.drain()


@worker_shutdown.connect
def _close(**_: Any) -> None:
    if _service is not None:
        _service.close()


@app.task(name=TASK_RUN_JOB, bind=True)
def run_job(self: Task, job_id: str, gen: int = 1) -> None:
    if _service is None:
        raise RuntimeError("worker model not loaded")
    try:
        lane = (self.request.delivery_info or {}).get("routing_key")
        _service.run(job_id, self.request.id, gen, lane)
    except HandBack as exc:
        log.warning("job %s handed back: %s", job_id, exc)
        raise Reject(str(exc), requeue=True) from exc
