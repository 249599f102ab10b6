"""Broker and job store on two Redis servers (`GUARDFLEET_BROKER_URL`): every path a job takes
still works, and each server holds only its own part: the lanes' messages on the broker, records
and everything else on the store."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import redis

from guardfleet.keys import QUEUE_BULK, QUEUE_INTERACTIVE, STATS
from tests.conftest import ApiServer, RedisServer, StartWorker, db_url, wait_until

STORE_DB = 50


def _url(client: redis.Redis) -> str:
    where = client.connection_pool.connection_kwargs
    return f"redis://{where['host']}:{where['port']}/0"


def test_a_fleet_with_its_broker_apart_from_its_store(
    redis_server: RedisServer,
    private_redis: redis.Redis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> None:
    store_url, broker = db_url(redis_server, STORE_DB), private_redis
    store = redis.Redis.from_url(store_url)
    store.flushdb()
    env = {"GUARDFLEET_BROKER_URL": _url(broker)}
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
        wait_until(
            lambda: http.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed",
            120,
            "the batch, fanned out to the broker, to complete",
        )
        assert http.get("/v1/health/ready").status_code == 200
    finally:
        worker.stop()

    # Each server holds its own part and nothing of the other's.
    assert int(store.hget(STATS, "jobs_ended:succeeded") or 0) == 7
    assert broker.keys("guardfleet:*") == []
    assert not store.exists(QUEUE_BULK, QUEUE_INTERACTIVE)
    assert store.keys("_kombu*") == []
    assert broker.keys("_kombu.binding.*")
