"""Job transitions in a real Redis: which message may start a job, and who owns it when two
attempts overlap."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from typing import Any

import pytest
import redis

from guardfleet.keys import OPEN_JOBS, QUEUE_BULK, job_channel
from guardfleet.queueing import make_celery, publish_jobs, task_message
from guardfleet.schemas import ClassifyRequest, Job, JobStatus, utcnow
from guardfleet.settings import Settings
from guardfleet.store import JobStore, TransitionRefused
from tests.conftest import RedisServer, db_url
from worker.reconcile import Reconciler

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


def test_a_job_life_costs_eighteen_commands_and_one_announcement(
    private_redis: redis.Redis,
) -> None:
    """Create, start and end a job: every command counts against what one Redis serves (and
    script calls count their own commands, as in INFO commandstats). Starting announces nothing
    (waiters wait for the end, and each would re-read the record for nothing), and leaves the
    open index's TTL to the reconciler."""
    store = JobStore(private_redis, ttl_s=60)
    warm = _started(_new(store), "a@test")  # loads the scripts
    store.start(warm, "task-0", 1)
    store.save(_succeeded(warm))
    job = Job(request=ClassifyRequest(prompt="hello"))
    listener = private_redis.pubsub()  # type: ignore[no-untyped-call]
    listener.subscribe(job_channel(job.id))
    assert listener.get_message(timeout=5) is not None  # the subscribe confirmation
    private_redis.config_resetstat()

    store.create(job, QUEUE_BULK)
    started = _started(job, "a@test")
    store.start(started, "task-1", 1)
    store.save(_succeeded(started))

    stats = private_redis.info("commandstats")
    calls = Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})
    del calls["config|resetstat"], calls["info"]
    assert calls.total() <= 18, calls
    announced = [listener.get_message(timeout=1) for _ in range(2)]
    assert [m["data"] for m in announced if m] == [b"succeeded"]
    assert calls["publish"] == 1


def test_the_reconciler_keeps_the_open_index_alive_while_jobs_run(store: JobStore) -> None:
    """Starts renew their job's TTL, not the index's: a worker's sweep does, so the index cannot
    expire under a job that was queued long before it started."""
    job = _new(store)
    store.start(_started(job, "a@test"), "task-1", 1)
    store.client.expire(OPEN_JOBS, 2)  # as if created long ago
    published: list[object] = []
    Reconciler(store.client, lambda *a, **k: published.append(a), 3600, 60).sweep()
    assert store.client.ttl(OPEN_JOBS) > 50
    assert store.client.zscore(OPEN_JOBS, job.id) is not None
    assert published == [], "a job within its deadline was published again"


def test_a_lease_renewal_never_brings_back_an_ended_job(store: JobStore) -> None:
    """A worker renews the leases of the jobs it runs with each heartbeat; a job that ended
    between its read of them and the renewal must stay out of the open index, or the
    reconciler would publish a finished job again."""
    running, ended = _new(store), _new(store)
    for job in (running, ended):
        store.start(_started(job, "a@test"), "task-1", 1)
    store.save(_succeeded(_started(ended, "a@test")))
    store.hold([running.id, ended.id], 100)
    assert store.client.zscore(OPEN_JOBS, ended.id) is None
    deadline = store.client.zscore(OPEN_JOBS, running.id)
    assert deadline is not None and deadline > time.time() + 90


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


def test_the_api_builds_the_message_kombu_would_publish(redis_server: RedisServer) -> None:
    """`task_message` (pushed by the API in the job's create transaction) must be the envelope
    kombu's Redis transport puts on the list, or workers would not take it."""
    client = redis.Redis.from_url(db_url(redis_server, 40))
    client.flushdb()
    app = make_celery(Settings(redis_url=db_url(redis_server, 40)))
    publish_jobs(app, ["job_kombu"], QUEUE_BULK)
    ours = json.loads(task_message(app, "job_ours", QUEUE_BULK))
    raw = client.rpop(QUEUE_BULK)
    assert isinstance(raw, bytes)
    kombus = json.loads(raw)

    def shape(message: dict[str, Any]) -> dict[str, Any]:
        unique = {"id", "root_id", "correlation_id", "delivery_tag", "argsrepr"}
        return {
            "top": sorted(message),
            "headers": {k: v for k, v in message["headers"].items() if k not in unique},
            "properties": {k: v for k, v in message["properties"].items() if k not in unique},
        }

    assert shape(ours) == shape(kombus)
    args, kwargs, embed = json.loads(base64.b64decode(ours["body"]))
    assert (args, kwargs) == (["job_ours"], {})
    assert embed == json.loads(base64.b64decode(kombus["body"]))[2]
    assert ours["headers"]["argsrepr"] == "['job_ours']"
