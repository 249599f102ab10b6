"""Fixtures that start real services: redis-server, Celery workers and the API, as processes.

Each tier is marked by folder (unit / integration / e2e). Nothing here mocks Redis, Celery or
the model: workers load the bundled demo model through the production code path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.cluster
from fastapi.testclient import TestClient

from guardfleet.keys import worker_key
from guardfleet.queueing import make_celery, publish_jobs, queue_for
from guardfleet.schemas import ClassifyRequest, Job
from guardfleet.settings import Settings
from guardfleet.store import STALE_S, JobStore

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in ("unit", "integration", "e2e", "faults", "compose"):
            item.add_marker(getattr(pytest.mark, tier))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_batch(
    http: httpx.Client | TestClient, batch_id: str, status: str, timeout: float, what: str = ""
) -> None:
    """Wait until the API (a live one or a `TestClient`) reports the batch in `status`."""

    def reached() -> bool:
        found: str = http.get(f"/v1/batches/{batch_id}").json()["status"]
        return found == status

    wait_until(reached, timeout, what or f"batch {batch_id} to be {status}")


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def answers(client: redis.Redis) -> bool:
    """Whether a Redis that is starting accepts connections yet."""
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: `apt-get install -y redis-server`")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "64",  # one per test module that needs its own queues
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, proc)
    client = server.client()
    wait_until(lambda: answers(client), 10, "redis-server to answer")
    yield server
    proc.terminate()
    proc.wait(timeout=10)


def service_env(redis_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDFLEET_")}
    env.update(
        GUARDFLEET_REDIS_URL=redis_url,
        GUARDFLEET_DEVICE="cpu",
        GUARDFLEET_HEARTBEAT_TTL_S="4",
        GUARDFLEET_HEARTBEAT_INTERVAL_S="1",
        GUARDFLEET_MAX_BATCH_SIZE="8",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    redis_url: str
    extra: dict[str, str] = field(default_factory=dict)

    def heartbeat(self) -> dict[str, object] | None:
        plain = self.extra.get("GUARDFLEET_REDIS_CLUSTER") != "true"
        client = redis.Redis if plain else redis.cluster.RedisCluster
        raw = client.from_url(self.redis_url).get(worker_key(self.name))
        return None if raw is None else dict(json.loads(raw))

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            return self.heartbeat() is not None

        wait_until(ready, timeout, f"worker {self.name} heartbeat", every=0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


StartWorker = Callable[..., Worker]


@pytest.fixture(scope="session")
def start_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartWorker]:
    """Start `python -m worker` processes; all are stopped at the end of the session."""
    started: list[Worker] = []
    logs = tmp_path_factory.mktemp("workers")

    def start(
        name: str | None = None,
        wait: bool = True,
        db: int = 0,
        url: str | None = None,
        module: str = "worker",
        **env: str,
    ) -> Worker:
        """A worker on Redis database `db` (or at `url`): its own queues, isolated from other
        databases. `module="worker.delivery"` starts a webhook delivery worker instead."""
        name = name or f"worker-{len(started)}@test"
        url = url or db_url(redis_server, db)
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--name", name, "--loglevel", "INFO"],
            cwd=ROOT,
            env=service_env(url, **env),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        worker = Worker(name, proc, log, url, env)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def shared_worker(start_worker: StartWorker) -> Worker:
    """One long-lived worker for the tests that only need *a* worker."""
    return start_worker("shared@test")


@pytest.fixture(scope="session")
def shared_delivery(start_worker: StartWorker) -> Worker:
    """A delivery worker on database 0, beside the shared worker: it fans batches out."""
    return start_worker("delivery@test", wait=False, module="worker.delivery")


@pytest.fixture
def live_worker(shared_worker: Worker, redis_server: RedisServer) -> Worker:
    """The shared worker, with its heartbeat restored if a test flushed Redis."""
    wait_until(lambda: shared_worker.heartbeat() is not None, 10, "shared worker heartbeat")
    return shared_worker


def queue_backlog(
    redis_url: str, prompts: list[str], stale_s: float = STALE_S
) -> tuple[JobStore, list[str]]:
    """Create jobs and put them on the bulk lane directly (no API): a backlog for a worker.
    Each is published again if not finished `stale_s` after it was queued."""
    settings = Settings(redis_url=redis_url)
    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=3600, stale_s=stale_s)
    jobs = [Job(request=ClassifyRequest(prompt=prompt)) for prompt in prompts]
    for job in jobs:
        store.create(job, queue_for(False))
    publish_jobs(make_celery(settings), [job.id for job in jobs], queue_for(False))
    return store, [job.id for job in jobs]


@dataclass
class ApiServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def db_url(server: RedisServer, db: int) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="session")
def start_api(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ApiServer]]:
    servers: list[ApiServer] = []
    logs = tmp_path_factory.mktemp("api")

    def start(db: int = 0, url: str | None = None, processes: int = 0, **env: str) -> ApiServer:
        """An API on `db`; with `processes`, that many behind one port as production runs
        them (`python -m api --workers N`), else one plain `uvicorn api.main:app`."""
        port = free_port()
        url = url or db_url(redis_server, db)
        log = logs / f"api-{port}.log"
        launcher = (
            ["api", "--workers", str(processes)] if processes else ["uvicorn", "api.main:app"]
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *launcher,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=service_env(url, **env),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        server = ApiServer(f"http://127.0.0.1:{port}", proc, log)
        servers.append(server)
        import httpx

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"api exited early:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(server.url + "/v1/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "the API to listen")
        return server

    yield start
    for server in servers:
        server.process.terminate()
        server.process.wait(timeout=10)


def url_of(client: redis.Redis) -> str:
    """The URL of database 0 on a client's server (`private_redis`'s, say), for the services."""
    where = client.connection_pool.connection_kwargs
    return f"redis://{where['host']}:{where['port']}/0"


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A Redis of this test's own: for a test that breaks it, or counts every command it runs."""
    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    workdir = str(tmp_path_factory.mktemp("oom"))
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    wait_until(lambda: answers(client), 10, "the private redis-server")
    yield client
    proc.terminate()
    proc.wait(timeout=10)


@contextmanager
def webhook_receiver(status: int = 204) -> Iterator[tuple[str, list[bytes]]]:
    """A local webhook endpoint answering `status` to every POST: its URL, and the bodies it
    received so far."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
