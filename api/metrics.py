"""Prometheus metrics of the API processes, and of the fleet as Redis shows it.

The counters and histograms here (requests, sync latency, accepted and refused jobs) belong to
the API processes. Run alone they live in this process; run by `python -m api`
(`api.__main__`), every process writes them to files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode) and a scrape answered by any one process reports the sum
over all the processes behind the port. The fleet gauges (queue depth and age per lane, ready
workers) and the fleet counters (jobs ended, batch items, webhook attempts: `guardfleet.keys.stats`,
one hash per part, kept by whichever process made the change) are read from Redis at scrape time, so
they read the same from every API container: query them with `max`, not `sum`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.deps import Resources
from api.readiness import ready_workers
from guardfleet.keys import GPU_QUEUES, QUEUE_WEBHOOKS, job_key, part_tags, stats
from guardfleet.queueing import message_job_id
from guardfleet.replies import as_text

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
SYNC_ROUTES = {"/v1/classify", "/v1/chat/completions"}


@dataclass(eq=False)  # registries hash their collectors
class FleetView(Collector):
    """The fleet as read from Redis at the last scrape: lane depths and ages, ready workers,
    and the counters in `keys.stats`. Every label value this service can write is listed, so a
    series exists (at 0) before its first event."""

    COUNTERS: ClassVar[dict[str, tuple[str, str, str, tuple[str, ...]]]] = {
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

    totals: dict[str, float] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    age: dict[str, float] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)

    def collect(self) -> Iterator[Metric]:
        for prefix, (name, doc, label, known) in self.COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=[label])
            seen = {k.split(":", 1)[1] for k in self.totals if k.startswith(prefix + ":")}
            for value in sorted(set(known) | seen):
                family.add_metric([value], self.totals.get(f"{prefix}:{value}", 0.0))
            yield family
        gauges = (
            ("guardfleet_queue_depth", "messages waiting on a lane", "lane", self.depth),
            (
                "guardfleet_queue_oldest_age_seconds",
                "age of the oldest job waiting on a GPU lane (since it was accepted)",
                "lane",
                self.age,
            ),
            ("guardfleet_workers_ready", "workers with a live heartbeat", "device", self.ready),
        )
        for name, doc, label, values in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=[label])
            for key, number in values.items():
                gauge.add_metric([key], number)
            yield gauge


FLEET = FleetView()


@cache
def _exposition() -> CollectorRegistry:
    """What a scrape reports: this process's metrics, or every API process's when they share a
    multiprocess directory, and the fleet as last read."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        REGISTRY.register(FLEET)
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(FLEET)
    return registry


async def render(res: Resources) -> bytes:
    """The Prometheus text, with the fleet read now."""
    lanes = [*GPU_QUEUES, QUEUE_WEBHOOKS]
    async with res.broker.pipeline(transaction=False) as pipe:
        for lane in lanes:
            pipe.llen(lane)
        for lane in GPU_QUEUES:
            pipe.lindex(lane, -1)  # the oldest: producers push on the left
        found = await pipe.execute()
    async with res.redis.pipeline(transaction=False) as pipe:
        for tag in part_tags(res.settings.store_parts):
            pipe.hgetall(stats(tag))
        parts = await pipe.execute()
    totals: Tally[str] = Tally()
    for part in parts:
        totals.update({as_text(k): float(v) for k, v in part.items()})
    FLEET.totals = dict(totals)
    FLEET.depth = {lane: int(depth) for lane, depth in zip(lanes, found, strict=False)}
    FLEET.age = {
        lane: await _age(res, message)
        for lane, message in zip(GPU_QUEUES, found[len(lanes) :], strict=True)
    }
    FLEET.ready = dict(Tally(w.device for w in await ready_workers(res)))
    return generate_latest(_exposition())


async def _age(res: Resources, message: bytes | None) -> float:
    """Seconds since the job in this Celery message was accepted; 0 for none (or unreadable)."""
    if message is None:
        return 0.0
    try:
        doc = await res.redis.hget(job_key(message_job_id(message)), "doc")
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
