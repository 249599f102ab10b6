"""`POST /v1/chat/completions` with `"stream": true`: OpenAI's chunk stream, fed live from the
worker through the job's Redis Stream (`guardfleet.streams`).

    data: {"object": "chat.completion.chunk", ..., "choices": [{"delta": {"role": "assistant"}}]}
    data: {... "choices": [{"delta": {"content": "<think>\\nThe"}, "finish_reason": null}]}
    ...
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}      (only with stream_options.include_usage)
    data: [DONE]

The content deltas joined are the non-streamed `content`, byte for byte. A failure after the
first byte arrives as `data: {"error": {...}}` (the envelope of every other error), then
`[DONE]`. A client that disconnects, or a stream with no progress for GUARDFLEET_SYNC_TIMEOUT_S,
cancels the job: its row leaves the running batch at the next decode step.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent

from api import live
from api.deps import Resources
from api.errors import error_body
from guardfleet.schemas import Completion, Job, JobStatus
from guardfleet.streams import Diverged, Transcript, continuation

DONE = "[DONE]"


class ChatStream:
    """The chunks of one streamed completion of `job_id`."""

    def __init__(self, res: Resources, job_id: str, model: str, include_usage: bool) -> None:
        self.res = res
        self.job_id = job_id
        self.id = "chatcmpl-" + job_id.removeprefix("job_")
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self.sent = ""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> ServerSentEvent:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return live.sse(json.dumps(body))

    def _delta(self, delta: dict[str, str], finish: str | None = None) -> ServerSentEvent:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )

    def _error(self, status: int, message: str, code: str | None) -> list[ServerSentEvent]:
        return [
            live.sse(json.dumps(error_body(status, message, code))),
            live.sse(DONE),
        ]

    def events(self) -> AsyncIterator[ServerSentEvent]:
        return live.guarded(
            self._events(),
            lambda message: self._error(503, message, "store_unavailable"),
            lambda: live.abandon(
                self.res, self.job_id, "client_disconnected", "the client left the stream"
            ),
        )

    async def _events(self) -> AsyncIterator[ServerSentEvent]:
        yield self._delta({"role": "assistant", "content": ""})
        transcript = Transcript()
        try:
            async for entry in live.entries(
                self.res, self.job_id, self.res.settings.sync_timeout_s
            ):
                if not transcript.apply(entry):
                    continue
                try:
                    new = continuation(self.sent, transcript.text)
                except Diverged as exc:
                    for event in self._error(500, str(exc), "stream_diverged"):
                        yield event
                    return
                if new:
                    self.sent += new
                    yield self._delta({"content": new})
        except live.NoProgress as exc:
            for event in self._error(504, str(exc), "sync_timeout"):
                yield event
            return
        job = await self.res.store.get(self.job_id)
        for event in self._final(job):
            yield event

    def _final(self, job: Job | None) -> list[ServerSentEvent]:
        if job is None:
            return self._error(404, f"job {self.job_id} expired while streaming", "job_expired")
        result = job.result
        if job.status is JobStatus.CANCELLED:
            reason = f": {job.error.message}" if job.error else ""
            return self._error(409, f"job {job.id} was cancelled{reason}", "job_cancelled")
        if job.status is not JobStatus.SUCCEEDED or not isinstance(result, Completion):
            error = job.error
            if error is not None and error.type == "input_too_long":
                return self._error(400, error.message, "context_length_exceeded")
            message = error.message if error else f"job ended {job.status}"
            return self._error(
                500, f"completion failed: {message} (job {job.id})", error.type if error else None
            )
        try:
            rest = continuation(self.sent, result.text)
        except Diverged as exc:
            return self._error(500, str(exc), "stream_diverged")
        events = [self._delta({"content": rest})] if rest else []
        events.append(self._delta({}, finish=result.finish_reason))
        if self.include_usage:
            usage = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
            events.append(self._chunk([], usage=usage))
        events.append(live.sse(DONE))
        return events
