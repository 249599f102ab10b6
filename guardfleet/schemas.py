"""The wire contract shared by the API and the worker: job requests, jobs and verdicts.

Both services import these models; a job is stored in Redis as `Job.model_dump_json()` and read
back with `Job.model_validate_json()`, so the record and the HTTP body are the same document.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from guardfleet.keys import new_id

# Generous per-field cap: the model's context is the real limit (checked in tokens by the worker);
# this only stops a client from parking megabytes in Redis before that check can run.
MAX_TEXT_CHARS = 200_000

NonEmptyText = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), Field(description="text")
]


class Mode(enum.StrEnum):
    """Whether the model writes a reasoning trace (`/think`) before its verdict."""

    THINK = "think"
    NO_THINK = "no_think"


class Harm(enum.StrEnum):
    HARMFUL = "harmful"
    UNHARMFUL = "unharmful"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class StrictModel(BaseModel):
    # Unknown fields are refused so that a misspelt option is a 422, not silently ignored.
    model_config = ConfigDict(extra="forbid")


# Patterns that say in the JSON schema what a validator below checks, so the OpenAPI document
# refuses what the API refuses. Whitespace is spelt out as the characters `str.strip()` removes:
# `\s` means something else in the ECMA-262 regexes JSON Schema uses (no U+001C-U+001F).
WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
HAS_TEXT = f"[^{WHITESPACE}]"
ONE_LINE_AFTER_STRIP = f"^[{WHITESPACE}]*[^{WHITESPACE}](?:[^\\n]*[^{WHITESPACE}])?[{WHITESPACE}]*$"


class Category(StrictModel):
    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=200),
        Field(json_schema_extra={"pattern": ONE_LINE_AFTER_STRIP}),
    ]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None

    # Stripped here rather than with `strip_whitespace`: pydantic-core strips by Rust's notion of
    # whitespace, the schema's pattern by Python's, and they must agree.
    @field_validator("name")
    @classmethod
    def _one_line(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("category name must contain non-whitespace text")
        if "\n" in v:
            raise ValueError("category name must be one line")
        return v

    @field_validator("description")
    @classmethod
    def _stripped(cls, v: str | None) -> str | None:
        return None if v is None else v.strip()


class TaxonomyPolicy(StrictModel):
    """Template A with custom categories: appended as S23+ (default) or replacing the 22."""

    # `replace: true` needs a category (the validator below), in JSON Schema terms.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"replace": {"const": False}}},
                {"required": ["categories"], "properties": {"categories": {"minItems": 1}}},
            ]
        }
    )

    type: Literal["taxonomy"] = "taxonomy"
    categories: list[Category] = Field(default_factory=list, max_length=200)
    # Strict: the document says `boolean`, so "yes" or 1 is refused, not read as true.
    replace: Annotated[bool, Field(strict=True)] = False
    allowed_topics: list[Annotated[str, StringConstraints(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=200
    )

    @model_validator(mode="after")
    def _categories_when_replacing(self) -> TaxonomyPolicy:
        if self.replace and not self.categories:
            raise ValueError("replace=true needs at least one category")
        return self


class HistoryTurn(StrictModel):
    role: Literal["user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]


class TopicPolicy(StrictModel):
    """Template B: a topic-following policy with the conversation so far (single verdict)."""

    type: Literal["topic_following"]
    instructions: NonEmptyText
    history: list[HistoryTurn] = Field(default_factory=list, max_length=200)


def _policy_type(value: Any) -> str | None:
    # `type` may be omitted for a taxonomy policy: it is the common case.
    if isinstance(value, dict):
        return str(value.get("type", "taxonomy"))
    return getattr(value, "type", None)


Policy = Annotated[
    Annotated[TaxonomyPolicy, Tag("taxonomy")] | Annotated[TopicPolicy, Tag("topic_following")],
    Discriminator(_policy_type),
]


class ClassifyRequest(StrictModel):
    """What a client asks: is this prompt (and optionally this response) harmful?"""

    kind: Literal["classify"] = "classify"
    prompt: Annotated[NonEmptyText, Field(json_schema_extra={"pattern": HAS_TEXT})]
    response: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)] | None = (
        None
    )
    mode: Mode = Mode.NO_THINK
    policy: Policy | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="echoed back on the job")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return v

    def classify_request(self) -> ClassifyRequest:
        """Just the classify request, without what a subclass adds (a job's `callback_url`, a
        batch line's `custom_id`): the part stored on the job and shown to the worker."""
        fields = set(ClassifyRequest.model_fields)
        return ClassifyRequest.model_validate(self.model_dump(include=fields))


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatInput(StrictModel):
    """An OpenAI-style chat completion, already validated and normalised by the API."""

    kind: Literal["chat"] = "chat"
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Scores(BaseModel):
    prompt_harm: float | None = None
    response_harm: float | None = None


class Verdict(BaseModel):
    """The parsed output of a classify job."""

    kind: Literal["classify"] = "classify"
    prompt_harm: Harm
    response_harm: Harm | None
    reasoning: str | None
    raw_output: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    scores: Scores | None = None
    batch_size: int | None = None
    queue_wait_ms: float | None = None
    inference_ms: float | None = None


class Completion(BaseModel):
    """The raw output of a chat job: the model text unchanged."""

    kind: Literal["chat"] = "chat"
    text: str
    finish_reason: Literal["stop", "length"]
    model: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int | None = None
    queue_wait_ms: float | None = None
    inference_ms: float | None = None


class JobError(BaseModel):
    type: str
    message: str
    raw_output: str | None = None


def new_job_id() -> str:
    """An id in the store's first part; the API draws from every part (`keys.new_id`)."""
    return new_id("job")


def utcnow() -> datetime:
    return datetime.now(UTC)


class DeliveryAttempt(BaseModel):
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class WebhookDelivery(BaseModel):
    """One webhook (job or batch completion) and every attempt to deliver it."""

    webhook_id: str
    url: str
    event: str
    status: Literal["pending", "delivered", "failed", "gone"] = "pending"
    attempts: list[DeliveryAttempt] = Field(default_factory=list)
    next_attempt_at: datetime | None = None
    payload: str = Field(exclude=True, default="")  # the exact body sent; not shown to clients


class JobCreate(ClassifyRequest):
    """`POST /v1/jobs`: a classify request plus where to deliver the verdict."""

    callback_url: (
        Annotated[
            str,
            StringConstraints(max_length=2048),
            Field(
                json_schema_extra={"format": "uri", "pattern": "^https?://"},
                description="must resolve to a public address (or one the operator allows)",
            ),
        ]
        | None
    ) = None


class Job(BaseModel):
    id: str = Field(default_factory=new_job_id)
    object: Literal["moderation.job"] = "moderation.job"
    status: JobStatus = JobStatus.QUEUED
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: Annotated[ClassifyRequest | ChatInput, Field(discriminator="kind")]
    result: Annotated[Verdict | Completion, Field(discriminator="kind")] | None = None
    error: JobError | None = None
    metadata: dict[str, Any] | None = None
    attempts: int = 0
    worker: str | None = None
    callback_url: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    webhook: WebhookDelivery | None = None  # filled in when read through the API


class WorkerHeartbeat(BaseModel):
    """What a worker writes to Redis (with a TTL) while it is ready to serve."""

    name: str
    host: str
    pid: int
    device: str
    model: str
    loaded: bool
    queues: list[str]
    started_at: datetime
    last_seen: datetime
    jobs_done: int = 0
    broker: str = ""  # the id of the broker it consumes (`keys.BROKER_ID`); "" from old workers


class BatchItem(ClassifyRequest):
    """One line of a batch: a classify request with the client's own id for it."""

    custom_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class BatchStatus(enum.StrEnum):
    """OpenAI's batch statuses that apply here (no `finalizing`: results are read from the job
    records, there is no output file to write; no `expired`: items wait until run or until the
    batch's TTL removes it)."""

    VALIDATING = "validating"  # accepted and stored; its items are not queued yet
    IN_PROGRESS = "in_progress"  # items being queued (fan-out) or run
    FAILED = "failed"  # the stored upload could not be fanned out; `errors` says why
    COMPLETED = "completed"
    CANCELLING = "cancelling"  # queued items cancelled; running ones finish and are counted
    CANCELLED = "cancelled"


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


def new_batch_id() -> str:
    return new_id("batch")


class Batch(BaseModel):
    id: str = Field(default_factory=new_batch_id)
    object: Literal["moderation.batch"] = "moderation.batch"
    status: BatchStatus = BatchStatus.VALIDATING
    created_at: datetime = Field(default_factory=utcnow)
    in_progress_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    errors: BatchErrors | None = None
    request_counts: RequestCounts
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None
    webhook: WebhookDelivery | None = None
