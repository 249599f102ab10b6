"""Hostile webhook receivers cannot hold the delivery worker: an endless body, a slow drip of
headers, a redirect to a loopback service and one byte every ten seconds each cost one bounded
attempt, while well-behaved receivers interleaved with them get their webhook on the first try."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from guardfleet import webhooks
from guardfleet.queueing import make_celery
from guardfleet.schemas import ClassifyRequest, Job, JobStatus
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, db_url, wait_until
from tests.faults.conftest import WEBHOOK_SECRET

DB = 23
TIMEOUT_S = 2.0
ENV = {
    "GUARDFLEET_WEBHOOK_SECRETS": WEBHOOK_SECRET,
    "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "0,600",  # one attempt each within the test
    "GUARDFLEET_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
}
HOSTILE = ("endless", "drip", "redirect", "per-byte")


def _serve(conn: socket.socket, stop: threading.Event) -> None:
    """Answer one request according to its path, as a hostile (or a good) receiver would."""
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(65536)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1].decode()
        try:
            if path.startswith("/ok"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            elif path.startswith("/endless"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"x" * 65536)
            elif path.startswith("/drip"):
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                    if stop.wait(0.5):
                        return
                    conn.sendall(bytes([byte]))
            elif path.startswith("/redirect"):
                conn.sendall(
                    b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:6379/\r\n"
                    b"content-length: 0\r\n\r\n"
                )
            elif path.startswith("/per-byte"):
                for byte in b"HTTP/1.1 200 OK\r\n":
                    conn.sendall(bytes([byte]))
                    if stop.wait(10):
                        return
        except OSError:  # the delivery worker gave up on us, as it should
            return


@pytest.fixture
def receiver() -> Iterator[str]:
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed at teardown
                return
            threading.Thread(target=_serve, args=(conn, stop), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_hostile_receivers_cost_one_bounded_attempt_each(
    redis_server: RedisServer, start_worker: StartWorker, receiver: str
) -> None:
    url = db_url(redis_server, DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    hooks = start_worker("hostile-hooks@test", wait=False, url=url, module="worker.delivery", **ENV)
    settings = Settings(
        redis_url=url,
        webhook_secrets=[WEBHOOK_SECRET],
        webhook_allow=["127.0.0.1"],
        webhook_retry_schedule_s=[0, 600],
    )
    store = webhooks.DeliveryStore(client, 600)
    celery = make_celery(settings)
    good: list[str] = []
    hostile: list[str] = []
    started = time.monotonic()
    for i in range(16):  # 32 hostile and 16 good deliveries, interleaved
        for path in (HOSTILE[i % 4], "ok", HOSTILE[(i + 2) % 4]):
            job = Job(request=ClassifyRequest(prompt="hi"), status=JobStatus.SUCCEEDED)
            webhooks.schedule(
                store,
                celery.send_task,
                settings,
                resource_id=job.id,
                url=f"{receiver}/{path}/{i}",
                event=webhooks.JOB_COMPLETED,
                data=job,
            )
            (good if path == "ok" else hostile).append(job.id)

    def settled(ids: list[str]) -> bool:
        return all((d := store.get(i)) is not None and d.attempts for i in ids)

    peak = 0.0

    def all_settled() -> bool:
        nonlocal peak
        peak = max(peak, _rss_mb(hooks.process.pid))
        return settled(good) and settled(hostile)

    # 16 delivery threads, 32 attempts of at most TIMEOUT_S each ahead of or beside the good
    # ones: a few rounds. Without bounds, the endless and one-byte receivers never let go.
    wait_until(all_settled, 60, "every delivery's first attempt", every=0.2)
    elapsed = time.monotonic() - started
    for job_id in good:
        delivery = store.get(job_id)
        assert delivery is not None
        assert (delivery.status, len(delivery.attempts)) == ("delivered", 1)
    for job_id in hostile:
        delivery = store.get(job_id)
        assert delivery is not None
        [first] = delivery.attempts  # the endless body's 200 counts: its headers said so
        assert first.duration_ms is not None and first.duration_ms < (TIMEOUT_S + 1) * 1000
    assert peak < 400, f"the delivery worker grew to {peak:.0f} MB"
    print(f"48 deliveries (32 hostile) settled in {elapsed:.1f}s; peak RSS {peak:.0f} MB")
