"""Prometheus metrics of one API process, and of the fleet as Redis shows it.

Counters and histograms are this process's (with several API processes, Prometheus sums them);
the fleet gauges (queue depth and age per lane, ready workers) and the fleet counters (jobs ended,
batch items, webhook attempts: `guardfleet.keys.STATS`, kept by whichever process made the change)
are read from Redis at scrape time. The fleet series are the same from every API process: query
them with `max`, not `sum`.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import datetime
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from api.deps import Resources
from api.readiness import ready_workers
from guardfleet.keys import GPU_QUEUES, QUEUE_WEBHOOKS, STATS, job_key

REGISTRY = CollectorRegistry()
HTTP_REQUESTS = Counter(
    "guardfleet_http_requests",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
SYNC_SECONDS = Histogram(
    "guardfleet_sync_request_duration_seconds",
    "sync calls (classify, chat completions) from request to answer",
    ["route"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
ACCEPTED = Counter(
    "guardfleet_jobs_accepted", "jobs queued by this process", ["lane"], registry=REGISTRY
)
REFUSED = Counter(
    "guardfleet_jobs_refused",
    "jobs refused for a full lane (429 bulk, 503 interactive)",
    ["lane"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "guardfleet_queue_depth", "messages waiting on a lane", ["lane"], registry=REGISTRY
)
QUEUE_AGE = Gauge(
    "guardfleet_queue_oldest_age_seconds",
    "age of the oldest job waiting on a GPU lane (since it was accepted)",
    ["lane"],
    registry=REGISTRY,
)
WORKERS_READY = Gauge(
    "guardfleet_workers_ready", "workers with a live heartbeat", ["device"], registry=REGISTRY
)
SYNC_ROUTES = {"/v1/classify", "/v1/chat/completions"}


class FleetTotals(Collector):
    """The fleet counters in `STATS`, as read at the last scrape. Every label value this
    service can write is listed, so a series exists (at 0) before its first event."""

    FAMILIES: ClassVar[dict[str, tuple[str, str, str, tuple[str, ...]]]] = {
        "jobs_ended": (
            "guardfleet_jobs_finished",
            "jobs that reached a final status, fleet-wide",
            "status",
            ("succeeded", "failed", "cancelled"),
        ),
        "batch_items": (
            "guardfleet_batch_items",
            "batch items accepted, and ended by state, fleet-wide",
            "state",
            ("accepted", "completed", "failed", "cancelled"),
        ),
        "webhook_attempts": (
            "guardfleet_webhook_attempts",
            "webhook delivery attempts by outcome: delivered, retry (will be tried again or "
            "has run out of attempts), gone (410), refused (blocked address)",
            "outcome",
            ("delivered", "retry", "gone", "refused"),
        ),
        "webhook_deliveries": (
            "guardfleet_webhook_deliveries",
            "webhook deliveries that ended, by final status (failed: every attempt failed)",
            "status",
            ("delivered", "gone", "failed"),
        ),
    }

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for prefix, (name, doc, label, known) in self.FAMILIES.items():
            family = CounterMetricFamily(name, doc, labels=[label])
            seen = {k.split(":", 1)[1] for k in self.values if k.startswith(prefix + ":")}
            for value in sorted(set(known) | seen):
                family.add_metric([value], self.values.get(f"{prefix}:{value}", 0.0))
            yield family


FLEET_TOTALS = FleetTotals()
REGISTRY.register(FLEET_TOTALS)


async def render(res: Resources) -> bytes:
    """The Prometheus text, with the fleet gauges read now."""
    lanes = [*GPU_QUEUES, QUEUE_WEBHOOKS]
    async with res.redis.pipeline(transaction=False) as pipe:
        for lane in lanes:
            pipe.llen(lane)
        for lane in GPU_QUEUES:
            pipe.lindex(lane, -1)  # the oldest: producers push on the left
        pipe.hgetall(STATS)
        found = await pipe.execute()
    FLEET_TOTALS.values = {k.decode(): float(v) for k, v in found.pop().items()}
    for lane, depth in zip(lanes, found, strict=False):
        QUEUE_DEPTH.labels(lane).set(int(depth))
    for lane, message in zip(GPU_QUEUES, found[len(lanes) :], strict=True):
        QUEUE_AGE.labels(lane).set(await _age(res, message))
    WORKERS_READY.clear()
    for device, count in Tally(w.device for w in await ready_workers(res)).items():
        WORKERS_READY.labels(device).set(count)
    return generate_latest(REGISTRY)


async def _age(res: Resources, message: bytes | None) -> float:
    """Seconds since the job in this Celery message was accepted; 0 for none (or unreadable)."""
    if message is None:
        return 0.0
    try:
        body = json.loads(base64.b64decode(json.loads(message)["body"]))
        doc = await res.redis.hget(job_key(str(body[0][0])), "doc")
        created = datetime.fromisoformat(json.loads(doc or b"{}")["created_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0.0
    return max(0.0, time.time() - created.timestamp())


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count an answer by route template (not raw path: ids would make a series per job), and
    time sync calls."""
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    if route in SYNC_ROUTES:
        SYNC_SECONDS.labels(route).observe(seconds)
