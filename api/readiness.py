"""Which workers are ready: live heartbeat keys of workers with a loaded model.

A heartbeat key exists only while its worker keeps rewriting it (Redis expires it after the
worker's TTL), so its existence is the whole freshness test: Redis keeps the time, and neither
the worker's clock nor the API's is compared with anything. The registry sorted set is only an
index of names to look up; its scores are written by worker clocks and are not trusted.
"""

from __future__ import annotations

import logging
import time

from pydantic import ValidationError

from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import QUEUE_INTERACTIVE, WORKER_REGISTRY, worker_key
from guardfleet.queueing import broker_id_async
from guardfleet.schemas import WorkerHeartbeat

log = logging.getLogger(__name__)

# A sync call only needs to know that *some* worker is ready; a positive answer is reused this
# long, so the check costs nothing on the hot path. Negative answers are never cached.
READY_CACHE_S = 1.0


async def ready_workers(res: Resources) -> list[WorkerHeartbeat]:
    """Workers with a loaded model that consume this API's broker."""
    return (await fleet(res))[0]


async def fleet(res: Resources) -> tuple[list[WorkerHeartbeat], list[WorkerHeartbeat]]:
    """Workers with a loaded model: those on this API's broker, and those on another (given
    another GUARDFLEET_BROKER_URL, they never see this API's jobs, so they are not counted)."""
    names = await res.redis.zrange(WORKER_REGISTRY, 0, -1)
    if not names:
        return [], []
    ours = await broker_id_async(res.broker, res.settings.result_ttl_s)
    keys = [worker_key(n.decode() if isinstance(n, bytes) else str(n)) for n in names]
    workers = []
    for key, raw in zip(keys, await res.redis.mget(keys), strict=True):
        if raw is None:  # expired: that worker stopped beating
            continue
        try:
            beat = WorkerHeartbeat.model_validate_json(raw)
        except ValidationError as exc:
            # One worker of another version (or a corrupt key) must not take readiness down for
            # the fleet: it is simply not counted.
            log.warning("ignoring heartbeat %s that does not validate: %s", key, exc)
            continue
        if beat.loaded:
            workers.append(beat)
    workers.sort(key=lambda w: w.name)
    # A heartbeat without a broker id comes from a worker of an older version: counted.
    elsewhere = [w for w in workers if w.broker not in ("", ours)]
    for w in elsewhere:
        if w.name not in _WARNED:
            _WARNED.add(w.name)
            log.warning("worker %s consumes another broker than this API's: not counted", w.name)
    return [w for w in workers if w.broker in ("", ours)], elsewhere


_WARNED: set[str] = set()  # workers on another broker already logged by this process


async def require_ready_worker(res: Resources) -> None:
    """Sync calls fail fast when nobody can serve them; queued jobs may wait for a worker.

    Sync calls go to the interactive queue, so only workers consuming it count: a fleet of
    bulk-only workers would leave the caller waiting for the sync timeout."""
    if time.monotonic() < res.ready_until:
        return
    serving = sum(QUEUE_INTERACTIVE in w.queues for w in await ready_workers(res))
    if serving:
        res.ready_until = time.monotonic() + READY_CACHE_S
        res.ready_interactive = serving
    else:
        raise APIError(
            503,
            "no worker with a loaded model serves the interactive queue; try again shortly",
            code="no_ready_worker",
            headers={"Retry-After": "5"},
        )
