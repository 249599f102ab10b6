"""Redis paused (SIGSTOP) or killed and restarted while jobs are queued and running: the API
says 503 promptly while it is gone, everything recovers without a restart, every accepted job
finishes and every promised webhook arrives."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from guardfleet.schemas import JobStatus
from tests.conftest import ApiServer, StartWorker, wait_until
from tests.faults.conftest import WEBHOOK_ENV, CountingReceiver, KillableRedis, Supervisor

ENV = {
    **WEBHOOK_ENV,
    "GUARDFLEET_JOB_STALE_S": "20",
    "GUARDFLEET_WORKER_THREADS": "4",
    "GUARDFLEET_MAX_BATCH_SIZE": "2",
    "GUARDFLEET_REDIS_TIMEOUT_S": "1",
}
JOBS = 60


@dataclass
class Fleet:
    api: ApiServer
    supervisors: list[Supervisor]

    def restarts(self) -> list[int | None]:
        return [code for s in self.supervisors for code in s.restarts]


@pytest.fixture
def fleet(
    killable_redis: KillableRedis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> Iterator[Fleet]:
    """A GPU worker and a delivery worker, each restarted if it exits, and the API."""
    url, runs = killable_redis.url, itertools.count()
    supervisors = [
        Supervisor(lambda: start_worker(f"gpu-{next(runs)}@test", url=url, **ENV)),
        Supervisor(
            lambda: start_worker(
                f"hooks-{next(runs)}@test", wait=False, url=url, module="worker.delivery", **ENV
            )
        ),
    ]
    yield Fleet(start_api(url=url, **ENV), supervisors)
    for supervisor in supervisors:
        supervisor.stop()


def _submit(api: ApiServer, receiver: CountingReceiver) -> list[str]:
    ids = []
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for i in range(JOBS):
            body = {"prompt": f"How do I plant tomatoes? #{i}", "callback_url": receiver.url}
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    return ids


def _under_load(api: ApiServer, receiver: CountingReceiver) -> list[str]:
    """Queue the jobs and return once the first verdict is in: some done, most still to do."""
    ids = _submit(api, receiver)
    wait_until(lambda: JobStatus.SUCCEEDED in _statuses(api, ids), 60, "a first verdict")
    return ids


def _statuses(api: ApiServer, ids: list[str]) -> list[str]:
    with httpx.Client(base_url=api.url, timeout=10) as client:
        return [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]


def _outage_answer(api: ApiServer, job_id: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=30)
    return response.status_code, time.monotonic() - started


def _everything_arrives(api: ApiServer, ids: list[str], receiver: CountingReceiver) -> None:
    seen: list[str] = []

    def all_succeeded() -> bool:
        seen[:] = _statuses(api, ids)
        return seen.count(JobStatus.SUCCEEDED) == len(ids)

    try:
        wait_until(all_succeeded, 180, "every accepted job to succeed", every=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {Counter(seen)}") from None
    promised = {f"msg_{i}" for i in ids}
    wait_until(lambda: promised <= set(receiver.ids), 120, "every promised webhook", every=0.5)
    assert set(receiver.ids) == promised, "a webhook arrived that nobody promised"
    reruns = sum(
        httpx.get(f"{api.url}/v1/jobs/{i}").json()["attempts"] > 1 for i in ids
    )  # informative: at-least-once may run a job twice, it is still finished once
    duplicates = sum(count - 1 for count in receiver.ids.values())
    print(
        f"\naccepted {len(ids)}, finished {len(ids)}, lost 0, reruns {reruns}, "
        f"webhooks promised {len(promised)}, delivered {len(receiver.ids)}, "
        f"duplicate deliveries {duplicates}"
    )


@pytest.mark.timeout(600)
def test_jobs_survive_redis_frozen_for_six_seconds(
    killable_redis: KillableRedis, fleet: Fleet, counting_receiver: CountingReceiver
) -> None:
    api, ids = fleet.api, _under_load(fleet.api, counting_receiver)
    killable_redis.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        status, seconds = _outage_answer(api, ids[-1])
        assert status == 503, "the API must say Redis is unavailable, not hang or fail"
        assert seconds < 5, f"503 took {seconds:.1f}s"
        print(f"\nAPI answered 503 in {seconds:.2f}s while Redis was frozen")
        time.sleep(max(0.0, 6 - (time.monotonic() - frozen_at)))
    finally:
        killable_redis.signal(signal.SIGCONT)

    left = [s for s in _statuses(api, ids) if s != JobStatus.SUCCEEDED]
    assert left, "everything finished before the freeze ended; nothing was tested"
    _everything_arrives(api, ids, counting_receiver)
    print(f"worker exits (restarted by the supervisor): {fleet.restarts()}")
    assert httpx.get(f"{api.url}/v1/health/ready").status_code == 200


@pytest.mark.timeout(600)
def test_jobs_survive_redis_killed_and_restarted(
    killable_redis: KillableRedis, fleet: Fleet, counting_receiver: CountingReceiver
) -> None:
    api, ids = fleet.api, _under_load(fleet.api, counting_receiver)
    killable_redis.kill()
    status, seconds = _outage_answer(api, ids[-1])
    assert status == 503
    assert seconds < 5, f"503 took {seconds:.1f}s"
    time.sleep(2)
    killable_redis.start()  # same port, same append-only file

    left = [s for s in _statuses(api, ids) if s != JobStatus.SUCCEEDED]
    assert left, "everything finished before Redis was killed; nothing was tested"
    _everything_arrives(api, ids, counting_receiver)
    print(f"worker exits (restarted by the supervisor): {fleet.restarts()}")
