"""The OpenAPI document says what the API does: the error statuses each route answers, in the
error envelope, and request schemas that refuse what the validators refuse."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from api.main import create_app
from guardfleet.schemas import HAS_TEXT, ONE_LINE_AFTER_STRIP, Category, ClassifyRequest
from guardfleet.settings import Settings

ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    app = create_app(
        Settings(api_keys=["k"], max_chat_tokens=100, default_chat_tokens=50, max_batch_items=7)
    )
    return app.openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("POST", "/v1/jobs", {"200", "202", "400", "401", "409", "413", "422", "503"}),
        ("GET", "/v1/jobs/{job_id}", {"200", "401", "404", "422", "503"}),
        ("POST", "/v1/jobs/{job_id}/cancel", {"200", "401", "404", "409", "503"}),
        ("POST", "/v1/classify", {"200", "400", "401", "413", "422", "503", "504"}),
        ("POST", "/v1/batches", {"200", "202", "400", "401", "404", "409", "413", "422", "503"}),
        ("GET", "/v1/batches/{batch_id}/results", {"200", "401", "404", "503"}),
        ("POST", "/v1/chat/completions", {"200", "400", "401", "404", "413", "422", "500"}),
        ("GET", "/v1/models", {"200", "401"}),
        ("GET", "/v1/health/ready", {"200", "503"}),
    ],
)
def test_each_route_declares_the_statuses_it_answers(
    document: dict[str, Any], method: str, path: str, codes: set[str]
) -> None:
    declared = set(document["paths"][path][method.lower()]["responses"])
    assert codes <= declared, codes - declared


def test_every_error_response_is_the_envelope_in_json(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400 and path != "/v1/health/ready":
                assert response["content"] == {"application/json": {"schema": ENVELOPE}}, (
                    method,
                    path,
                    status,
                )
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_configured_limits_are_in_the_document(document: dict[str, Any]) -> None:
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 100} in chat["max_tokens"]["anyOf"]
    body = document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert (schema["maxItems"], schema["items"]) == (
        7,
        {"$ref": "#/components/schemas/BatchItem"},
    )


SAMPLES = ["a", " a ", "\x1e", "\x1ea\x1f", "\u3000", "a\nb", "a\n", "\n", "", "\ufeff", "\t x"]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_prompt_pattern_agrees_with_the_validator(text: str) -> None:
    try:
        ClassifyRequest(prompt=text)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (re.search(HAS_TEXT, text) is not None)


@pytest.mark.parametrize("text", SAMPLES)
def test_the_category_name_pattern_agrees_with_the_validator(text: str) -> None:
    try:
        Category(name=text)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (re.search(ONE_LINE_AFTER_STRIP, text) is not None)


def test_optional_parameters_are_absent_rather_than_null(document: dict[str, Any]) -> None:
    for _method, _path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            assert "null" not in str(parameter["schema"]), parameter
