"""Webhooks per the Standard Webhooks spec: payloads, signatures, one delivery attempt, retries.

Who does what:
- a GPU worker that finishes a job (or the last item of a batch) calls `schedule()`: it stores
  the delivery (once: a redelivered job finds it already there) and queues the first attempt;
- the delivery worker (`python -m worker.delivery`, no model) makes each try with
  `worker.webhook_transport.attempt()` and records it here; failures wait in a Redis sorted set
  until their retry is due.

The body is frozen when the delivery is scheduled and sent byte for byte on every attempt, with
the same `webhook-id`; each attempt has its own `webhook-timestamp` and signature.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import redis
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook

from guardfleet.keys import QUEUE_WEBHOOKS, TASK_DELIVER, WEBHOOKS_DUE, delivery_key
from guardfleet.schemas import DeliveryAttempt, WebhookDelivery, utcnow
from guardfleet.settings import Settings

JOB_COMPLETED = "moderation.job.completed"
JOB_FAILED = "moderation.job.failed"
BATCH_COMPLETED = "moderation.batch.completed"
MAX_RETRY_AFTER_S = 24 * 3600.0

SendTask = Callable[..., Any]


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


class DeliveryStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def get(self, resource_id: str) -> StoredDelivery | None:
        raw = self.client.get(delivery_key(resource_id))
        return None if raw is None else StoredDelivery.model_validate_json(raw)

    def save(self, resource_id: str, delivery: StoredDelivery) -> None:
        self.client.set(delivery_key(resource_id), delivery.model_dump_json(), ex=self.ttl_s)

    def due_at(self, resource_id: str, when: datetime) -> None:
        self.client.zadd(WEBHOOKS_DUE, {resource_id: when.timestamp()})


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
    """Store the delivery and queue its first attempt; False if it already existed."""
    delivery = StoredDelivery(
        webhook_id=f"msg_{resource_id}", url=url, event=event, payload=make_payload(event, data)
    )
    first = settings.webhook_retry_schedule_s[0]
    if first > 0:
        delivery.next_attempt_at = utcnow() + timedelta(seconds=first)
    created = store.client.set(
        delivery_key(resource_id), delivery.model_dump_json(), ex=store.ttl_s, nx=True
    )
    if not created:
        return False
    if delivery.next_attempt_at is not None:
        store.due_at(resource_id, delivery.next_attempt_at)
    else:
        send_task(TASK_DELIVER, args=[resource_id], queue=QUEUE_WEBHOOKS)
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
