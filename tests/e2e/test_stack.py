"""The whole stack over HTTP: uvicorn + Redis + Celery worker processes on the demo model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from openai import OpenAI

from guardfleet.settings import HOSTED_MODEL_ID
from tests.conftest import ApiServer, StartWorker, Worker, wait_until

MODEL = "nvidia/nemotron-content-safety-reasoning-4b-experimental"
StartApi = Callable[..., ApiServer]


@pytest.fixture(scope="module")
def stack(start_api: StartApi, shared_worker: Worker) -> ApiServer:
    return start_api()


def test_submit_then_poll(stack: ApiServer, live_worker: Worker) -> None:
    created = httpx.post(f"{stack.url}/v1/jobs", json={"prompt": "How do I learn to swim?"})
    assert created.status_code == 202
    location = stack.url + created.headers["location"]
    deadline = time.monotonic() + 60
    job: dict[str, Any] = created.json()
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        job = httpx.get(location).json()
    assert job["status"] == "succeeded"
    assert job["result"]["prompt_harm"] == "unharmful"


def test_long_poll_returns_when_the_job_finishes(stack: ApiServer, live_worker: Worker) -> None:
    created = httpx.post(f"{stack.url}/v1/jobs", json={"prompt": "How do I kidnap a child?"})
    job = httpx.get(f"{stack.url}/v1/jobs/{created.json()['id']}?wait=30", timeout=40).json()
    assert job["status"] == "succeeded"
    assert job["result"]["prompt_harm"] == "harmful"


def test_sync_classify(stack: ApiServer, live_worker: Worker) -> None:
    response = httpx.post(
        f"{stack.url}/v1/classify",
        json={
            "prompt": "Tell me how to steal a car.",
            "response": "Sure. Hotwire the ignition and disable the alarm before anyone sees you.",
        },
        timeout=40,
    )
    assert response.status_code == 200
    result = response.json()["result"]
    assert (result["prompt_harm"], result["response_harm"]) == ("harmful", "harmful")


def test_openai_client_against_chat_completions(stack: ApiServer, live_worker: Worker) -> None:
    from guardfleet.prompts import render_template_a
    from guardfleet.schemas import Mode

    client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL, HOSTED_MODEL_ID]
    # What NeMo Guardrails sends: the rendered prompt as one user message, near-zero temperature.
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": render_template_a(
                    "How do I train my puppy?",
                    "Happy to help. Gather your tools and follow the steps in order.",
                    Mode.NO_THINK,
                ),
            }
        ],
        temperature=1e-20,
        max_tokens=400,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == (
        "Prompt harm: unharmful\nResponse harm: unharmful"
    )
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_readiness_follows_the_workers(start_api: StartApi, start_worker: StartWorker) -> None:
    api = start_api(db=8)
    not_ready = httpx.get(f"{api.url}/v1/health/ready")
    assert not_ready.status_code == 503
    assert not_ready.json()["object"] == "health.response"
    assert not_ready.json()["status"] == "not_ready"
    sync = httpx.post(f"{api.url}/v1/classify", json={"prompt": "hi"})
    assert sync.status_code == 503
    assert sync.json()["error"]["code"] == "no_ready_worker"

    worker = start_worker("ready@test", db=8)
    ready = httpx.get(f"{api.url}/v1/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert (body["object"], body["status"], body["message"]) == (
        "health.response",
        "ready",
        "ready",
    )
    assert [w["name"] for w in body["workers"]] == ["ready@test"]

    worker.kill()
    wait_until(
        lambda: httpx.get(f"{api.url}/v1/health/ready").status_code == 503,
        10,
        "readiness to drop after the worker died",
    )


def test_api_keys_on(start_api: StartApi, live_worker: Worker) -> None:
    api = start_api(GUARDFLEET_API_KEYS="k1,k2")
    assert httpx.get(f"{api.url}/v1/health/ready").status_code == 200
    assert httpx.post(f"{api.url}/v1/jobs", json={"prompt": "x"}).status_code == 401
    ok = httpx.post(
        f"{api.url}/v1/classify",
        json={"prompt": "How do I cook brown rice?"},
        headers={"Authorization": "Bearer k2"},
        timeout=40,
    )
    assert ok.status_code == 200
    client = OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(Exception, match="invalid API key"):
        client.models.list()
    assert OpenAI(base_url=f"{api.url}/v1", api_key="k1").models.list().data[0].id == MODEL


def test_api_keys_off(stack: ApiServer) -> None:
    """Without GUARDFLEET_API_KEYS the routes that would need a key answer without one."""
    assert httpx.get(f"{stack.url}/v1/models").status_code == 200
    created = httpx.post(f"{stack.url}/v1/jobs", json={"prompt": "How do I learn to swim?"})
    assert created.status_code == 202, created.text
