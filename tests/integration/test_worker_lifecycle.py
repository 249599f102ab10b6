"""Readiness heartbeats and at-least-once delivery, with real worker processes."""

from __future__ import annotations

import signal
import time

from guardfleet.schemas import JobStatus
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, db_url, queue_backlog, wait_until


def test_heartbeat_appears_only_after_warm_up(start_worker: StartWorker) -> None:
    worker = start_worker("warmup@test", wait=False, db=4)
    seen_before_ready = False
    deadline = time.monotonic() + 120
    while worker.heartbeat() is None:
        assert worker.process.poll() is None, worker.log.read_text()
        assert time.monotonic() < deadline, "no heartbeat"
        seen_before_ready = True
        time.sleep(0.05)
    assert seen_before_ready, "the heartbeat must not exist while the model loads"
    assert "warm-up generation succeeded" in worker.log.read_text()
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
    settings = Settings(redis_url=db_url(redis_server, db), visibility_timeout_s=3)
    env = {
        "GUARDFLEET_VISIBILITY_TIMEOUT_S": "3",
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
