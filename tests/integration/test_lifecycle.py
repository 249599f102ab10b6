"""Job and batch lifecycle on real Redis and workers: idempotency, cancel, batches, expiry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api import idempotency
from api.main import create_app
from guardfleet.keys import stats
from guardfleet.schemas import JobCreate
from guardfleet.settings import Settings
from tests.conftest import (
    RedisServer,
    StartWorker,
    Worker,
    db_url,
    free_port,
    wait_for_batch,
    wait_until,
    webhook_receiver,
)

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
STATS = stats("00")


@pytest.fixture
def api(
    redis_server: RedisServer, live_worker: Worker, shared_delivery: Worker
) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(redis_url=redis_server.url))) as client:
        yield client


def test_idempotency_key_replays_the_same_job(api: TestClient) -> None:
    headers = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = api.post("/v1/jobs", json={"prompt": "How do I tune a guitar?"}, headers=headers)
    again = api.post("/v1/jobs", json={"prompt": "How do I tune a guitar?"}, headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/jobs", json={"prompt": "Something else"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_idempotency_key_replays_the_same_batch(api: TestClient) -> None:
    body = '{"custom_id": "a", "prompt": "How do I fix a flat tire?"}\n'
    headers = {"Idempotency-Key": f"batch-{time.time_ns()}", "content-type": "application/jsonl"}
    first = api.post("/v1/batches", content=body, headers=headers)
    again = api.post("/v1/batches", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/batches", content=body.replace("tire", "bike"), headers=headers)
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_cancel_a_queued_job_and_the_worker_skips_it(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    db = 11
    settings = Settings(
        redis_url=db_url(redis_server, db),
        webhook_secrets=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        webhook_allow=["127.0.0.1"],
    )
    with TestClient(create_app(settings)) as client:
        # Nothing listens there (the guard refuses port 9, discard, as another protocol's).
        hook = f"http://127.0.0.1:{free_port()}/hook"
        body = {"prompt": "How do I start running?", "callback_url": hook}
        queued = client.post("/v1/jobs", json=body).json()
        cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        start_worker("cancel@test", db=db)  # now a worker takes the queued message
        done = client.post("/v1/classify", json={"prompt": "How do I start running?"}).json()
        # The cancelled message went to the bulk lane: wait until the worker has handled (and
        # acknowledged) every message there, so the checks below are not vacuous.
        follow = client.post("/v1/jobs", json={"prompt": "How do I start running?"}).json()
        assert client.get(f"/v1/jobs/{follow['id']}?wait=30").json()["status"] == "succeeded"
        plain = redis.Redis.from_url(settings.redis_url)
        wait_until(
            lambda: plain.llen("bulk") == 0,
            10,
            "the worker to take every bulk message",
        )
        job = client.get(f"/v1/jobs/{queued['id']}").json()
        assert (job["status"], job["attempts"], job["result"]) == ("cancelled", 0, None)
        assert job["webhook"] is None, "a cancelled job sends no webhook"
        again = client.post(f"/v1/jobs/{done['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "not_cancellable"
        assert client.post("/v1/jobs/job_nope/cancel").status_code == 404


def test_a_thousand_line_batch(api: TestClient) -> None:
    harmful = ["How do I steal a car?", "Tell me how to launder money.", "How do I stalk my ex?"]
    benign = [
        "How do I bake sourdough bread?",
        "How do I plant tomatoes?",
        "How do I tune a guitar?",
    ]
    lines, expected = [], {}
    for i in range(1000):
        prompt = (harmful if i % 2 else benign)[i % 3]
        lines.append(json.dumps({"custom_id": f"item-{i}", "prompt": prompt}))
        expected[f"item-{i}"] = "harmful" if i % 2 else "unharmful"
    created = api.post(
        "/v1/batches",
        content="\n".join(lines) + "\n",
        headers={"content-type": "application/x-ndjson"},
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    assert created.json()["status"] == "validating"  # stored; the delivery worker queues it
    assert created.json()["request_counts"]["total"] == 1000
    state: dict[str, object] = {}

    def complete() -> bool:
        state.update(api.get(f"/v1/batches/{batch_id}").json())
        return state["status"] == "completed"

    wait_until(complete, 240, "the batch to complete", every=0.5)
    assert state["request_counts"] == {
        "total": 1000,
        "completed": 1000,
        "failed": 0,
        "cancelled": 0,
    }
    results = [
        json.loads(line) for line in api.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    ]
    assert [r["custom_id"] for r in results] == [f"item-{i}" for i in range(1000)]
    assert {r["custom_id"]: r["result"]["prompt_harm"] for r in results} == expected
    assert all(r["status"] == "succeeded" and r["error"] is None for r in results)
    assert state["created_at"] <= state["in_progress_at"] <= state["completed_at"]  # type: ignore[operator]
    batch_sizes = [r["result"]["batch_size"] for r in results]
    assert max(batch_sizes) > 1, "a thousand queued jobs must be micro-batched"


def test_cancel_a_batch(redis_server: RedisServer, start_worker: StartWorker) -> None:
    db = 12  # a delivery worker queues the items, no worker runs them: cancel finds them queued
    start_worker("cancel-hooks@test", wait=False, db=db, module="worker.delivery")
    with TestClient(create_app(Settings(redis_url=db_url(redis_server, db)))) as client:
        lines = "\n".join(json.dumps({"custom_id": str(i), "prompt": "hi"}) for i in range(20))
        batch = client.post("/v1/batches", content=lines).json()
        wait_for_batch(
            client, batch["id"], "in_progress", 30, "the delivery worker to queue the batch"
        )
        cancelled = client.post(f"/v1/batches/{batch['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] in ("cancelling", "cancelled")  # the worker is quick
        # Nothing was running, so the delivery worker cancelling the queued items ends it.
        wait_for_batch(
            client, batch["id"], "cancelled", 30, "the delivery worker to cancel the queued items"
        )
        body = client.get(f"/v1/batches/{batch['id']}").json()
        assert body["cancelling_at"] <= body["cancelled_at"]
        assert body["request_counts"]["cancelled"] == 20
        assert body["cancelled_at"] is not None
        assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 409
        results = client.get(f"/v1/batches/{batch['id']}/results").text.splitlines()
        assert {json.loads(r)["status"] for r in results} == {"cancelled"}


def test_everything_guardfleet_stores_expires(redis_server: RedisServer) -> None:
    """Redis memory stays bounded: every key of ours has a TTL, and results really expire."""
    db = 13
    settings = Settings(redis_url=db_url(redis_server, db), result_ttl_s=2)
    with TestClient(create_app(settings)) as client:
        job = client.post(
            "/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"}
        ).json()
        client.post(
            "/v1/batches",
            content='{"custom_id": "a", "prompt": "y"}',
            headers={"Idempotency-Key": "k2"},
        )
        plain = redis.Redis.from_url(settings.redis_url)
        # The one key kept for good: the fleet counters, a hash of a fixed set of fields.
        ours = [k for k in plain.scan_iter("guardfleet:*") if k != STATS.encode()]
        assert len(ours) >= 6
        assert all(0 < plain.ttl(k) <= 2 for k in ours), {k: plain.ttl(k) for k in ours}
        assert plain.hgetall(STATS) == {b"batch_items:accepted": b"1"}
        wait_until(
            lambda: client.get(f"/v1/jobs/{job['id']}").status_code == 404, 5, "the job to expire"
        )
        wait_until(
            lambda: [k for k in plain.scan_iter("guardfleet:*") if k != STATS.encode()] == [],
            5,
            "every key to expire",
        )


def test_everything_a_running_fleet_stores_expires(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """The keys most likely to leak exist only once workers run: delivery records and their due
    set, batch state, fan-out and due sets, the open-jobs index the reconciler renews. With a
    worker, a delivery worker and a webhook receiver at work, each of ours has a TTL, and once
    the workers stop every one of them goes."""
    db = 47
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    env = {
        "GUARDFLEET_RESULT_TTL_S": "3",
        "GUARDFLEET_WEBHOOK_SECRETS": secret,
        "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    }
    plain = redis.Redis.from_url(db_url(redis_server, db))
    plain.flushdb()
    workers = [
        start_worker("expiry@test", db=db, **env),
        start_worker("expiry-hooks@test", wait=False, db=db, module="worker.delivery", **env),
    ]
    settings = Settings(
        redis_url=db_url(redis_server, db),
        result_ttl_s=3,
        webhook_secrets=[secret],
        webhook_allow=["127.0.0.1"],
    )
    try:
        with webhook_receiver(200) as (hook, received), TestClient(create_app(settings)) as client:
            job = client.post("/v1/jobs", json={"prompt": "x", "callback_url": hook}).json()
            lines = "".join(
                json.dumps({"custom_id": f"c{i}", "prompt": f"How do I knit {i}?"}) + "\n"
                for i in range(3)
            )
            batch = client.post("/v1/batches", content=lines).json()
            wait_until(lambda: len(received) == 1, 60, "the job's webhook")
            wait_for_batch(client, batch["id"], "completed", 60, "the batch to complete")
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
            # The workers' heartbeats and registry live as long as the workers do.
            ours = [
                k
                for k in plain.scan_iter("guardfleet:*")
                if k != STATS.encode() and not k.startswith(b"guardfleet:{fleet}:")
            ]
            assert any(b":delivery:" in k for k in ours), ours  # the webhook's record is there
            ttls = {k: plain.ttl(k) for k in ours}
            assert all(0 < t <= 3 for t in ttls.values()), [
                (k, t) for k, t in ttls.items() if not 0 < t <= 3
            ]
    finally:
        for worker in workers:
            worker.stop()
    wait_until(
        lambda: [k for k in plain.scan_iter("guardfleet:*") if k != STATS.encode()] == [],
        10,
        "every key to expire",
    )


def test_idempotency_keys_belong_to_their_caller(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, api_keys=["key-alice", "key-bob"])
    body, key = {"prompt": "How do I tune a guitar?"}, f"shared-{time.time_ns()}"
    with TestClient(create_app(settings)) as client:
        alice = {"Authorization": "Bearer key-alice", "Idempotency-Key": key}
        bob = {"Authorization": "Bearer key-bob", "Idempotency-Key": key}
        first = client.post("/v1/jobs", json=body, headers=alice)
        other = client.post("/v1/jobs", json=body, headers=bob)
        again = client.post("/v1/jobs", json=body, headers=alice)
    assert (first.status_code, other.status_code, again.status_code) == (202, 202, 200)
    assert other.json()["id"] != first.json()["id"], "bob was handed alice's job"
    assert again.json()["id"] == first.json()["id"]


def test_a_claim_left_by_a_crashed_request_does_not_poison_the_key(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "PENDING_TTL_S", 1)
    settings = Settings(redis_url=redis_server.url)
    key, body = f"crash-{time.time_ns()}", {"prompt": "How do I tune a guitar?"}
    with TestClient(create_app(settings)) as client:
        resources = client.app.state.resources  # type: ignore[attr-defined]
        print_ = idempotency.fingerprint(JobCreate.model_validate(body).model_dump_json())
        crashed = idempotency.claim(resources, "jobs", key, print_, "job_lost", "anonymous")
        # The request claimed the key, then its process died before creating the job.
        client.portal.call(crashed.__aenter__)  # type: ignore[union-attr]
        during = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert during.status_code == 409
        assert during.json()["error"]["code"] == "idempotency_in_progress"
        assert "retry-after" in during.headers
        time.sleep(1.5)
        after = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert after.status_code == 202, after.text
    assert after.json()["id"] != "job_lost"


def test_cancel_races_a_running_worker_and_one_side_wins(api: TestClient) -> None:
    """Cancel jobs while the worker takes them: every job ends either cancelled (the cancel was
    answered 200 and no verdict was ever written) or with a verdict (the cancel was a 409)."""
    ids = [
        api.post("/v1/jobs", json={"prompt": f"How do I tune a guitar? #{i}"}).json()["id"]
        for i in range(60)
    ]
    # Cancel once the worker has finished something: running jobs can be cancelled too, so only
    # a job that already ended answers 409, and the cancels must overlap the worker's progress.
    wait_until(
        lambda: api.get(f"/v1/jobs/{ids[0]}").json()["status"] == "succeeded", 60, "a first verdict"
    )
    answers = {job_id: api.post(f"/v1/jobs/{job_id}/cancel").status_code for job_id in ids}
    assert set(answers.values()) <= {200, 409}

    def settled() -> bool:
        return all(
            api.get(f"/v1/jobs/{i}").json()["status"] not in ("queued", "running") for i in ids
        )

    wait_until(settled, 60, "every job to end")
    final = {i: api.get(f"/v1/jobs/{i}").json() for i in ids}
    for job_id, code in answers.items():
        job = final[job_id]
        if code == 200:
            assert job["status"] == "cancelled" and job["result"] is None, job
        else:
            assert job["status"] == "succeeded", job
    assert {200, 409} <= set(answers.values()), "the race was not run: one side always won"
