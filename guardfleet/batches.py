"""Bulk batches in Redis: a static record, a state hash of counters, the stored upload, and the
list of job ids.

A batch is accepted in one transaction that stores its checked upload (`validating`); a delivery
worker then queues its items a chunk per transaction (the fan-out, `worker.fanout`), each chunk
advancing a cursor in the same transaction, so a fan-out that dies resumes at the next chunk and
never queues an item twice. Items are counted by one Lua script as their jobs end. It adds the job
id to a set first, so a job counted once is never counted again (a redelivered job re-reports
harmlessly), and it flips the batch to `completed` (or a `cancelling` one to `cancelled`) exactly
once. It never recreates an expired batch's counters, so nothing it writes outlives the batch's
TTL.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import redis
import redis.asyncio as aioredis
from celery import Celery

from guardfleet.batch_file import parse_items
from guardfleet.errors import InvalidBatch
from guardfleet.keys import (
    BATCHES_DUE,
    BATCHES_PENDING,
    QUEUE_BULK,
    STATS,
    batch_done_key,
    batch_fanout_key,
    batch_jobs_key,
    batch_key,
    batch_state_key,
    batch_upload_key,
    job_key,
)
from guardfleet.queueing import task_message
from guardfleet.schemas import (
    Batch,
    BatchErrors,
    BatchItem,
    BatchStatus,
    Job,
    JobStatus,
    RequestCounts,
    utcnow,
)
from guardfleet.store import STALE_S, add_create, record_fields

COUNTER = {
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}

# Ends a batch whose items are all counted: `completed`, or `cancelled` if it was cancelling.
# KEYS[1]: batch state; ARGV[3]: now.
_SETTLE = """
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
    + _SETTLE
)

# KEYS: batch state, fan-out. ARGV[3]: now. A chunk being queued at this moment is refused (its
# transaction watches the fan-out hash) and written again as cancelled.
_CANCEL = (
    """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'in_progress' and s ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'cancel', 1) end
"""
    + _SETTLE
)

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


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


STAMPS = ("in_progress_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at")


def _merge(batch: Batch, state: Mapping[bytes | str, bytes | str]) -> Batch:
    """The static record with the live status, counters and timestamps from the state hash."""
    values = {_text(k): _text(v) for k, v in state.items()}
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
    def __init__(self, client: aioredis.Redis, ttl_s: int, stale_s: float = STALE_S) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.stale_s = stale_s

    async def create(self, batch: Batch, upload: bytes) -> None:
        """Store the batch and its checked upload in one transaction, due for fan-out now."""
        ttl, total = self.ttl_s, batch.request_counts.total
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
            pipe.zadd(BATCHES_DUE, {batch.id: time.time()})
            pipe.hset(BATCHES_PENDING, batch.id, total)
            # Renewed with every batch, these outlive each batch in them (as OPEN_JOBS does).
            pipe.expire(BATCHES_DUE, ttl)
            pipe.expire(BATCHES_PENDING, ttl)
            pipe.hincrby(STATS, "batch_items:accepted", total)
            await pipe.execute()

    async def get(self, batch_id: str) -> Batch | None:
        raw = await self.client.get(batch_key(batch_id))
        if raw is None:
            return None
        state = await self.client.hgetall(batch_state_key(batch_id))
        return _merge(Batch.model_validate_json(raw), state)

    async def mark_cancelling(self, batch_id: str) -> bool:
        """Move a validating or in-progress batch to `cancelling`; False for any other."""
        script = self.client.register_script(_CANCEL)
        keys = [batch_state_key(batch_id), batch_fanout_key(batch_id)]
        return bool(await script(keys=keys, args=["", "", utcnow().isoformat()]))

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


class FanOut:
    """Queues the items of stored batches on the bulk lane, `chunk` per transaction.

    Each transaction creates the chunk's job records, pushes their Celery messages, appends their
    ids to the batch, and advances the cursor, watching the fan-out hash: if anything else moved
    the cursor (a second fan-out of the same batch, after a lease ran out) or a cancel arrived,
    the chunk is not written and the fan-out looks again. After a cancel the rest of the items
    are written as cancelled records (counted at once, no message), so every item has a result.
    """

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        ttl_s: int,
        chunk: int,
        lease_s: float,
        stale_s: float = STALE_S,
    ) -> None:
        self.client = client
        self.app = app
        self.ttl_s = ttl_s
        self.chunk = chunk
        self.lease_s = lease_s
        self.stale_s = stale_s
        self._settle = client.register_script(_SETTLE)

    def run(self, batch_id: str, stop: threading.Event | None = None) -> int:
        """Queue what is left of a batch; returns how many items this call wrote. Once `stop`
        is set it hands the batch back between chunks, due at once for another worker."""
        state = self.client.hget(batch_state_key(batch_id), "total")
        upload = self.client.get(batch_upload_key(batch_id))
        if state is None:  # expired
            self._forget(batch_id)
            return 0
        total = int(state)
        if upload is None:
            cursor = self.client.hget(batch_fanout_key(batch_id), "cursor")
            if cursor is not None and int(cursor) < total:
                self._fail(batch_id, "upload_missing", "the stored upload expired before queueing")
            self._forget(batch_id)
            return 0
        try:
            # Checked when accepted, so this cannot fail unless the stored bytes changed.
            items = parse_items(_bytes(upload), max_items=total)
        except InvalidBatch as exc:
            self._fail(batch_id, exc.code, exc.message)
            self._forget(batch_id)
            return 0
        written = 0
        while (step := self._step(batch_id, items)) is not None:
            written += step
            if stop is not None and stop.is_set():
                self.client.zadd(BATCHES_DUE, {batch_id: time.time()}, xx=True)
                break
        return written

    def _step(self, batch_id: str, items: Sequence[BatchItem]) -> int | None:
        """Write the next chunk: its size, 0 if refused (look again), None when there is
        nothing left for this fan-out to do."""
        fanout = batch_fanout_key(batch_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(fanout)  # type: ignore[no-untyped-call]
                cursor_raw, cancel = pipe.hmget(fanout, ["cursor", "cancel"])
                status = _text(pipe.hget(batch_state_key(batch_id), "status") or b"")
                if cursor_raw is None:  # expired meanwhile
                    pipe.unwatch()
                    self._forget(batch_id)
                    return None
                cursor = int(cursor_raw)
                if cursor >= len(items):
                    pipe.unwatch()
                    self._finish(batch_id)
                    return None
                chunk = items[cursor : cursor + self.chunk]
                cancelled = cancel is not None
                pipe.multi()
                self._write(pipe, batch_id, chunk, cancelled, status)
                pipe.hset(fanout, "cursor", cursor + len(chunk))
                pipe.hset(BATCHES_PENDING, batch_id, len(items) - cursor - len(chunk))
                pipe.zadd(BATCHES_DUE, {batch_id: time.time() + self.lease_s})  # renew lease
                pipe.execute()
            except redis.WatchError:
                now = self.client.hget(fanout, "cursor")
                if now is not None and int(now) != cursor:
                    return None  # another fan-out has it; it continues from there
                return 0
        if cancelled:
            self._settle(keys=[batch_state_key(batch_id)], args=["", "", utcnow().isoformat()])
        return len(chunk)

    def _write(
        self,
        pipe: redis.client.Pipeline,
        batch_id: str,
        chunk: Sequence[BatchItem],
        cancelled: bool,
        status: str,
    ) -> None:
        now = utcnow()
        jobs = [
            Job(
                request=item.classify_request(),
                metadata=item.metadata,
                batch_id=batch_id,
                custom_id=item.custom_id,
                **({"status": JobStatus.CANCELLED, "finished_at": now} if cancelled else {}),
            )
            for item in chunk
        ]
        if cancelled:
            state = batch_state_key(batch_id)
            for job in jobs:
                pipe.hset(job_key(job.id), mapping=record_fields(job, QUEUE_BULK))
                pipe.expire(job_key(job.id), self.ttl_s)
            pipe.sadd(batch_done_key(batch_id), *[job.id for job in jobs])
            pipe.expire(batch_done_key(batch_id), self.ttl_s)
            pipe.hincrby(state, "cancelled", len(jobs))
            pipe.hincrby(STATS, "batch_items:cancelled", len(jobs))
            pipe.hincrby(STATS, "jobs_ended:cancelled", len(jobs))
        else:
            for job in jobs:
                add_create(pipe, job, QUEUE_BULK, self.ttl_s, self.stale_s)
            pipe.lpush(QUEUE_BULK, *[task_message(self.app, job.id, QUEUE_BULK) for job in jobs])
            if status == BatchStatus.VALIDATING:
                pipe.hset(
                    batch_state_key(batch_id),
                    mapping={
                        "status": BatchStatus.IN_PROGRESS.value,
                        "in_progress_at": now.isoformat(),
                    },
                )
        pipe.rpush(batch_jobs_key(batch_id), *[job.id for job in jobs])
        pipe.expire(batch_jobs_key(batch_id), self.ttl_s)

    def _finish(self, batch_id: str) -> None:
        """Every item is written: drop the upload and the due entry; end a batch that was
        cancelled with nothing left running."""
        self._settle(keys=[batch_state_key(batch_id)], args=["", "", utcnow().isoformat()])
        self._forget(batch_id)

    def _forget(self, batch_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(batch_upload_key(batch_id))
            pipe.zrem(BATCHES_DUE, batch_id)
            pipe.hdel(BATCHES_PENDING, batch_id)
            pipe.execute()

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        errors = BatchErrors.model_validate({"data": [{"code": code, "message": message}]})
        self.client.hset(
            batch_state_key(batch_id),
            mapping={
                "status": BatchStatus.FAILED.value,
                "failed_at": utcnow().isoformat(),
                "errors": errors.model_dump_json(),
            },
        )
