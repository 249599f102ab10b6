"""`POST /v1/chat/completions`, compatible with the NIM of this model and the OpenAI clients.

The whole conversation passes through the model's chat template and `content` is the model's
text unchanged (think block inline), because NeMo Guardrails parses exactly that.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sse_starlette import EventSourceResponse

from api import backpressure, jobs
from api.chat_stream import ChatStream
from api.deps import Resources, ResourcesDep
from api.errors import APIError, responses
from api.live import event_stream, sse_responses
from api.readiness import require_ready_worker
from guardfleet.schemas import HAS_TEXT, ChatInput, ChatMessage, Completion, JobStatus

router = APIRouter(tags=["openai"])

# NeMo Guardrails sends temperature 1e-20 to mean "greedy"; below this we decode greedily.
GREEDY_BELOW = 1e-5
HF_MODEL_ID = "nvidia/Nemotron-Content-Safety-Reasoning-4B"


def _json_number(value: object) -> object:
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


JSON_NUMBER = BeforeValidator(_json_number)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


def _content_must_hold_text(schema: dict[str, Any]) -> None:
    """`content` is optional for pydantic (so the handler can answer a precise 400), but the
    document says what is served: content is required and holds a non-whitespace character
    (for a list of parts, some part does)."""
    schema["required"] = ["role", "content"]
    content = schema["properties"]["content"]
    content.pop("default", None)
    branches = [b for b in content.pop("anyOf") if b.get("type") != "null"]
    for branch in branches:
        if branch["type"] == "string":
            branch["pattern"] = HAS_TEXT
        else:
            branch["contains"] = {"properties": {"text": {"pattern": HAS_TEXT}}}
    content["anyOf"] = branches


class Message(BaseModel):
    model_config = ConfigDict(
        extra="ignore",  # e.g. `name`
        json_schema_extra=_content_must_hold_text,
    )
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Annotated[bool, Field(strict=True)] = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send many optional fields; those that change nothing here are ignored.
    # As OpenAI does, `stream_options` is refused unless `stream` is true (the document says so).
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "dependentSchemas": {
                "stream_options": {
                    "required": ["stream"],
                    "properties": {"stream": {"const": True}},
                }
            }
        },
    )

    model: str
    messages: Annotated[
        list[Message],
        Field(
            min_length=1,
            json_schema_extra={"contains": {"properties": {"role": {"const": "user"}}}},
            description="at least one message must be the user's",
        ),
    ]
    # api.main puts GUARDFLEET_MAX_CHAT_TOKENS into the document as their maximum.
    # Numbers are JSON numbers and booleans JSON booleans (no "0.5", no 0 for false): the
    # document says `number`, `integer`, `boolean`. As in JSON Schema, 2.0 is an integer.
    max_tokens: Annotated[int, Field(ge=1), JSON_NUMBER] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_NUMBER] | None = None
    temperature: Annotated[float, Field(ge=0, le=2), JSON_NUMBER] | None = None
    top_p: Annotated[float, Field(gt=0, le=1), JSON_NUMBER] | None = None
    # Only this value is served; others are refused with a 400 that says so.
    n: Annotated[int, Field(ge=1, json_schema_extra={"const": 1}), JSON_NUMBER] = 1
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    # Within torch's seed range (outside it the job would fail on the worker) and exact in
    # JSON parsers that read numbers as doubles.
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), JSON_NUMBER] | None = None


def _messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    out = []
    for index, msg in enumerate(body.messages):
        text = msg.content if isinstance(msg.content, str) else None
        if isinstance(msg.content, list):
            text = "".join(part.text for part in msg.content)
        if not text or not text.strip():
            raise APIError(
                400,
                f"messages[{index}] has no text content",
                code="invalid_value",
                param=f"messages.{index}.content",
            )
        role = "system" if msg.role == "developer" else msg.role
        out.append(ChatMessage(role=role, content=text))
    if not any(m.role == "user" for m in out):
        raise APIError(400, "messages must contain a user message", param="messages")
    return out


def to_chat_input(body: ChatCompletionRequest, res: Resources) -> ChatInput:
    settings = res.settings
    if body.model not in {*settings.model_ids, settings.model, HF_MODEL_ID}:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; use {settings.served_model_name!r}",
            code="model_not_found",
            param="model",
        )
    if "stream_options" in body.model_fields_set and not body.stream:
        raise APIError(
            400,
            "stream_options is only allowed when stream is true",
            code="invalid_value",
            param="stream_options",
        )
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", code="unsupported_value", param="n")
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_chat_tokens
    if max_tokens > settings.max_chat_tokens:
        raise APIError(
            400,
            f"max_tokens is {max_tokens}; at most {settings.max_chat_tokens} is allowed",
            code="invalid_value",
            param="max_tokens",
        )
    temperature = body.temperature or 0.0
    return ChatInput(
        messages=_messages(body),
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=body.top_p or 1.0,
        seed=body.seed,
    )


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        **sse_responses("the completion; with `stream: true`, its chunks", {"type": "object"}),
        **responses(400, 404, 413, 422, 500, 503, 504),
    },
)
async def chat_completions(
    body: ChatCompletionRequest, res: ResourcesDep
) -> dict[str, Any] | EventSourceResponse:
    chat = to_chat_input(body, res)
    await require_ready_worker(res)
    await backpressure.admit_interactive(res)
    if body.stream:
        job = await jobs.submit(res, jobs.new_job(res, chat), interactive=True, watch=True)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = ChatStream(res, job.id, body.model, include_usage)
        return event_stream(stream.events())
    job = jobs.new_job(res, chat)
    done = await jobs.submit_and_wait(res, job, res.settings.sync_timeout_s)
    if not done.status.terminal:
        raise APIError(
            504,
            f"no completion within {res.settings.sync_timeout_s:g}s (job {job.id})",
            code="sync_timeout",
        )
    if done.status is not JobStatus.SUCCEEDED or not isinstance(done.result, Completion):
        error = done.error
        if error is not None and error.type == "input_too_long":
            raise APIError(400, error.message, code="context_length_exceeded", param="messages")
        message = error.message if error else f"job ended {done.status}"
        raise APIError(
            500, f"completion failed: {message} (job {job.id})", code=error.type if error else None
        )
    result = done.result
    return {
        "id": "chatcmpl-" + job.id.removeprefix("job_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }
