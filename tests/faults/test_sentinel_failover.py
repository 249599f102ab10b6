"""Redis behind Sentinel: the master dies, a sentinel promotes its replica, and the API, a worker
and Celery's broker all follow it to the new master without being restarted."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import ApiServer, StartWorker, free_port, wait_until

MASTER_NAME = "guardfleet-test"


class Servers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.master, self.replica, self.sentinel = free_port(), free_port(), free_port()

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        assert binary is not None
        workdir = self.root / name
        workdir.mkdir()
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen([binary, *args, "--dir", str(workdir)], stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def master_port(self) -> int:
        found: Any = self.client(self.sentinel).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(found[1])


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    s.spawn("master", "--port", str(s.master), *common)
    s.spawn("replica", "--port", str(s.replica), *common, "--replicaof", "127.0.0.1", str(s.master))
    conf = tmp_path / "sentinel.conf"  # a sentinel rewrites its file: one of its own
    conf.write_text(
        f"port {s.sentinel}\nbind 127.0.0.1\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {s.master} 1\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        f"sentinel failover-timeout {MASTER_NAME} 5000\n"
    )
    s.spawn("sentinel", str(conf), "--sentinel")

    def replicating() -> bool:
        try:
            info = s.client(s.replica).info("replication")
            known = s.client(s.sentinel).sentinel_slaves(MASTER_NAME)
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up" and len(known) == 1

    # A sentinel learns of replicas from the master's INFO, every 10 s.
    wait_until(replicating, 30, "the replica to sync and the sentinel to see it", every=0.2)
    yield s
    for proc in reversed(s.procs):
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(240)
def test_the_fleet_follows_a_sentinel_failover(
    servers: Servers, start_api: Callable[..., ApiServer], start_worker: StartWorker
) -> None:
    url = f"sentinel://127.0.0.1:{servers.sentinel}/0"
    env = {"GUARDFLEET_REDIS_SENTINEL_MASTER": MASTER_NAME}
    api = start_api(url=url, **env)
    worker = start_worker("sentinel@test", wait=False, url=url, **env)
    try:
        _follow_the_failover(servers, api)
    finally:  # both would otherwise retry a dead sentinel until the session ends
        worker.stop()
        api.process.terminate()
        api.process.wait(timeout=30)


def _follow_the_failover(servers: Servers, api: ApiServer) -> None:
    http = httpx.Client(base_url=api.url, timeout=30)
    wait_until(
        lambda: http.get("/v1/health/ready").status_code == 200, 120, "the worker, via sentinel"
    )
    before = http.post("/v1/jobs", json={"prompt": "How do I descale a kettle?"}).json()
    assert http.get(f"/v1/jobs/{before['id']}", params={"wait": 60}).json()["status"] == "succeeded"
    # The test is about following the master, not about replication lag: let it catch up.
    assert servers.client(servers.master).wait(1, 5000) == 1

    servers.procs[0].send_signal(signal.SIGKILL)
    wait_until(
        lambda: servers.master_port() == servers.replica, 60, "the sentinel to promote the replica"
    )

    answers: list[httpx.Response] = []

    def classify() -> bool:
        answers.append(http.post("/v1/classify", json={"prompt": "How do I steal a car?"}))
        ok = answers[-1].status_code == 200
        return ok and answers[-1].json()["result"]["prompt_harm"] == "harmful"

    started = time.monotonic()
    wait_until(classify, 90, "a sync call served after the failover", every=1)
    followed_s = time.monotonic() - started
    after = http.post("/v1/jobs", json={"prompt": "How do I fold a fitted sheet?"})
    assert after.status_code == 202, after.text
    done = http.get(f"/v1/jobs/{after.json()['id']}", params={"wait": 60}).json()
    assert done["status"] == "succeeded"
    # What was written before the failover is on the new master.
    assert http.get(f"/v1/jobs/{before['id']}").json()["status"] == "succeeded"
    assert followed_s < 60
    # Meanwhile: clear refusals to retry, never a 500 or a hang.
    refused = [a for a in answers if a.status_code != 200]
    assert all(a.status_code == 503 and "retry-after" in a.headers for a in refused), [
        (a.status_code, a.text[:200]) for a in refused
    ]
    print(f"followed in {followed_s:.1f}s; {len(refused)} refusal(s) meanwhile")
