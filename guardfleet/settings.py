"""Validated settings, read from `GUARDFLEET_*` environment variables (or a `.env` file).

Obtain them with `get_settings()`; nothing reads the environment at import time, so tests and
scripts can set variables first. Every field is documented in the README's configuration table.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from guardfleet.keys import MAX_PARTS

DEMO_MODEL = "demo"
NIM_MODEL_ID = "nvidia/nemotron-content-safety-reasoning-4b-experimental"
# The id of NVIDIA's hosted API: a client moved here by changing only its base_url sends it.
HOSTED_MODEL_ID = "nvidia/nemotron-content-safety-reasoning-4b"

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GUARDFLEET_", env_file=".env", extra="ignore", frozen=True
    )

    # --- shared -----------------------------------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    redis_sentinel_master: str = Field(
        "", description="with a sentinel:// Redis URL: the name the sentinels monitor"
    )
    broker_url: str = Field(
        "",
        description="the Celery broker's Redis when it is not the job store's: the lanes' "
        "message lists live there, everything else on GUARDFLEET_REDIS_URL; empty: the same",
    )
    redis_cluster: bool = Field(
        False,
        description="the job store is a Redis Cluster: GUARDFLEET_REDIS_URL names any of its "
        "nodes (database 0); needs GUARDFLEET_BROKER_URL, since Celery's broker cannot use one",
    )
    broker_sentinel_master: str = Field(
        "", description="with a sentinel:// broker URL: its master name (default: the store's)"
    )
    redis_timeout_s: float = Field(2.0, gt=0, description="connect/read timeout for Redis calls")
    redis_max_connections: int = Field(
        100,
        ge=4,
        description="Redis connections per API process; a request waits (up to the Redis "
        "timeout) for a free one rather than opening more",
    )
    store_parts: int = Field(
        1,
        ge=1,
        le=MAX_PARTS,
        description="parts (hash tags) new job and batch ids are spread over, so the job store "
        "can spread over a Redis Cluster; raise it at will, never lower it",
    )
    result_ttl_s: int = Field(86_400, ge=1, description="how long jobs and results are kept")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per line, with request, job and worker ids"
    )

    # --- model / worker ---------------------------------------------------------------------
    model: str = Field(DEMO_MODEL, description="'demo', a Hugging Face id, or a local path")
    served_model_name: str = Field(NIM_MODEL_ID, description="model id shown to OpenAI clients")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_input_tokens: int = Field(8192, ge=64)
    max_new_tokens_no_think: int = Field(64, ge=8)
    max_new_tokens_think: int = Field(1024, ge=16)
    max_chat_tokens: int = Field(2048, ge=1, description="upper bound for chat max_tokens")
    default_chat_tokens: int = Field(1024, ge=1, description="chat max_tokens when not sent")
    max_batch_size: int = Field(64, ge=1, description="most requests decoding at once per worker")
    kv_budget_tokens: int | None = Field(
        None,
        ge=256,
        description="KV cache cells per worker (default: 80% of free GPU memory, or 4 GiB on CPU)",
    )
    prefill_chunk_tokens: int | None = Field(
        None,
        ge=16,
        description="prompt tokens per forward between decode steps (default: 16384 GPU, 1024 CPU)",
    )
    compile: bool = Field(
        False,
        description="replay decode steps as CUDA graphs (GPU; the KV budget becomes an arena)",
    )
    task_events: bool = Field(
        True, description="send Celery task events (Flower's task view; about 1 ms per job)"
    )
    prefix_cache: bool = Field(
        True, description="reuse the KV cache of the shared taxonomy prefix across requests"
    )
    worker_threads: int | None = Field(
        None, ge=1, description="Celery task threads per worker (default: 2 x max_batch_size)"
    )
    score_threshold: float | None = Field(
        None, ge=0, le=1, description="if set, a score >= this makes the label harmful"
    )
    heartbeat_ttl_s: int = Field(15, ge=2)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    job_stale_s: float = Field(
        7200.0,
        gt=0,
        description="a job not started this long is published again (a started one: when its "
        "worker stops renewing its lease)",
    )
    redis_outage_s: float = Field(
        60.0, gt=0, description="how long a job waits out Redis errors before it is handed back"
    )
    model_stall_s: float = Field(
        300.0,
        gt=0,
        description="a model step running longer than this means the model thread hangs",
    )
    inject_fault: Literal["", "model_thread_dies", "model_thread_hangs"] = Field(
        "", description="for the fault suite only: break the model thread on its first request"
    )

    # --- api --------------------------------------------------------------------------------
    api_keys: CommaList = Field(default_factory=list)
    sync_timeout_s: float = Field(30.0, gt=0, le=600)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_batch_items: int = Field(50_000, ge=1, description="most lines in one batch")
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="a worker serves Prometheus metrics here when set"
    )
    max_queued_bulk: int = Field(
        100_000, ge=1, description="bulk jobs waiting before new ones get 429 (batches too)"
    )
    max_queued_interactive_per_worker: int = Field(
        128, ge=1, description="sync calls waiting per ready worker before new ones get 503"
    )
    max_batch_body_bytes: int = Field(64 * 1_048_576, ge=1024, description="batch upload limit")
    batch_fanout_chunk: int = Field(
        1000, ge=1, le=10_000, description="batch items the delivery worker queues per transaction"
    )
    batch_fanout_lease_s: float = Field(
        30.0,
        gt=0,
        description="a batch whose fan-out made no progress for this long is resumed by another "
        "delivery worker",
    )

    # --- webhooks ---------------------------------------------------------------------------
    webhook_secrets: CommaList = Field(
        default_factory=list, description="whsec_... signing secrets; each signs every delivery"
    )
    webhook_allow: CommaList = Field(
        default_factory=list, description="hosts, IPs or CIDRs callbacks may reach despite SSRF"
    )
    webhook_timeout_s: float = Field(15.0, gt=0, le=120)
    webhook_lease_s: float = Field(
        60.0,
        gt=0,
        description="a due delivery handed to a task is queued again if not settled by then",
    )
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="delay before each attempt (the first is the initial delivery)",
    )

    _split_keys = field_validator(
        "api_keys", "webhook_secrets", "webhook_allow", "webhook_retry_schedule_s", mode="before"
    )(_split_commas)

    @field_validator("webhook_secrets")
    @classmethod
    def _secret_format(cls, v: list[str]) -> list[str]:
        for secret in v:
            if not secret.startswith("whsec_") or len(secret) < 16:
                raise ValueError("each secret must look like whsec_<base64>")
        return v

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule(cls, v: list[float]) -> list[float]:
        if not v or any(d < 0 for d in v):
            raise ValueError("needs at least one delay, none negative")
        return v

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v:
            return v  # an empty broker URL: the store's; an empty store URL fails below
        schemes = {urlparse(part.strip()).scheme for part in v.split(";")}
        if schemes == {"sentinel"}:
            return v
        if len(schemes) > 1 or schemes - {"redis", "rediss", "unix"}:
            raise ValueError(
                "must be a redis://, rediss:// or unix:// URL, or sentinel://host:port URLs "
                "joined by ';'"
            )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps"):
            return v
        kind, _, index = v.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise ValueError("must be 'auto', 'cpu', 'cuda', 'mps' or 'cuda:N'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.redis_url:
            raise ValueError("redis_url must not be empty")
        if urlparse(self.redis_url).scheme == "sentinel" and not self.redis_sentinel_master:
            raise ValueError("a sentinel:// redis_url needs GUARDFLEET_REDIS_SENTINEL_MASTER")
        if urlparse(self.broker).scheme == "sentinel" and not self.broker_master:
            raise ValueError(
                "a sentinel:// broker_url needs GUARDFLEET_BROKER_SENTINEL_MASTER (or "
                "GUARDFLEET_REDIS_SENTINEL_MASTER)"
            )
        if self.redis_cluster:
            if urlparse(self.redis_url).scheme not in ("redis", "rediss"):
                raise ValueError("GUARDFLEET_REDIS_CLUSTER needs a redis:// or rediss:// URL")
            if urlparse(self.redis_url).path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster has database 0 only")
            if not self.separate_broker:
                raise ValueError(
                    "GUARDFLEET_REDIS_CLUSTER needs GUARDFLEET_BROKER_URL: Celery's broker "
                    "cannot use a Redis Cluster"
                )
        if self.max_batch_items > self.max_queued_bulk:
            raise ValueError("max_batch_items must not exceed max_queued_bulk (no batch could fit)")
        if self.heartbeat_interval_s >= self.heartbeat_ttl_s:
            raise ValueError("heartbeat_interval_s must be shorter than heartbeat_ttl_s")
        if self.default_chat_tokens > self.max_chat_tokens:
            raise ValueError("default_chat_tokens must not exceed max_chat_tokens")
        return self

    @property
    def model_ids(self) -> list[str]:
        """The ids /v1/models lists and chat completions accept: the served name, then the
        hosted API's id as an alias."""
        return list(dict.fromkeys([self.served_model_name, HOSTED_MODEL_ID]))

    @property
    def broker(self) -> str:
        """The broker's Redis URL: `broker_url`, or the job store's."""
        return self.broker_url or self.redis_url

    @property
    def broker_master(self) -> str:
        return self.broker_sentinel_master or self.redis_sentinel_master

    @property
    def separate_broker(self) -> bool:
        """Whether broker and job store are different Redis servers (then a submit is two
        writes, see `guardfleet.store.AsyncJobStore.create`)."""
        if self.broker != self.redis_url:
            return True
        # One set of sentinels may watch both: then the master names tell them apart.
        sentinels = urlparse(self.broker).scheme == "sentinel"
        return sentinels and self.broker_master != self.redis_sentinel_master

    @property
    def redis_host_is_local(self) -> bool:
        host = urlparse(self.redis_url).hostname or ""
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"


@functools.cache
def get_settings() -> Settings:
    return Settings()
