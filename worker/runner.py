"""The model thread: Celery task threads hand it requests, it forms batches and runs them.

Task threads call `submit()` and block on the returned future; one thread owns the model, so
torch never runs two forward passes at once in this process and batches can form across the
concurrently running tasks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from worker.batching import BatchPolicy, Pending, next_deadline, take_batch
from worker.engine import Engine, GenRequest, GenResult

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
    def __init__(self, engine: Engine, policy: BatchPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self._pending: list[Pending[_Work]] = []
        self._incoming = 0  # task threads that will submit soon: worth waiting for
        self._cond = threading.Condition()
        self._stopped = False
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
            if self._stopped:
                raise RuntimeError("the model thread has stopped")
            self._pending.append(item)
            self._cond.notify()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Pending[_Work]]:
        with self._cond:
            while not self._stopped:
                batch = take_batch(self._pending, time.monotonic(), self.policy, self._incoming > 0)
                if batch:
                    return batch
                deadline = next_deadline(self._pending, self.policy)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._cond.wait(timeout)
            return []

    def _loop(self) -> None:
        while batch := self._next_batch():
            self._run(batch)
        with self._cond:
            for item in self._pending:
                item.item.future.set_exception(RuntimeError("worker shutting down"))

    def _run(self, batch: list[Pending[_Work]]) -> None:
        started = time.monotonic()
        try:
            results = self.engine.generate([p.item.request for p in batch])
        except Exception as exc:
            if len(batch) == 1:
                log.exception("generation failed")
                batch[0].item.future.set_exception(exc)
                return
            # One bad request must fail only its own job: run each alone to find it.
            log.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            for item in batch:
                self._run([item])
            return
        elapsed_ms = (time.monotonic() - started) * 1000.0
        for item, result in zip(batch, results, strict=True):
            wait_ms = (started - item.enqueued_at) * 1000.0
            item.item.future.set_result(Timed(result, item.tokens, len(batch), wait_ms, elapsed_ms))
