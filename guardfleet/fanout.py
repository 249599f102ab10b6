"""Queueing a stored batch's items: the fan-out, run by the delivery worker.

The API stores a batch's checked upload (`guardfleet.batches`); a delivery worker takes the batch
from its part's due set (`keys.batches_due`) with a lease and calls `FanOut.run`, which queues the
items a chunk per transaction and, once a batch is cancelled, cancels its queued items too. Both are
safe to run again after a crash, and the lease makes sure they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import redis
from celery import Celery

from guardfleet.batch_file import parse_items
from guardfleet.batches import SETTLE, record_progress_many
from guardfleet.errors import InvalidBatch
from guardfleet.keys import (
    BATCHES_PENDING,
    QUEUE_BULK,
    batch_done_key,
    batch_fanout_key,
    batch_jobs_key,
    batch_state_key,
    batch_upload_key,
    batches_due,
    id_tag,
    job_key,
    new_id,
    stats,
)
from guardfleet.queueing import task_message
from guardfleet.replies import as_bytes, as_text
from guardfleet.schemas import BatchErrors, BatchItem, BatchStatus, Job, JobStatus, utcnow
from guardfleet.store import (
    JOB_FIELDS,
    STALE_S,
    JobStore,
    add_create,
    load_job,
    record_fields,
    renew_open_index,
)


class FanOut:
    """Queues the items of stored batches on the bulk lane, `chunk` per transaction.

    Each transaction creates the chunk's job records, pushes their Celery messages, appends their
    ids to the batch, and advances the cursor, watching the fan-out hash: if anything else moved
    the cursor (a second fan-out of the same batch, after a lease ran out) or a cancel arrived,
    the chunk is not written and the fan-out looks again. After a cancel the rest of the items
    are written as cancelled records (counted at once, no message), so every item has a result.

    With a `broker` on another server the messages are pushed there right after the
    transaction. If that push fails, the chunk's jobs are made stale at once in the open index,
    so that the stale-job sweep publishes them as soon as the broker answers again, and the
    error is raised (the lease brings the batch back for the items after the chunk).
    """

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        ttl_s: int,
        chunk: int,
        lease_s: float,
        stale_s: float = STALE_S,
        broker: redis.Redis | None = None,
    ) -> None:
        self.client = client
        self.broker = broker  # the broker's Redis, where it is another server
        self.app = app
        self.ttl_s = ttl_s
        self.chunk = chunk
        self.lease_s = lease_s
        self.stale_s = stale_s
        self.store = JobStore(client, ttl_s, stale_s)
        self._settle = client.register_script(SETTLE)

    def run(self, batch_id: str, stop: threading.Event | None = None) -> int:
        """Queue what is left of a batch; returns how many items this call wrote. Once `stop`
        is set it hands the batch back between chunks, due at once for another worker."""
        state = self.client.hget(batch_state_key(batch_id), "total")
        upload = self.client.get(batch_upload_key(batch_id))
        if state is None:  # expired
            self._forget(batch_id)
            return 0
        total = int(state)
        if upload is None:  # queued already (a cancel brought it back), or expired
            cursor = self.client.hget(batch_fanout_key(batch_id), "cursor")
            if cursor is not None and int(cursor) < total:
                self._fail(batch_id, "upload_missing", "the stored upload expired before queueing")
                self._forget(batch_id)
            else:
                self._finish(batch_id)
            return 0
        try:
            # Checked when accepted, so this cannot fail unless the stored bytes changed.
            items = parse_items(as_bytes(upload), max_items=total)
        except InvalidBatch as exc:
            self._fail(batch_id, exc.code, exc.message)
            self._forget(batch_id)
            return 0
        written = 0
        while (step := self._step(batch_id, items)) is not None:
            written += step
            if stop is not None and stop.is_set():
                self.client.zadd(batches_due(id_tag(batch_id)), {batch_id: time.time()}, xx=True)
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
                status = as_text(pipe.hget(batch_state_key(batch_id), "status") or b"")
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
                messages = self._write(pipe, batch_id, chunk, cancelled, status)
                pipe.hset(fanout, "cursor", cursor + len(chunk))
                # renew the lease
                pipe.zadd(batches_due(id_tag(batch_id)), {batch_id: time.time() + self.lease_s})
                pipe.execute()
            except redis.WatchError:
                now = self.client.hget(fanout, "cursor")
                if now is not None and int(now) != cursor:
                    return None  # another fan-out has it; it continues from there
                return 0
        # The fleet-wide estimate lives outside the batch's part, so outside its transaction.
        self.client.hset(BATCHES_PENDING, batch_id, len(items) - cursor - len(chunk))
        if messages:
            self._push(messages)
        if cancelled:
            self._settle(keys=[batch_state_key(batch_id)], args=["", "", utcnow().isoformat()])
        return len(chunk)

    def _push(self, messages: dict[str, str]) -> None:
        """Push the messages of jobs just created (id -> message) to a separate broker."""
        assert self.broker is not None
        try:
            self.broker.lpush(QUEUE_BULK, *messages.values())
        except redis.RedisError:
            self.store.hold(messages.keys(), lease_s=0)  # stale now: the sweep publishes them
            raise

    def _write(
        self,
        pipe: redis.client.Pipeline,
        batch_id: str,
        chunk: Sequence[BatchItem],
        cancelled: bool,
        status: str,
    ) -> dict[str, str]:
        """Queue the chunk's writes on `pipe`; returns the messages (by job id) that are still
        to be pushed to a separate broker once the transaction has run."""
        now, tag = utcnow(), id_tag(batch_id)
        messages: dict[str, str] = {}
        jobs = [
            Job(
                id=new_id("job", tag=tag),  # in the batch's part, as every key written here
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
            pipe.hincrby(stats(tag), "batch_items:cancelled", len(jobs))
            pipe.hincrby(stats(tag), "jobs_ended:cancelled", len(jobs))
        else:
            for job in jobs:
                add_create(pipe, job, QUEUE_BULK, self.ttl_s, self.stale_s)
            renew_open_index(pipe, self.ttl_s, tag)
            messages = {job.id: task_message(self.app, job.id, QUEUE_BULK) for job in jobs}
            if self.broker is None:
                pipe.lpush(QUEUE_BULK, *messages.values())
                messages = {}
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
        return messages

    def _finish(self, batch_id: str) -> None:
        """Every item is written: cancel the queued ones of a cancelling batch, end it if
        nothing is left running, and drop the upload and the due entry."""
        if self.client.hget(batch_state_key(batch_id), "status") == b"cancelling":
            self._cancel_queued(batch_id)
        self._settle(keys=[batch_state_key(batch_id)], args=["", "", utcnow().isoformat()])
        self._forget(batch_id)

    def _cancel_queued(self, batch_id: str) -> None:
        """Cancel every still-queued item, a pipelined chunk at a time, renewing the lease as
        it goes; items a worker started meanwhile are refused by the end script and counted
        when they finish. Safe to run again after a crash: only queued items change, and each
        is counted once."""
        key = batch_jobs_key(batch_id)
        total = int(self.client.llen(key))
        for start in range(0, total, self.chunk):
            ids = [as_text(i) for i in self.client.lrange(key, start, start + self.chunk - 1)]
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(job_key(job_id), JOB_FIELDS)
                raws = pipe.execute()
            now = utcnow()
            queued = [
                job.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": now})
                for job in (load_job(raw) for raw in raws)
                if job is not None and job.status is JobStatus.QUEUED
            ]
            saved = self.store.save_many(queued)
            cancelled = [job for job, ok in zip(queued, saved, strict=True) if ok]
            record_progress_many(self.client, cancelled, self.ttl_s)
            lease = {batch_id: time.time() + self.lease_s}
            self.client.zadd(batches_due(id_tag(batch_id)), lease, xx=True)

    def _forget(self, batch_id: str) -> None:
        # The count first: a crash between the two leaves the batch due, forgotten again later.
        self.client.hdel(BATCHES_PENDING, batch_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(batch_upload_key(batch_id))
            pipe.zrem(batches_due(id_tag(batch_id)), batch_id)
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
