"""What the fault suite needs beyond the shared fixtures: a Redis of its own that a test may
pause, kill and restart (with an fsync-always append-only file, as production should run it), and
a webhook receiver that counts what arrives."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import Worker, free_port, wait_until

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEBHOOK_ENV = {
    "GUARDFLEET_WEBHOOK_SECRETS": WEBHOOK_SECRET,
    "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "0,0.5,1,1,2,2,5,5,5,5",
    "GUARDFLEET_WEBHOOK_TIMEOUT_S": "2",
}


@dataclass
class KillableRedis:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on PATH"
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = self.client()

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 20, "redis-server to answer")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def killable_redis(tmp_path: Path) -> Iterator[KillableRedis]:
    server = KillableRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@dataclass
class CountingReceiver:
    """A webhook endpoint that answers 200 and counts deliveries by `webhook-id`."""

    server: ThreadingHTTPServer
    ids: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"


@pytest.fixture
def counting_receiver() -> Iterator[CountingReceiver]:
    holder: dict[str, CountingReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            recv = holder["r"]
            with recv.lock:
                recv.ids[self.headers["webhook-id"]] += 1
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = CountingReceiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield holder["r"]
    server.shutdown()


class Supervisor:
    """Restarts a worker whenever it exits, as compose's `restart: unless-stopped` or systemd
    would: a worker that meets an unrecoverable broker error exits non-zero and relies on it."""

    def __init__(self, start: Callable[[], Worker]) -> None:
        self.start = start
        self.current = start()
        self.restarts: list[int | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            code = self.current.process.poll()
            if code is not None:
                self.restarts.append(code)
                self.current = self.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
