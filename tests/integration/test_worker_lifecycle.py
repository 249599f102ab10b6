"""Readiness heartbeats and at-least-once delivery, with real worker processes."""

from __future__ import annotations

import signal
import time

import redis

from guardfleet.keys import QUEUE_BULK
from guardfleet.queueing import queue_for
from guardfleet.schemas import ClassifyRequest, Job, JobStatus
from guardfleet.settings import Settings
from guardfleet.store import JobStore
from tests.conftest import RedisServer, StartWorker, db_url, queue_backlog, wait_until


def test_heartbeat_appears_only_after_warm_up(start_worker: StartWorker) -> None:
    worker = start_worker("warmup@test", wait=False, db=4)
    deadline = time.monotonic() + 120
    # Read the log before each look at the heartbeat: when the heartbeat is first seen, the log
    # as read just before it must already say the warm-up finished.
    log_before = worker.log.read_text()
    while worker.heartbeat() is None:
        assert worker.process.poll() is None, worker.log.read_text()
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)
        log_before = worker.log.read_text()
    assert "warm-up generation succeeded" in log_before, "a heartbeat before the warm-up ended"
    beat = worker.heartbeat()
    assert beat is not None
    assert beat["loaded"] is True
    assert beat["device"] == "cpu"
    assert beat["model"] == "demo"
    assert beat["queues"] == ["bulk", "interactive"]
    worker.stop()


def test_a_worker_that_cannot_load_its_model_never_reports_ready(
    start_worker: StartWorker,
) -> None:
    worker = start_worker("broken@test", wait=False, db=5, GUARDFLEET_MODEL="/nonexistent/model")
    worker.process.wait(timeout=120)
    assert worker.process.returncode != 0
    assert worker.heartbeat() is None


def test_heartbeat_expires_after_a_kill_and_is_removed_on_clean_stop(
    start_worker: StartWorker,
) -> None:
    killed = start_worker("killed@test", db=6)
    killed.kill(signal.SIGKILL)
    assert killed.heartbeat() is not None, "a killed worker cannot delete its key"
    wait_until(lambda: killed.heartbeat() is None, 4 + 2, "the heartbeat TTL to expire")

    stopped = start_worker("stopped@test", db=6, GUARDFLEET_HEARTBEAT_TTL_S="600")
    stopped.stop()
    assert stopped.process.returncode == 0
    assert stopped.heartbeat() is None


def test_jobs_held_by_a_killed_worker_still_succeed(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    db = 7
    settings = Settings(redis_url=db_url(redis_server, db))
    env = {
        # The killed worker's running jobs come back when their leases (2 x TTL) lapse; a
        # message it had taken and not yet started (the kill can land in that moment: it
        # comes right after a batch ends) by the sweep's lane-order check, seconds later.
        "GUARDFLEET_HEARTBEAT_TTL_S": "2",
        "GUARDFLEET_HEARTBEAT_INTERVAL_S": "0.5",
        "GUARDFLEET_WORKER_THREADS": "4",
        "GUARDFLEET_MAX_BATCH_SIZE": "2",
    }
    first = start_worker("doomed@test", db=db, **env)
    store, jobs = queue_backlog(
        settings.redis_url, [f"How do I plant tomatoes? #{i}" for i in range(120)]
    )

    def statuses() -> list[JobStatus]:
        return [j.status for j in (store.get(i) for i in jobs) if j is not None]

    wait_until(lambda: JobStatus.SUCCEEDED in statuses(), 60, "the first job to finish")
    first.kill(signal.SIGKILL)
    left = [s for s in statuses() if s is not JobStatus.SUCCEEDED]
    assert left, "the worker finished everything before it was killed; nothing was tested"
    held = [i for i in jobs if (j := store.get(i)) and j.status is JobStatus.RUNNING]

    start_worker("rescuer@test", db=db, **env)
    wait_until(
        lambda: statuses().count(JobStatus.SUCCEEDED) == len(jobs), 90, "every job to succeed"
    )
    # A job that was mid-flight ran twice; the second run's result is the one stored.
    for job_id in held:
        rerun = store.get(job_id)
        assert rerun is not None
        assert rerun.attempts == 2 and rerun.worker == "rescuer@test"


def test_a_message_taken_by_a_worker_that_died_runs_within_seconds(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """A worker killed between taking a message (BRPOP) and starting its job takes the message
    along; the job is still queued and nothing in Redis names it. The sweep must find it by the
    lane's order within a couple of sweeps, not after `GUARDFLEET_JOB_STALE_S` (2 hours here)."""
    db = 54
    url = db_url(redis_server, db)
    redis.Redis.from_url(url).flushdb()
    store, (job_id,) = queue_backlog(url, ["How do I plant tomatoes?"])
    assert redis.Redis.from_url(url).rpop(QUEUE_BULK) is not None  # taken, by a worker now dead

    start_worker("survivor@test", db=db)
    wait_until(
        lambda: (job := store.get(job_id)) is not None and job.status is JobStatus.SUCCEEDED,
        30,
        "the job to succeed",
    )


def test_a_job_whose_message_was_lost_is_published_again(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """Redis can die between handing a message to a consumer and recording it: the job record
    says `queued` and no message exists anywhere. The stale-job sweep must run it anyway, and a
    backlog that merely waits longer than the deadline must not run twice."""
    db = 26
    url = db_url(redis_server, db)
    redis.Redis.from_url(url).flushdb()
    store = JobStore(redis.Redis.from_url(url), ttl_s=600, stale_s=1)
    lost = Job(request=ClassifyRequest(prompt="How do I plant tomatoes?"))
    store.create(lost, queue_for(False))  # created, but its message never made it
    _, waiting = queue_backlog(url, [f"How do I bake bread? #{i}" for i in range(24)])
    time.sleep(1.5)  # every job is past its deadline before a worker sees it

    start_worker(
        "reconciler@test",
        db=db,
        GUARDFLEET_JOB_STALE_S="1",
        GUARDFLEET_MAX_BATCH_SIZE="2",
        GUARDFLEET_WORKER_THREADS="2",
    )
    ids = [lost.id, *waiting]
    wait_until(
        lambda: all((j := store.get(i)) and j.status is JobStatus.SUCCEEDED for i in ids),
        120,
        "every job, the lost one included, to succeed",
    )
    attempts = [j.attempts for i in ids if (j := store.get(i)) is not None]
    assert attempts == [1] * len(ids), "a re-published job ran twice"
