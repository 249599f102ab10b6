"""A delivery worker killed (or stopped) while it fans a batch out: another resumes at the
cursor, and every item ends up queued exactly once."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.keys import (
    BATCHES_PENDING,
    QUEUE_BULK,
    batch_fanout_key,
    batch_jobs_key,
    batch_upload_key,
    batches_due,
    job_key,
)
from guardfleet.queueing import message_job_id
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, db_url, wait_until

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
BATCHES_DUE = batches_due("00")

ITEMS = 20_000
LEASE_S = {signal.SIGKILL: 2, signal.SIGTERM: 120}


def _cursor(client: redis.Redis, batch_id: str) -> int:
    return int(client.hget(batch_fanout_key(batch_id), "cursor") or 0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_fan_out_stopped_midway_resumes_and_queues_each_item_once(
    redis_server: RedisServer, start_worker: StartWorker, sig: signal.Signals
) -> None:
    """Killed, the batch waits out its lease (2 s here); stopped, the worker hands it back
    between chunks, so the rescuer need not wait out a lease (120 s here) at all."""
    db = 44
    env = {
        "GUARDFLEET_BATCH_FANOUT_CHUNK": "100",
        "GUARDFLEET_BATCH_FANOUT_LEASE_S": str(LEASE_S[sig]),
    }
    url = db_url(redis_server, db)
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    lines = "".join(
        json.dumps({"custom_id": f"i{n}", "prompt": "How do I fold a fitted sheet?"}) + "\n"
        for n in range(ITEMS)
    )
    with TestClient(create_app(Settings(redis_url=url))) as client:
        batch_id = client.post("/v1/batches", content=lines).json()["id"]

    first = start_worker("fanout-victim@test", wait=False, db=db, module="worker.delivery", **env)
    wait_until(lambda: _cursor(plain, batch_id) > 0, 60, "the fan-out to start", every=0.01)
    first.kill(sig)
    stopped_at = _cursor(plain, batch_id)
    assert 0 < stopped_at < ITEMS, f"killed at {stopped_at}: not midway, the test proves nothing"

    second = start_worker("fanout-rescuer@test", wait=False, db=db, module="worker.delivery", **env)
    try:
        wait_until(lambda: plain.zcard(BATCHES_DUE) == 0, 60, "the rescuer to finish the fan-out")
    finally:
        second.stop()

    assert _cursor(plain, batch_id) == ITEMS
    job_ids = [
        i.decode() if isinstance(i, bytes) else i
        for i in plain.lrange(batch_jobs_key(batch_id), 0, -1)
    ]
    assert len(job_ids) == len(set(job_ids)) == ITEMS
    queued = Counter(message_job_id(m) for m in plain.lrange(QUEUE_BULK, 0, -1))
    assert queued == Counter(job_ids), "each item's job must have exactly one message"
    with plain.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "doc")
        docs = [json.loads(raw) for raw in pipe.execute()]
    assert [d["custom_id"] for d in docs] == [f"i{n}" for n in range(ITEMS)]
    assert {d["status"] for d in docs} == {"queued"}
    assert plain.exists(batch_upload_key(batch_id)) == 0
    assert plain.hlen(BATCHES_PENDING) == 0
