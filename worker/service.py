"""One worker process's resident state (engine, model thread, job store, heartbeat) and the
life of one job inside it.

A job ends in exactly one of three ways: its result is written (and announced), it fails for a
reason of its own (bad input, unparseable output), or it is handed back (`worker.errors`) for
another try because something that is not its fault went wrong: Redis stayed away, the worker
is shutting down, or its model thread died or hung. Redis errors are retried in place first,
since a blip of a few seconds should cost neither the verdict already computed nor a requeue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import redis
import torch

from guardfleet import batches, logs, redis_conn, webhooks
from guardfleet.errors import GuardfleetError
from guardfleet.keys import QUEUE_BULK
from guardfleet.queueing import broker_id
from guardfleet.schemas import Batch, BatchStatus, Job, JobError, JobStatus, utcnow
from guardfleet.settings import Settings
from guardfleet.store import JobStore, TransitionRefused
from worker import metrics
from worker.batching import BatchPolicy
from worker.engine import Engine
from worker.errors import HandBack, ModelUnavailable, StoreUnavailable
from worker.heartbeat import Heartbeat
from worker.notices import SAFETY_POLL_S, Notices
from worker.prompting import interpret, prepare
from worker.reconcile import Reconciler
from worker.runner import Runner, Timed
from worker.streaming import Publisher, Tap

log = logging.getLogger(__name__)
T = TypeVar("T")
TICK_S = 0.5  # how often a waiting task thread checks that the model thread is alive


class WorkerService:
    def __init__(
        self,
        settings: Settings,
        send_task: webhooks.SendTask,
        on_problem: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.settings = settings
        self.send_task = send_task
        self.on_problem = on_problem
        self.engine = Engine(settings)
        started = time.perf_counter()
        self.engine.warm_up()
        log.info("warm-up generation succeeded in %.0f ms", (time.perf_counter() - started) * 1e3)
        self.runner = Runner(
            self.engine,
            BatchPolicy(settings.max_batch_size, self.engine.kv_budget),
            stall_s=settings.model_stall_s,
            fault=settings.inject_fault,
        )
        self.redis = redis_conn.connect(settings)
        self.broker = (
            redis_conn.connect(settings, broker=True) if settings.separate_broker else self.redis
        )
        # A running job's lease is twice the heartbeat's TTL: renewed with every beat, it lapses
        # soon after its worker dies, and the reconciler of any worker alive runs it again.
        self.store = JobStore(
            self.redis,
            settings.result_ttl_s,
            settings.job_stale_s,
            run_lease_s=2 * settings.heartbeat_ttl_s,
        )
        self.reconciler = Reconciler(
            self.redis,
            send_task,
            settings.job_stale_s,
            settings.result_ttl_s,
            broker=self.broker,
            run_lease_s=self.store.run_lease_s,
            parts=settings.store_parts,
        )
        self.deliveries = webhooks.DeliveryStore(self.redis, settings.result_ttl_s)
        self.publisher = Publisher(self.redis, self.engine.decode)
        self.notices = Notices(self.redis)
        self.notices.start()
        if settings.worker_metrics_port:
            device = self.engine.device
            metrics.serve(
                settings.worker_metrics_port,
                self.runner.load,
                lambda: torch.cuda.memory_allocated(device) if device.type == "cuda" else 0,
            )
        self.heartbeat: Heartbeat | None = None
        self.name = "unnamed"
        self._done = 0
        self._lock = threading.Lock()
        self._held: set[str] = set()  # ids of the jobs this worker has started and not let go

    def announce(self, name: str, queues: list[str]) -> None:
        """Start the heartbeat: from now on the API counts this worker as ready."""
        self.name = name
        self.heartbeat = Heartbeat(
            self.redis,
            name=name,
            device=str(self.engine.device),
            model=self.settings.model,
            queues=queues,
            ttl_s=self.settings.heartbeat_ttl_s,
            interval_s=self.settings.heartbeat_interval_s,
            jobs_done=lambda: self._done,
            problem=self.runner.problem,
            on_problem=self._leave,
            on_beat=lambda: self.store.hold(self._held_now()),
            broker_id=lambda: broker_id(self.broker, self.settings.result_ttl_s),
        )
        self.heartbeat.start()
        self.reconciler.start()

    def _leave(self, reason: str) -> None:
        """The model thread is dead or stuck: hand every job back and let the process go."""
        self.runner.abandon(reason)
        self.on_problem(reason)

    def drain(self) -> None:
        """SIGTERM: leave the fleet at once, finish the running batch, hand back the rest."""
        self.reconciler.stop()
        self.runner.drain()
        if self.heartbeat is not None:
            threading.Thread(target=self.heartbeat.stop, name="heartbeat-stop").start()

    def close(self) -> None:
        self.reconciler.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.runner.stop()
        self.publisher.stop()
        self.notices.stop()

    def run(self, job_id: str, task_id: str, gen: int, lane: str | None = None) -> None:
        """Run one job to its end for the message (`task_id`, `gen`); raises a `HandBack`
        when it must be tried again. Bulk-lane jobs yield to interactive ones in the batcher."""
        with logs.scope(job_id=job_id):
            started = self._start(job_id, task_id, gen)
            if started is None:
                return
            with self._lock:
                self._held.add(job_id)
            try:
                with logs.scope(batch_id=started[0].batch_id):
                    self._run(*started, lane)
            except HandBack:
                # Its message is back on the queue: until a worker takes it, the job waits as a
                # queued one does, not under a lease nobody renews.
                with contextlib.suppress(redis.RedisError):
                    self.store.hold([job_id], self.settings.job_stale_s)
                raise
            finally:
                with self._lock:
                    self._held.discard(job_id)

    def _held_now(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _run(self, job: Job, watched: bool, lane: str | None) -> None:
        began = time.monotonic()
        cancel = threading.Event()
        tap = self.publisher.open(job.id, job.attempts, watched)
        try:
            prepared = prepare(job.request, self.engine, self.settings)
            prepared.priority = 1 if lane == QUEUE_BULK else 0
            prepared.cancel = cancel
            prepared.on_token = tap.on_token
            timed = self._wait(job.id, self.runner.submit(prepared), cancel, tap)
        except Exception as exc:
            self._fail(job, exc)
            return
        finally:
            self.publisher.close(tap)  # a result's last deltas go before its final status
        if timed.result.finish_reason == "cancelled":
            _observe(timed, tap, began, "cancelled")
            log.info(
                "job %s was cancelled while running; its generation stopped after %d tokens",
                job.id,
                len(timed.result.token_ids),
            )
            self._announce_stored(job.id)  # the cancel's batch bookkeeping, once
            return
        try:
            result = interpret(job.request, timed, self.engine, self.settings)
            done = job.model_copy(update={"status": JobStatus.SUCCEEDED, "result": result})
        except Exception as exc:
            done = self._failed(job, exc)
        self._finish(done)
        _observe(timed, tap, began, done.error.type if done.error else timed.result.finish_reason)

    def _wait(self, job_id: str, future: Future[Timed], cancel: threading.Event, tap: Tap) -> Timed:
        """The generation's result. Meanwhile, a job cancelled through the API has its row
        dropped at the next step, one that someone starts streaming gets its text published
        (both announced by `Notices`, and read every SAFETY_POLL_S anyway), and a broken model
        thread hands the job back."""
        with self.notices.watch(job_id) as noticed:
            future.add_done_callback(lambda _: noticed.set())
            polled = time.monotonic()
            while True:
                noticed.wait(TICK_S)
                if future.done():
                    return future.result()
                if (reason := self.runner.problem()) is not None:
                    raise ModelUnavailable(reason)
                if not noticed.is_set() and time.monotonic() - polled < SAFETY_POLL_S:
                    continue
                noticed.clear()
                polled = time.monotonic()
                try:
                    status, watched = self.store.poll(job_id)
                except redis.RedisError:
                    continue  # a blip only delays noticing; the job's own writes retry as usual
                if status == JobStatus.CANCELLED.value and not cancel.is_set():
                    cancel.set()
                if watched and not tap.watched:
                    self.publisher.watch(tap)

    def _redis(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried through Redis errors for up to `redis_outage_s`."""
        deadline = time.monotonic() + self.settings.redis_outage_s
        delay = 0.1
        while True:
            try:
                return call()
            except redis.RedisError as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"Redis unavailable while {what}: {exc}") from exc
                log.warning("Redis error while %s (retrying in %.1fs): %s", what, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _start(self, job_id: str, task_id: str, gen: int) -> tuple[Job, bool] | None:
        """Mark the job running as a new attempt (and say whether anyone streams it), or
        return None if there is nothing (left) to do here. One script reads and starts it."""
        started_at = utcnow()
        try:
            return self._redis(
                "starting the job",
                lambda: self.store.start(job_id, task_id, gen, self.name, started_at),
            )
        except TransitionRefused as exc:
            job = exc.current
            if job is None:
                log.warning("job %s expired or never existed; nothing to do", job_id)
            elif job.status.terminal:
                log.info("job %s is already %s (redelivery); skipping", job_id, job.status)
                # Idempotent: finishes what a killed worker left undone.
                self._redis("announcing the result", lambda: self._announce_end(job))
            else:
                log.info("not running job %s: %s", job_id, exc)
            return None

    def _fail(self, job: Job, exc: Exception) -> None:
        """End the job as failed, unless the fault is not its own: then hand it back."""
        if isinstance(exc, HandBack):
            raise exc
        failed = self._failed(job, exc)
        self._finish(failed)
        metrics.FINISHED.labels(failed.error.type if failed.error else "error").inc()

    def _failed(self, job: Job, exc: Exception) -> Job:
        if isinstance(exc, GuardfleetError):
            error = JobError(
                type=exc.type, message=exc.message, raw_output=getattr(exc, "raw_output", None)
            )
        else:  # a bug or a device fault: fail the job loudly, never drop it
            log.error("job %s failed unexpectedly", job.id, exc_info=exc)
            error = JobError(type="internal_error", message=f"{type(exc).__name__}: {exc}")
        return job.model_copy(update={"status": JobStatus.FAILED, "error": error})

    def _finish(self, done: Job) -> None:
        done.finished_at = utcnow()
        try:
            self._redis("writing the result", lambda: self.store.save(done))
        except TransitionRefused as exc:
            # Finished already (by this very write, retried, or by another attempt), or a later
            # attempt owns the job. Announcing a finished job again is harmless; doing it here
            # covers a write that landed while its reply was lost.
            if not self._announce_stored(done.id):
                log.info("result of job %s not written: %s", done.id, exc)
            return
        with self._lock:
            self._done += 1
        log.info("job %s %s (attempt %d)", done.id, done.status.value, done.attempts)
        self._redis("announcing the result", lambda: self._announce_end(done))

    def _announce_stored(self, job_id: str) -> bool:
        """Announce the job as the store has it, if it has ended; False if it has not."""
        current = self._redis("reading the job", lambda: self.store.get(job_id))
        if current is None or not current.status.terminal:
            return False
        self._redis("announcing the result", lambda: self._announce_end(current))
        return True

    def _announce_end(self, job: Job) -> None:
        """Webhook and batch bookkeeping for a finished job. Every step is idempotent and
        re-checked on each call, so a job redelivered after its worker died (or after Redis
        failed) here is announced exactly once."""
        if job.callback_url and job.status is not JobStatus.CANCELLED:  # cancel was the client's
            succeeded = job.status is JobStatus.SUCCEEDED
            self._webhook(
                job.callback_url, webhooks.JOB_COMPLETED if succeeded else webhooks.JOB_FAILED, job
            )
        if job.batch_id is None:
            return
        counted = batches.record_progress(self.redis, job, self.settings.result_ttl_s)
        if counted == batches.COUNTED:
            return  # counted now without completing the batch: the batch webhook is not ours
        # Completed by this job, or counted before (a redelivery): whoever completed the batch
        # may have died before scheduling its webhook, and scheduling is idempotent.
        batch = batches.get_batch(self.redis, job.batch_id)
        if batch is not None and batch.status is BatchStatus.COMPLETED and batch.callback_url:
            self._webhook(batch.callback_url, webhooks.BATCH_COMPLETED, batch)

    def _webhook(self, url: str, event: str, data: Job | Batch) -> None:
        webhooks.schedule(
            self.deliveries,
            self.send_task,
            self.settings,
            resource_id=data.id,
            url=url,
            event=event,
            data=data,
        )


def _observe(timed: Timed, tap: Tap, began: float, reason: str) -> None:
    """A generation's figures into the worker's metrics."""
    metrics.FINISHED.labels(reason).inc()
    metrics.BATCH.observe(timed.batch_size)
    metrics.QUEUE.observe(timed.queue_wait_ms / 1000)
    metrics.INFERENCE.observe(timed.inference_ms / 1000)
    metrics.PREFILL.observe(timed.prefill_ms / 1000)
    metrics.DECODE.observe((timed.inference_ms - timed.prefill_ms) / 1000)
    metrics.PROMPT_TOKENS.inc(timed.prompt_tokens)
    metrics.GENERATION_TOKENS.inc(len(timed.result.token_ids))
    if tap.first_at is not None:
        metrics.FIRST_TOKEN.observe(tap.first_at - began)
    metrics.END_TO_END.observe(time.monotonic() - began)
