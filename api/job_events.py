"""A job's life as Server-Sent Events: `GET /v1/jobs/{id}/events` and `POST /v1/classify` with
`"stream": true`.

    event: status     {"id": ..., "status": "running", "attempt": 1}
    event: reasoning  {"delta": "...", "attempt": 1}       (think mode, as the trace is written)
    event: done       the whole job, as GET /v1/jobs/{id} returns it; id "end"; then the stream ends
    event: error      {"error": {...}} when streaming itself failed; then the stream ends

Every event but the first status carries an `id`; a client that reconnects with
`Last-Event-ID` gets what came after it, and one that already has `done` gets 204 (which tells
browsers' EventSource to stop reconnecting). If the job runs again after its worker died, a
status event with the new attempt comes first and the reasoning starts over. The deltas of an
attempt joined together are its trace as generated; `done` carries the verdict's `reasoning`
(the same text, trimmed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import ServerSentEvent

from api import jobs, live
from api.deps import Resources
from api.errors import error_body
from guardfleet.schemas import Job
from guardfleet.streams import Entry, Transcript, reasoning_so_far

END_ID = "end"


def _event(kind: str, data: object, event_id: str | None = None) -> ServerSentEvent:
    return live.sse(json.dumps(data), kind, event_id)


async def done_event(res: Resources, job: Job) -> ServerSentEvent:
    job = await jobs.with_webhook(res, job)
    return live.sse(job.model_dump_json(), "done", END_ID)


def error_event(status: int, message: str, code: str) -> ServerSentEvent:
    return live.sse(json.dumps(error_body(status, message, code)), "error")


@dataclass
class _View:
    """What one reader has been told: the status announced and the trace shown."""

    status: tuple[str, int]
    quiet_until: tuple[int, int] | None  # entries up to here were sent before a reconnect
    min_attempt: int  # entries of older attempts are history for a new reader
    transcript: Transcript = field(default_factory=Transcript)
    shown: str = ""

    def quiet(self, entry: Entry) -> bool:
        return entry.attempt < self.min_attempt or (
            self.quiet_until is not None and live.stream_id(entry.id) <= self.quiet_until
        )

    def take(self, job_id: str, entry: Entry) -> ServerSentEvent | None:
        quiet = self.quiet(entry)
        attempt = self.transcript.attempt
        self.transcript.apply(entry)
        if self.transcript.attempt != attempt:
            self.shown = ""
        if entry.kind == "status" and entry.status is not None:
            announced = self.status
            self.status = (entry.status, entry.attempt)
            if quiet or self.status == announced:
                return None
            data = {"id": job_id, "status": entry.status, "attempt": entry.attempt}
            return _event("status", data, entry.id)
        trace = reasoning_so_far(self.transcript.text)
        if not trace or len(trace) <= len(self.shown):
            return None
        delta, self.shown = trace[len(self.shown) :], trace
        if quiet:
            return None
        return _event("reasoning", {"delta": delta, "attempt": entry.attempt}, entry.id)


def job_events(
    res: Resources, job: Job, last_event_id: str | None, owned: bool = False
) -> AsyncIterator[ServerSentEvent]:
    """The events of `job` (as `live.watch` returned it) for a new reader, or for one resuming
    after `last_event_id`. An `owned` stream is the only reader of a classify call: when its
    client leaves, or nothing happens for GUARDFLEET_SYNC_TIMEOUT_S, the job is cancelled."""

    def failure(message: str) -> list[ServerSentEvent]:
        return [error_event(503, message, "store_unavailable")]

    async def abandon() -> None:
        await live.abandon(res, job.id, "client_disconnected", "the client left the stream")

    events = _events(res, job, last_event_id, res.settings.sync_timeout_s if owned else None)
    return live.guarded(events, failure, abandon if owned else None)


async def _events(
    res: Resources, job: Job, last_event_id: str | None, limit: float | None
) -> AsyncIterator[ServerSentEvent]:
    if job.status.terminal and last_event_id is None:
        yield await done_event(res, job)
        return
    view = _View(
        status=(job.status.value, job.attempts),
        quiet_until=live.stream_id(last_event_id) if last_event_id else None,
        min_attempt=0 if last_event_id else job.attempts,
    )
    if last_event_id is None:
        yield _event("status", {"id": job.id, "status": job.status, "attempt": job.attempts})
    try:
        async for entry in live.entries(res, job.id, limit):
            if (event := view.take(job.id, entry)) is not None:
                yield event
    except live.NoProgress as exc:
        yield error_event(504, str(exc), "sync_timeout")
        return
    final = await res.store.get(job.id)
    if final is None:
        yield error_event(404, f"job {job.id} expired while it was streamed", "job_expired")
        return
    yield await done_event(res, final)
