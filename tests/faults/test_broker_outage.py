"""A broker on its own Redis (`GUARDFLEET_BROKER_URL`) refusing writes while the job store
answers: a submit it refuses leaves no job behind, and batch items whose messages it refused are
published as soon as it takes writes again, each once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.fanout import FanOut
from guardfleet.keys import QUEUE_BULK, batch_jobs_key, open_jobs
from guardfleet.queueing import make_celery, message_job_id
from guardfleet.replies import as_text
from guardfleet.settings import Settings
from tests.conftest import ApiServer, RedisServer, StartWorker, Worker, db_url, url_of, wait_until
from tests.faults.conftest import WEBHOOK_ENV, CountingReceiver, KillableRedis
from worker.reconcile import Reconciler

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
OPEN_JOBS = open_jobs("00")

STORE_DB = 51


@pytest.fixture
def apart(redis_server: RedisServer, private_redis: redis.Redis) -> Iterator[Settings]:
    """Settings with the job store on the session's server and the broker on a private one."""
    store = redis.Redis.from_url(db_url(redis_server, STORE_DB))
    store.flushdb()
    yield Settings(
        redis_url=db_url(redis_server, STORE_DB),
        broker_url=url_of(private_redis),
        redis_timeout_s=1,
    )
    store.flushdb()


def _refuse_writes(broker: redis.Redis, refuse: bool) -> None:
    """A full broker: `noeviction` with no memory to spare refuses every write (OOM) and still
    answers reads, so the API's backlog read passes and the push is what fails."""
    broker.config_set("maxmemory-policy", "noeviction")
    broker.config_set("maxmemory", 1 if refuse else 0)


def _queued_job_ids(broker: redis.Redis) -> list[str]:
    return [message_job_id(m) for m in broker.lrange(QUEUE_BULK, 0, -1)]


def test_a_submit_the_broker_refuses_leaves_no_job(
    apart: Settings, private_redis: redis.Redis
) -> None:
    store = redis.Redis.from_url(apart.redis_url)
    with TestClient(create_app(apart)) as client:
        _refuse_writes(private_redis, True)
        try:
            refused = client.post("/v1/jobs", json={"prompt": "How do I descale a kettle?"})
        finally:
            _refuse_writes(private_redis, False)
        assert refused.status_code == 503, refused.text
        assert "retry-after" in refused.headers
        # Answered 503, so it must never run: no record, nothing for the stale sweep.
        assert store.keys("guardfleet:*:job:*") == []
        assert store.zcard(OPEN_JOBS) == 0
        accepted = client.post("/v1/jobs", json={"prompt": "How do I descale a kettle?"})
    assert accepted.status_code == 202, accepted.text
    assert _queued_job_ids(private_redis) == [accepted.json()["id"]]


def test_batch_items_the_broker_refused_are_published_once_it_answers(
    apart: Settings, private_redis: redis.Redis
) -> None:
    store = redis.Redis.from_url(apart.redis_url)
    lines = "".join(json.dumps({"custom_id": f"i{n}", "prompt": "Hi"}) + "\n" for n in range(5))
    with TestClient(create_app(apart)) as client:  # no delivery worker: the test fans out
        batch_id = client.post("/v1/batches", content=lines).json()["id"]
    app = make_celery(apart)
    broker = redis.Redis.from_url(apart.broker)
    fan_out = FanOut(store, app, 3600, chunk=2, lease_s=60, stale_s=3600, broker=broker)
    sweep = Reconciler(store, app.send_task, stale_s=3600, ttl_s=3600, broker=broker)

    _refuse_writes(private_redis, True)
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            fan_out.run(batch_id)
        written = [as_text(i) for i in store.lrange(batch_jobs_key(batch_id), 0, -1)]
        assert len(written) == 2  # the first chunk: stored, its messages refused
        # ... and due at once for the stale-job sweep, not in an hour.
        assert store.zrangebyscore(OPEN_JOBS, "-inf", "+inf") == sorted(w.encode() for w in written)
        assert store.zcount(OPEN_JOBS, "-inf", time.time()) == 2
        with pytest.raises(Exception, match="maxmemory"):
            sweep.sweep()  # the broker still refuses: they stay due, not leased for an hour
        assert store.zcount(OPEN_JOBS, "-inf", time.time()) == 2
    finally:
        _refuse_writes(private_redis, False)

    assert sweep.sweep() == 2
    assert fan_out.run(batch_id) == 3
    every = [as_text(i) for i in store.lrange(batch_jobs_key(batch_id), 0, -1)]
    assert len(every) == 5
    assert sorted(_queued_job_ids(private_redis)) == sorted(every)  # each item once


@pytest.mark.timeout(180)
def test_a_webhook_due_while_the_broker_is_down_is_sent_once_it_is_back(
    redis_server: RedisServer,
    killable_redis: KillableRedis,
    counting_receiver: CountingReceiver,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> None:
    """The delivery worker takes a due webhook from the store and fails to queue it on the dead
    broker (a kombu error, not a Redis one): the lease brings it back, and it is sent once the
    broker answers. Before, that error ended the loop that queues due webhooks, for good."""
    store_url = db_url(redis_server, STORE_DB)
    redis.Redis.from_url(store_url).flushdb()
    env = {
        **WEBHOOK_ENV,
        "GUARDFLEET_BROKER_URL": killable_redis.url,
        "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "2,1,1,1",  # the first attempt waits in the outbox
        "GUARDFLEET_WEBHOOK_LEASE_S": "2",
        "GUARDFLEET_REDIS_TIMEOUT_S": "1",
    }
    api = start_api(url=store_url, **env)
    worker = start_worker("outage@test", url=store_url, **env)
    delivery = start_worker(
        "outage-delivery@test", wait=False, url=store_url, module="worker.delivery", **env
    )
    # Its loop that queues due webhooks starts once it is ready (consuming from the broker).
    wait_until(lambda: "ready." in delivery.log.read_text(), 60, "the delivery worker")
    http = httpx.Client(base_url=api.url, timeout=60)
    body = {"prompt": "How do I descale a kettle?", "callback_url": counting_receiver.url}
    job = http.post("/v1/jobs", json=body).json()
    assert http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()["status"] == "succeeded"
    killable_redis.kill()  # the webhook is due in 2 s, with no broker to queue it on

    def tried() -> bool:  # taken from the outbox, and the broker refused it
        log = delivery.log.read_text()
        return "could not re-queue due webhooks" in log or "Exception in thread" in log

    wait_until(tried, 30, "the delivery worker to try queueing the due webhook")
    assert counting_receiver.ids == {}
    # The GPU worker goes on beating (and renewing its jobs' leases) past its heartbeat's TTL.
    killed_at = time.time()
    wait_until(
        lambda: _last_seen(worker) > killed_at + HEARTBEAT_TTL_S, 20, "a beat with no broker"
    )
    killable_redis.start()
    wait_until(
        lambda: counting_receiver.ids == {f"msg_{job['id']}": 1},
        60,
        "the webhook, once the broker is back",
    )


HEARTBEAT_TTL_S = 4  # tests.conftest.service_env's


def _last_seen(worker: Worker) -> float:
    beat = worker.heartbeat()
    return 0.0 if beat is None else datetime.fromisoformat(str(beat["last_seen"])).timestamp()
