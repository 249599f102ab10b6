"""Webhook deliveries that must not be lost or doubled, with a real delivery worker: a first
attempt whose task could not be queued, copies of one delivery's task running at once, and a
batch whose completing worker died before it scheduled the batch webhook."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from guardfleet import batches, webhooks
from guardfleet.keys import QUEUE_WEBHOOKS, TASK_DELIVER, batch_key, batch_state_key, webhooks_due
from guardfleet.queueing import make_celery, publish_jobs, queue_for
from guardfleet.schemas import Batch, ClassifyRequest, Job, JobStatus, RequestCounts, utcnow
from guardfleet.settings import Settings
from guardfleet.store import JobStore
from tests.conftest import RedisServer, StartWorker, db_url, wait_until

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
WEBHOOKS_DUE = webhooks_due("00")

DB = 25
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ENV = {
    "GUARDFLEET_WEBHOOK_SECRETS": SECRET,
    "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "0,30",
    "GUARDFLEET_WEBHOOK_TIMEOUT_S": "5",
    "GUARDFLEET_WEBHOOK_LEASE_S": "2",
}


@dataclass
class SlowFailingReceiver:
    """Answers every POST with 500 after a second, so overlapping attempts would show."""

    server: ThreadingHTTPServer
    hits: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"


@pytest.fixture
def receiver() -> Iterator[SlowFailingReceiver]:
    holder: dict[str, SlowFailingReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            holder["r"].hits.append(self.path)
            status = 200 if self.path.startswith("/ok") else 500
            if status == 500:
                time.sleep(1)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = SlowFailingReceiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield holder["r"]
    server.shutdown()


@pytest.fixture
def settings(redis_server: RedisServer, start_worker: StartWorker) -> Settings:
    url = db_url(redis_server, DB)
    redis.Redis.from_url(url).flushdb()
    start_worker("rules-hooks@test", wait=False, url=url, module="worker.delivery", **ENV)
    return Settings(
        redis_url=url,
        webhook_secrets=[SECRET],
        webhook_allow=["127.0.0.1"],
        webhook_retry_schedule_s=[0, 30],
        webhook_lease_s=2,
    )


def _store(settings: Settings) -> webhooks.DeliveryStore:
    return webhooks.DeliveryStore(redis.Redis.from_url(settings.redis_url), 600)


def _schedule(settings: Settings, url: str, send_task: webhooks.SendTask) -> str:
    job = Job(request=ClassifyRequest(prompt="hi"), status=JobStatus.SUCCEEDED)
    webhooks.schedule(
        _store(settings),
        send_task,
        settings,
        resource_id=job.id,
        url=url,
        event=webhooks.JOB_COMPLETED,
        data=job,
    )
    return job.id


def test_a_first_attempt_that_could_not_be_queued_is_sent_by_the_sweeper(
    settings: Settings, receiver: SlowFailingReceiver
) -> None:
    def broker_down(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker unreachable")

    job_id = _schedule(settings, receiver.url("/ok/swept"), broker_down)
    wait_until(
        lambda: (d := _store(settings).get(job_id)) is not None and d.status == "delivered",
        30,
        "the outbox to deliver the webhook",
    )
    assert receiver.hits.count("/ok/swept") == 1
    assert redis.Redis.from_url(settings.redis_url).zscore(WEBHOOKS_DUE, job_id) is None


def test_copies_of_one_delivery_attempt_once_and_keep_the_schedule(
    settings: Settings, receiver: SlowFailingReceiver
) -> None:
    celery = make_celery(settings)
    job_id = _schedule(settings, receiver.url("/fail/copies"), celery.send_task)
    for _ in range(4):  # a backlog outlived the lease, and a message was redelivered
        celery.send_task(TASK_DELIVER, args=[job_id], queue=QUEUE_WEBHOOKS)
    wait_until(
        lambda: (d := _store(settings).get(job_id)) is not None and len(d.attempts) >= 1,
        30,
        "a first attempt",
    )
    time.sleep(4)  # let every copy run: none may attempt again before the retry is due
    delivery = _store(settings).get(job_id)
    assert delivery is not None
    assert receiver.hits.count("/fail/copies") == 1
    assert len(delivery.attempts) == 1
    assert delivery.next_attempt_at is not None
    assert (delivery.next_attempt_at - utcnow()).total_seconds() > 15


def test_a_batch_webhook_lost_by_a_dying_worker_is_sent_on_redelivery(
    settings: Settings, receiver: SlowFailingReceiver, start_worker: StartWorker
) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    store = JobStore(client, 600)
    batch = Batch(callback_url=receiver.url("/ok/batch"), request_counts=RequestCounts(total=2))
    jobs = [Job(request=ClassifyRequest(prompt=f"hi {i}"), batch_id=batch.id) for i in range(2)]
    client.set(batch_key(batch.id), batch.model_dump_json(), ex=600)
    client.hset(
        batch_state_key(batch.id),
        mapping={"total": 2, "completed": 0, "failed": 0, "cancelled": 0, "status": "in_progress"},
    )
    # A worker finished both jobs and counted them, completing the batch, then died before it
    # scheduled the batch webhook: its last message was never acknowledged.
    for job in jobs:
        store.create(job.model_copy(update={"status": JobStatus.SUCCEEDED}), "bulk")
        batches.record_progress(client, job.model_copy(update={"status": JobStatus.SUCCEEDED}), 600)
    assert batches.get_batch(client, batch.id).status == "completed"  # type: ignore[union-attr]
    publish_jobs(make_celery(settings), [jobs[1].id], queue_for(False))  # the redelivery

    start_worker("batch-redelivery@test", url=settings.redis_url, **ENV)
    wait_until(lambda: "/ok/batch" in receiver.hits, 60, "the batch webhook")
    assert receiver.hits.count("/ok/batch") == 1
