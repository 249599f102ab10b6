"""The job store on a Redis in cluster mode (issue 13): no script, transaction or multi-key
command touches keys of two slots.

A Redis in cluster mode that holds every slot itself refuses a script, a transaction or a
multi-key command whose keys hash to different slots (CROSSSLOT), exactly as a real cluster
does, while a plain client still reaches every key. So the store's operations run against one,
each alone and then all together as a fleet (API, GPU worker and delivery worker, with the
broker on a plain Redis as a cluster needs: kombu does not speak Redis Cluster), and the server's
own error count must show no cross-slot refusal, even one a retry loop swallowed.

One node does not catch a script touching a key it was not given, nor a client that assumes one
server: so the fleet runs again on a real three-node cluster, with `GUARDFLEET_REDIS_CLUSTER`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from guardfleet import webhooks
from guardfleet.batches import AsyncBatchStore, record_progress
from guardfleet.fanout import FanOut
from guardfleet.keys import QUEUE_BULK, batch_jobs_key, id_tag, part_tags
from guardfleet.queueing import make_celery
from guardfleet.replies import as_text
from guardfleet.schemas import Batch, ClassifyRequest, Job, JobStatus
from guardfleet.settings import Settings
from guardfleet.store import AsyncJobStore, JobStore
from tests.cluster import Cluster
from tests.conftest import (
    ApiServer,
    RedisServer,
    StartWorker,
    db_url,
    url_of,
    wait_for_batch,
    wait_until,
    webhook_receiver,
)
from worker.reconcile import Reconciler

PARTS = 16
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One cluster-mode server holding every slot itself."""
    one = Cluster(tmp_path_factory.mktemp("cluster"), masters=1)
    one.start()
    yield one.urls[0]
    one.stop()


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three masters sharing the slots: the URLs of their nodes, the first one the seed."""
    three = Cluster(tmp_path_factory.mktemp("cluster3"), masters=3)
    three.start()
    yield three.urls
    three.stop()


def _cross_slot_refusals(*urls: str) -> int:
    """How many commands the servers refused for keys of two slots, since they started."""
    found = 0
    for url in urls:
        stats = redis.Redis.from_url(url).info("errorstats")
        found += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
    return found


def _job_lifecycle(url: str, _: str) -> None:
    store = JobStore(redis.Redis.from_url(url), ttl_s=60)
    job = Job(request=ClassifyRequest(prompt="Hi"))
    store.create(job, "bulk")
    store.hold([job.id], lease_s=0)
    running, _watched = store.start(job.id, "task-1", 1, "w@test", datetime.now(UTC))
    store.save(running.model_copy(update={"status": JobStatus.SUCCEEDED}))


def _api_submit(url: str, broker_url: str) -> None:
    async def submit() -> None:
        client, broker = aioredis.Redis.from_url(url), aioredis.Redis.from_url(broker_url)
        try:
            store = AsyncJobStore(client, 60, broker=broker)
            job = Job(request=ClassifyRequest(prompt="Hi"))
            await store.create(job, "bulk", "m", watch=True, waited=True)
            await store.get_waited(job.id)
            await store.save(job.model_copy(update={"status": JobStatus.CANCELLED}))
        finally:
            await client.aclose()
            await broker.aclose()

    asyncio.run(submit())


def _batch_accept_fan_out_and_count(url: str, broker_url: str) -> None:
    client = redis.Redis.from_url(url)
    batch = Batch.model_validate({"request_counts": {"total": 3}})

    async def accept() -> None:
        store = AsyncBatchStore(aioredis.Redis.from_url(url), 60)
        try:
            lines = "".join(
                json.dumps({"custom_id": f"i{n}", "prompt": "Hi"}) + "\n" for n in range(3)
            )
            await store.create(batch, lines.encode())
        finally:
            await store.client.aclose()

    asyncio.run(accept())
    app = make_celery(Settings(redis_url=url, broker_url=broker_url))
    broker = redis.Redis.from_url(broker_url)
    fan_out = FanOut(client, app, 60, chunk=2, lease_s=60, broker=broker)
    assert fan_out.run(batch.id) == 3
    store = JobStore(client, 60)
    for job_id in client.lrange(batch_jobs_key(batch.id), 0, -1):
        job = store.get(as_text(job_id))
        assert job is not None and id_tag(job.id) == id_tag(batch.id)
        record_progress(client, job.model_copy(update={"status": JobStatus.SUCCEEDED}), 60)

    async def cancel() -> None:
        store = AsyncBatchStore(aioredis.Redis.from_url(url), 60)
        try:
            await store.mark_cancelling(batch.id)
        finally:
            await store.client.aclose()

    asyncio.run(cancel())


def _webhook_outbox(url: str, _: str) -> None:
    store = webhooks.DeliveryStore(redis.Redis.from_url(url), 60)
    job = Job(request=ClassifyRequest(prompt="Hi"))

    def send_task(*_: Any, **__: Any) -> None:
        pass

    settings = Settings(redis_url=url)
    webhooks.schedule(
        store, send_task, settings, resource_id=job.id, url="http://x", event="job.done", data=job
    )
    delivery = store.get(job.id)
    assert delivery is not None
    store.settle(job.id, delivery, "retry")


def _stale_sweep(url: str, broker_url: str) -> None:
    client = redis.Redis.from_url(url)
    store = JobStore(client, 60)
    jobs = [
        Job(id=f"job_{tag}{'0' * 30}", request=ClassifyRequest(prompt="Hi")) for tag in ("00", "0a")
    ]
    for job in jobs:
        store.create(job, QUEUE_BULK)
    store.hold([job.id for job in jobs], lease_s=0)  # stale now
    app = make_celery(Settings(redis_url=url, broker_url=broker_url))
    sweep = Reconciler(client, app.send_task, 60, 60, broker=redis.Redis.from_url(broker_url))
    assert sweep.sweep() == 1, "one part swept: the other job is not in it"
    sweep = Reconciler(
        client, app.send_task, 60, 60, broker=redis.Redis.from_url(broker_url), parts=PARTS
    )
    assert sweep.sweep() == 1  # the other part's job; the first is leased again
    sweep.sweep()


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(_job_lifecycle, id="a job's create, start and end"),
        pytest.param(_api_submit, id="the API's submit, read and cancel"),
        pytest.param(_batch_accept_fan_out_and_count, id="a batch's accept, fan-out and count"),
        pytest.param(_webhook_outbox, id="a webhook's outbox entry and its settling"),
        pytest.param(_stale_sweep, id="the stale-job sweep over the parts"),
    ],
)
def test_store_operations_on_a_cluster(
    cluster_url: str, redis_server: RedisServer, operation: Callable[[str, str], None]
) -> None:
    before = _cross_slot_refusals(cluster_url)
    operation(cluster_url, db_url(redis_server, 56))
    assert _cross_slot_refusals(cluster_url) == before


@pytest.fixture(params=["one node holding every slot", "three nodes, cluster clients"])
def store_nodes(request: pytest.FixtureRequest) -> tuple[list[str], dict[str, str]]:
    """The store's nodes (the first one named in GUARDFLEET_REDIS_URL) and the settings for
    them: one cluster-mode server reached with plain clients, or a real cluster."""
    if request.param.startswith("one"):
        return [request.getfixturevalue("cluster_url")], {}
    return request.getfixturevalue("real_cluster"), {"GUARDFLEET_REDIS_CLUSTER": "true"}


def test_a_fleet_on_a_cluster_mode_store(
    store_nodes: tuple[list[str], dict[str, str]],
    private_redis: redis.Redis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> None:
    """Every path a job takes, with the store spread over 16 parts of a cluster."""
    nodes, cluster_env = store_nodes
    for node in nodes:
        redis.Redis.from_url(node).flushall()  # what earlier tests left
    before = _cross_slot_refusals(*nodes)
    env = {
        "GUARDFLEET_BROKER_URL": url_of(private_redis),
        "GUARDFLEET_STORE_PARTS": str(PARTS),
        "GUARDFLEET_WEBHOOK_SECRETS": SECRET,
        "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
        **cluster_env,
    }
    seed = nodes[0]
    api = start_api(url=seed, **env)
    http = httpx.Client(base_url=api.url, timeout=60)
    start_worker("cluster-hooks@test", wait=False, url=seed, module="worker.delivery", **env)
    # A batch fanned out with no GPU worker yet, then cancelled: its queued items are cancelled
    # by the delivery worker in pipelined scripts.
    lines = "".join(json.dumps({"custom_id": f"i{n}", "prompt": "Hi"}) + "\n" for n in range(5))
    doomed = http.post("/v1/batches", content=lines).json()
    wait_for_batch(http, doomed["id"], "in_progress", 60, "the batch to be fanned out")
    assert http.post(f"/v1/batches/{doomed['id']}/cancel").status_code == 200
    wait_until(
        lambda: http.get(f"/v1/batches/{doomed['id']}").json()["request_counts"]["cancelled"] == 5,
        60,
        "the batch's queued items to be cancelled",
    )
    worker = start_worker("cluster@test", url=seed, **env)
    try:
        with webhook_receiver(200) as (hook, received):
            ids = [
                http.post("/v1/jobs", json={"prompt": f"Tea {n}?", "callback_url": hook}).json()[
                    "id"
                ]
                for n in range(6)
            ]
            for job_id in ids:
                done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                assert done["status"] == "succeeded", done
            wait_until(lambda: len(received) == len(ids), 60, "every job's webhook")
        classified = http.post("/v1/classify", json={"prompt": "How do I steal a car?"})
        assert classified.status_code == 200, classified.text
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        )
        assert chat.status_code == 200 and "[DONE]" in chat.text, chat.text
        batch = http.post("/v1/batches", content=lines).json()
        wait_for_batch(http, batch["id"], "completed", 120, "the batch to complete")
        assert http.get("/v1/health/ready").status_code == 200
        # Six jobs, a sync call, a chat and five items, counted in the parts they ran in.
        assert (
            'guardfleet_jobs_finished_total{status="succeeded"} 13.0' in http.get("/metrics").text
        )
    finally:
        worker.stop()
    assert len({id_tag(job_id) for job_id in ids}) > 1, "new ids are spread over the parts"
    assert {id_tag(job_id) for job_id in ids} <= set(part_tags(PARTS))
    assert _cross_slot_refusals(*nodes) == before
    if len(nodes) > 1:
        holding = [node for node in nodes if redis.Redis.from_url(node).dbsize() > 0]
        assert len(holding) > 1, "the parts spread over the nodes"


def test_a_one_node_cluster_refuses_keys_of_two_slots(cluster_url: str) -> None:
    """The harness itself: keys in two slots are refused, one hash tag makes them one slot."""
    client = redis.Redis.from_url(cluster_url)
    before = _cross_slot_refusals(cluster_url)
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):
        client.mget("guardfleet:a", "guardfleet:b")
    assert client.mget("guardfleet:{p}:a", "guardfleet:{p}:b") == [None, None]
    assert _cross_slot_refusals(cluster_url) == before + 1
