"""Workers that stop while holding jobs: SIGTERM drains, a dead or hung model thread makes the
worker leave the fleet and exit non-zero. In each case every job still succeeds, on the worker
that took over, and none is failed by the fault."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from guardfleet.keys import QUEUE_BULK, job_key
from guardfleet.schemas import JobStatus
from guardfleet.settings import Settings
from guardfleet.store import JobStore
from tests.conftest import RedisServer, StartWorker, db_url, queue_backlog, wait_until

ENV = {
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


@pytest.mark.timeout(200)
def test_a_killed_workers_running_jobs_run_again_once_their_leases_lapse(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """SIGKILL leaves the jobs a worker had started `running`, and their messages died with it
    (kombu holds unacknowledged messages in the worker's memory). Their leases, renewed with each
    heartbeat, lapse within twice the heartbeat's TTL, and the reconciler of a live worker
    publishes them again."""
    db = 49
    url = db_url(redis_server, db)
    env = {**ENV, "GUARDFLEET_HEARTBEAT_TTL_S": "2"}  # leases of 4 s
    doomed = start_worker("leased@test", db=db, **env)
    store, ids = queue_backlog(url, [f"How do I plant tomatoes? #{i}" for i in range(60)])
    wait_until(
        lambda: _statuses(store, ids).count(JobStatus.RUNNING) >= 3,
        60,
        "jobs running on the doomed worker",
        every=0.01,
    )
    doomed.process.send_signal(signal.SIGSTOP)  # what runs now stays `running`
    held = [i for i in ids if (j := store.get(i)) is not None and j.status is JobStatus.RUNNING]
    doomed.kill(signal.SIGKILL)
    assert held
    start_worker(f"rescuer-{db}@test", db=db, **env)

    def rescued() -> bool:
        return all((j := store.get(i)) is not None and j.status.terminal for i in held)

    wait_until(rescued, 60, "the killed worker's jobs to run again")
    for job_id in held:
        job = store.get(job_id)
        assert job is not None
        assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 2), job
        assert job.worker == f"rescuer-{db}@test"


def _waiting_in_brpop(client: redis.Redis, db: int) -> bool:
    """Whether a consumer on `db` is blocked in BRPOP right now (Redis's view of it)."""
    return any(
        c["cmd"] == "brpop" and "b" in c["flags"] and int(c["db"]) == db
        for c in client.client_list()
    )


@pytest.mark.timeout(200)
def test_a_message_on_its_way_to_a_killed_worker_is_published_again(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """A worker with room for work keeps a BRPOP waiting in Redis. A message Redis hands it is
    then in no queue, only in a reply the worker has not read: a worker killed in between takes
    the message with it. The worker is frozen (SIGSTOP) so that it never reads the reply, then
    killed; only the stale-job sweep runs the job, and by the lanes' order it does so within
    seconds, with the job's deadline (`GUARDFLEET_JOB_STALE_S`) two hours away."""
    db = 38
    url = db_url(redis_server, db)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    doomed = start_worker("in-flight@test", db=db, **ENV)
    job_id = ""
    for _ in range(10):
        doomed.process.send_signal(signal.SIGSTOP)
        # Its BRPOP times out after 1 s; publish only while one is still waiting.
        if _waiting_in_brpop(client, db):
            store, [job_id] = queue_backlog(url, ["How do I plant tomatoes?"])
            try:
                wait_until(lambda: client.llen(QUEUE_BULK) == 0, 2, "the frozen worker's BRPOP")
                break
            except AssertionError:
                pass  # the BRPOP had just timed out; the job runs once the worker goes on
        doomed.process.send_signal(signal.SIGCONT)
        time.sleep(0.3)
    else:
        pytest.fail("never caught the worker waiting in BRPOP")
    doomed.kill(signal.SIGKILL)

    job = store.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED
    assert client.llen(QUEUE_BULK) == 0  # the message is nowhere in Redis
    start_worker(f"rescuer-{db}@test", db=db, **ENV)
    wait_until(
        lambda: (j := store.get(job_id)) is not None and j.status is JobStatus.SUCCEEDED,
        45,
        "the lost job to succeed on the rescuer",
    )
    assert client.hget(job_key(job_id), "gen") == "2", "not the sweep's message that ran it"
