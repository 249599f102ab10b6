"""The model thread: Celery task threads hand it requests; it runs them as one continuous batch.

Task threads call `submit()` and block on the returned future; one thread owns the model, so
torch never runs two forward passes at once in this process. Each turn of its loop:

    1. admit waiting requests as a new prefill group, if the running set has room (batching.py);
    2. compute one chunk (`prefill_chunk` tokens) of one group's prompts, so a long prompt never
       freezes the running rows for more than a chunk and a short one can start meanwhile;
    3. a group whose prompts are done joins the running set; run one decode step for every row;
    4. rows that stopped, ran out of tokens or were cancelled leave and their futures settle.

The runner also knows whether it can still serve: `problem()` names a dead model thread or one
stuck in a single step longer than `stall_s`, and `drain()` (on SIGTERM) lets the rows already
running finish while everything not yet started is handed back with `ModelUnavailable`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from worker.batching import BatchPolicy, Pending, admit, prefill_groups
from worker.engine import Batch, Engine, GenRequest, GenResult, Prefill, Row
from worker.errors import ModelUnavailable

log = logging.getLogger(__name__)


@dataclass
class Timed:
    """A generation result with what it cost: the batch it ran in and the time spent."""

    result: GenResult
    prompt_tokens: int
    batch_size: int  # rows in the running set when this one joined it
    queue_wait_ms: float  # waiting to be admitted
    inference_ms: float  # admitted -> last token
    prefill_ms: float  # admitted -> first token (prefill chunks, and decode steps between them)


@dataclass
class _Work:
    request: GenRequest
    future: Future[Timed]
    admitted_at: float = 0.0
    prefilled_at: float = 0.0
    batch_size: int = 0


class Runner:
    def __init__(
        self, engine: Engine, policy: BatchPolicy, stall_s: float = 300.0, fault: str = ""
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.stall_s = stall_s
        self._fault = fault
        self._waiting: list[Pending[_Work]] = []
        self._live: dict[Row, Pending[_Work]] = {}  # rows prefilling or running
        self._busy_since: float | None = None  # monotonic start of the step in progress
        self._cond = threading.Condition()
        self._closed: str | None = None  # why no new work is taken, once that is so
        self._abandoned = False
        self._died: str | None = None
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest) -> Future[Timed]:
        self.engine.check(request)  # a request that cannot run fails alone, here
        future: Future[Timed] = Future()
        prefix = request.prefix if self.engine.reuse_prefix else ()
        item = Pending(
            _Work(request, future),
            request.reserved_tokens,
            len(request.prompt_ids) - len(prefix),
            prefix,
            request.priority,
            time.monotonic(),
        )
        with self._cond:
            if self._closed is not None:
                raise ModelUnavailable(self._closed)
            self._waiting.append(item)
            self._cond.notify()
        return future

    def load(self) -> tuple[int, int]:
        """(requests prefilling or generating, requests waiting to join)."""
        with self._cond:
            return len(self._live), len(self._waiting)

    def problem(self) -> str | None:
        """Why this runner cannot serve any more (dead or stuck model thread), or None."""
        if self._died is not None:
            return self._died
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.stall_s:
            return f"the model thread has been stuck in one step for over {self.stall_s:g}s"
        return None

    def drain(self) -> None:
        """Take no new work; hand back what has not started. Running rows finish."""
        self._close("worker shutting down; the job goes back on its queue", include_running=False)

    def abandon(self, reason: str) -> None:
        """The model thread cannot be trusted: hand back everything, running rows included."""
        self._close(reason, include_running=True)

    def stop(self) -> None:
        self.drain()
        self._thread.join(timeout=30)

    def _close(self, reason: str, include_running: bool) -> None:
        with self._cond:
            self._closed = self._closed or reason
            handed_back, self._waiting = self._waiting, []
            if include_running:
                self._abandoned = True
                handed_back += list(self._live.values())
            self._cond.notify_all()
        for item in handed_back:
            _settle(item.item.future, ModelUnavailable(reason))

    def _next_group(self, busy: bool) -> list[Pending[_Work]] | None:
        """The next prefill group; [] if none now; None once closed and idle (loop ends)."""
        with self._cond:
            while True:
                if self._abandoned:
                    return None
                in_flight = [p.reserved for p in self._live.values()]
                group = admit(self._waiting, in_flight, self.policy)
                if group or busy:
                    return group
                if self._closed is not None:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        batch: Batch | None = None
        works: list[Prefill] = []  # groups being prefilled, oldest first
        turn = 0
        try:
            while not self._abandoned:
                group = self._next_group(busy=bool(works) or bool(batch and batch.rows))
                if group is None:
                    return
                self._busy_since = time.monotonic()
                for part in prefill_groups(group, self.engine.prefill_chunk):
                    if (started := self._begin(part)) is not None:
                        works.append(started)  # its rows are live: abandon() can hand them back
                        self._inject_fault()
                if works:
                    # Alternate shortest-first (a sync call's short prompt is not stuck behind a
                    # burst's prefill) with oldest-first (so nothing starves).
                    turn += 1
                    work = min(works, key=_prefill_left) if turn % 2 else works[0]
                    done = self._prefill(work)  # None: it failed, its rows are settled
                    if done:
                        batch = self._join(batch, work)
                    if done is not False:
                        works.remove(work)
                if batch is not None and batch.rows:
                    batch = self._decode(batch)
                self._busy_since = None
        except BaseException as exc:
            log.critical("the model thread died", exc_info=True)
            self._died = f"the model thread died: {type(exc).__name__}: {exc}"
            self.abandon(self._died)
            raise

    def _begin(self, group: list[Pending[_Work]]) -> Prefill | None:
        try:
            work = self.engine.begin([p.item.request for p in group])
        except Exception as exc:
            self._fail(group, exc)
            return None
        now = time.monotonic()
        with self._cond:
            for row, item in zip(work.rows, group, strict=True):
                item.item.admitted_at = now
                self._live[row] = item
        return work

    def _prefill(self, work: Prefill) -> bool | None:
        """One chunk: True once the group has its first tokens, None if it failed."""
        try:
            return self.engine.prefill(work, self.engine.prefill_chunk)
        except Exception as exc:
            self._fail(self._forget(work.rows), exc)
            return None

    def _join(self, batch: Batch | None, work: Prefill) -> Batch:
        joined = self.engine.join(batch, work)
        now = time.monotonic()
        for row in work.rows:
            self._live[row].item.prefilled_at = now
            if row.finish is None:  # it joined
                self._live[row].item.batch_size = len(joined.rows)
        self._finish([r for r in work.rows if r.finish is not None], len(joined.rows))
        return joined

    def _decode(self, batch: Batch) -> Batch | None:
        try:
            ended = self.engine.decode_step(batch)
        except Exception as exc:
            self._fail(self._forget(batch.rows), exc)
            return None
        self._finish(ended, len(batch.rows) + len(ended))
        return batch

    def _fail(self, group: list[Pending[_Work]], exc: Exception) -> None:
        # Requests are checked on submit, so this is the device or a bug: fail them loudly.
        log.error("generation failed for %d rows: %s", len(group), exc, exc_info=exc)
        for item in group:
            _settle(item.item.future, exc)

    def _finish(self, rows: list[Row], batch_size: int) -> None:
        now = time.monotonic()
        for row, item in zip(rows, self._forget(rows), strict=True):
            work = item.item
            timed = Timed(
                row.result(),
                len(work.request.prompt_ids),
                work.batch_size or batch_size,
                (work.admitted_at - item.enqueued_at) * 1000.0,
                (now - work.admitted_at) * 1000.0,
                ((work.prefilled_at or now) - work.admitted_at) * 1000.0,
            )
            _settle(work.future, row.error or timed)

    def _forget(self, rows: list[Row]) -> list[Pending[_Work]]:
        with self._cond:
            return [self._live.pop(row) for row in rows]

    def _inject_fault(self) -> None:
        if self._fault == "model_thread_dies":
            raise RuntimeError("injected fault: the model thread dies")
        if self._fault == "model_thread_hangs":
            threading.Event().wait()


def _prefill_left(work: Prefill) -> int:
    return work.remaining * len(work.rows)


def _settle(future: Future[Timed], outcome: Timed | BaseException) -> None:
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # already handed back by drain() or abandon()
        pass
