"""The worker's Celery app: `celery -A worker.celery_app worker ...` (or `python -m worker`).

The model is loaded and warmed up in `worker_init`, before the consumer starts, so a worker
never takes a job it cannot run; the heartbeat starts at `worker_ready`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown

from guardfleet.keys import TASK_RUN_JOB
from guardfleet.queueing import make_celery
from guardfleet.settings import get_settings
from worker.service import WorkerService

log = logging.getLogger(__name__)


def create_app() -> Celery:
    settings = get_settings()
    app = make_celery(settings)
    threads = settings.worker_threads or 2 * settings.max_batch_size
    app.conf.update(
        worker_pool="threads",
        # More task threads than the batch size, so that a full batch can be waiting on the
        # model thread while the next requests are already taken off the queue. Each thread
        # holds one job; a prefetch multiplier of 1 reserves one more message per thread, so a
        # killed worker strands at most 2 x threads jobs, all redelivered after the visibility
        # timeout.
        worker_concurrency=threads,
        worker_prefetch_multiplier=1,
    )
    return app


app = create_app()
_service: WorkerService | None = None


@worker_init.connect
def _load_model(**_: Any) -> None:
    global _service
    try:
        _service = WorkerService(get_settings(), app.send_task)
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


@worker_shutdown.connect
def _close(**_: Any) -> None:
    if _service is not None:
        _service.close()


@app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    if _service is None:
        raise RuntimeError("worker model not loaded")
    _service.run(job_id)
