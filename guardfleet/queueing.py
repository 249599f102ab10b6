"""The Celery app both services build from settings: the API to send by task name, the worker to
consume. Delivery guarantees (at-least-once) are set here, in one place."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu.entity import Exchange, Queue

from guardfleet.keys import (
    BROKER_ID,
    GPU_QUEUES,
    QUEUE_BULK,
    QUEUE_INTERACTIVE,
    QUEUE_WEBHOOKS,
    TASK_RUN_JOB,
)
from guardfleet.redis_conn import broker_options
from guardfleet.replies import as_text
from guardfleet.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("guardfleet", broker=settings.broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the job record, not in a Celery backend
        # At-least-once: a job is acknowledged only after its result is written, and a job
        # handed back is requeued (`Reject(requeue=True)`).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={
            # kombu keeps unacknowledged messages in memory, not in Redis: its Redis bookkeeping
            # (a hash and a sorted set, written when a message is taken and cleared when it is
            # acknowledged) cost 8 of the 24 commands a job took to run. A warm shutdown still
            # requeues what a worker holds; what a killed worker held comes back through the
            # job store instead: a started job's lease lapses, and the stale-job sweep publishes
            # a job that is still queued past its deadline (`worker.reconcile`).
            "ack_emulation": False,
            # Consume queues in the order given (interactive before bulk), not round-robin.
            "queue_order_strategy": "priority",
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            **broker_options(settings),
        },
        broker_connection_timeout=settings.redis_timeout_s,
        broker_connection_retry_on_startup=True,
        # The API must answer 503 promptly when Redis is down, not retry for a minute.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        # Each queue with its own direct exchange: a bare Queue(name) would inherit the default
        # exchange and routing key, binding every queue to the same key.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (*GPU_QUEUES, QUEUE_WEBHOOKS)
        ],
        task_default_queue=QUEUE_BULK,
        task_routes={TASK_RUN_JOB: {"queue": QUEUE_BULK}},
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,  # Flower's live task view
    )
    return app


# KEYS: the broker's id. ARGV: an id to take if it has none, its TTL. The id, renewed.
_BROKER_ID = """
local id = redis.call('GET', KEYS[1]) or ARGV[1]
redis.call('SET', KEYS[1], id, 'EX', ARGV[2])
return id
"""


def broker_id(broker: redis.Redis, ttl_s: int) -> str:
    """The id the broker keeps for itself (`keys.BROKER_ID`), made if it has none."""
    return as_text(broker.eval(_BROKER_ID, 1, BROKER_ID, uuid.uuid4().hex, ttl_s))


async def broker_id_async(broker: aioredis.Redis, ttl_s: int) -> str:
    return as_text(await broker.eval(_BROKER_ID, 1, BROKER_ID, uuid.uuid4().hex, ttl_s))


# A header of ours on every `run_job` message: when it was sent (seconds since the epoch, the
# sender's clock). Lists are first in, first out, so the oldest message still waiting on a lane
# dates every message that left it: the stale-job sweep finds by it a job whose message a worker
# took and died with (`worker.reconcile`).
SENT_AT = "sent_at"


def sent_header() -> dict[str, float]:
    return {SENT_AT: time.time()}


def queue_for(interactive: bool) -> str:
    return QUEUE_INTERACTIVE if interactive else QUEUE_BULK


def publish_jobs(app: Celery, job_ids: Sequence[str], queue: str, chunk: int = 1000) -> None:
    """Queue one `run_job` task per id, `chunk` messages per Redis round trip.

    A plain `send_task` costs about 1 ms a message here, most of it a round trip and Celery's
    retry wrapper: 50,000 batch items took 47 s. The same task messages published through
    kombu's publish batch (a Redis pipeline) take about 0.2 ms each.
    """
    with app.producer_or_acquire() as producer, producer.batch(max_size=chunk):
        for job_id in job_ids:
            headers, properties, body, _ = app.amqp.as_task_v2(
                str(uuid.uuid4()), TASK_RUN_JOB, args=[job_id]
            )
            producer.publish(
                body,
                exchange="",  # straight to the queue's list, as send_task does for direct queues
                routing_key=queue,
                headers={**headers, **sent_header()},
                serializer="json",
                retry=False,
                **properties,
            )


def task_message(app: Celery, job_id: str, queue: str) -> str:
    """The `run_job` message for `job_id` exactly as kombu's Redis transport puts it on the
    queue's list (what `publish_jobs` sends), built without touching Redis, so that the API can
    push it in the same transaction that creates the job: one round trip, no thread hop for
    Celery's blocking publish, and never a record without its message or the reverse.

    Celery's `as_task_v2` runs once per process (`_envelope`); each message then only fills in
    its ids: 15 microseconds a message here, against 40 with `as_task_v2` per message, on the
    path every accepted job takes."""
    task_id = str(uuid.uuid4())
    headers, properties, embed = _envelope(app)
    body = json.dumps([[job_id], {}, embed])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                **headers,
                "id": task_id,
                "root_id": task_id,
                "argsrepr": repr([job_id]),
                **sent_header(),
            },
            "properties": {
                **properties,
                "correlation_id": task_id,
                "delivery_mode": 2,  # persistent
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,  # the list named after the queue (kombu's priority 0)
                "body_encoding": "base64",
                # Unique per message, which is all kombu asks of it: the task id is.
                "delivery_tag": task_id,
            },
        }
    )


def message_job_id(message: bytes | str) -> str:
    """The job id a `run_job` message on a queue's list carries (`task_message` read back)."""
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    return str(body[0][0])


def message_sent_at(message: bytes | str) -> float | None:
    """When a `run_job` message was sent (`SENT_AT`); None for one without the header (sent by
    a process older than it)."""
    sent = json.loads(message)["headers"].get(SENT_AT)
    return float(sent) if isinstance(sent, int | float) else None


_ENVELOPES: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}


def _envelope(app: Celery) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What `as_task_v2` puts in every `run_job` message of this app and process (the origin
    header names the process)."""
    key = (id(app), os.getpid())
    if key not in _ENVELOPES:
        headers, properties, body, _ = app.amqp.as_task_v2("", TASK_RUN_JOB, args=[])
        _ENVELOPES[key] = (headers, properties, body[2])
    return _ENVELOPES[key]
