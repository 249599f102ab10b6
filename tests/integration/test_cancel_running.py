"""Cancelling a running job stops its generation at the next decode step and frees its row.

A real worker runs a small random Gemma 3: random weights almost never pick a stop token, so a
generation runs its whole budget (here 4,000 tokens) unless something stops it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ApiServer, StartWorker, wait_until
from tests.synthetic import random_gemma3

pytestmark = pytest.mark.integration
BUDGET = 4000


@pytest.mark.timeout(300)
def test_cancelling_a_running_job_stops_its_generation(
    start_worker: StartWorker, start_api: Callable[..., ApiServer], tmp_path: Path
) -> None:
    model = random_gemma3(tmp_path / "model")
    worker = start_worker(
        "cancel@test",
        db=27,
        GUARDFLEET_MODEL=str(model),
        GUARDFLEET_MAX_NEW_TOKENS_NO_THINK=str(BUDGET),
        GUARDFLEET_MAX_BATCH_SIZE="1",  # the next job can only start once the row has left
    )
    api = start_api(db=27)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        job = client.post("/v1/jobs", json={"prompt": "How do I bake bread?"}).json()

        def status(job_id: str) -> str:
            return str(client.get(f"/v1/jobs/{job_id}").json()["status"])

        wait_until(lambda: status(job["id"]) == "running", 60, "the job to start")
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        follow = client.post("/v1/jobs", json={"prompt": "How do I plant tomatoes?"}).json()

        wait_until(
            lambda: "cancelled while running" in worker.log.read_text(), 60, "the row to stop"
        )
        found = re.search(r"stopped after (\d+) tokens", worker.log.read_text())
        assert found is not None and int(found.group(1)) < BUDGET
        # The follow-up got the freed row (a random model's verdict is unparseable: failed).
        ended = client.get(f"/v1/jobs/{follow['id']}?wait=60").json()
        assert ended["status"] in ("succeeded", "failed"), ended
        assert status(job["id"]) == "cancelled"
        assert client.get(f"/v1/jobs/{job['id']}").json()["result"] is None
