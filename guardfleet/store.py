"""Job records in Redis: one hash per job, with a TTL, and an event per status change.

The hash holds the job document (`doc`, JSON) beside small fields the scripts read, so a status
change never decodes a document that may carry 200k characters of history:

    status    queued | running | succeeded | failed | cancelled
    attempt   how many runs have started (the document's `attempts`)
    queue     the lane the job was published to
    gen       how many messages were published for it (the reconciler adds one per re-publish)
    run_gen   `gen` when the current run started
    run_msg   the Celery task id of the message that started the current run
    run       the current run: its `started_at` (ISO 8601) and its worker, space-separated
    waited    set when someone waits for the job's end (a sync call, a long poll): only then is
              the end published on the job's channel

A start writes only the small fields (`status`, `attempt`, `run`...); the document is rewritten
when the job ends (or is cancelled). Read a job with `JOB_FIELDS` and `load_job`, which lays a
running job's fields over its document, never the document alone.

Starting a job is allowed when the job is queued, or when it is running and the message is the
very one that started that run (requeued by a worker that handed it back, or restored after a
broker reconnect) or was published after that run started (the reconciler declared the run
stale). Any other message is a duplicate and is dropped. The
attempt that started last owns the job: the result of an older attempt is refused. Ending a job
(and cancelling one) writes only from a status the change may start from, once.

A job someone streams also has `watch` set; then every status change is added to its stream
(`guardfleet.streams`) by the same script.

Open jobs are also in their part's open index (`keys.open_jobs`) with a staleness deadline; see
`worker.reconcile`. `JobStore` is for the worker (blocking client), `AsyncJobStore` for the API.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from guardfleet import streams
from guardfleet.keys import (
    JOB_NOTICES,
    by_tag,
    id_tag,
    job_channel,
    job_key,
    job_stream,
    open_jobs,
    stats,
)
from guardfleet.redis_conn import eval_many, initialize
from guardfleet.replies import optional_text
from guardfleet.schemas import Job, JobStatus

# Shared by the scripts below: a watched job's status changes also go to its stream.
_NOTE_STATUS = """
local function note_status(watched, stream, status, attempt, maxlen, ttl)
  if watched then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'kind', 'status', 'status', status,
               'attempt', attempt)
    redis.call('EXPIRE', stream, ttl)
    redis.call('PUBLISH', stream .. ':new', 'status')
    return 2
  end
  return 1
end
"""

# KEYS: job, open index, stream. ARGV: task id, message gen, run (start time and worker), deadline
# in the open index (the run lease), job id, stream maxlen, stream ttl. Returns {code, fields...}:
# 1 (or 2 when the job is watched) once started, then the record as `JOB_FIELDS` reads it; 0
# refused and -1 missing, with the record as it is. The same start sent again (its first reply
# lost) finds its own `run` and answers as if it had started the job now. Nothing is
# published on the job's channel (waiters wait for its end, see `job_channel`); the job's TTL
# runs from its creation, and the open index's TTL is renewed by the reconciler.
_START = (
    _NOTE_STATUS
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'gen', 'run_gen', 'run_msg', 'watch',
                     'run', 'doc')
if not h[1] then return {-1} end
local function record(code) return {code, h[8], h[1], h[2], h[7]} end
local watched = 1
if h[6] then watched = 2 end
if h[1] == 'running' and h[7] == ARGV[3] then return record(watched) end
if h[1] ~= 'queued' then
  if h[1] ~= 'running' then return record(0) end
  if h[5] ~= ARGV[1] and tonumber(ARGV[2]) <= tonumber(h[4] or '0') then return record(0) end
end
local attempt = tonumber(h[2]) + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', attempt, 'run_gen', h[3] or '1',
           'run_msg', ARGV[1], 'run', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
h[1], h[2], h[7] = 'running', attempt, ARGV[3]
return record(note_status(h[6], KEYS[3], 'running', attempt, ARGV[6], ARGV[7]))
"""
)

# KEYS: job, channel, open index, stream, fleet counters. ARGV: doc, new (final) status,
# allowed-from statuses, ttl, required current attempt ('' = any), job id, stream maxlen,
# stream ttl, notices channel (told when a running job is cancelled).
_END = (
    _NOTE_STATUS
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'watch', 'waited')
if not h[1] then return -1 end
if not string.find(',' .. ARGV[3] .. ',', ',' .. h[1] .. ',', 1, true) then return 0 end
if ARGV[5] ~= '' and h[2] ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[6])
if h[4] then redis.call('PUBLISH', KEYS[2], ARGV[2]) end
if h[1] == 'running' and ARGV[2] == 'cancelled' then redis.call('PUBLISH', ARGV[9], ARGV[6]) end
redis.call('HINCRBY', KEYS[5], 'jobs_ended:' .. ARGV[2], 1)
note_status(h[3], KEYS[4], ARGV[2], h[2], ARGV[7], ARGV[8])
return 1
"""
)

# From which statuses each final status may be reached.
ALLOWED_FROM: dict[JobStatus, tuple[JobStatus, ...]] = {
    JobStatus.SUCCEEDED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.FAILED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.CANCELLED: (JobStatus.QUEUED, JobStatus.RUNNING),
}
STALE_S = 7200.0


class TransitionRefused(Exception):
    """The job is gone, no longer in a status the change may start from, or owned by another
    attempt."""

    def __init__(
        self, job_id: str, target: JobStatus, missing: bool, current: Job | None = None
    ) -> None:
        reason = "does not exist" if missing else "has moved on"
        super().__init__(f"job {job_id} {reason}; not set to {target}")
        self.missing = missing
        self.current = current  # the job as the refusal found it, where the store said


def _end_args(job: Job, ttl_s: int, required_attempt: int | None) -> tuple[list[str], list[Any]]:
    allowed = ",".join(s.value for s in ALLOWED_FROM[job.status])
    tag = id_tag(job.id)
    return [job_key(job.id), job_channel(job.id), open_jobs(tag), job_stream(job.id), stats(tag)], [
        job.model_dump_json(),
        job.status.value,
        allowed,
        ttl_s,
        "" if required_attempt is None else required_attempt,
        job.id,
        streams.MAX_ENTRIES,
        streams.TTL_S,
        JOB_NOTICES,
    ]


def _check(code: int, job: Job) -> None:
    if code != 1:
        raise TransitionRefused(job.id, job.status, missing=code == -1)


# What a reader asks the job hash for (HMGET), in this order, for `load_job` (and
# `_READ_WAITED`, which reads the status second).
JOB_FIELDS = ("doc", "status", "attempt", "run")


def load_job(raw: Sequence[Any]) -> Job | None:
    """The job from its `JOB_FIELDS` (None if it does not exist): the document, with a running
    job's run laid over it."""
    doc, status, attempt, run = (optional_text(v) for v in raw)
    if doc is None:
        return None
    job = Job.model_validate_json(doc)
    if status == JobStatus.RUNNING.value and run is not None:
        started, _, worker = run.partition(" ")  # an ISO 8601 time has no space
        update = {"status": JobStatus.RUNNING, "attempts": int(attempt or 0), "worker": worker}
        job = job.model_copy(update={**update, "started_at": datetime.fromisoformat(started)})
    return job


def record_fields(
    job: Job, queue: str, watch: bool = False, waited: bool = False
) -> dict[FieldT, EncodableT]:
    """The hash a new job is created with (also used by the batch store's pipelines)."""
    fields: dict[FieldT, EncodableT] = {
        "doc": job.model_dump_json(),
        "status": job.status.value,
        "attempt": job.attempts,
        "queue": queue,
        "gen": 1,
    }
    if watch:
        fields["watch"] = 1
    if waited:
        fields["waited"] = 1
    return fields


def add_create(
    pipe: Any, job: Job, queue: str, ttl_s: int, stale_s: float, watch: bool = False
) -> None:
    """Queue the commands that create `job` on a (sync or async) pipeline; a `watch`ed job
    streams its events from the start (`guardfleet.streams`). The caller renews the open
    index's TTL (`renew_open_index`), once per pipeline rather than once per job."""
    pipe.hset(job_key(job.id), mapping=record_fields(job, queue, watch))
    pipe.expire(job_key(job.id), ttl_s)
    pipe.zadd(open_jobs(id_tag(job.id)), {job.id: time.time() + stale_s})


def renew_open_index(pipe: Any, ttl_s: int, tag: str) -> None:
    """Keep a part's open index alive as long as the jobs just created in it; every worker's
    reconciler renews it too, so it goes only once no worker runs and its jobs have expired."""
    pipe.expire(open_jobs(tag), ttl_s)


# A job's creation, for the API: one script call rather than a MULTI/EXEC of five commands.
# KEYS: job, open index, and the queue when the broker is this Redis. ARGV: ttl, deadline in the
# open index, job id, task message, the open index's new TTL ('' to leave it), then the record's
# field/value pairs.
_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
if KEYS[3] then redis.call('LPUSH', KEYS[3], ARGV[4]) end
"""
INDEX_RENEW_S = 60

# KEYS: job. ARGV: `JOB_FIELDS` (the status second). The record, marked as waited for if it
# exists and has not ended (an ended job has nothing left to announce).
_READ_WAITED = """
local r = redis.call('HMGET', KEYS[1], unpack(ARGV))
if r[2] == 'queued' or r[2] == 'running' then redis.call('HSET', KEYS[1], 'waited', 1) end
return r
"""


def set_deadlines(client: redis.Redis, job_ids: Collection[str], deadline: float) -> None:
    """Move open jobs' deadlines in the open index. Only ids still in the index are touched: a
    job that ended meanwhile stays out."""
    with client.pipeline(transaction=False) as pipe:  # one round trip, one command a part
        for tag, ids in by_tag(job_ids).items():
            pipe.zadd(open_jobs(tag), dict.fromkeys(ids, deadline), xx=True)
        pipe.execute()


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        stale_s: float = STALE_S,
        run_lease_s: float | None = None,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        # A started job's deadline in the open index: its worker renews it while it runs
        # (`hold`), so the reconciler publishes it again soon after that worker dies.
        self.run_lease_s = stale_s if run_lease_s is None else run_lease_s
        self._start = client.register_script(_START)
        self._end = client.register_script(_END)

    def get(self, job_id: str) -> Job | None:
        return load_job(self.client.hmget(job_key(job_id), JOB_FIELDS))

    def poll(self, job_id: str) -> tuple[str | None, bool]:
        """The status, and whether anyone streams the job: cheap enough to read while it runs."""
        status, watch = self.client.hmget(job_key(job_id), ["status", "watch"])
        return optional_text(status), status is not None and watch is not None

    def create(self, job: Job, queue: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            add_create(pipe, job, queue, self.ttl_s, self.stale_s)
            renew_open_index(pipe, self.ttl_s, id_tag(job.id))
            pipe.execute()

    def start(
        self, job_id: str, task_id: str, gen: int, worker: str, started_at: datetime
    ) -> tuple[Job, bool]:
        """Move the job to `running` as a new attempt by `worker` at `started_at`, for the
        message (`task_id`, `gen`); returns it, and whether someone streams it. Raises
        TransitionRefused (with the job as found) for a duplicate message or a job that is not
        queued or running. Safe to call again with the same arguments after an error: a start
        that landed is returned."""
        keys = [job_key(job_id), open_jobs(id_tag(job_id)), job_stream(job_id)]
        args: list[EncodableT] = [
            task_id,
            gen,
            f"{started_at.isoformat()} {worker}",
            time.time() + self.run_lease_s,
            job_id,
            streams.MAX_ENTRIES,
            streams.TTL_S,
        ]
        code, *raw = self._start(keys=keys, args=args)
        job = load_job(raw) if raw else None
        if int(code) < 1 or job is None:
            raise TransitionRefused(job_id, JobStatus.RUNNING, int(code) == -1, job)
        return job, int(code) == 2

    def hold(self, job_ids: Collection[str], lease_s: float | None = None) -> None:
        """Set the open-index deadline of jobs this worker runs (or hands back) to `lease_s`
        (the run lease unless given) from now."""
        lease = self.run_lease_s if lease_s is None else lease_s
        set_deadlines(self.client, job_ids, time.time() + lease)

    def save(self, job: Job) -> None:
        """End `job` (succeeded or failed) as the attempt it carries; raises TransitionRefused
        if it ended already or a later attempt owns it."""
        keys, args = _end_args(job, self.ttl_s, job.attempts)
        _check(int(self._end(keys=keys, args=args)), job)

    def save_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Changes made for the API (a batch's queued items cancelled), many in one round
        trip, no attempt required; True where the change was made."""
        calls = [_end_args(job, self.ttl_s, None) for job in jobs]
        return [int(code) == 1 for code in eval_many(self.client, self._end, calls)]


class AsyncJobStore:
    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: int,
        stale_s: float = STALE_S,
        broker: aioredis.Redis | None = None,
    ) -> None:
        self.client = client
        self.broker = broker  # the broker's Redis, where it is another server
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self._end = client.register_script(_END)
        self._create = client.register_script(_CREATE)
        self._read_waited = client.register_script(_READ_WAITED)
        self._index_renewed: dict[str, float] = {}  # by part

    async def get(self, job_id: str) -> Job | None:
        return load_job(await self.client.hmget(job_key(job_id), JOB_FIELDS))

    async def get_waited(self, job_id: str) -> Job | None:
        """The job, which from now on announces its end on its channel (`job_channel`)."""
        return load_job(await self._read_waited(keys=[job_key(job_id)], args=list(JOB_FIELDS)))

    async def get_many(self, job_ids: Iterable[str]) -> list[Job | None]:
        ids = list(job_ids)
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(job_key(job_id), JOB_FIELDS)
            return [load_job(raw) for raw in await pipe.execute()]

    async def create(
        self, job: Job, queue: str, message: str, watch: bool = False, waited: bool = False
    ) -> None:
        """Store `job` and push its task `message` on `queue` (kombu's list for the queue,
        which consumers BRPOP): in the same script when the broker is this Redis, so there is
        never a record without its message. A `waited` job announces its end on its channel
        (`job_channel`).

        With a separate broker it is two writes, the record first: a worker that takes the
        message always finds the job. If the push fails the record is taken back and the error
        raised (the caller answers 503; nothing runs). A process that dies between the two
        leaves a queued record without a message, which the stale-job sweep publishes once its
        deadline (`stale_s`) passes, as it does for a message the broker lost."""
        renew, tag = "", id_tag(job.id)
        if time.monotonic() - self._index_renewed.get(tag, -INDEX_RENEW_S) >= INDEX_RENEW_S:
            # The jobs of the next minute may outlive the index by up to a minute if no worker
            # runs meanwhile (each one's reconciler renews it every few seconds): then nothing
            # sweeps the index anyway.
            renew, self._index_renewed[tag] = str(self.ttl_s), time.monotonic()
        fields = [v for pair in record_fields(job, queue, watch, waited).items() for v in pair]
        keys = [job_key(job.id), open_jobs(tag)]
        if self.broker is None:
            keys.append(queue)
        deadline = time.time() + self.stale_s
        await self._create(keys=keys, args=[self.ttl_s, deadline, job.id, message, renew, *fields])
        if self.broker is None:
            return
        try:
            await self.broker.lpush(queue, message)
        except redis.RedisError:
            # Not accepted, so it must not run later: if the push landed after all (its reply
            # lost), the message finds no job and is dropped.
            with contextlib.suppress(redis.RedisError):
                await initialize(self.client)
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.delete(job_key(job.id))
                    pipe.zrem(open_jobs(tag), job.id)
                    await pipe.execute()
            raise

    async def save(self, job: Job) -> None:
        """A change made by the API (a cancel): no attempt is required, since the API never runs
        jobs."""
        keys, args = _end_args(job, self.ttl_s, None)
        _check(int(await self._end(keys=keys, args=args)), job)
