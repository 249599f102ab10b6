"""Workers that stop while holding jobs: SIGTERM drains, a dead or hung model thread makes the
worker leave the fleet and exit non-zero. In each case every job still succeeds, on the worker
that took over, and none is failed by the fault."""

from __future__ import annotations

import signal

import pytest

from guardfleet.schemas import JobStatus
from guardfleet.settings import Settings
from guardfleet.store import JobStore
from tests.conftest import RedisServer, StartWorker, db_url, queue_backlog, wait_until

ENV = {
    "GUARDFLEET_VISIBILITY_TIMEOUT_S": "600",  # long: nothing below may rely on redelivery
    "GUARDFLEET_WORKER_THREADS": "6",
    "GUARDFLEET_MAX_BATCH_SIZE": "3",
    "GUARDFLEET_HEARTBEAT_INTERVAL_S": "0.5",
    "GUARDFLEET_MODEL_STALL_S": "3",
}


def _statuses(store: JobStore, ids: list[str]) -> list[JobStatus]:
    return [j.status for j in (store.get(i) for i in ids) if j is not None]


def _rescue(start_worker: StartWorker, db: int, store: JobStore, ids: list[str]) -> None:
    start_worker(f"rescuer-{db}@test", db=db, **ENV)
    wait_until(
        lambda: _statuses(store, ids).count(JobStatus.SUCCEEDED) == len(ids),
        180,
        "every job to succeed on the rescuer",
        every=0.5,
    )
    assert JobStatus.FAILED not in _statuses(store, ids)


@pytest.mark.timeout(400)
def test_sigterm_finishes_the_running_batch_and_hands_back_the_rest(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    db = 20
    url = db_url(redis_server, db)
    worker = start_worker("drained@test", db=db, **{**ENV, "GUARDFLEET_WORKER_THREADS": "12"})
    store, ids = queue_backlog(url, [f"How do I plant tomatoes? #{i}" for i in range(60)])

    def batch_and_waiters() -> bool:
        # More jobs running than fit one batch: some wait in the batcher for the next one.
        statuses = _statuses(store, ids)
        return JobStatus.SUCCEEDED in statuses and statuses.count(JobStatus.RUNNING) > 3

    wait_until(batch_and_waiters, 60, "a verdict, and jobs waiting for the next batch", every=0.02)
    done_before = _statuses(store, ids).count(JobStatus.SUCCEEDED)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    statuses = _statuses(store, ids)
    # The running batch (3), plus one more that may have started while we read: no more. The
    # other jobs the 12 task threads held went back to the queue instead of being run.
    assert statuses.count(JobStatus.SUCCEEDED) - done_before <= 6
    assert JobStatus.FAILED not in statuses, "the shutdown failed a job"
    waiting = [s for s in statuses if s is not JobStatus.SUCCEEDED]
    assert waiting, "the worker finished everything before SIGTERM; nothing was tested"
    assert "handed back" in worker.log.read_text()
    _rescue(start_worker, db, store, ids)


@pytest.mark.parametrize("fault", ["model_thread_dies", "model_thread_hangs"])
@pytest.mark.timeout(400)
def test_a_broken_model_thread_takes_its_worker_out_of_the_fleet(
    redis_server: RedisServer, start_worker: StartWorker, fault: str
) -> None:
    db = 21 if fault == "model_thread_dies" else 22
    url = db_url(redis_server, db)
    settings = Settings(redis_url=url)
    broken = start_worker(f"{fault}@test", db=db, GUARDFLEET_INJECT_FAULT=fault, **ENV)
    store, ids = queue_backlog(
        settings.redis_url, [f"How do I bake bread? #{i}" for i in range(20)]
    )

    # The worker takes jobs, breaks on its first batch, leaves the fleet and exits with 4.
    assert broken.process.wait(timeout=120) == 4, broken.log.read_text()[-3000:]
    assert broken.heartbeat() is None
    statuses = _statuses(store, ids)
    assert JobStatus.SUCCEEDED not in statuses
    assert JobStatus.FAILED not in statuses, "a broken model thread must not fail jobs"
    _rescue(start_worker, db, store, ids)
