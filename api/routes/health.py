"""NIM-compatible health, model and version endpoints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import redis.exceptions
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from api import metrics
from api.deps import ResourcesDep, require_api_key
from api.errors import responses
from api.readiness import fleet

router = APIRouter(tags=["health"])
API_VERSION = "1.0.0"


def release() -> str:
    try:
        return version("guardfleet")
    except PackageNotFoundError:
        return "0+unknown"


class WorkerSummary(BaseModel):
    name: str
    device: str
    model: str
    queues: list[str]
    jobs_done: int


class HealthResponse(BaseModel):
    object: str = "health.response"
    message: str
    status: str
    workers: list[WorkerSummary] | None = None


def _health(status_code: int, status: str, message: str, **extra: Any) -> JSONResponse:
    body = {"object": "health.response", "message": message, "status": status, **extra}
    return JSONResponse(body, status_code=status_code)


@router.get("/v1/health/live", responses={200: {"model": HealthResponse}})
async def live() -> JSONResponse:
    return _health(200, "live", "live")


@router.get(
    "/v1/health/ready",
    responses={
        200: {"model": HealthResponse, "description": "at least one worker is ready"},
        503: {"model": HealthResponse, "description": "no worker is ready, or Redis is down"},
    },
)
async def ready(res: ResourcesDep) -> JSONResponse:
    if res.broker is not res.redis:
        try:
            await res.broker.ping()
        except redis.exceptions.RedisError as exc:
            return _health(503, "not_ready", f"the broker's Redis is unavailable: {exc}")
    try:
        workers, elsewhere = await fleet(res)
    except redis.exceptions.RedisError as exc:
        return _health(503, "not_ready", f"Redis is unavailable: {exc}")
    if not workers and elsewhere:
        names = ", ".join(w.name for w in elsewhere)
        message = f"no worker consumes this API's broker (ready on another broker: {names})"
        return _health(503, "not_ready", message)
    if not workers:
        return _health(503, "not_ready", "no worker has a loaded model yet")
    summary = [
        {
            "name": w.name,
            "device": w.device,
            "model": w.model,
            "queues": w.queues,
            "jobs_done": w.jobs_done,
        }
        for w in workers
    ]
    return _health(200, "ready", "ready", workers=summary)


@router.get("/v1/models", dependencies=[Depends(require_api_key)], responses=responses(401))
async def models(res: ResourcesDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": "guardfleet",
                "root": res.settings.model,
                "max_model_len": res.settings.max_input_tokens,
            }
            for model_id in res.settings.model_ids
        ],
    }


@router.get(
    "/v1/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **responses(401)},
)
@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def prometheus_metrics(res: ResourcesDep) -> PlainTextResponse:
    """Prometheus text: this API process's counters and the fleet's queues and workers."""
    return PlainTextResponse(await metrics.render(res), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/version", dependencies=[Depends(require_api_key)], responses=responses(401))
async def version_info() -> dict[str, str]:
    return {"release": release(), "api": API_VERSION}
