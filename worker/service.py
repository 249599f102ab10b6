"""One worker process's resident state (engine, model thread, job store, heartbeat) and the
life of one job inside it."""

from __future__ import annotations

import logging
import threading
import time

import redis

from guardfleet import batches, webhooks
from guardfleet.errors import GuardfleetError
from guardfleet.schemas import Batch, Job, JobError, JobStatus, utcnow
from guardfleet.settings import Settings
from guardfleet.store import JobStore, TransitionRefused
from worker.batching import BatchPolicy
from worker.engine import Engine
from worker.heartbeat import Heartbeat
from worker.jobs import interpret, prepare
from worker.runner import Runner

log = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, settings: Settings, send_task: webhooks.SendTask) -> None:
        self.settings = settings
        self.send_task = send_task
        self.engine = Engine(settings)
        started = time.perf_counter()
        self.engine.warm_up()
        log.info("warm-up generation succeeded in %.0f ms", (time.perf_counter() - started) * 1e3)
        self.runner = Runner(
            self.engine,
            BatchPolicy(settings.max_batch_size, settings.max_wait_ms, settings.max_batch_tokens),
        )
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        self.store = JobStore(self.redis, settings.result_ttl_s)
        self.deliveries = webhooks.DeliveryStore(self.redis, settings.result_ttl_s)
        self.heartbeat: Heartbeat | None = None
        self.name = "unnamed"
        self._done = 0
        self._done_lock = threading.Lock()

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
        )
        self.heartbeat.start()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.runner.stop()

    def run(self, job_id: str) -> None:
        with self.runner.arriving() as submit:
            job = self._start(job_id)
            if job is None:
                return
            try:
                prepared = prepare(job.request, self.engine, self.settings)
                future = submit(prepared)
            except Exception as exc:
                self._finish(job, self._failed(job, exc))
                return
        try:
            timed = future.result()
            result = interpret(job.request, timed, self.engine, self.settings)
            done = job.model_copy(update={"status": JobStatus.SUCCEEDED, "result": result})
        except Exception as exc:
            done = self._failed(job, exc)
        self._finish(job, done)

    def _start(self, job_id: str) -> Job | None:
        """Mark the job running, or return None if there is nothing (left) to do."""
        job = self.store.get(job_id)
        if job is None:
            log.warning("job %s expired or never existed; nothing to do", job_id)
            return None
        if job.status.terminal:
            log.info("job %s is already %s (redelivery); skipping", job_id, job.status)
            self._announce_end(job)  # idempotent: finishes what a killed worker left undone
            return None
        job = job.model_copy(
            update={
                "status": JobStatus.RUNNING,
                "started_at": utcnow(),
                "attempts": job.attempts + 1,
                "worker": self.name,
            }
        )
        try:
            self.store.save(job)
        except TransitionRefused as exc:  # cancelled or finished since we read it
            log.info("not running job %s: %s", job_id, exc)
            return None
        return job

    def _failed(self, job: Job, exc: Exception) -> Job:
        if isinstance(exc, GuardfleetError):
            error = JobError(
                type=exc.type, message=exc.message, raw_output=getattr(exc, "raw_output", None)
            )
        else:  # a bug or a device fault: fail the job loudly, never drop it
            log.error("job %s failed unexpectedly", job.id, exc_info=exc)
            error = JobError(type="internal_error", message=f"{type(exc).__name__}: {exc}")
        return job.model_copy(update={"status": JobStatus.FAILED, "error": error})

    def _finish(self, job: Job, done: Job) -> None:
        done.finished_at = utcnow()
        try:
            self.store.save(done)
        except TransitionRefused as exc:  # an earlier delivery already finished it
            log.info("result of job %s not written: %s", job.id, exc)
            return
        with self._done_lock:
            self._done += 1
        self._announce_end(done)

    def _announce_end(self, job: Job) -> None:
        """Webhook and batch bookkeeping for a finished job. Both are idempotent, so a job
        redelivered after its worker died here is announced exactly once."""
        if job.callback_url and job.status is not JobStatus.CANCELLED:  # cancel was the client's
            succeeded = job.status is JobStatus.SUCCEEDED
            self._webhook(
                job.callback_url, webhooks.JOB_COMPLETED if succeeded else webhooks.JOB_FAILED, job
            )
        if job.batch_id is None:
            return
        ttl = self.settings.result_ttl_s
        if batches.record_progress(self.redis, job, ttl) == batches.BATCH_COMPLETED:
            batch = batches.get_batch(self.redis, job.batch_id)
            if batch is not None and batch.callback_url:
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
