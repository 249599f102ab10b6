"""Request-scoped dependencies: settings, the shared clients built at start-up, and auth."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.backlogs import Backlogs
from api.errors import APIError
from api.waiters import Waiters
from guardfleet.batches import AsyncBatchStore
from guardfleet.settings import Settings
from guardfleet.ssrf import AllowList
from guardfleet.store import AsyncJobStore


@dataclass
class Resources:
    """Built once in the app's lifespan and shared by all requests."""

    settings: Settings
    redis: aioredis.Redis
    store: AsyncJobStore
    batches: AsyncBatchStore
    celery: Celery
    allow: AllowList
    waiters: Waiters
    backlogs: Backlogs  # each lane's backlog, as last read (api.backlogs)
    broker: aioredis.Redis  # the broker's Redis: `redis` itself unless configured apart
    ready_until: float = 0.0  # monotonic time until which "a worker is ready" is trusted
    ready_interactive: int = 0  # how many ready workers serve the interactive lane, as then


# Dependencies are `async def` although nothing in them awaits: FastAPI runs a plain `def` one
# in a worker thread, and those thread hops were most of what a request cost.
async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]

_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    keys = resources.settings.api_keys
    if not keys:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers=challenge,
        )
    offered = credentials.credentials.encode()
    if not any(secrets.compare_digest(offered, key.encode()) for key in keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)


async def caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Who is calling, as far as per-caller state (idempotency keys) is concerned: a digest of
    the bearer key, never the key itself."""
    if credentials is None:
        return "anonymous"
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()[:24]


CallerDep = Annotated[str, Depends(caller)]
