"""Broker and job store on two Redis servers (`GUARDFLEET_BROKER_URL`): every path a job takes
still works, and each server holds only its own part: the lanes' messages (and the broker's id)
on the broker, records and everything else on the store; a worker on another broker is not
counted ready."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import redis

from guardfleet.keys import BROKER_ID, QUEUE_BULK, QUEUE_INTERACTIVE, stats
from tests.conftest import (
    ApiServer,
    RedisServer,
    StartWorker,
    db_url,
    url_of,
    wait_for_batch,
)

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
STATS = stats("00")

STORE_DB = 50


def test_a_fleet_with_its_broker_apart_from_its_store(
    redis_server: RedisServer,
    private_redis: redis.Redis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> None:
    store_url, broker = db_url(redis_server, STORE_DB), private_redis
    store = redis.Redis.from_url(store_url)
    store.flushdb()
    env = {"GUARDFLEET_BROKER_URL": url_of(broker)}
    api = start_api(url=store_url, **env)
    http = httpx.Client(base_url=api.url, timeout=60)

    # Accepted with no worker running: the message waits on the broker, which the API's
    # backlog figures and metrics read.
    queued = http.post("/v1/jobs", json={"prompt": "How do I descale a kettle?"})
    assert queued.status_code == 202, queued.text
    assert broker.llen(QUEUE_BULK) == 1
    assert not store.exists(QUEUE_BULK)
    assert 'guardfleet_queue_depth{lane="bulk"} 1.0' in http.get("/metrics").text

    worker = start_worker("apart@test", url=store_url, **env)
    start_worker("apart-delivery@test", wait=False, url=store_url, module="worker.delivery", **env)
    try:
        done = http.get(f"/v1/jobs/{queued.json()['id']}", params={"wait": 60}).json()
        assert done["status"] == "succeeded", done
        classified = http.post("/v1/classify", json={"prompt": "How do I steal a car?"})
        assert classified.status_code == 200, classified.text
        assert classified.json()["result"]["prompt_harm"] == "harmful"
        lines = "".join(
            json.dumps({"custom_id": f"i{n}", "prompt": f"Is tea number {n} safe to drink?"}) + "\n"
            for n in range(5)
        )
        batch = http.post("/v1/batches", content=lines).json()
        wait_for_batch(
            http, batch["id"], "completed", 120, "the batch, fanned out to the broker, to complete"
        )
        assert http.get("/v1/health/ready").status_code == 200
    finally:
        worker.stop()

    # Each server holds its own part and nothing of the other's.
    assert int(store.hget(STATS, "jobs_ended:succeeded") or 0) == 7
    assert broker.keys("guardfleet:*") == [BROKER_ID.encode()]  # its id, which workers report
    assert not store.exists(QUEUE_BULK, QUEUE_INTERACTIVE, BROKER_ID)
    assert store.keys("_kombu*") == []
    assert broker.keys("_kombu.binding.*")


def test_a_worker_on_another_broker_is_not_counted_ready(
    redis_server: RedisServer,
    private_redis: redis.Redis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> None:
    """Same store, different brokers: the worker's heartbeat is there, but it would never see
    this API's jobs, so readiness says so and sync calls are refused at once instead of waiting
    out their timeout."""
    store_url = db_url(redis_server, STORE_DB)
    redis.Redis.from_url(store_url).flushdb()
    api = start_api(url=store_url, GUARDFLEET_BROKER_URL=url_of(private_redis))
    worker = start_worker("misrouted@test", url=store_url)  # its broker is the store's Redis
    try:
        http = httpx.Client(base_url=api.url, timeout=60)
        ready = http.get("/v1/health/ready")
        assert ready.status_code == 503
        assert "another broker: misrouted@test" in ready.json()["message"]
        refused = http.post("/v1/classify", json={"prompt": "How do I steal a car?"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "no_ready_worker"
        assert worker.heartbeat() is not None  # it is alive, only elsewhere
    finally:
        worker.stop()
