"""Bulk batches in Redis: a static record, a state hash of counters, the stored upload, and the
list of job ids.

A batch is accepted in one transaction that stores its checked upload (`validating`); a delivery
worker then queues its items a chunk per transaction (the fan-out, `guardfleet.fanout`), each chunk
advancing a cursor in the same transaction, so a fan-out that dies resumes at the next chunk and
never queues an item twice. Items are counted by one Lua script as their jobs end. It adds the job
id to a set first, so a job counted once is never counted again (a redelivered job re-reports
harmlessly), and it flips the batch to `completed` (or a `cancelling` one to `cancelled`) exactly
once. It never recreates an expired batch's counters, so nothing it writes outlives the batch's
TTL.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import redis
import redis.asyncio as aioredis

from guardfleet.keys import (
    BATCHES_PENDING,
    batch_done_key,
    batch_fanout_key,
    batch_jobs_key,
    batch_key,
    batch_state_key,
    batch_upload_key,
    batches_due,
    id_tag,
    job_key,
    stats,
)
from guardfleet.redis_conn import eval_many, initialize
from guardfleet.replies import as_text
from guardfleet.schemas import (
    Batch,
    BatchStatus,
    Job,
    JobStatus,
    RequestCounts,
    utcnow,
)
from guardfleet.store import JOB_FIELDS, load_job

COUNTER = {
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}

# Ends a batch whose items are all counted: `completed`, or `cancelled` if it was cancelling.
# KEYS[1]: batch state; ARGV[3]: now.
SETTLE = """
local h = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'status')
if h[1] and tonumber(h[2]) + tonumber(h[3]) + tonumber(h[4]) >= tonumber(h[1]) then
  if h[5] == 'in_progress' then
    redis.call('HSET', KEYS[1], 'status', 'completed', 'completed_at', ARGV[3])
    return 2
  elseif h[5] == 'cancelling' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[3])
  end
end
return 1
"""

# KEYS: batch state, ids already counted, fleet counters. ARGV: job id, counter, now, ttl.
_PROGRESS = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('HINCRBY', KEYS[3], 'batch_items:' .. ARGV[2], 1)
"""
    + SETTLE
)

# KEYS: batch state, fan-out, due set. ARGV: batch id, now (epoch s), now (ISO). A chunk being
# queued at this moment is refused (its transaction watches the fan-out hash) and written again
# as cancelled; a batch whose fan-out is over is due again, for a delivery worker to cancel its
# queued items (one being fanned out is in the due set already and does that when it ends).
_CANCEL = (
    """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'in_progress' and s ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'cancel', 1) end
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
"""
    + SETTLE
)

# Progress results
NOT_COUNTED, COUNTED, BATCH_COMPLETED = 0, 1, 2
CHUNK = 1000


def _progress_args(job: Job, ttl_s: int) -> tuple[list[str], list[str | int]]:
    assert job.batch_id is not None
    keys = [
        batch_state_key(job.batch_id),
        batch_done_key(job.batch_id),
        stats(id_tag(job.batch_id)),
    ]
    return keys, [job.id, COUNTER[job.status], utcnow().isoformat(), ttl_s]


def record_progress(client: redis.Redis, job: Job, ttl_s: int) -> int:
    """Count a finished batch job; returns BATCH_COMPLETED for the job that completed it."""
    keys, args = _progress_args(job, ttl_s)
    return int(client.register_script(_PROGRESS)(keys=keys, args=args))


def record_progress_many(client: redis.Redis, jobs: Sequence[Job], ttl_s: int) -> list[int]:
    """`record_progress` for many jobs in one round trip."""
    calls = [_progress_args(job, ttl_s) for job in jobs]
    return [int(code) for code in eval_many(client, client.register_script(_PROGRESS), calls)]


def get_batch(client: redis.Redis, batch_id: str) -> Batch | None:
    raw = client.get(batch_key(batch_id))
    return (
        None
        if raw is None
        else _merge(Batch.model_validate_json(raw), client.hgetall(batch_state_key(batch_id)))
    )


STAMPS = ("in_progress_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at")


def _merge(batch: Batch, state: Mapping[bytes | str, bytes | str]) -> Batch:
    """The static record with the live status, counters and timestamps from the state hash."""
    values = {as_text(k): as_text(v) for k, v in state.items()}
    if not values:
        return batch
    data = batch.model_dump()
    data.update(
        status=values["status"],
        request_counts={name: int(values[name]) for name in RequestCounts.model_fields},
        errors=json.loads(values["errors"]) if "errors" in values else None,
        **{stamp: values.get(stamp) or None for stamp in STAMPS},
    )
    return Batch.model_validate(data)


class AsyncBatchStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def create(self, batch: Batch, upload: bytes) -> None:
        """Store the batch and its checked upload in one transaction, due for fan-out now, then
        count its items as pending (a fleet-wide hash, outside the batch's part)."""
        ttl, total, tag = self.ttl_s, batch.request_counts.total, id_tag(batch.id)
        await initialize(self.client)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(batch_key(batch.id), batch.model_dump_json(), ex=ttl)
            pipe.hset(
                batch_state_key(batch.id),
                mapping={
                    "total": total,
                    "completed": 0,
                    "failed": 0,
                    "cancelled": 0,
                    "status": BatchStatus.VALIDATING.value,
                },
            )
            pipe.expire(batch_state_key(batch.id), ttl)
            pipe.set(batch_upload_key(batch.id), upload, ex=ttl)
            pipe.hset(batch_fanout_key(batch.id), "cursor", 0)
            pipe.expire(batch_fanout_key(batch.id), ttl)
            pipe.zadd(batches_due(tag), {batch.id: time.time()})
            pipe.expire(batches_due(tag), ttl)  # renewed with every batch: it outlives each
            pipe.hincrby(stats(tag), "batch_items:accepted", total)
            await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            # Lost if this process dies right here: admission then undercounts the batch until
            # its fan-out's first chunk writes the count again.
            pipe.hset(BATCHES_PENDING, batch.id, total)
            pipe.expire(BATCHES_PENDING, ttl)
            await pipe.execute()

    async def get(self, batch_id: str) -> Batch | None:
        raw = await self.client.get(batch_key(batch_id))
        if raw is None:
            return None
        state = await self.client.hgetall(batch_state_key(batch_id))
        return _merge(Batch.model_validate_json(raw), state)

    async def mark_cancelling(self, batch_id: str) -> bool:
        """Move a validating or in-progress batch to `cancelling`, due for a delivery worker to
        cancel its items; False for a batch in any other status."""
        script = self.client.register_script(_CANCEL)
        keys = [
            batch_state_key(batch_id),
            batch_fanout_key(batch_id),
            batches_due(id_tag(batch_id)),
        ]
        args: list[str | float] = [batch_id, time.time(), utcnow().isoformat()]
        return bool(await script(keys=keys, args=args))

    async def jobs(self, batch_id: str) -> AsyncIterator[list[Job | None]]:
        """The batch's jobs in input order, a chunk at a time."""
        key = batch_jobs_key(batch_id)
        total = await self.client.llen(key)
        for start in range(0, total, CHUNK):
            ids = [as_text(i) for i in await self.client.lrange(key, start, start + CHUNK - 1)]
            async with self.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(job_key(job_id), JOB_FIELDS)
                raws = await pipe.execute()
            yield [load_job(r) for r in raws]
