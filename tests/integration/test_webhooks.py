"""Webhook delivery end to end: a GPU worker finishes a job, the delivery worker POSTs it to a
real local HTTP receiver, which verifies every delivery with the standardwebhooks library."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook

from api.main import create_app
from guardfleet.settings import Settings
from guardfleet.webhooks import StoredDelivery
from tests.conftest import ROOT, RedisServer, StartWorker, db_url, service_env, wait_until
from worker.webhook_transport import WebhookSender, attempt

SECRETS = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_dGhlIG5ldyBzZWNyZXQgYWZ0ZXIgcm90"]
DB = 10
WEBHOOK_ENV = {
    "GUARDFLEET_WEBHOOK_SECRETS": ",".join(SECRETS),
    "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "0,0.3,0.3,0.3",
    "GUARDFLEET_WEBHOOK_TIMEOUT_S": "2",
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local webhook endpoint answering with a scripted sequence of statuses (then 200)."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def for_path(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            recv = state["r"]
            headers = {name.lower(): value for name, value in self.headers.items()}
            recv.received.append(Received(self.path, headers, self.rfile.read(length)))
            status, headers = recv.script.pop(0) if recv.script else (200, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state["r"]
    server.shutdown()


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer,
    start_worker: StartWorker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Settings]:
    """A GPU worker and a delivery worker on their own database."""
    start_worker("hooks-gpu@test", db=DB, **WEBHOOK_ENV)
    log = (tmp_path_factory.mktemp("delivery") / "delivery.log").open("wb")
    delivery = subprocess.Popen(
        [sys.executable, "-m", "worker.delivery", "--name", "hooks@test"],
        cwd=ROOT,
        env=service_env(db_url(redis_server, DB), **WEBHOOK_ENV),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield Settings(
        redis_url=db_url(redis_server, DB), webhook_secrets=SECRETS, webhook_allow=["127.0.0.1"]
    )
    delivery.terminate()
    delivery.wait(timeout=30)
    log.close()


@pytest.fixture
def api(fleet: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(fleet)) as client:
        yield client


def verified(received: Received) -> dict[str, Any]:
    """Every configured secret must verify the exact bytes received."""
    payloads = [Webhook(secret).verify(received.body, received.headers) for secret in SECRETS]
    assert payloads[0] == payloads[1]
    assert len(received.headers["webhook-signature"].split(" ")) == len(SECRETS)
    payload: dict[str, Any] = payloads[0]
    return payload


def wait_webhook(api: TestClient, path: str, status: str, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def settled() -> bool:
        found.update(api.get(path).json())
        hook = found.get("webhook")
        return hook is not None and hook["status"] == status

    wait_until(settled, timeout, f"webhook of {path} to be {status}")
    return found


def test_a_finished_job_is_delivered_signed(api: TestClient, receiver: Receiver) -> None:
    body = {"prompt": "How do I poison my neighbor?", "callback_url": receiver.url + "/ok"}
    job = api.post("/v1/jobs", json=body).json()
    done = wait_webhook(api, f"/v1/jobs/{job['id']}", "delivered")
    [delivery] = receiver.for_path("/ok")
    payload = verified(delivery)
    assert payload["type"] == "moderation.job.completed"
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["result"]["prompt_harm"] == "harmful"
    assert delivery.headers["webhook-id"] == f"msg_{job['id']}"
    assert done["webhook"]["attempts"][0]["status_code"] == 200
    assert "payload" not in done["webhook"]


def test_a_failing_receiver_gets_three_attempts_with_one_id(
    api: TestClient, receiver: Receiver
) -> None:
    receiver.script[:] = [(500, {}), (503, {"Retry-After": "0"})]
    body = {"prompt": "How do I learn to swim?", "callback_url": receiver.url + "/flaky"}
    job = api.post("/v1/jobs", json=body).json()
    done = wait_webhook(api, f"/v1/jobs/{job['id']}", "delivered")
    deliveries = receiver.for_path("/flaky")
    assert len(deliveries) == 3
    assert {d.headers["webhook-id"] for d in deliveries} == {f"msg_{job['id']}"}
    assert len({d.body for d in deliveries}) == 1, "every attempt sends the same bytes"
    for delivery in deliveries:
        verified(delivery)
    assert [a["status_code"] for a in done["webhook"]["attempts"]] == [500, 503, 200]


def test_gone_stops_and_redirects_are_not_followed(api: TestClient, receiver: Receiver) -> None:
    receiver.script[:] = [(410, {})]
    gone = api.post("/v1/jobs", json={"prompt": "hi there", "callback_url": receiver.url + "/gone"})
    result = wait_webhook(api, f"/v1/jobs/{gone.json()['id']}", "gone")
    assert len(result["webhook"]["attempts"]) == 1
    receiver.script[:] = [(302, {"Location": receiver.url + "/elsewhere"})] * 4
    moved = api.post("/v1/jobs", json={"prompt": "hello", "callback_url": receiver.url + "/moved"})
    result = wait_webhook(api, f"/v1/jobs/{moved.json()['id']}", "failed")
    attempts = result["webhook"]["attempts"]
    assert [a["status_code"] for a in attempts] == [302, 302, 302, 302]  # the whole schedule
    assert "redirects are not followed" in attempts[0]["error"]
    assert receiver.for_path("/elsewhere") == []
    # The redirected delivery ran its whole retry schedule after the 410 was recorded: a retry
    # of the gone one would have been made by now.
    assert len(receiver.for_path("/gone")) == 1


def test_a_completed_batch_is_announced(api: TestClient, receiver: Receiver) -> None:
    lines = [
        json.dumps({"custom_id": f"c{i}", "prompt": f"How do I paint a room? {i}"})
        for i in range(5)
    ]
    batch = api.post(
        f"/v1/batches?callback_url={receiver.url}/batch",
        content="\n".join(lines),
        headers={"content-type": "application/x-ndjson"},
    )
    assert batch.status_code == 202, batch.text
    done = wait_webhook(api, f"/v1/batches/{batch.json()['id']}", "delivered")
    payload = verified(receiver.for_path("/batch")[0])
    assert payload["type"] == "moderation.batch.completed"
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["request_counts"] == {
        "total": 5,
        "completed": 5,
        "failed": 0,
        "cancelled": 0,
    }
    assert done["status"] == "completed"


def counted(api: TestClient) -> dict[str, float]:
    """The fleet's webhook counters, as the API serves them to Prometheus."""
    text = api.get("/v1/metrics").text
    return {
        f"{sample.name}:{next(iter(sample.labels.values()))}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("guardfleet_webhook_")
    }


def test_every_attempt_and_every_ended_delivery_is_counted(
    api: TestClient, receiver: Receiver
) -> None:
    before = counted(api)
    receiver.script[:] = [(500, {}), (410, {})]
    first = api.post("/v1/jobs", json={"prompt": "hello", "callback_url": receiver.url + "/count"})
    wait_webhook(api, f"/v1/jobs/{first.json()['id']}", "gone")
    second = api.post("/v1/jobs", json={"prompt": "hi", "callback_url": receiver.url + "/count"})
    wait_webhook(api, f"/v1/jobs/{second.json()['id']}", "delivered")
    after = counted(api)
    assert {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k)} == {
        "guardfleet_webhook_attempts_total:retry": 1,
        "guardfleet_webhook_attempts_total:gone": 1,
        "guardfleet_webhook_attempts_total:delivered": 1,
        "guardfleet_webhook_deliveries_total:gone": 1,
        "guardfleet_webhook_deliveries_total:delivered": 1,
    }


def test_callbacks_to_private_addresses_are_refused_at_submit(fleet: Settings) -> None:
    settings = fleet.model_copy(update={"webhook_allow": []})
    with TestClient(create_app(settings)) as client:
        for url in (
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.0.0.1/x",
            "http://169.254.169.254/latest",
            "http://[::ffff:192.168.0.1]/",
        ):
            response = client.post("/v1/jobs", json={"prompt": "x", "callback_url": url})
            assert response.status_code == 422, url
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("unsafe_callback_url", "callback_url")


def test_callbacks_need_a_signing_secret(fleet: Settings) -> None:
    settings = fleet.model_copy(update={"webhook_secrets": []})
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "callback_url": "http://8.8.8.8/"})
    assert response.status_code == 422
    assert "GUARDFLEET_WEBHOOK_SECRETS" in response.json()["error"]["message"]


def test_delivery_connects_to_the_checked_address_with_the_original_host(
    receiver: Receiver,
) -> None:
    """The name is resolved once, checked, and that address is the one connected to; the
    receiver still sees its own host name."""
    port = receiver.server.server_port
    settings = Settings(webhook_secrets=SECRETS, webhook_allow=["hooks.example"])
    stored = StoredDelivery(
        webhook_id="msg_pinned",
        url=f"http://hooks.example:{port}/pinned",
        event="moderation.job.completed",
        payload='{"ok":true}',
    )
    outcome = attempt(stored, settings, WebhookSender(), resolver=lambda host, p: ["127.0.0.1"])
    assert outcome.status == "delivered"
    [got] = receiver.for_path("/pinned")
    assert got.headers["host"] == f"hooks.example:{port}"
    assert verified(got) == {"ok": True}
