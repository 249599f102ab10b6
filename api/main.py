"""The API application: `uvicorn api.main:app` (or `create_app()` in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.deps import Resources, require_api_key
from api.routes import batches, chat, health, jobs
from guardfleet.batches import AsyncBatchStore
from guardfleet.queueing import make_celery
from guardfleet.settings import Settings, get_settings
from guardfleet.ssrf import AllowList
from guardfleet.store import AsyncJobStore


class BodyLimit:
    """Refuse bodies over the limit with 413, whether or not Content-Length is sent. Batch
    uploads (`/v1/batches`) have their own, larger limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_batch_bytes: int) -> None:
        self.app = app
        self.default = max_bytes
        self.batch = max_batch_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.batch if scope["path"] == "/v1/batches" else self.default
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # Answer now; the app sees a disconnect, and whatever it sends is dropped.
                refused = True
                await self._refuse(scope, receive, send, limit)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = errors.error_response(
            413, f"request body exceeds {limit} bytes", code="body_too_large"
        )
        await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        ttl = settings.result_ttl_s
        app.state.resources = Resources(
            settings,
            client,
            AsyncJobStore(client, ttl, settings.job_stale_s),
            AsyncBatchStore(client, ttl, settings.job_stale_s),
            make_celery(settings),
            AllowList(settings.webhook_allow),
        )
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(
        title="guardfleet",
        summary="Nemotron content-safety classification as a queue-driven worker fleet",
        lifespan=lifespan,
    )
    errors.install(app)
    for module in (jobs, batches, chat):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    app.include_router(health.router)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        max_batch_bytes=settings.max_batch_body_bytes,
    )
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` builds the app on first access, after the environment is final.
    if name == "app":
        return create_app()
    raise AttributeError(name)
