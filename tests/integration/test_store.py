"""Job transitions in a real Redis: which message may start a job, and who owns it when two
attempts overlap."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from guardfleet.keys import QUEUE_BULK, QUEUE_INTERACTIVE, job_channel, job_key, open_jobs, stats
from guardfleet.queueing import (
    make_celery,
    message_job_id,
    message_sent_at,
    publish_jobs,
    task_message,
)
from guardfleet.schemas import ClassifyRequest, Job, JobStatus, utcnow
from guardfleet.settings import Settings
from guardfleet.store import AsyncJobStore, JobStore, TransitionRefused
from tests.conftest import RedisServer, db_url
from worker.leases import DueSet
from worker.reconcile import Reconciler

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
OPEN_JOBS = open_jobs("00")
STATS = stats("00")

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


def _start(store: JobStore, job: Job, worker: str, task_id: str, gen: int = 1) -> Job:
    started, _ = store.start(job.id, task_id, gen, worker, utcnow())
    return started


def _async_client(client: redis.Redis) -> aioredis.Redis:
    """An asyncio client (the API's kind) on the same Redis database as `client`."""
    where = client.connection_pool.connection_kwargs
    return aioredis.Redis(host=where["host"], port=where["port"], db=where.get("db", 0))


def _get_waited(store: JobStore, job_id: str) -> Job | None:
    """What a long poll's first read does, through the API's async store."""

    async def read() -> Job | None:
        client = _async_client(store.client)
        try:
            return await AsyncJobStore(client, ttl_s=60).get_waited(job_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def _succeeded(job: Job) -> Job:
    return job.model_copy(update={"status": JobStatus.SUCCEEDED, "finished_at": utcnow()})


def _read(store: JobStore, job: Job) -> Job:
    stored = store.get(job.id)
    assert stored is not None
    return stored


def test_the_attempt_that_started_last_owns_the_job(store: JobStore) -> None:
    job = _new(store)
    slow = _start(store, job, "slow@test", "task-1")
    assert (slow.status, slow.attempts, slow.worker) == (JobStatus.RUNNING, 1, "slow@test")
    assert _read(store, job) == slow, "a reader sees the run the start returned"
    # Its worker died: the same message went to another worker.
    fresh = _start(store, job, "fresh@test", "task-1")

    with pytest.raises(TransitionRefused):
        store.save(_succeeded(slow))
    store.save(_succeeded(fresh))
    final = _read(store, job)
    assert (final.status, final.attempts, final.worker) == (JobStatus.SUCCEEDED, 2, "fresh@test")
    with pytest.raises(TransitionRefused):  # and a result is written once only
        store.save(_succeeded(fresh))
    assert store.client.zscore(OPEN_JOBS, job.id) is None, "an ended job left the open index"


def test_a_start_sent_again_returns_the_run_it_started(store: JobStore) -> None:
    """A start whose reply was lost is retried with the same arguments: it must answer with
    the run it started, not start another attempt."""
    job = _new(store)
    at = utcnow()
    first, _ = store.start(job.id, "task-1", 1, "a@test", at)
    again, _ = store.start(job.id, "task-1", 1, "a@test", at)
    assert again == first and again.attempts == 1
    assert _read(store, job).attempts == 1


def test_a_refused_start_says_what_it_found(store: JobStore) -> None:
    job = _new(store)
    done = _start(store, job, "a@test", "task-1")
    store.save(_succeeded(done))
    with pytest.raises(TransitionRefused) as refused:
        store.start(job.id, "task-2", 2, "b@test", utcnow())
    assert refused.value.current is not None
    assert refused.value.current.status is JobStatus.SUCCEEDED
    with pytest.raises(TransitionRefused) as missing:
        store.start("job_missing", "task-3", 1, "b@test", utcnow())
    assert missing.value.missing and missing.value.current is None


def test_a_duplicate_message_cannot_take_a_running_job(store: JobStore) -> None:
    """A message re-published for a job that is only waiting (not lost) is dropped once the
    original has started the job; a message published after the run started may take over."""
    job = _new(store)
    store.client.hincrby(job_key(job.id), "gen", 1)  # the reconciler re-published
    _start(store, job, "a@test", "original", 1)
    with pytest.raises(TransitionRefused):
        _start(store, job, "b@test", "republished", 2)
    store.client.hincrby(job_key(job.id), "gen", 1)  # the run itself went stale
    _start(store, job, "c@test", "republished-again", 3)
    assert _read(store, job).worker == "c@test"


def test_a_job_life_costs_sixteen_commands_and_one_announcement(
    private_redis: redis.Redis,
) -> None:
    """Create (as the API does), start and end a job: every command counts against what one
    Redis serves (and script calls count their own commands, as in INFO commandstats). Starting
    announces nothing (waiters wait for the end, and each would re-read the record for
    nothing), renews no TTL (the job's runs from its creation, the open index's is renewed by
    the reconciler), and reads the record itself, so a worker needs no read before it."""
    store = JobStore(private_redis, ttl_s=60)
    app = make_celery(Settings())
    job = Job(request=ClassifyRequest(prompt="hello"))
    listener = private_redis.pubsub()  # type: ignore[no-untyped-call]
    listener.subscribe(job_channel(job.id))
    assert listener.get_message(timeout=5) is not None  # the subscribe confirmation

    async def lives() -> None:
        api = AsyncJobStore(_async_client(private_redis), ttl_s=60)
        warm = Job(request=ClassifyRequest(prompt="hello"))
        # Loads the scripts, and renews the open index's TTL for the next minute.
        await api.create(warm, QUEUE_BULK, task_message(app, warm.id, QUEUE_BULK))
        store.save(_succeeded(_start(store, warm, "a@test", "task-0")))
        private_redis.config_resetstat()
        # As a sync call creates it: someone waits, so its end is announced.
        await api.create(job, QUEUE_BULK, task_message(app, job.id, QUEUE_BULK), waited=True)
        store.save(_succeeded(_start(store, job, "a@test", "task-1")))
        await api.client.aclose()

    asyncio.run(lives())
    stats = private_redis.info("commandstats")
    calls = Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})
    del calls["config|resetstat"], calls["info"]
    assert calls.total() <= 16, calls
    assert calls["evalsha"] == 3, calls  # one call each: create, start, end
    announced = [listener.get_message(timeout=1) for _ in range(2)]
    assert [m["data"] for m in announced if m] == [b"succeeded"]
    assert calls["publish"] == 1


def test_only_a_job_someone_waits_for_announces_its_end(store: JobStore) -> None:
    """Most jobs are polled or send a webhook: their end is published to nobody. A long poll
    marks the job with its first read, and from then on the end is announced."""
    quiet, waited = _new(store), _new(store)
    listener = store.client.pubsub()  # type: ignore[no-untyped-call]
    listener.subscribe(job_channel(quiet.id), job_channel(waited.id))
    for _ in range(2):
        assert listener.get_message(timeout=5) is not None  # the subscribe confirmations

    assert _get_waited(store, waited.id) == _read(store, waited)
    for job in (quiet, waited):
        store.save(_succeeded(_start(store, job, "a@test", "task-1")))
    heard = [m for _ in range(3) if (m := listener.get_message(timeout=1)) is not None]
    assert [(m["channel"], m["data"]) for m in heard] == [
        (job_channel(waited.id).encode(), b"succeeded")
    ]


def test_a_missing_job_is_not_created_by_waiting_for_it(store: JobStore) -> None:
    assert _get_waited(store, "job_missing") is None
    assert store.client.exists(job_key("job_missing")) == 0


def test_waiting_for_an_ended_job_writes_nothing(store: JobStore) -> None:
    job = _new(store)
    store.save(_succeeded(_start(store, job, "a@test", "task-1")))
    waited = _get_waited(store, job.id)
    assert waited is not None and waited.status is JobStatus.SUCCEEDED
    assert store.client.hget(job_key(job.id), "waited") is None


def test_the_reconciler_keeps_the_open_index_alive_while_jobs_run(store: JobStore) -> None:
    """Starts renew their job's TTL, not the index's: a worker's sweep does, so the index cannot
    expire under a job that was queued long before it started."""
    job = _new(store)
    _start(store, job, "a@test", "task-1")
    store.client.expire(OPEN_JOBS, 2)  # as if created long ago
    published: list[object] = []
    Reconciler(store.client, lambda *a, **k: published.append(a), 3600, 60).sweep()
    assert store.client.ttl(OPEN_JOBS) > 50
    assert store.client.zscore(OPEN_JOBS, job.id) is not None
    assert published == [], "a job within its deadline was published again"


def test_a_message_taken_by_a_worker_that_died_is_published_again_at_the_second_sweep(
    store: JobStore, redis_server: RedisServer
) -> None:
    """A worker that takes a message (BRPOP) and dies before it starts the job takes the
    message along. Lanes are first in, first out, so once every lane's oldest waiting message
    was sent after the job's (or the lane is empty), the job's message has left: a job still
    queued then, two sweeps in a row, is published again, long before its deadline. A job whose
    message still waits, or that a worker starts between the two sweeps, is not; nor is one
    lost from a lane while another lane's older backlog waits, until that backlog moves on."""
    app = make_celery(Settings(redis_url=db_url(redis_server, DB)))
    sent: list[Job] = []
    for _ in range(4):  # the lane, oldest first: lost, started, late, waiting
        sent.append(_new(store))
        publish_jobs(app, [sent[-1].id], QUEUE_BULK)
    lost, started, late, waiting = sent

    def take(lane: str) -> str:  # as a worker's BRPOP does
        taken = store.client.rpop(lane)
        assert isinstance(taken, bytes)
        return message_job_id(taken)

    assert [take(QUEUE_BULK) for _ in range(3)] == [lost.id, started.id, late.id]
    _start(store, started, "a@test", "task-1")
    sweep = Reconciler(store.client, app.send_task, store.stale_s, 60, skew_s=0)

    store.client.lpush(QUEUE_INTERACTIVE, b"not a message")
    assert sweep.sweep() == 0 and sweep.sweep() == 0, "an undated lane dates nothing"
    store.client.rpop(QUEUE_INTERACTIVE)
    assert sweep.sweep() == 0, "one sweep is not enough: a live worker may be starting it"
    _start(store, late, "b@test", "task-2")  # a slow start, between two sweeps
    assert sweep.sweep() == 1
    lane = [message_job_id(m) for m in store.client.lrange(QUEUE_BULK, 0, -1)]
    assert lane == [lost.id, waiting.id]  # newest first: the lost job's new message, behind
    assert store.client.hget(job_key(lost.id), "gen") == b"2"
    deadline = store.client.zscore(OPEN_JOBS, lost.id)
    assert deadline is not None and deadline > time.time() + store.stale_s - 5
    assert sweep.sweep() == 0 and sweep.sweep() == 0, "its new message waits; nothing is lost"

    # Lost from the interactive lane while the bulk lane's older messages wait: left alone
    # until the bulk lane has moved past it.
    urgent = Job(request=ClassifyRequest(prompt="hello"))
    store.create(urgent, QUEUE_INTERACTIVE)
    publish_jobs(app, [urgent.id], QUEUE_INTERACTIVE)
    assert take(QUEUE_INTERACTIVE) == urgent.id
    assert sweep.sweep() == 0 and sweep.sweep() == 0
    for task, job_id in enumerate([take(QUEUE_BULK), take(QUEUE_BULK)]):
        store.start(job_id, f"task-{task + 3}", 2 if job_id == lost.id else 1, "c@test", utcnow())
    assert sweep.sweep() == 0 and sweep.sweep() == 1
    assert message_job_id(store.client.lindex(QUEUE_INTERACTIVE, 0) or b"") == urgent.id


def test_a_lease_renewal_never_brings_back_an_ended_job(store: JobStore) -> None:
    """A worker renews the leases of the jobs it runs with each heartbeat; a job that ended
    between its read of them and the renewal must stay out of the open index, or the
    reconciler would publish a finished job again."""
    running, ended = _new(store), _new(store)
    started = [_start(store, job, "a@test", "task-1") for job in (running, ended)]
    store.save(_succeeded(started[1]))
    store.hold([running.id, ended.id], 100)
    assert store.client.zscore(OPEN_JOBS, ended.id) is None
    deadline = store.client.zscore(OPEN_JOBS, running.id)
    assert deadline is not None and deadline > time.time() + 90


def test_a_cancelled_job_cannot_be_started(store: JobStore) -> None:
    job = _new(store)
    store.client.hset(job_key(job.id), "status", JobStatus.CANCELLED.value)
    with pytest.raises(TransitionRefused):
        _start(store, job, "a@test", "task-1")


def test_transitions_read_status_without_the_document(store: JobStore) -> None:
    """The scripts must not parse the (possibly huge) document: a record whose document is not
    even JSON still changes status."""
    job = _new(store)
    key = job_key(job.id)
    store.client.hset(key, "doc", "x" * 200_000)
    with pytest.raises(ValidationError):  # only the reader in Python parses what it returns
        store.start(job.id, "task-1", 1, "a@test", utcnow())
    assert store.client.hget(key, "status") == b"running"
    done = job.model_copy(update={"status": JobStatus.SUCCEEDED, "attempts": 1})
    store.save(done)
    assert store.client.hget(key, "status") == b"succeeded"


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
        unique = {"id", "root_id", "correlation_id", "delivery_tag", "argsrepr", "sent_at"}
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
    assert message_sent_at(raw) is not None and message_sent_at(json.dumps(ours)) is not None


def test_pipelined_scripts_survive_a_server_that_forgot_them(store: JobStore) -> None:
    """Scripts run in a pipeline are sent as bare EVALSHA (a Redis Cluster pipeline takes no
    script objects): after SCRIPT FLUSH (a restart, a failover) the calls the server refused
    run again once the script is loaded, and none that ran runs twice."""
    jobs = [_new(store) for _ in range(3)]
    store.client.script_flush()
    cancelled = [
        job.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": utcnow()})
        for job in jobs
    ]
    assert store.save_many(cancelled) == [True, True, True]
    assert store.save_many(cancelled) == [False, False, False]  # each ended once
    assert int(store.client.hget(STATS, "jobs_ended:cancelled") or 0) == 3

    tags = ["00", "01"]
    due = DueSet(store.client, [f"guardfleet:{{{tag}}}:test:due" for tag in tags])
    for tag in tags:
        store.client.zadd(f"guardfleet:{{{tag}}}:test:due", {f"m{tag}": 0})
    store.client.script_flush()
    assert sorted(due.take_due(60)) == ["m00", "m01"]
    assert due.take_due(60) == []  # leased, not taken again


def test_a_worker_says_what_an_upgrade_without_draining_left(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys written before the store had parts are never read again: a worker starting on such
    a store says how many open jobs and webhooks they hold, instead of leaving them silently."""
    app = make_celery(Settings())
    quiet = Reconciler(store.client, app.send_task, stale_s=60, ttl_s=60, every_s=3600)
    with caplog.at_level(logging.ERROR, logger="worker.reconcile"):
        quiet.start()
        quiet.stop()
    assert caplog.records == []
    store.client.zadd("guardfleet:jobs:open", {"job_a1": 1.0, "job_b2": 2.0})
    store.client.zadd("guardfleet:webhooks:due", {"job_a1": 1.0})
    loud = Reconciler(store.client, app.send_task, stale_s=60, ttl_s=60, every_s=3600)
    with caplog.at_level(logging.ERROR, logger="worker.reconcile"):
        loud.start()
        loud.stop()
    assert "2 open jobs, 1 webhooks due under the key names of a version" in caplog.text
