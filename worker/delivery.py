"""The webhook delivery worker: `python -m worker.delivery` (no GPU, no torch).

It consumes the `webhooks` queue, one attempt per task, and runs a small thread that moves
deliveries whose retry is due from the Redis sorted set back onto the queue. A due entry is
*leased* (pushed LEASE_S into the future) rather than removed when it is queued, so a crash
between taking it and queueing it only delays the attempt; the task removes it when it runs.
"""

from __future__ import annotations

import argparse
import logging
import random
import socket
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from guardfleet.keys import QUEUE_WEBHOOKS, TASK_DELIVER, WEBHOOKS_DUE
from guardfleet.queueing import make_celery
from guardfleet.settings import get_settings
from guardfleet.webhooks import DeliveryStore, record
from worker.webhook_transport import WebhookSender, attempt

log = logging.getLogger(__name__)

LEASE_S = 60.0
POLL_S = 0.25
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


def create_app() -> Celery:
    app = make_celery(get_settings())
    app.conf.update(worker_pool="threads", worker_concurrency=16, worker_prefetch_multiplier=1)
    return app


app = create_app()
_settings = get_settings()
_redis = redis.Redis.from_url(
    _settings.redis_url,
    socket_timeout=_settings.redis_timeout_s,
    socket_connect_timeout=_settings.redis_timeout_s,
)
_store = DeliveryStore(_redis, _settings.result_ttl_s)
_http = WebhookSender()
_rng = random.Random()
_stop = threading.Event()


@app.task(name=TASK_DELIVER)
def deliver_webhook(resource_id: str) -> None:
    _redis.zrem(WEBHOOKS_DUE, resource_id)
    delivery = _store.get(resource_id)
    if delivery is None or delivery.status != "pending":
        return
    outcome = attempt(delivery, _settings, _http)
    delivery = record(delivery, outcome, _settings, _rng)
    _store.save(resource_id, delivery)
    if delivery.next_attempt_at is not None:
        _store.due_at(resource_id, delivery.next_attempt_at)
    log.info(
        "webhook %s to %s: attempt %d %s (%s)",
        delivery.webhook_id,
        delivery.url,
        len(delivery.attempts),
        outcome.status,
        outcome.attempt.status_code or outcome.attempt.error,
    )


def _requeue_due() -> None:
    claim = _redis.register_script(_CLAIM_DUE)
    while not _stop.wait(POLL_S):
        try:
            now = time.time()
            for member in claim(keys=[WEBHOOKS_DUE], args=[now, now + LEASE_S]):
                app.send_task(TASK_DELIVER, args=[member.decode()], queue=QUEUE_WEBHOOKS)
        except redis.RedisError as exc:
            log.warning("could not re-queue due webhooks: %s", exc)


@worker_ready.connect
def _start_scheduler(**_: Any) -> None:
    threading.Thread(target=_requeue_due, name="webhook-retries", daemon=True).start()


@worker_shutdown.connect
def _stop_scheduler(**_: Any) -> None:
    _stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"webhooks@{socket.gethostname()}")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
    )
    app.worker_main(
        [
            "worker",
            "-n",
            args.name,
            "-Q",
            QUEUE_WEBHOOKS,
            "--loglevel",
            args.loglevel,
            "--without-gossip",
        ]
    )


if __name__ == "__main__":
    main()
