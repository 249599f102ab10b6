"""Prometheus metrics of one API process, and of the fleet as Redis shows it.

Counters and histograms are this process's (with several API processes, Prometheus sums them);
the fleet gauges (queue depth and age per lane, ready workers) are read from Redis at scrape time.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter as Tally
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import Resources
from api.readiness import ready_workers
from guardfleet.keys import GPU_QUEUES, QUEUE_WEBHOOKS, job_key

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


async def render(res: Resources) -> bytes:
    """The Prometheus text, with the fleet gauges read now."""
    lanes = [*GPU_QUEUES, QUEUE_WEBHOOKS]
    async with res.redis.pipeline(transaction=False) as pipe:
        for lane in lanes:
            pipe.llen(lane)
        for lane in GPU_QUEUES:
            pipe.lindex(lane, -1)  # the oldest: producers push on the left
        found = await pipe.execute()
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


class CountRequests:
    """ASGI middleware: every answer counted by route template (not raw path: ids would make a
    series per job), and sync calls timed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            if route in SYNC_ROUTES:
                SYNC_SECONDS.labels(route).observe(time.monotonic() - started)
