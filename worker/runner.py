"""The model thread: Celery task threads hand it requests, it forms batches and runs them.

Task threads call `submit()` and block on the returned future; one thread owns the model, so
torch never runs two forward passes at once in this process and batches can form across the
concurrently running tasks.

The runner also knows whether it can still serve: `problem()` names a dead model thread or one
stuck in a batch longer than `stall_s`, and `drain()` (on SIGTERM) lets the running batch finish
while everything not yet started is handed back with `ModelUnavailable`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass

from worker.batching import BatchPolicy, Pending, next_deadline, take_batch
from worker.engine import Engine, GenRequest, GenResult
from worker.errors import ModelUnavailable

log = logging.getLogger(__name__)


@dataclass
class Timed:
    """A generation result with what it cost: the batch it ran in and the time spent."""

    result: GenResult
    prompt_tokens: int
    batch_size: int
    queue_wait_ms: float
    inference_ms: float


@dataclass
class _Work:
    request: GenRequest
    future: Future[Timed]


class Runner:
    def __init__(
        self, engine: Engine, policy: BatchPolicy, stall_s: float = 300.0, fault: str = ""
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.stall_s = stall_s
        self._fault = fault
        self._pending: list[Pending[_Work]] = []
        self._running: list[Pending[_Work]] = []
        self._busy_since: float | None = None  # monotonic start of the batch in progress
        self._incoming = 0  # task threads that will submit soon: worth waiting for
        self._cond = threading.Condition()
        self._closed: str | None = None  # why no new work is taken, once that is so
        self._died: str | None = None
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    @contextmanager
    def arriving(self) -> Iterator[Callable[[GenRequest], Future[Timed]]]:
        """Announce a request that is being prepared, so a batch waits for it; yields `submit`.

        Leaving the block without submitting (the job failed early) withdraws the announcement.
        """
        with self._cond:
            self._incoming += 1
        pending = True

        def submit(request: GenRequest) -> Future[Timed]:
            nonlocal pending
            with self._cond:
                pending, self._incoming = False, self._incoming - 1
            return self.submit(request)

        try:
            yield submit
        finally:
            if pending:
                with self._cond:
                    self._incoming -= 1
                    self._cond.notify()

    def submit(self, request: GenRequest) -> Future[Timed]:
        future: Future[Timed] = Future()
        item = Pending(
            _Work(request, future), len(request.prompt_ids), request.batch_key, time.monotonic()
        )
        with self._cond:
            if self._closed is not None:
                raise ModelUnavailable(self._closed)
            self._pending.append(item)
            self._cond.notify()
        return future

    def problem(self) -> str | None:
        """Why this runner cannot serve any more (dead or stuck model thread), or None."""
        if self._died is not None:
            return self._died
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.stall_s:
            return f"the model thread has been stuck in one batch for over {self.stall_s:g}s"
        return None

    def drain(self) -> None:
        """Take no new work; hand back what has not started. The running batch finishes."""
        self._close("worker shutting down; the job goes back on its queue", include_running=False)

    def abandon(self, reason: str) -> None:
        """The model thread cannot be trusted: hand back everything, running batch included."""
        self._close(reason, include_running=True)

    def stop(self) -> None:
        self.drain()
        self._thread.join(timeout=30)

    def _close(self, reason: str, include_running: bool) -> None:
        with self._cond:
            self._closed = self._closed or reason
            handed_back = self._pending + (self._running if include_running else [])
            self._pending = []
            self._cond.notify_all()
        for item in handed_back:
            _settle(item.item.future, ModelUnavailable(reason))

    def _next_batch(self) -> list[Pending[_Work]]:
        with self._cond:
            while self._closed is None:
                batch = take_batch(self._pending, time.monotonic(), self.policy, self._incoming > 0)
                if batch:
                    self._running, self._busy_since = batch, time.monotonic()
                    return batch
                deadline = next_deadline(self._pending, self.policy)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._cond.wait(timeout)
            return []

    def _loop(self) -> None:
        try:
            while batch := self._next_batch():
                self._inject_fault()
                self._run(batch)
                with self._cond:
                    self._running, self._busy_since = [], None
        except BaseException as exc:
            log.critical("the model thread died", exc_info=True)
            self._died = f"the model thread died: {type(exc).__name__}: {exc}"
            self.abandon(self._died)
            raise

    def _inject_fault(self) -> None:
        if self._fault == "model_thread_dies":
            raise RuntimeError("injected fault: the model thread dies")
        if self._fault == "model_thread_hangs":
            threading.Event().wait()

    def _run(self, batch: list[Pending[_Work]]) -> None:
        started = time.monotonic()
        try:
            results = self.engine.generate([p.item.request for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            if len(batch) == 1:
                log.exception("generation failed")
                _settle(batch[0].item.future, exc)
                return
            # One bad request must fail only its own job: run each alone to find it.
            log.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            for item in batch:
                self._run([item])
            return
        elapsed_ms = (time.monotonic() - started) * 1000.0
        for item, result in zip(batch, results, strict=True):
            wait_ms = (started - item.enqueued_at) * 1000.0
            _settle(item.item.future, Timed(result, item.tokens, len(batch), wait_ms, elapsed_ms))


def _settle(future: Future[Timed], outcome: Timed | BaseException) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # already handed back by drain() or abandon()
        pass
