"""Which workers are ready: fresh heartbeats with a loaded model."""

from __future__ import annotations

import time
from datetime import timedelta

from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import WORKER_REGISTRY, worker_key
from guardfleet.schemas import WorkerHeartbeat, utcnow

# A sync call only needs to know that *some* worker is ready; a positive answer is reused this
# long, so the check costs nothing on the hot path. Negative answers are never cached.
READY_CACHE_S = 1.0


async def ready_workers(res: Resources) -> list[WorkerHeartbeat]:
    names = await res.redis.zrangebyscore(WORKER_REGISTRY, time.time(), "+inf")
    if not names:
        return []
    keys = [worker_key(n.decode() if isinstance(n, bytes) else str(n)) for n in names]
    # The key's TTL already drops dead workers; the timestamp check also drops a worker whose
    # clock or heartbeat thread has stalled while the key lingers.
    horizon = utcnow() - timedelta(seconds=res.settings.heartbeat_ttl_s)
    workers = []
    for raw in await res.redis.mget(keys):
        if raw is None:
            continue
        beat = WorkerHeartbeat.model_validate_json(raw)
        if beat.loaded and beat.last_seen >= horizon:
            workers.append(beat)
    return sorted(workers, key=lambda w: w.name)


async def require_ready_worker(res: Resources) -> None:
    """Sync calls fail fast when nobody can serve them; queued jobs may wait for a worker."""
    if time.monotonic() < res.ready_until:
        return
    if await ready_workers(res):
        res.ready_until = time.monotonic() + READY_CACHE_S
    else:
        raise APIError(
            503,
            "no worker with a loaded model is ready; try again shortly",
            code="no_ready_worker",
            headers={"Retry-After": "5"},
        )
