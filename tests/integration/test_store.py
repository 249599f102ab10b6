"""Job transitions in a real Redis: which message may start a job, and who owns it when two
attempts overlap."""

from __future__ import annotations

import pytest
import redis

from guardfleet.keys import OPEN_JOBS
from guardfleet.schemas import ClassifyRequest, Job, JobStatus, utcnow
from guardfleet.store import JobStore, TransitionRefused
from tests.conftest import RedisServer, db_url

DB = 24


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    client = redis.Redis.from_url(db_url(redis_server, DB))
    client.flushdb()
    return JobStore(client, ttl_s=60)


def _new(store: JobStore) -> Job:
    job = Job(request=ClassifyRequest(prompt="hello"))
    store.create(job, "bulk")
    return job


def _started(job: Job, worker: str) -> Job:
    return job.model_copy(
        update={
            "status": JobStatus.RUNNING,
            "attempts": job.attempts + 1,
            "worker": worker,
            "started_at": utcnow(),
        }
    )


def _succeeded(job: Job) -> Job:
    return job.model_copy(update={"status": JobStatus.SUCCEEDED, "finished_at": utcnow()})


def _read(store: JobStore, job: Job) -> Job:
    stored = store.get(job.id)
    assert stored is not None
    return stored


def test_the_attempt_that_started_last_owns_the_job(store: JobStore) -> None:
    job = _new(store)
    slow = _started(job, "slow@test")
    store.start(slow, "task-1", 1)
    # The visibility timeout ran out: the same message went to another worker.
    fresh = _started(_read(store, job), "fresh@test")
    store.start(fresh, "task-1", 1)

    with pytest.raises(TransitionRefused):
        store.save(_succeeded(slow))
    store.save(_succeeded(fresh))
    final = _read(store, job)
    assert (final.status, final.attempts, final.worker) == (JobStatus.SUCCEEDED, 2, "fresh@test")
    with pytest.raises(TransitionRefused):  # and a result is written once only
        store.save(_succeeded(fresh))
    assert store.client.zscore(OPEN_JOBS, job.id) is None, "an ended job left the open index"


def test_two_copies_started_from_one_read_cannot_both_own_it(store: JobStore) -> None:
    job = _new(store)
    store.start(_started(job, "a@test"), "task-1", 1)
    with pytest.raises(TransitionRefused):
        store.start(_started(job, "b@test"), "task-1", 1)
    assert _read(store, job).worker == "a@test"


def test_a_duplicate_message_cannot_take_a_running_job(store: JobStore) -> None:
    """A message re-published for a job that is only waiting (not lost) is dropped once the
    original has started the job; a message published after the run started may take over."""
    job = _new(store)
    store.client.hincrby(f"guardfleet:job:{job.id}", "gen", 1)  # the reconciler re-published
    store.start(_started(job, "a@test"), "original", 1)
    running = _read(store, job)
    with pytest.raises(TransitionRefused):
        store.start(_started(running, "b@test"), "republished", 2)
    store.client.hincrby(f"guardfleet:job:{job.id}", "gen", 1)  # the run itself went stale
    store.start(_started(running, "c@test"), "republished-again", 3)
    assert _read(store, job).worker == "c@test"


def test_a_cancelled_job_cannot_be_started(store: JobStore) -> None:
    job = _new(store)
    store.client.hset(f"guardfleet:job:{job.id}", "status", JobStatus.CANCELLED.value)
    with pytest.raises(TransitionRefused):
        store.start(_started(job, "a@test"), "task-1", 1)


def test_transitions_read_status_without_the_document(store: JobStore) -> None:
    """The scripts must not parse the (possibly huge) document: a record whose document is not
    even JSON still changes status."""
    job = _new(store)
    store.client.hset(f"guardfleet:job:{job.id}", "doc", "x" * 200_000)
    store.start(_started(job, "a@test"), "task-1", 1)
    assert store.client.hget(f"guardfleet:job:{job.id}", "status") == b"running"
