"""The delivery worker: `python -m worker.delivery` (no GPU, no torch). It sends webhooks and
fans batches out.

Batches: a thread takes stored batches from their parts' due sets with a lease and queues their
items (`guardfleet.batches.FanOut`); the lease is renewed with every chunk, so a worker that dies
mid-batch leaves it to the next sweep of any delivery worker, which resumes at the cursor.

Webhooks: it consumes the `webhooks` queue, one attempt per task, and runs a small thread (the
sweeper) that moves deliveries whose time has come from the outbox (a Redis sorted set per part)
onto the queue. A due entry is *leased* (pushed GUARDFLEET_WEBHOOK_LEASE_S into the future)
rather than removed when it is queued, so a crash between taking it and queueing it, or a lost
task, only delays the attempt; the task settles the entry (next attempt's time, or removed) once
it has recorded it.

Copies of one delivery's task (a lease that ran out behind a backlog, a redelivered message)
are harmless: an attempt runs only under the delivery's lock and only once it is due.
"""

from __future__ import annotations

import argparse
import logging
import random
import socket
import threading
import uuid
from typing import Any

import kombu.exceptions
import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from guardfleet import logs, redis_conn
from guardfleet.fanout import FanOut
from guardfleet.keys import (
    QUEUE_WEBHOOKS,
    TASK_DELIVER,
    batches_due,
    id_tag,
    part_tags,
    webhooks_due,
)
from guardfleet.queueing import make_celery
from guardfleet.schemas import utcnow
from guardfleet.settings import get_settings
from guardfleet.webhooks import DeliveryStore, record
from worker.consume import run_worker
from worker.leases import DueSet
from worker.webhook_transport import WebhookSender, attempt

log = logging.getLogger(__name__)

POLL_S = 0.25


def create_app() -> Celery:
    app = make_celery(get_settings())
    app.conf.update(worker_pool="threads", worker_concurrency=16, worker_prefetch_multiplier=1)
    return app


app = create_app()
_settings = get_settings()
_redis = redis_conn.connect(_settings)
_store = DeliveryStore(_redis, _settings.result_ttl_s)
_http = WebhookSender()
_rng = random.Random()
_stop = threading.Event()


@app.task(name=TASK_DELIVER)
def deliver_webhook(resource_id: str) -> None:
    kind = "batch_id" if resource_id.startswith("batch_") else "job_id"
    with logs.scope(**{kind: resource_id}):
        _deliver_locked(resource_id)


def _deliver_locked(resource_id: str) -> None:
    token = uuid.uuid4().hex
    # Longer than one attempt can take; a holder that died releases it by expiry.
    if not _store.lock(resource_id, token, 2 * _settings.webhook_timeout_s + 10):
        log.info("webhook %s: an attempt is already running; this copy stops", resource_id)
        return
    try:
        _deliver(resource_id)
    finally:
        _store.unlock(resource_id, token)


def _deliver(resource_id: str) -> None:
    delivery = _store.get(resource_id)
    if delivery is None or delivery.status != "pending":  # expired, or settled by another copy
        _redis.zrem(webhooks_due(id_tag(resource_id)), resource_id)
        return
    if delivery.next_attempt_at is not None and delivery.next_attempt_at > utcnow():
        # An early copy: put the entry back to its real time instead of attempting now.
        due = {resource_id: delivery.next_attempt_at.timestamp()}
        _redis.zadd(webhooks_due(id_tag(resource_id)), due)
        return
    outcome = attempt(delivery, _settings, _http)
    delivery = record(delivery, outcome, _settings, _rng)
    _store.settle(resource_id, delivery, outcome.status)
    log.info(
        "webhook %s to %s: attempt %d %s (%s)",
        delivery.webhook_id,
        delivery.url,
        len(delivery.attempts),
        outcome.status,
        outcome.attempt.status_code or outcome.attempt.error,
    )


def _requeue_due() -> None:
    outbox = DueSet(_redis, [webhooks_due(t) for t in part_tags(_settings.store_parts)])
    while not _stop.wait(POLL_S):
        try:
            for resource_id in outbox.take_due(_settings.webhook_lease_s):
                app.send_task(TASK_DELIVER, args=[resource_id], queue=QUEUE_WEBHOOKS)
        except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
            # The leases bring back what was taken; a broker error (kombu's, not Redis's) must
            # not end this loop either, or no retry would be queued again.
            log.warning("could not re-queue due webhooks: %s", exc)


def _fan_out_due() -> None:
    # One batch due from each part at a time: a batch not reached before its lease ends is
    # taken by another delivery worker, and the fan-out's cursor keeps the two apart.
    due = DueSet(_redis, [batches_due(t) for t in part_tags(_settings.store_parts)])
    fan_out = FanOut(
        _redis,
        app,
        _settings.result_ttl_s,
        _settings.batch_fanout_chunk,
        _settings.batch_fanout_lease_s,
        _settings.job_stale_s,
        redis_conn.connect(_settings, broker=True) if _settings.separate_broker else None,
    )
    while not _stop.wait(POLL_S):
        try:
            for batch_id in due.take_due(_settings.batch_fanout_lease_s, limit=1):
                with logs.scope(batch_id=batch_id):
                    written = fan_out.run(batch_id, _stop)
                    log.info("batch %s: %d items queued", batch_id, written)
        except redis.RedisError as exc:  # the lease brings the batch back
            log.warning("could not fan out a batch: %s", exc)


_fan_out = threading.Thread(target=_fan_out_due, name="batch-fan-out", daemon=True)


@worker_ready.connect
def _start_scheduler(**_: Any) -> None:
    threading.Thread(target=_requeue_due, name="webhook-retries", daemon=True).start()
    _fan_out.start()


@worker_shutting_down.connect
def _stop_scheduler(**_: Any) -> None:
    # At the signal, not at the end of Celery's shutdown: a batch being fanned out is handed
    # back after its current chunk, due at once for another delivery worker.
    _stop.set()


@worker_shutdown.connect
def _wait_for_fan_out(**_: Any) -> None:
    if _fan_out.is_alive():
        _fan_out.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"webhooks@{socket.gethostname()}")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    logs.configure(_settings.log_format, args.loglevel, worker=args.name)
    raise SystemExit(
        run_worker(
            app,
            name=args.name,
            queues=[QUEUE_WEBHOOKS],
            loglevel=args.loglevel,
            quiet=_settings.log_format == "json",
        )
    )


if __name__ == "__main__":
    main()
