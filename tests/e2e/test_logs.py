"""JSON logs (GUARDFLEET_LOG_FORMAT=json) and X-Request-ID, from a real API and a real worker."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ApiServer, StartWorker, wait_until

pytestmark = pytest.mark.e2e
DB = 37


def records(log: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be one JSON object."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in parsed)
    return parsed


@pytest.mark.timeout(180)
def test_json_logs_carry_request_job_and_worker_ids(
    start_api: Callable[..., ApiServer], start_worker: StartWorker
) -> None:
    api = start_api(db=DB, GUARDFLEET_LOG_FORMAT="json")
    worker = start_worker("json-logs@test", db=DB, GUARDFLEET_LOG_FORMAT="json")
    sent = "checkout-7f3a9c1e-0042"
    with httpx.Client(base_url=api.url, timeout=60) as http:
        classified = http.post(
            "/v1/classify",
            json={"prompt": "How do I fix a flat tire?"},
            headers={"X-Request-ID": sent},
        )
        assert classified.status_code == 200
        assert classified.headers["X-Request-ID"] == sent
        job_id = classified.json()["id"]

        made = http.post("/v1/jobs", json={"prompt": "Where can I buy seeds?"})
        assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
        # Not an id (too short, or text meant for the log): replaced, never echoed or refused.
        for hostile in ("abc", 'x", "level": "CRITICAL", "pad": "' + "y" * 20):
            answer = http.post("/v1/jobs", json={"prompt": "hi"}, headers={"X-Request-ID": hostile})
            assert answer.status_code == 202
            assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-ID"])
        # Errors carry it too, as the envelope's 4xx answers do.
        refused = http.post("/v1/jobs", json={}, headers={"X-Request-ID": sent + "-2"})
        assert refused.status_code == 422
        assert refused.headers["X-Request-ID"] == sent + "-2"

    api_lines = records(api.log)
    assert {
        "logger": "api.access",
        "request_id": sent,
        "method": "POST",
        "path": "/v1/classify",
        "status": 200,
    }.items() <= next(r for r in api_lines if r.get("request_id") == sent and "status" in r).items()
    [queued] = [r for r in api_lines if r.get("job_id") == job_id]
    assert queued["request_id"] == sent
    assert queued["message"] == f"job {job_id} queued on interactive"

    def finished() -> dict[str, Any] | None:
        done = [r for r in records(worker.log) if r.get("job_id") == job_id]
        return next((r for r in done if "succeeded" in r["message"]), None)

    wait_until(finished, 10, "the worker to log the job's end")
    assert {
        "level": "INFO",
        "logger": "worker.service",
        "worker": "json-logs@test",
        "message": f"job {job_id} succeeded (attempt 1)",
    }.items() <= (finished() or {}).items()
