"""Prometheus metrics, scraped from a real API and a real worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ApiServer, StartWorker, free_port

pytestmark = pytest.mark.e2e
StartApi = Callable[..., ApiServer]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), float("nan"))


@pytest.mark.timeout(180)
def test_the_api_and_a_worker_report_what_happened(
    start_api: StartApi, start_worker: StartWorker
) -> None:
    db = 36
    api = start_api(db=db)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        waiting = http.post("/v1/jobs", json={"prompt": "How do I plant tulips?"}).json()
        time.sleep(1.2)
        before = scrape(f"{api.url}/v1/metrics")  # no worker yet: the job waits on its lane
        assert value(before, "guardfleet_queue_depth", lane="bulk") == 1
        assert value(before, "guardfleet_queue_oldest_age_seconds", lane="bulk") >= 1.0
        assert value(before, "guardfleet_queue_depth", lane="interactive") == 0
        assert value(before, "guardfleet_jobs_accepted_total", lane="bulk") == 1

        port = free_port()
        start_worker("measured@test", db=db, GUARDFLEET_WORKER_METRICS_PORT=str(port))
        assert (
            http.get(f"/v1/jobs/{waiting['id']}", params={"wait": 60}).json()["status"]
            == "succeeded"
        )
        assert (
            http.post("/v1/classify", json={"prompt": "How do I steal a car?"}).status_code == 200
        )

    after = scrape(f"{api.url}/metrics")
    assert value(after, "guardfleet_queue_depth", lane="bulk") == 0
    assert value(after, "guardfleet_workers_ready", device="cpu") == 1
    assert value(after, "guardfleet_jobs_accepted_total", lane="interactive") == 1
    assert (
        value(
            after, "guardfleet_http_requests_total", route="/v1/jobs", method="POST", status="202"
        )
        == 1
    )
    assert (
        value(
            after,
            "guardfleet_http_requests_total",
            route="/v1/jobs/{job_id}",
            method="GET",
            status="200",
        )
        == 1
    )
    assert value(after, "guardfleet_sync_request_duration_seconds_count", route="/v1/classify") == 1

    worker = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(worker, "guardfleet_request_finish_total", reason="stop") == 2
    assert value(worker, "guardfleet_e2e_request_latency_seconds_count") == 2
    assert value(worker, "guardfleet_time_to_first_token_seconds_count") == 2
    assert value(worker, "guardfleet_batch_size_count") == 2
    assert value(worker, "guardfleet_prompt_tokens_total") > 100  # the taxonomy alone is longer
    assert value(worker, "guardfleet_generation_tokens_total") >= 4
    assert value(worker, "guardfleet_num_requests_running") == 0
    assert value(worker, "guardfleet_num_requests_waiting") == 0
    assert value(worker, "guardfleet_device_memory_used_bytes") == 0  # a CPU worker
