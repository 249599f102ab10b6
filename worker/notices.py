"""Cancels and new readers of running jobs, heard at once instead of polled.

The API announces on one fleet-wide channel (`guardfleet.keys.JOB_NOTICES`) when a running job is
cancelled or starts being streamed; each worker keeps one subscription and wakes that job's task
thread, which then reads the job's status. Before, every running job read its status every half
second: on a CPU worker, whose jobs wait seconds for their turn, that was most of a job's Redis
commands. The read stays as a safety net every `SAFETY_POLL_S`, for a notice published while the
subscription was reconnecting (every watched job is woken after a reconnect, too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from guardfleet.keys import JOB_NOTICES
from guardfleet.replies import as_text

log = logging.getLogger(__name__)

SAFETY_POLL_S = 5.0
_RETRY_S = 0.5


class Notices:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._events: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="job-notices", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever `job_id` gets a notice (and after a reconnect)."""
        event = threading.Event()
        with self._lock:
            self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._events.get(job_id, set())
                events.discard(event)
                if not events:
                    self._events.pop(job_id, None)

    def _wake(self, job_id: str | None) -> None:
        with self._lock:
            events = (
                [e for group in self._events.values() for e in group]
                if job_id is None
                else list(self._events.get(job_id, ()))
            )
        for event in events:
            event.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(JOB_NOTICES)
                self._wake(None)  # anything published while we were away is read now
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        data = message["data"]
                        self._wake(as_text(data))
            except redis.RedisError as exc:
                log.warning("job notices: %s; subscribing again", exc)
                self._stop.wait(_RETRY_S)
            finally:
                pubsub.close()
