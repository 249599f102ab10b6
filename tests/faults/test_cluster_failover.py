"""The job store on a Redis Cluster loses a master: its replica is promoted, and the API, a GPU
worker and a delivery worker follow it without being restarted, answering clear 503s meanwhile.
What was written (and replicated) before is still there, and jobs of every part run after."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from api.waiters import _ANCHOR
from guardfleet.keys import JOB_NOTICES, id_tag, part_tags
from tests.cluster import Cluster, master_of
from tests.conftest import ApiServer, StartWorker, url_of, wait_until

PARTS = 16


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    found = Cluster(tmp_path, masters=3, replicas=True)
    try:
        found.start()
        yield found
    finally:
        found.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "victim",
    [
        pytest.param(master_of(_ANCHOR, 3), id="the master the API subscribes on"),
        pytest.param(master_of(JOB_NOTICES, 3), id="the master the workers hear notices on"),
    ],
)
def test_the_fleet_follows_a_cluster_failover(
    victim: int,
    cluster: Cluster,
    private_redis: redis.Redis,
    start_api: Callable[..., ApiServer],
    start_worker: StartWorker,
) -> None:
    survivor = next(i for i in range(3) if i != victim)
    seed = f"redis://127.0.0.1:{cluster.ports[survivor]}/0"
    env = {
        "GUARDFLEET_REDIS_CLUSTER": "true",
        "GUARDFLEET_BROKER_URL": url_of(private_redis),
        "GUARDFLEET_STORE_PARTS": str(PARTS),
    }
    api = start_api(url=seed, **env)
    worker = start_worker("cluster-failover@test", url=seed, **env)
    http = httpx.Client(base_url=api.url, timeout=30)
    try:
        before = [http.post("/v1/jobs", json={"prompt": f"Tea {n}?"}).json() for n in range(8)]
        for job in before:
            done = http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
        # The test is about following the promotion, not about replication lag.
        for port in cluster.ports[:3]:
            assert cluster.client(port).wait(1, 5000) == 1

        dead = cluster.ports[victim]
        cluster.procs[victim].send_signal(signal.SIGKILL)
        wait_until(lambda: cluster.promoted(dead), 60, "a replica to be promoted")

        answers: list[httpx.Response] = []

        def classify() -> bool:
            answers.append(http.post("/v1/classify", json={"prompt": "How do I steal a car?"}))
            return answers[-1].status_code == 200

        started = time.monotonic()
        wait_until(classify, 90, "a sync call served after the failover", every=1)
        followed_s = time.monotonic() - started
        # Jobs of every part are accepted and run, those on the promoted replica's slots too.
        after: list[str] = []

        def submit() -> bool:
            answers.append(http.post("/v1/jobs", json={"prompt": "How do I fold a sheet?"}))
            if answers[-1].status_code == 202:
                after.append(answers[-1].json()["id"])
            return {id_tag(i) for i in after} == set(part_tags(PARTS))

        started = time.monotonic()
        wait_until(submit, 60, "a job accepted in every part", every=0.1)
        every_part_s = time.monotonic() - started
        for job_id in after:
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
        # What was written before the failover is still there.
        for job in before:
            assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        assert http.get("/v1/health/ready").status_code == 200
        # Meanwhile: clear refusals to retry, never a 500 or a hang.
        refused = [a for a in answers if a.status_code not in (200, 202)]
        assert all(a.status_code == 503 and "retry-after" in a.headers for a in refused), [
            (a.status_code, a.text[:200]) for a in refused
        ]
        print(
            f"a sync call served {followed_s:.1f} s after the promotion, a job accepted in every "
            f"part {every_part_s:.1f} s after that; {len(refused)} refusal(s) meanwhile"
        )
    finally:
        worker.stop()
        api.process.terminate()
        api.process.wait(timeout=30)
