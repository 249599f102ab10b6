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
yet (`BATCHES_PENDING`). Backlogs are read at most every `DEPTH_CACHE_S` per API process and
lane, one read at a time (`api.backlogs`), so a flood costs one Redis round trip per lane per
interval, not one per request; a burst can overshoot a limit by what other API processes accept
within that interval.
"""

from __future__ import annotations

from api import metrics
from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import QUEUE_BULK, QUEUE_INTERACTIVE

RETRY_BULK_S = 5
RETRY_INTERACTIVE_S = 1


async def admit_bulk(res: Resources, adding: int = 1) -> None:
    limit = res.settings.max_queued_bulk
    if adding > limit:
        raise APIError(
            422,
            f"{adding} items can never fit under this server's bulk queue limit of {limit} "
            "(GUARDFLEET_MAX_QUEUED_BULK); split the batch",
            code="batch_too_large",
        )
    waiting = await res.backlogs.get(QUEUE_BULK)
    if waiting + adding > limit:
        metrics.REFUSED.labels(QUEUE_BULK).inc(adding)
        raise APIError(
            429,
            f"the bulk queue holds {waiting} jobs waiting, and {adding} more would pass its "
            f"limit of {limit}; retry later (nothing was queued)",
            code="queue_full",
            headers={"Retry-After": str(RETRY_BULK_S)},
        )
    res.backlogs.add(QUEUE_BULK, adding)


async def admit_interactive(res: Resources) -> None:
    """For sync calls, after `require_ready_worker` has counted the ready workers."""
    limit = res.ready_interactive * res.settings.max_queued_interactive_per_worker
    waiting = await res.backlogs.get(QUEUE_INTERACTIVE)
    if waiting >= limit:
        metrics.REFUSED.labels(QUEUE_INTERACTIVE).inc()
        raise APIError(
            503,
            f"{waiting} sync calls are already waiting for {res.ready_interactive} ready "
            f"worker(s) (limit {limit}); retry shortly",
            code="overloaded",
            headers={"Retry-After": str(RETRY_INTERACTIVE_S)},
        )
    res.backlogs.add(QUEUE_INTERACTIVE, 1)
