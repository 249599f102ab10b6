"""Bulk batches in Redis: a static record, a state hash of counters, and the list of job ids.

Items are counted by one Lua script as their jobs end. It adds the job id to a set first, so a
job counted once is never counted again (a redelivered job re-reports harmlessly), and it flips
the batch to `completed` exactly once. It never recreates an expired batch's counters, so nothing
it writes outlives the batch's TTL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

import redis
import redis.asyncio as aioredis

from guardfleet.keys import (
    QUEUE_BULK,
    STATS,
    batch_done_key,
    batch_jobs_key,
    batch_key,
    batch_state_key,
    job_key,
)
from guardfleet.schemas import Batch, BatchStatus, Job, JobStatus, RequestCounts, utcnow
from guardfleet.store import STALE_S, add_create

COUNTER = {
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}

# KEYS: batch state, ids already counted, fleet counters. ARGV: job id, counter, now, ttl.
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('HINCRBY', KEYS[3], 'batch_items:' .. ARGV[2], 1)
local h = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'status')
if h[5] == 'in_progress' and tonumber(h[2]) + tonumber(h[3]) + tonumber(h[4]) >= tonumber(h[1]) then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'completed_at', ARGV[3])
  return 2
end
return 1
"""

_CANCEL = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
return 1
"""

# Progress results
NOT_COUNTED, COUNTED, BATCH_COMPLETED = 0, 1, 2
CHUNK = 1000


def _progress_args(job: Job, ttl_s: int) -> tuple[list[str], list[str | int]]:
    assert job.batch_id is not None
    keys = [batch_state_key(job.batch_id), batch_done_key(job.batch_id), STATS]
    return keys, [job.id, COUNTER[job.status], utcnow().isoformat(), ttl_s]


def record_progress(client: redis.Redis, job: Job, ttl_s: int) -> int:
    """Count a finished batch job; returns BATCH_COMPLETED for the job that completed it."""
    keys, args = _progress_args(job, ttl_s)
    return int(client.register_script(_PROGRESS)(keys=keys, args=args))


def get_batch(client: redis.Redis, batch_id: str) -> Batch | None:
    raw = client.get(batch_key(batch_id))
    return (
        None
        if raw is None
        else _merge(Batch.model_validate_json(raw), client.hgetall(batch_state_key(batch_id)))
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _merge(batch: Batch, state: Mapping[bytes | str, bytes | str]) -> Batch:
    """The static record with the live status and counters from the state hash."""
    values = {_text(k): _text(v) for k, v in state.items()}
    if not values:
        return batch
    data = batch.model_dump()
    data.update(
        status=values["status"],
        request_counts={name: int(values[name]) for name in RequestCounts.model_fields},
        completed_at=values.get("completed_at") or None,
        cancelled_at=values.get("cancelled_at") or None,
    )
    return Batch.model_validate(data)


class AsyncBatchStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, stale_s: float = STALE_S) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.stale_s = stale_s

    async def create(self, batch: Batch, jobs: Sequence[Job]) -> None:
        """Write the batch and its job records in pipelined chunks, all with the result TTL."""
        ttl = self.ttl_s
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(batch_key(batch.id), batch.model_dump_json(), ex=ttl)
            pipe.hset(
                batch_state_key(batch.id),
                mapping={
                    "total": len(jobs),
                    "completed": 0,
                    "failed": 0,
                    "cancelled": 0,
                    "status": BatchStatus.IN_PROGRESS.value,
                },
            )
            pipe.expire(batch_state_key(batch.id), ttl)
            pipe.hincrby(STATS, "batch_items:accepted", len(jobs))
            await pipe.execute()
        for start in range(0, len(jobs), CHUNK):
            chunk = jobs[start : start + CHUNK]
            async with self.client.pipeline(transaction=False) as pipe:
                for job in chunk:
                    add_create(pipe, job, QUEUE_BULK, ttl, self.stale_s)
                pipe.rpush(batch_jobs_key(batch.id), *[job.id for job in chunk])
                pipe.expire(batch_jobs_key(batch.id), ttl)
                await pipe.execute()

    async def get(self, batch_id: str) -> Batch | None:
        raw = await self.client.get(batch_key(batch_id))
        if raw is None:
            return None
        state = await self.client.hgetall(batch_state_key(batch_id))
        return _merge(Batch.model_validate_json(raw), state)

    async def mark_cancelled(self, batch_id: str) -> bool:
        script = self.client.register_script(_CANCEL)
        return bool(await script(keys=[batch_state_key(batch_id)], args=[utcnow().isoformat()]))

    async def record_progress_many(self, jobs: Sequence[Job]) -> list[int]:
        """`record_progress` for many jobs in one round trip."""
        if not jobs:
            return []
        script = self.client.register_script(_PROGRESS)
        async with self.client.pipeline(transaction=False) as pipe:
            for job in jobs:
                keys, args = _progress_args(job, self.ttl_s)
                await script(keys=keys, args=args, client=pipe)
            return [int(code) for code in await pipe.execute()]

    async def jobs(self, batch_id: str) -> AsyncIterator[list[Job | None]]:
        """The batch's jobs in input order, a chunk at a time."""
        key = batch_jobs_key(batch_id)
        total = await self.client.llen(key)
        for start in range(0, total, CHUNK):
            ids = [_text(i) for i in await self.client.lrange(key, start, start + CHUNK - 1)]
            async with self.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(job_key(job_id), "doc")
                raws = await pipe.execute()
            yield [None if r is None else Job.model_validate_json(r) for r in raws]
