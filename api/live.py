"""Following a job's live events (`guardfleet.streams`): the API's side of streaming.

A reader does not block on the job's Redis Stream (that would hold a pooled connection for as long
as it waits: a few hundred idle streams would take every connection). Each entry added to a stream
is announced on the job's stream channel; readers wait on the process's shared subscriber
(`api.waiters`) and read what is new without blocking, so a connection is theirs only for that
read. `None` from `follow` is a quiet second passing, when a reader checks its deadline or the
job record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import redis
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import jobs
from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import JOB_NOTICES, job_key, job_stream, job_stream_channel
from guardfleet.schemas import Job, JobError, JobStatus
from guardfleet.store import JOB_FIELDS, load_job
from guardfleet.streams import Entry

log = logging.getLogger(__name__)

PING_S = 15  # an SSE comment this often keeps idle proxies from closing a quiet stream
TICK_S = 1.0  # one quiet "tick" of `follow`
READ_COUNT = 256
RECHECK_S = 5  # quiet seconds between reads of the job record, a safety net under the stream
TERMINAL = {status.value for status in JobStatus if status.terminal}

# KEYS: job. ARGV: the notices channel, the job id, then `JOB_FIELDS`. Marks the job watched
# and returns its record in one step: every change after this is in the stream. A running job's
# worker is told at once, so it starts writing the text.
_WATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'watch', 1)
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return redis.call('HMGET', KEYS[1], unpack(ARGV, 3))
"""


def stream_id(value: str) -> tuple[int, int]:
    """A stream entry id as a comparable pair; ValueError if it is not one."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


async def watch(res: Resources, job_id: str) -> Job | None:
    """Start streaming a job: from now on its status changes and text go to its stream.
    Returns the job as it was at that moment."""
    raw = await res.redis.eval(_WATCH, 1, job_key(job_id), JOB_NOTICES, job_id, *JOB_FIELDS)
    return None if raw is None else load_job(raw)


async def follow(res: Resources, job_id: str) -> AsyncIterator[Entry | None]:
    """The job's entries from its first, as they come; None after each quiet second. Redis
    errors are retried for up to GUARDFLEET_REDIS_OUTAGE_S, then raised."""
    key, after = job_stream(job_id), "0-0"
    failing_since: float | None = None
    async with res.waiters.watch(job_stream_channel(job_id)) as appended:
        while True:
            appended.clear()  # before the read: an entry added after it wakes us again
            try:
                # RESP2 (our clients' protocol): [[key, [(id, fields), ...]]], or [] if none.
                found: Any = await res.redis.xread({key: after}, count=READ_COUNT)
            except redis.RedisError as exc:
                now = asyncio.get_running_loop().time()
                failing_since = failing_since or now
                if now - failing_since > res.settings.redis_outage_s:
                    raise
                log.warning("reading the stream of job %s failed (retrying): %s", job_id, exc)
                await asyncio.sleep(0.5)
                continue
            failing_since = None
            if found:
                for entry_id, fields in found[0][1]:
                    entry = Entry.parse(entry_id, fields)
                    after = entry.id
                    yield entry
                continue
            try:
                await asyncio.wait_for(appended.wait(), TICK_S)
            except TimeoutError:
                yield None


class NoProgress(Exception):
    """Nothing reached the stream for the time a streaming call may wait; the job was
    cancelled (`stream_timeout`)."""


async def entries(res: Resources, job_id: str, limit_s: float | None) -> AsyncIterator[Entry]:
    """The job's entries until its final status: `follow` with the waiting handled. Every
    RECHECK_S quiet seconds the job record is read too, as a safety net (it is the truth, and a
    stream can expire). After `limit_s` quiet seconds the job is cancelled and NoProgress
    raised: a streaming call's reader gives up, so nobody would read the rest."""
    quiet = 0
    async for entry in follow(res, job_id):
        if entry is None:
            quiet += 1
            if limit_s is not None and quiet >= limit_s:
                await abandon(res, job_id, "stream_timeout", "no progress on the stream")
                raise NoProgress(f"no progress within {limit_s:g}s; the job was cancelled")
            if quiet % RECHECK_S == 0:
                job = await res.store.get(job_id)
                if job is None or job.status.terminal:
                    return
            continue
        quiet = 0
        yield entry
        if entry.kind == "status" and entry.status in TERMINAL:
            return


async def abandon(res: Resources, job_id: str, error_type: str, message: str) -> None:
    """Cancel a streamed job nobody reads any more, saying why; never raises, and finishes even
    while the request around it is being cancelled (a disconnect)."""
    with anyio.move_on_after(res.settings.redis_timeout_s * 2, shield=True):
        try:
            job = await res.store.get(job_id)
            if job is not None:
                await jobs.cancel(res, job, JobError(type=error_type, message=message))
                log.info("job %s cancelled: %s", job_id, message)
        except APIError:
            pass  # it ended already, or meanwhile
        except (redis.RedisError, OSError) as exc:
            log.warning("could not cancel job %s after %s: %s", job_id, error_type, exc)


async def guarded(
    events: AsyncIterator[ServerSentEvent],
    failure: Callable[[str], list[ServerSentEvent]],
    abandon_job: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """`events`, ending with `failure`'s events if Redis stays away; `abandon_job` runs when
    the stream does not end by itself (the client disconnected, or the server is stopping)."""
    ended = False
    try:
        try:
            async for event in events:
                yield event
        except (redis.RedisError, OSError) as exc:
            log.warning("a stream ended early: %s", exc)
            for event in failure(f"the job store (Redis) is unavailable: {exc}"):
                yield event
        ended = True
    finally:
        if not ended and abandon_job is not None:
            await abandon_job()


def sse(data: str, kind: str | None = None, event_id: str | None = None) -> ServerSentEvent:
    """One event, its lines ended by "\n" as OpenAI's servers send them."""
    return ServerSentEvent(data=data, event=kind, id=event_id, sep="\n")


def event_stream(
    events: AsyncIterator[ServerSentEvent], headers: dict[str, str] | None = None
) -> EventSourceResponse:
    return EventSourceResponse(events, headers=headers, sep="\n", ping=PING_S)


# What OpenAPI (before 3.2) says about `text/event-stream`: the schema of one event.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def sse_responses(description: str, json_schema: dict[str, Any]) -> dict[int | str, Any]:
    """OpenAPI for a 200 that is JSON, or Server-Sent Events when the request asks to stream."""
    return {
        200: {
            "description": f"{description} as Server-Sent Events",
            "content": {
                "application/json": {"schema": json_schema},
                "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
            },
        }
    }
