"""Webhooks per the Standard Webhooks spec: payloads, signatures, one delivery attempt, retries.

Who does what:
- a GPU worker that finishes a job (or the last item of a batch) calls `schedule()`: in one
  Redis transaction it stores the delivery and enters it in the due set (the outbox), then queues
  the first attempt as a fast path. A redelivered job finds the delivery already there;
- the delivery worker (`python -m worker.delivery`, no model) runs one attempt per task
  (`worker.webhook_transport.attempt()`), under a per-delivery lock, and only when the delivery
  is due; it records the attempt here and either removes the delivery from the due set (done)
  or moves it to its next attempt's time;
- the delivery worker's sweeper queues every due entry whose lease has run out. So a delivery
  stays in the due set from the moment it is stored until it is settled, and a crash or a lost
  task anywhere in between only delays it: it is never lost.

The body is frozen when the delivery is scheduled and sent byte for byte on every attempt, with
the same `webhook-id`; each attempt has its own `webhook-timestamp` and signature.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import redis
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook

from guardfleet.keys import (
    QUEUE_WEBHOOKS,
    TASK_DELIVER,
    delivery_key,
    delivery_lock_key,
    id_tag,
    stats,
    webhooks_due,
)
from guardfleet.schemas import DeliveryAttempt, WebhookDelivery, utcnow
from guardfleet.settings import Settings

JOB_COMPLETED = "moderation.job.completed"
JOB_FAILED = "moderation.job.failed"
BATCH_COMPLETED = "moderation.batch.completed"
MAX_RETRY_AFTER_S = 24 * 3600.0

SendTask = Callable[..., Any]
log = logging.getLogger(__name__)


class StoredDelivery(WebhookDelivery):
    """What Redis holds: the public record plus the exact body to send."""

    payload: str


def make_payload(event: str, data: BaseModel) -> str:
    body = {"type": event, "timestamp": utcnow().isoformat(), "data": data.model_dump(mode="json")}
    return json.dumps(body, separators=(",", ":"))


def sign(secrets: list[str], webhook_id: str, timestamp: datetime, body: str) -> str:
    """Space-separated `v1,<sig>` per secret, so receivers can rotate secrets without downtime."""
    return " ".join(Webhook(secret).sign(webhook_id, timestamp, body) for secret in secrets)


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped at a day."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def next_delay(schedule: list[float], attempts_done: int, rng: random.Random) -> float | None:
    """Delay before attempt number `attempts_done + 1`, with +-20% jitter; None when exhausted."""
    if attempts_done >= len(schedule):
        return None
    return schedule[attempts_done] * rng.uniform(0.8, 1.2)


_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class DeliveryStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def get(self, resource_id: str) -> StoredDelivery | None:
        raw = self.client.get(delivery_key(resource_id))
        return None if raw is None else StoredDelivery.model_validate_json(raw)

    def settle(self, resource_id: str, delivery: StoredDelivery, outcome: str) -> None:
        """Save the delivery after an attempt and, in the same transaction, move its due entry
        to the next attempt's time or drop it when there is none, and count the attempt (and
        the delivery, once it has ended)."""
        tag = id_tag(resource_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(delivery_key(resource_id), delivery.model_dump_json(), ex=self.ttl_s)
            pipe.hincrby(stats(tag), f"webhook_attempts:{outcome}", 1)
            if delivery.status != "pending":
                pipe.hincrby(stats(tag), f"webhook_deliveries:{delivery.status}", 1)
            if delivery.next_attempt_at is not None:
                pipe.zadd(webhooks_due(tag), {resource_id: delivery.next_attempt_at.timestamp()})
                pipe.expire(webhooks_due(tag), self.ttl_s)  # outlive the record just saved
            else:
                pipe.zrem(webhooks_due(tag), resource_id)
            pipe.execute()

    def lock(self, resource_id: str, token: str, ttl_s: float) -> bool:
        """One attempt at a time per delivery, whatever copies of its task are queued."""
        return bool(
            self.client.set(delivery_lock_key(resource_id), token, nx=True, px=int(ttl_s * 1000))
        )

    def unlock(self, resource_id: str, token: str) -> None:
        self.client.register_script(_UNLOCK)(keys=[delivery_lock_key(resource_id)], args=[token])


# Store a new delivery and enter it in the due set, both or neither (KEYS: delivery, due set;
# ARGV: record, ttl, due score, id). Returns 0 when the delivery already exists. The due set's
# TTL is renewed with each delivery, so it outlives every delivery in it.
_STORE_NEW = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) == false then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


def schedule(
    store: DeliveryStore,
    send_task: SendTask,
    settings: Settings,
    *,
    resource_id: str,
    url: str,
    event: str,
    data: BaseModel,
) -> bool:
    """Store the delivery in the outbox and queue its first attempt; False if it already
    existed (then it is in the outbox already, and the sweeper drives it)."""
    delivery = StoredDelivery(
        webhook_id=f"msg_{resource_id}", url=url, event=event, payload=make_payload(event, data)
    )
    first = settings.webhook_retry_schedule_s[0]
    if first > 0:
        delivery.next_attempt_at = utcnow() + timedelta(seconds=first)
        due = delivery.next_attempt_at.timestamp()
    else:
        # Leased to the task queued below: if that task is lost, the sweeper sends another once
        # the lease ends (GUARDFLEET_WEBHOOK_LEASE_S).
        due = time.time() + settings.webhook_lease_s
    created = store.client.register_script(_STORE_NEW)(
        keys=[delivery_key(resource_id), webhooks_due(id_tag(resource_id))],
        args=[delivery.model_dump_json(), store.ttl_s, due, resource_id],
    )
    if not created:
        return False
    if delivery.next_attempt_at is None:
        try:
            send_task(TASK_DELIVER, args=[resource_id], queue=QUEUE_WEBHOOKS)
        except Exception as exc:  # the outbox has it: the sweeper sends it once the lease ends
            log.warning("could not queue webhook %s now (%s); the sweeper will", resource_id, exc)
    return True


@dataclass
class Outcome:
    attempt: DeliveryAttempt
    status: str  # "delivered", "gone", "refused" (never retried) or "retry"
    retry_after_s: float | None = None


def record(
    delivery: StoredDelivery,
    outcome: Outcome,
    settings: Settings,
    rng: random.Random,
) -> StoredDelivery:
    """The delivery after `outcome`: delivered, given up, or waiting for its next attempt."""
    delivery.attempts.append(outcome.attempt)
    delivery.next_attempt_at = None
    if outcome.status == "delivered":
        delivery.status = "delivered"
    elif outcome.status == "gone":
        delivery.status = "gone"
    elif outcome.status == "refused":
        delivery.status = "failed"
    else:
        delay = next_delay(settings.webhook_retry_schedule_s, len(delivery.attempts), rng)
        if delay is None:
            delivery.status = "failed"
        else:
            if outcome.retry_after_s is not None:
                delay = outcome.retry_after_s
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
    return delivery
