"""Back-pressure: over a lane's limit new work is refused with a clear answer and Retry-After,
and everything accepted still finishes. Real API, Redis and workers; small limits."""

from __future__ import annotations

import signal
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import ApiServer, StartWorker

pytestmark = pytest.mark.e2e
StartApi = Callable[..., ApiServer]


@pytest.mark.timeout(180)
def test_a_bulk_flood_gets_429s_and_every_accepted_job_finishes(
    start_api: StartApi, start_worker: StartWorker
) -> None:
    db = 34
    api = start_api(db=db, GUARDFLEET_MAX_QUEUED_BULK="5", GUARDFLEET_MAX_BATCH_ITEMS="5")
    with httpx.Client(base_url=api.url, timeout=30) as http:
        # No worker yet: everything accepted waits in the bulk list.
        answers = [
            http.post("/v1/jobs", json={"prompt": f"How do I fold a shirt? {i}"}) for i in range(12)
        ]
        assert http.get("/v1/health/live").status_code == 200  # still responsive
        accepted = [r.json()["id"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code != 202]
        assert len(accepted) == 5
        assert all(r.status_code == 429 for r in refused)
        assert all(r.headers["retry-after"] == "5" for r in refused)
        assert {r.json()["error"]["code"] for r in refused} == {"queue_full"}
        assert "holds 5 jobs waiting" in refused[0].json()["error"]["message"]

        lines = [{"custom_id": f"b{i}", "prompt": "How do I fold a shirt?"} for i in range(3)]
        full = http.post("/v1/batches", json=lines)
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
        too_big = http.post("/v1/batches", json=lines * 2)  # 6 items can never fit under 5
        assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "batch_too_large"

        start_worker("drainer@test", db=db)
        for job_id in accepted:
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
        # Drained: the lane takes work again.
        assert http.post("/v1/batches", json=lines).status_code == 202


@pytest.mark.timeout(180)
def test_sync_calls_get_503_when_too_many_wait_for_the_ready_workers(
    start_api: StartApi, start_worker: StartWorker
) -> None:
    db = 35
    worker = start_worker("stuck@test", db=db, GUARDFLEET_HEARTBEAT_TTL_S="60")
    api = start_api(
        db=db, GUARDFLEET_MAX_QUEUED_INTERACTIVE_PER_WORKER="2", GUARDFLEET_SYNC_TIMEOUT_S="1"
    )
    worker.process.send_signal(signal.SIGSTOP)  # ready by its heartbeat, taking nothing
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            # A message may already sit in the frozen worker's pending BRPOP: it counts as
            # taken, not waiting, so the third call may still be queued.
            waited: list[httpx.Response] = []
            while len(waited) < 4:
                answer = http.post("/v1/classify", json={"prompt": f"Hello {len(waited)}"})
                if answer.status_code == 503:
                    break
                waited.append(answer)
            over = answer
            assert len(waited) in (2, 3) and {r.status_code for r in waited} == {504}
            chat = http.post(
                "/v1/chat/completions",
                json={
                    "model": "nvidia/nemotron-content-safety-reasoning-4b",
                    "messages": [{"role": "user", "content": "Hello"}],
                },
            )
    finally:
        worker.process.send_signal(signal.SIGCONT)
    for refused in (over, chat):
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert (
            error["code"] == "overloaded" and "2 sync calls are already waiting" in error["message"]
        )
    with httpx.Client(base_url=api.url, timeout=70) as http:
        for response in waited:
            job_id = response.json()["job"]["id"]
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["status"] == "succeeded", done
