"""The API's answers to bad input, with Redis pointed at a closed port.

Validation must answer before Redis is touched; when Redis *is* needed and is down, the answer
is a prompt 503 in the error envelope, never a hang or a 500.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.settings import Settings
from tests.conftest import free_port

MODEL = "nvidia/nemotron-content-safety-reasoning-4b-experimental"


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5, max_body_bytes=4096
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def envelope(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   \n"}, "prompt", "non-whitespace"),
        ({"prompt": 42}, "prompt", "valid string"),
        ({"prompt": "x", "mode": "fast"}, "mode", "'think' or 'no_think'"),
        ({"prompt": "x", "response": ""}, "response", "at least 1 character"),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs"),
        ({"prompt": "x", "policy": {"type": "nope"}}, "policy", "does not match"),
        ({"prompt": "x", "policy": {"replace": True}}, "policy.taxonomy", "at least one category"),
        ({"prompt": "x", "policy": {"type": "topic_following"}}, "policy", "instructions"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/classify"])
def test_invalid_classify_bodies_are_422_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], param: str, fragment: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422
    error = envelope(response)
    assert error["param"].startswith(param.split(".")[0])
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert envelope(response)["code"] == "invalid_json"


def test_oversized_body_is_413_with_or_without_content_length(client: TestClient) -> None:
    big = b'{"prompt": "' + b"a" * 5000 + b'"}'
    response = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert envelope(response)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        yield big[:3000]
        yield big[3000:]

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": []}, 422, "messages"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            400,
            "stream_options",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            422,
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 422, "messages"),
        ({"model": MODEL, "messages": [{"role": "system", "content": "x"}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": " "}]}, 400, "messages"),
    ],
)
def test_invalid_chat_requests(
    client: TestClient, body: dict[str, Any], status: int, param: str
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert envelope(response)["param"].startswith(param)


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    assert envelope(client.get("/v1/nothing"))["type"] == "not_found_error"
    assert client.get("/v1/classify").status_code == 405


def test_redis_down_is_a_prompt_503(client: TestClient) -> None:
    started = time.monotonic()
    response = client.post("/v1/jobs", json={"prompt": "hello"})
    assert response.status_code == 503
    assert envelope(response)["code"] == "queue_unavailable"
    assert response.headers["retry-after"] == "2"
    assert client.get("/v1/jobs/job_x").status_code == 503
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    assert client.get("/v1/health/live").status_code == 200
    assert time.monotonic() - started < 10


def test_api_keys_guard_everything_but_health() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", api_keys=["s3cret"])
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/health/live").status_code == 200
        for path in ("/v1/models", "/v1/version", "/v1/jobs/job_x"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert envelope(wrong)["code"] == "invalid_api_key"
        right = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert (
            right.status_code == 200 and right.json()["data"][0]["id"] == settings.served_model_name
        )


def test_a_batch_with_bad_lines_is_refused_naming_each_line(client: TestClient) -> None:
    body = "\n".join(
        [
            '{"custom_id": "a", "prompt": "fine"}',
            "",
            '{"custom_id": "b"}',
            "{not json",
            '{"custom_id": "a", "prompt": "again"}',
            '{"custom_id": "c", "prompt": "x", "mode": "loud"}',
        ]
    )
    response = client.post("/v1/batches", content=body)
    assert response.status_code == 422
    body_json = response.json()
    assert body_json["error"]["code"] == "invalid_batch"
    assert body_json["error"]["message"].startswith("4 invalid line(s), nothing was queued")
    lines = {e["line"]: e["message"] for e in body_json["errors"]}
    assert sorted(lines) == [3, 4, 5, 6]
    assert "prompt: Field required" in lines[3]
    assert "invalid JSON" in lines[4]
    assert "custom_id 'a' repeats line 1" in lines[5]
    assert "mode" in lines[6]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 422, "empty_batch"),
        (b"\n\n", 422, "empty_batch"),
        (b'{"custom_id": "a", "prompt": "x"}', 503, "queue_unavailable"),  # valid: needs Redis
        (b'[{"custom_id": "a", "prompt": "x"}]', 503, "queue_unavailable"),  # JSON array form
        (b'{"custom_id": "a"', 422, "invalid_batch"),
        (b'[{"custom_id": "a"', 400, "invalid_json"),
        (b'{"not": "an array"}', 422, "invalid_batch"),
        (b"\xff\xfe", 400, "invalid_encoding"),
    ],
)
def test_batch_body_forms(client: TestClient, body: bytes, status: int, code: str) -> None:
    response = client.post("/v1/batches", content=body)
    assert response.status_code == status, response.text
    assert envelope(response)["code"] == code


def test_a_batch_over_the_item_limit_is_refused() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", max_batch_items=2)
    with TestClient(create_app(settings)) as client:
        body = "\n".join(f'{{"custom_id": "{i}", "prompt": "x"}}' for i in range(3))
        response = client.post("/v1/batches", content=body)
    assert response.status_code == 422
    assert "at most 2" in envelope(response)["message"]


@pytest.mark.parametrize(
    "url",
    [
        "https://" + "a" * 64 + ".example/hook",  # a label DNS cannot carry: was a 500
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 form of 127.0.0.1
        "http://[2002:7f00:1::]/hook",  # 6to4 form of 127.0.0.1
        "http://93.184.216.34:0/hook",
    ],
)
def test_unsafe_callbacks_are_a_422_at_submit(url: str) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_timeout_s=0.5,
        webhook_secrets=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "callback_url": url})
    assert response.status_code == 422, response.text
    assert (envelope(response)["code"], envelope(response)["param"]) == (
        "unsafe_callback_url",
        "callback_url",
    )


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "stream": 0}, "stream"),
        ("/v1/chat/completions", {**CHAT, "seed": "2"}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": 2**53 + 1}, "seed"),
        ("/v1/jobs", {"prompt": "x", "policy": {"replace": "yes"}}, "policy.taxonomy.replace"),
    ],
)
def test_numbers_and_booleans_are_not_coerced(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    """What the OpenAPI document calls an integer, number or boolean must be one."""
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert envelope(response)["param"] == param


def test_a_whole_float_is_an_integer_as_in_json_schema(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5.0, "seed": 2.0})
    assert response.status_code == 503, response.text  # past validation, to Redis (down here)


def test_an_unexpected_error_is_a_500_envelope_naming_the_request_id(client: TestClient) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    client.app.add_api_route("/broken", broken)  # type: ignore[attr-defined]
    # Not entered: the app's lifespan (and its clients) belong to `client`.
    raw = TestClient(client.app, raise_server_exceptions=False)
    answer = raw.get("/broken", headers={"X-Request-ID": "support-ticket-0000000001"})
    assert answer.status_code == 500
    assert answer.headers["X-Request-ID"] == "support-ticket-0000000001"
    error = answer.json()["error"]
    assert error["code"] == "internal_error"
    assert error["message"] == "internal server error (request id support-ticket-0000000001)"
    assert "a bug" not in answer.text
