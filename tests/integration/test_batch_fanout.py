"""Batches are accepted in one transaction and queued by a delivery worker (the fan-out)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.keys import (
    BATCHES_PENDING,
    QUEUE_BULK,
    batch_fanout_key,
    batch_upload_key,
    batches_due,
    stats,
)
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, db_url, url_of, wait_for_batch, wait_until

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
STATS = stats("00")
BATCHES_DUE = batches_due("00")


def _lines(count: int, prompt: str = "How do I fold a fitted sheet?") -> str:
    return "".join(
        json.dumps({"custom_id": f"i{n}", "prompt": prompt}) + "\n" for n in range(count)
    )


def _assert_all_cancelled(client: TestClient, batch_id: str, items: int) -> dict[str, Any]:
    """Every item counted cancelled once and listed cancelled, in input order; the batch."""
    done: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
    assert done["request_counts"] == {
        "total": items,
        "completed": 0,
        "failed": 0,
        "cancelled": items,
    }
    lines = client.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in results] == [f"i{n}" for n in range(items)]
    assert {r["status"] for r in results} == {"cancelled"}
    return done


def _commands(client: redis.Redis) -> int:
    """Commands Redis has run so far, leaving out the INFO calls that read the count."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def test_accepting_a_batch_costs_the_same_few_commands_at_any_size(
    private_redis: redis.Redis,
) -> None:
    """On a Redis of its own (the others' workers would add their commands to the count), and
    no delivery worker: a stored batch waits, `validating`, with nothing queued."""
    plain = private_redis
    url = url_of(plain)
    costs, answers = [], []
    with TestClient(create_app(Settings(redis_url=url))) as client:
        client.post("/v1/batches", content=_lines(1))  # first use: connections, scripts
        for size in (10, 20_000):
            time.sleep(0.3)  # let the cached bulk backlog lapse, so each submit reads it
            before = _commands(plain)
            answers.append(client.post("/v1/batches", content=_lines(size)))
            costs.append(_commands(plain) - before)
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.json()["status"] for a in answers] == ["validating", "validating"]
    assert [a.json()["request_counts"]["total"] for a in answers] == [10, 20_000]
    assert costs[0] == costs[1] <= 20, costs
    assert plain.llen(QUEUE_BULK) == 0
    assert not list(plain.scan_iter("guardfleet:*:job:*"))
    pending = [int(v) for v in plain.hvals(BATCHES_PENDING)]
    assert sorted(pending) == [1, 10, 20_000]
    assert plain.zcard(BATCHES_DUE) == 3


def test_a_batch_cancelled_before_it_was_queued_has_every_item_cancelled(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    db = 43
    url = db_url(redis_server, db)
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    with TestClient(create_app(Settings(redis_url=url))) as client:
        batch = client.post("/v1/batches", content=_lines(50)).json()
        cancel = client.post(f"/v1/batches/{batch['id']}/cancel")
        assert cancel.status_code == 200, cancel.text
        # Nothing is queued yet, so nothing could be cancelled yet: the fan-out will do it.
        assert cancel.json()["status"] == "cancelling"
        assert cancel.json()["request_counts"]["cancelled"] == 0
        assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 409
        hooks = start_worker("cancel-fanout@test", wait=False, db=db, module="worker.delivery")
        try:
            wait_for_batch(
                client, batch["id"], "cancelled", 30, "the delivery worker to cancel every item"
            )
        finally:
            hooks.stop()
        done = _assert_all_cancelled(client, batch["id"], 50)
        assert done["in_progress_at"] is None  # it never ran
    assert plain.llen(QUEUE_BULK) == 0  # no message for any of them
    assert plain.exists(batch_upload_key(batch["id"])) == 0
    assert plain.hlen(BATCHES_PENDING) == 0


def test_a_batch_cancelled_mid_fan_out_has_every_item_cancelled_once(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """Some items queued, the rest not yet: the queued ones are cancelled, the rest written
    cancelled, and each is counted once."""
    db = 46
    items = 20_000
    url = db_url(redis_server, db)
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    with TestClient(create_app(Settings(redis_url=url))) as client:
        batch = client.post("/v1/batches", content=_lines(items)).json()
        cursor = batch_fanout_key(batch["id"])
        hooks = start_worker(
            "midway-fanout@test",
            wait=False,
            db=db,
            module="worker.delivery",
            GUARDFLEET_BATCH_FANOUT_CHUNK="100",
        )
        try:
            wait_until(lambda: int(plain.hget(cursor, "cursor") or 0) > 0, 60, "the fan-out")
            cancel = client.post(f"/v1/batches/{batch['id']}/cancel")
            assert cancel.status_code == 200, cancel.text
            queued_when_cancelled = int(plain.hget(cursor, "cursor") or 0)
            assert queued_when_cancelled < items, "the fan-out ended before the cancel"
            wait_for_batch(
                client, batch["id"], "cancelled", 120, "the delivery worker to cancel every item"
            )
        finally:
            hooks.stop()
        _assert_all_cancelled(client, batch["id"], items)
    assert 0 < plain.llen(QUEUE_BULK) < items  # only the items queued before the cancel
    assert int(plain.hget(STATS, "batch_items:cancelled") or 0) == items
