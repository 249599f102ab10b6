"""A job goes through the API, Redis and a real Celery worker on the demo model, and back."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, Worker, db_url

MODEL = "nvidia/nemotron-content-safety-reasoning-4b-experimental"


@pytest.fixture
def api(redis_server: RedisServer, live_worker: Worker) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(redis_url=redis_server.url))) as client:
        yield client


def poll(api: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_job_round_trip_prompt_only(api: TestClient) -> None:
    created = api.post(
        "/v1/jobs", json={"prompt": "How do I build a pipe bomb?", "metadata": {"ticket": 7}}
    )
    assert created.status_code == 202
    job = created.json()
    assert job["status"] == "queued"
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    done = poll(api, job["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["prompt_harm"] == "harmful"
    assert result["response_harm"] is None
    assert result["reasoning"] is None
    assert result["raw_output"] == "Prompt harm: harmful\nResponse harm: None"
    assert result["model"] == "demo"
    assert result["prompt_tokens"] > 100 and result["completion_tokens"] > 0
    assert result["scores"]["prompt_harm"] > 0.5
    assert result["scores"]["response_harm"] is None
    assert result["batch_size"] >= 1 and result["inference_ms"] > 0
    assert done["metadata"] == {"ticket": 7}
    assert done["attempts"] == 1 and done["worker"] == "shared@test"


def test_think_mode_with_response_gives_a_trace(api: TestClient) -> None:
    body = {
        "prompt": "How do I steal a car?",
        "response": "I can't help with that request.",
        "mode": "think",
    }
    response = api.post("/v1/classify", json=body)
    assert response.status_code == 200
    result = response.json()["result"]
    assert result["prompt_harm"] == "harmful"
    assert result["response_harm"] == "unharmful"
    # The trace names a category by number and name (which one is the demo model's weak spot).
    assert re.match(r"The human user's request falls under S\d+ \(", result["reasoning"])
    assert result["raw_output"].startswith("<think>\n")
    assert result["scores"]["prompt_harm"] > 0.5
    assert result["scores"]["response_harm"] < 0.5


def test_benign_prompt_is_unharmful(api: TestClient) -> None:
    response = api.post("/v1/classify", json={"prompt": "How do I bake sourdough bread?"})
    result = response.json()["result"]
    assert result["prompt_harm"] == "unharmful"
    assert result["scores"]["prompt_harm"] < 0.5


def test_topic_following_policy_has_a_single_verdict(api: TestClient) -> None:
    body = {
        "prompt": "Tell me how to launder money.",
        "policy": {"type": "topic_following", "instructions": "Only discuss recipes."},
    }
    result = api.post("/v1/classify", json=body).json()["result"]
    assert result["raw_output"] == "Prompt harm: harmful"
    assert result["prompt_harm"] == "harmful"
    assert result["response_harm"] is None


def test_custom_taxonomy(api: TestClient) -> None:
    body = {
        "prompt": "How do I plant tomatoes?",
        "policy": {"categories": [{"name": "Financial Advice"}]},
    }
    result = api.post("/v1/classify", json=body).json()["result"]
    assert result["prompt_harm"] == "unharmful"


def test_a_replacing_taxonomy_reaches_the_model(api: TestClient) -> None:
    """The demo model learned to name a default category ("falls under S3 (...)") only when the
    prompt lists the default taxonomy: with a policy that replaces it, the trace names none. A
    policy dropped on the way would leave the default taxonomy in the prompt."""
    body: dict[str, Any] = {"prompt": "How can I steal a car?", "mode": "think"}
    default = api.post("/v1/classify", json=body).json()["result"]
    body["policy"] = {"categories": [{"name": "Financial Advice"}], "replace": True}
    replaced = api.post("/v1/classify", json=body).json()["result"]
    assert "falls under S" in default["raw_output"], default["raw_output"]
    assert "falls under S" not in replaced["raw_output"], replaced["raw_output"]
    assert replaced["prompt_harm"] == "harmful"


def test_input_over_the_token_limit_is_a_clear_4xx(api: TestClient) -> None:
    response = api.post("/v1/classify", json={"prompt": "word " * 30_000})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "input_too_long"
    assert "GUARDFLEET_MAX_INPUT_TOKENS" in error["message"]
    job = api.get(f"/v1/jobs/{response.json()['job']['id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["type"] == "input_too_long"


def test_chat_completion_returns_the_model_text_unchanged(api: TestClient) -> None:
    from guardfleet.prompts import render_template_a
    from guardfleet.schemas import Mode

    prompt = render_template_a("How do I hack into a bank account?", None, Mode.THINK)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 1e-20,
        "max_tokens": 400,
    }
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    content = out["choices"][0]["message"]["content"]
    assert content.startswith("<think>\n") and "</think>\n\nPrompt harm: harmful" in content
    assert out["choices"][0]["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_max_tokens_is_honoured(api: TestClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    out = api.post("/v1/chat/completions", json=body).json()
    # Two tokens cannot hold a verdict ("Prompt harm: unharmful" is several), so the budget
    # is what ended it.
    assert out["usage"]["completion_tokens"] == 2
    assert out["choices"][0]["finish_reason"] == "length"


def test_unknown_job_is_404(api: TestClient) -> None:
    response = api.get("/v1/jobs/job_doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_a_score_threshold_lets_the_score_decide(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    """GUARDFLEET_SCORE_THRESHOLD reaches the worker's verdict: at 0.0 every scored label is
    harmful, whatever the model wrote; the raw output and the score stay as generated."""
    db = 48
    start_worker("threshold@test", db=db, GUARDFLEET_SCORE_THRESHOLD="0.0")
    settings = Settings(redis_url=db_url(redis_server, db))
    with TestClient(create_app(settings)) as client:
        body = {"prompt": "How do I plant tomatoes?", "response": "Dig a hole and water it."}
        result = client.post("/v1/classify", json=body).json()["result"]
    assert "Prompt harm: unharmful" in result["raw_output"]
    assert result["scores"]["prompt_harm"] < 0.5
    assert (result["prompt_harm"], result["response_harm"]) == ("harmful", "harmful")
