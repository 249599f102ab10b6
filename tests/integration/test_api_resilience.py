"""The API's answers when Redis or the fleet misbehave: a 503 in the envelope, never a 500 or a
needless wait. Heartbeats are written here in the worker's wire format, so clocks and queues can
be set to what a real fleet may show (a skewed clock, a bulk-only worker, another version)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.keys import QUEUE_BULK, QUEUE_INTERACTIVE, WORKER_REGISTRY, worker_key
from guardfleet.schemas import WorkerHeartbeat, utcnow
from guardfleet.settings import Settings
from tests.conftest import (
    ApiServer,
    RedisServer,
    StartWorker,
    db_url,
    free_port,
    url_of,
    wait_until,
)

DB = 14  # no worker consumes this database: only the heartbeats written here exist


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[TestClient]:
    redis.Redis.from_url(db_url(redis_server, DB)).flushdb()
    # A short sync timeout: where readiness wrongly passes, the call ends in a 504, not a hang.
    settings = Settings(redis_url=db_url(redis_server, DB), sync_timeout_s=2)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def beat(
    redis_server: RedisServer,
    name: str,
    *,
    queues: tuple[str, ...] = (QUEUE_INTERACTIVE, QUEUE_BULK),
    clock_skew: timedelta = timedelta(0),
    ttl_s: int = 30,
    raw: str | None = None,
) -> None:
    """What a worker's heartbeat writes, as seen from a worker whose clock is off by `skew`."""
    now = utcnow() + clock_skew
    record = WorkerHeartbeat(
        name=name,
        host="elsewhere",
        pid=1,
        device="cpu",
        model="demo",
        loaded=True,
        queues=list(queues),
        started_at=now,
        last_seen=now,
    )
    client = redis.Redis.from_url(db_url(redis_server, DB))
    client.set(worker_key(name), raw or record.model_dump_json(), ex=ttl_s)
    client.zadd(WORKER_REGISTRY, {name: now.timestamp() + ttl_s})


def error_of(response: Any) -> dict[str, Any]:  # httpx's or the TestClient's response
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def test_a_heartbeat_that_does_not_validate_is_skipped(
    client: TestClient, redis_server: RedisServer
) -> None:
    beat(redis_server, "future@test", raw=json.dumps({"name": "future@test", "shape": "v2"}))
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 503, ready.text
    sync = client.post("/v1/classify", json={"prompt": "hello"})
    assert (sync.status_code, error_of(sync)["code"]) == (503, "no_ready_worker")
    beat(redis_server, "current@test")
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 200, ready.text
    assert [w["name"] for w in ready.json()["workers"]] == ["current@test"]


def test_sync_calls_need_a_worker_on_the_interactive_queue(
    client: TestClient, redis_server: RedisServer
) -> None:
    beat(redis_server, "bulk-only@test", queues=(QUEUE_BULK,))
    ready = client.get("/v1/health/ready")  # the fleet can take queued jobs...
    assert ready.status_code == 200
    assert ready.json()["workers"][0]["queues"] == [QUEUE_BULK]
    for path, body in [
        ("/v1/classify", {"prompt": "hello"}),
        (
            "/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        ),
    ]:
        response = client.post(path, json=body)  # ...but nobody would answer a sync call
        assert (response.status_code, error_of(response)["code"]) == (503, "no_ready_worker")
        assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize("skew", [timedelta(hours=-1), timedelta(hours=1)])
def test_readiness_trusts_the_key_ttl_not_the_workers_clock(
    client: TestClient, redis_server: RedisServer, skew: timedelta
) -> None:
    beat(redis_server, "skewed@test", clock_skew=skew)
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 200, ready.text
    redis.Redis.from_url(db_url(redis_server, DB)).delete(worker_key("skewed@test"))
    assert client.get("/v1/health/ready").status_code == 503  # the key expired: gone


RefuseWrites = Callable[[redis.Redis], object]


def _out_of_memory(r: redis.Redis) -> object:
    return r.config_set("maxmemory", 1)


def _read_only_replica(r: redis.Redis) -> object:
    return r.replicaof("127.0.0.1", free_port())


@pytest.mark.parametrize("refuse", [_out_of_memory, _read_only_replica])
def test_redis_refusing_writes_is_a_503(private_redis: redis.Redis, refuse: RefuseWrites) -> None:
    settings = Settings(redis_url=url_of(private_redis))
    with TestClient(create_app(settings)) as client:
        refuse(private_redis)
        response = client.post("/v1/jobs", json={"prompt": "hello"})
        assert response.status_code == 503, response.text
        assert error_of(response)["code"] == "store_unavailable"
        assert response.headers["retry-after"] == "5"
        batch = client.post("/v1/batches", content=json.dumps({"custom_id": "a", "prompt": "x"}))
        assert batch.status_code == 503, batch.text


def test_cancelling_a_batch_counts_its_items_under_python_O(
    start_api: Callable[..., ApiServer], redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """`python -O` strips asserts; progress recorded inside one would be lost with it. The API
    marks the batch, the delivery worker cancels and counts its items: both run optimized."""
    redis.Redis.from_url(db_url(redis_server, DB)).flushdb()
    optimized = {"PYTHONOPTIMIZE": "1"}
    api = start_api(db=DB, **optimized)
    hooks = start_worker(
        "optimized-hooks@test", wait=False, db=DB, module="worker.delivery", **optimized
    )
    try:
        lines = "\n".join(json.dumps({"custom_id": str(i), "prompt": "hi"}) for i in range(5))
        batch = httpx.post(f"{api.url}/v1/batches", content=lines).json()

        def status() -> str:
            return str(httpx.get(f"{api.url}/v1/batches/{batch['id']}").json()["status"])

        wait_until(lambda: status() == "in_progress", 30, "the delivery worker to queue it")
        cancelled = httpx.post(f"{api.url}/v1/batches/{batch['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        wait_until(lambda: status() == "cancelled", 30, "the delivery worker to cancel it")
        done = httpx.get(f"{api.url}/v1/batches/{batch['id']}").json()
        assert done["request_counts"]["cancelled"] == 5
    finally:
        hooks.stop()  # this database is otherwise left without workers
