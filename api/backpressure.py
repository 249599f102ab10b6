"""Saying "not now" instead of queueing without bound.

Each lane's backlog is the length of its Redis list (messages no worker has taken yet). Over
the lane's limit a new job is refused, never an accepted one dropped:

- bulk (`POST /v1/jobs`, batches): 429 with `Retry-After` once `GUARDFLEET_MAX_QUEUED_BULK`
  messages wait; a batch is refused whole if its items would not fit, and one larger than the
  limit itself can never fit (422).
- interactive (sync classify, chat completions): 503 with `Retry-After` once the backlog reaches
  `GUARDFLEET_MAX_QUEUED_INTERACTIVE_PER_WORKER` times the ready workers serving the lane: past
  that, a caller would most likely wait out its sync timeout, so it had better try another
  replica or come back.

The bulk backlog also counts the items of accepted batches that a delivery worker has not queued
yet (`BATCHES_PENDING`). Backlogs are read at most every `DEPTH_CACHE_S` per API process and lane,
so a flood costs one Redis round trip per lane per interval, not one per request; a burst can
overshoot a limit by what arrives within that interval.
"""

from __future__ import annotations

import time

from api import metrics
from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import BATCHES_PENDING, QUEUE_BULK, QUEUE_INTERACTIVE

DEPTH_CACHE_S = 0.2
RETRY_BULK_S = 5
RETRY_INTERACTIVE_S = 1


async def backlog(res: Resources, queue: str) -> int:
    """Messages waiting on `queue`, as of at most DEPTH_CACHE_S ago."""
    now = time.monotonic()
    cached = res.depths.get(queue)
    if cached is not None and now - cached[1] < DEPTH_CACHE_S:
        return cached[0]
    if queue == QUEUE_BULK:
        # Batch items not queued yet count too, or batches accepted a moment apart would each
        # see the lane as it was before the other's fan-out.
        async with res.redis.pipeline(transaction=False) as pipe:
            pipe.llen(queue)
            pipe.hvals(BATCHES_PENDING)
            length, pending = await pipe.execute()
        depth = int(length) + sum(int(n) for n in pending)
    else:
        depth = int(await res.redis.llen(queue))
    res.depths[queue] = (depth, now)
    return depth


async def admit_bulk(res: Resources, adding: int = 1) -> None:
    limit = res.settings.max_queued_bulk
    if adding > limit:
        raise APIError(
            422,
            f"{adding} items can never fit under this server's bulk queue limit of {limit} "
            "(GUARDFLEET_MAX_QUEUED_BULK); split the batch",
            code="batch_too_large",
        )
    waiting = await backlog(res, QUEUE_BULK)
    if waiting + adding > limit:
        metrics.REFUSED.labels(QUEUE_BULK).inc(adding)
        raise APIError(
            429,
            f"the bulk queue holds {waiting} jobs waiting, and {adding} more would pass its "
            f"limit of {limit}; retry later (nothing was queued)",
            code="queue_full",
            headers={"Retry-After": str(RETRY_BULK_S)},
        )
    res.depths[QUEUE_BULK] = (waiting + adding, res.depths[QUEUE_BULK][1])


async def admit_interactive(res: Resources) -> None:
    """For sync calls, after `require_ready_worker` has counted the ready workers."""
    limit = res.ready_interactive * res.settings.max_queued_interactive_per_worker
    waiting = await backlog(res, QUEUE_INTERACTIVE)
    if waiting >= limit:
        metrics.REFUSED.labels(QUEUE_INTERACTIVE).inc()
        raise APIError(
            503,
            f"{waiting} sync calls are already waiting for {res.ready_interactive} ready "
            f"worker(s) (limit {limit}); retry shortly",
            code="overloaded",
            headers={"Retry-After": str(RETRY_INTERACTIVE_S)},
        )
    res.depths[QUEUE_INTERACTIVE] = (waiting + 1, res.depths[QUEUE_INTERACTIVE][1])
