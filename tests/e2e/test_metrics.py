"""Prometheus metrics, scraped from a real API and a real worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ApiServer, StartWorker, free_port, wait_for_batch

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
        dropped = http.post("/v1/jobs", json={"prompt": "How do I prune roses?"}).json()
        assert http.post(f"/v1/jobs/{dropped['id']}/cancel").status_code == 200
        lines = "".join(
            json.dumps({"custom_id": str(n), "prompt": f"What grows well in pots, {n}?"}) + "\n"
            for n in range(2)
        )
        batch = http.post("/v1/batches", content=lines).json()
        start_worker("measured-hooks@test", wait=False, db=db, module="worker.delivery")
        wait_for_batch(
            http, batch["id"], "in_progress", 30, "the delivery worker to queue the batch"
        )
        time.sleep(1.2)
        before = scrape(f"{api.url}/v1/metrics")  # no worker yet: the job waits on its lane
        assert value(before, "guardfleet_queue_depth", lane="bulk") == 4  # cancelled one too
        assert value(before, "guardfleet_queue_oldest_age_seconds", lane="bulk") >= 1.0
        assert value(before, "guardfleet_queue_depth", lane="interactive") == 0
        assert value(before, "guardfleet_jobs_accepted_total", lane="bulk") == 4
        assert value(before, "guardfleet_jobs_finished_total", status="cancelled") == 1
        assert value(before, "guardfleet_jobs_finished_total", status="succeeded") == 0
        assert value(before, "guardfleet_batch_items_total", state="accepted") == 2

        port = free_port()
        start_worker("measured@test", db=db, GUARDFLEET_WORKER_METRICS_PORT=str(port))
        assert (
            http.get(f"/v1/jobs/{waiting['id']}", params={"wait": 60}).json()["status"]
            == "succeeded"
        )
        assert (
            http.post("/v1/classify", json={"prompt": "How do I steal a car?"}).status_code == 200
        )
        wait_for_batch(http, batch["id"], "completed", 60, "the batch to complete")

    after = scrape(f"{api.url}/metrics")
    assert value(after, "guardfleet_queue_depth", lane="bulk") == 0
    assert value(after, "guardfleet_workers_ready", device="cpu") == 1
    assert value(after, "guardfleet_jobs_accepted_total", lane="interactive") == 1
    assert (
        value(
            after, "guardfleet_http_requests_total", route="/v1/jobs", method="POST", status="202"
        )
        == 2
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
    assert value(after, "guardfleet_jobs_finished_total", status="succeeded") == 4
    assert value(after, "guardfleet_jobs_finished_total", status="cancelled") == 1
    assert value(after, "guardfleet_jobs_finished_total", status="failed") == 0
    assert value(after, "guardfleet_batch_items_total", state="completed") == 2
    assert value(after, "guardfleet_webhook_attempts_total", outcome="delivered") == 0

    worker = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(worker, "guardfleet_request_finish_total", reason="stop") == 4
    assert value(worker, "guardfleet_e2e_request_latency_seconds_count") == 4
    assert value(worker, "guardfleet_time_to_first_token_seconds_count") == 4
    assert value(worker, "guardfleet_batch_size_count") == 4
    for stage in ("queue", "prefill", "decode", "inference"):
        assert value(worker, f"guardfleet_request_{stage}_time_seconds_count") == 4
    assert value(worker, "guardfleet_request_prefill_time_seconds_sum") <= value(
        worker, "guardfleet_request_inference_time_seconds_sum"
    )
    # Four prompts under the one default policy: its taxonomy prefix is computed once (at the
    # warm-up or the first job) and served from the cache to every one of them.
    queried = value(worker, "guardfleet_prefix_cache_queries_total")
    assert value(worker, "guardfleet_prefix_cache_hits_total") > queried / 2
    assert value(worker, "guardfleet_prompt_tokens_total") > 100  # the taxonomy alone is longer
    assert value(worker, "guardfleet_generation_tokens_total") >= 4
    assert value(worker, "guardfleet_num_requests_running") == 0
    assert value(worker, "guardfleet_num_requests_waiting") == 0
    assert value(worker, "guardfleet_device_memory_used_bytes") == 0  # a CPU worker


@pytest.mark.timeout(120)
def test_several_api_processes_report_one_sum(start_api: StartApi, tmp_path: Path) -> None:
    """Behind one port a scrape reaches one process at random; each must report every
    process's requests, not its own share."""
    shared = tmp_path / "metrics"
    api = start_api(db=41, processes=2, PROMETHEUS_MULTIPROC_DIR=str(shared))

    def live(_: int) -> int:
        with httpx.Client(base_url=api.url, timeout=10) as http:  # a new connection each
            return http.get("/v1/health/live").status_code

    def live_200() -> float:
        return value(
            scrape(f"{api.url}/v1/metrics"),
            "guardfleet_http_requests_total",
            route="/v1/health/live",
            method="GET",
            status="200",
        )

    before = live_200()  # start_api's own readiness probe
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(live, range(80))) == {200}
    writers = {p.name for p in shared.glob("counter_*.db")}
    assert len(writers) == 2, f"both processes should have answered some requests: {writers}"
    # Each scrape on a new connection, so both processes answer some.
    assert [live_200() for _ in range(10)] == [before + 80] * 10
