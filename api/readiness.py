"""Which workers are ready: fresh heartbeats with a loaded model."""

from __future__ import annotations

from datetime import timedelta

from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import WORKER_PATTERN
from guardfleet.schemas import WorkerHeartbeat, utcnow


async def ready_workers(res: Resources) -> list[WorkerHeartbeat]:
    keys = [key async for key in res.redis.scan_iter(match=WORKER_PATTERN, count=500)]
    if not keys:
        return []
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
    if not await ready_workers(res):
        raise APIError(
            503,
            "no worker with a loaded model is ready; try again shortly",
            code="no_ready_worker",
            headers={"Retry-After": "5"},
        )
