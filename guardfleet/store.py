"""Job records in Redis: one JSON document per job, with a TTL, and an event per status change.

Every status change goes through one Lua script that writes only if the job's current status is
one the change may start from. That makes result writes idempotent under at-least-once delivery
(a redelivered job that already succeeded is not overwritten) and lets cancel race safely with a
worker: whoever changes the status first wins, the other is told so.

`JobStore` is for the worker (blocking client), `AsyncJobStore` for the API (asyncio client).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from guardfleet.keys import job_channel, job_key
from guardfleet.schemas import Job, JobStatus

_TRANSITION = """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
local status = cjson.decode(current)['status']
if not string.find(',' .. ARGV[3] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# From which statuses each target status may be reached. A job found `running` may be started
# again: that is a redelivery after its worker died.
ALLOWED_FROM: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.RUNNING: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.SUCCEEDED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.FAILED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.CANCELLED: (JobStatus.QUEUED,),
}


class TransitionRefused(Exception):
    """The job is gone or no longer in a status the change may start from."""

    def __init__(self, job_id: str, target: JobStatus, missing: bool) -> None:
        reason = "does not exist" if missing else "has moved on"
        super().__init__(f"job {job_id} {reason}; not set to {target}")
        self.missing = missing


def _transition_args(job: Job, ttl_s: int) -> tuple[list[str], list[Any]]:
    allowed = ",".join(s.value for s in ALLOWED_FROM[job.status])
    return [job_key(job.id), job_channel(job.id)], [
        job.model_dump_json(),
        job.status.value,
        allowed,
        ttl_s,
    ]


def _check(code: int, job: Job) -> None:
    if code != 1:
        raise TransitionRefused(job.id, job.status, missing=code == -1)


def _load(raw: bytes | str | None) -> Job | None:
    return None if raw is None else Job.model_validate_json(raw)


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)

    def get(self, job_id: str) -> Job | None:
        return _load(self.client.get(job_key(job_id)))

    def create(self, job: Job) -> None:
        self.client.set(job_key(job.id), job.model_dump_json(), ex=self.ttl_s)

    def save(self, job: Job) -> None:
        """Move `job` to its (new) status; raises TransitionRefused if that is not allowed."""
        keys, args = _transition_args(job, self.ttl_s)
        _check(int(self._transition(keys=keys, args=args)), job)


class AsyncJobStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)

    async def get(self, job_id: str) -> Job | None:
        return _load(await self.client.get(job_key(job_id)))

    async def get_many(self, job_ids: Iterable[str]) -> list[Job | None]:
        ids = list(job_ids)
        if not ids:
            return []
        return [_load(raw) for raw in await self.client.mget([job_key(i) for i in ids])]

    async def create(self, job: Job) -> None:
        await self.client.set(job_key(job.id), job.model_dump_json(), ex=self.ttl_s)

    async def save(self, job: Job) -> None:
        keys, args = _transition_args(job, self.ttl_s)
        _check(int(await self._transition(keys=keys, args=args)), job)

    async def save_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Like `save` for many jobs in one round trip; True where the change was made."""
        if not jobs:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for job in jobs:
                keys, args = _transition_args(job, self.ttl_s)
                await self._transition(keys=keys, args=args, client=pipe)
            return [int(code) == 1 for code in await pipe.execute()]
