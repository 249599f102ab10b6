"""The API application: `python -m api` or `uvicorn api.main:app` (or `create_app()` in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.backlogs import Backlogs
from api.deps import Resources, require_api_key
from api.request_ids import ObserveRequests
from api.routes import batches, chat, health, jobs
from api.waiters import Waiters
from guardfleet import logs, redis_conn
from guardfleet.batches import AsyncBatchStore
from guardfleet.queueing import make_celery
from guardfleet.schemas import BatchItem
from guardfleet.settings import Settings, get_settings
from guardfleet.ssrf import AllowList
from guardfleet.store import AsyncJobStore

REDIS_CLIENT_NAME = "guardfleet-api"


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
        # Bounded: a burst of requests queues for a connection instead of opening one each.
        client = redis_conn.connect_async(settings, REDIS_CLIENT_NAME)
        broker = client
        if settings.separate_broker:
            broker = redis_conn.connect_async(settings, REDIS_CLIENT_NAME, broker=True)
        ttl = settings.result_ttl_s
        app.state.resources = Resources(
            settings,
            client,
            AsyncJobStore(
                client, ttl, settings.job_stale_s, broker if broker is not client else None
            ),
            AsyncBatchStore(client, ttl),
            make_celery(settings),
            AllowList(settings.webhook_allow),
            Waiters(client, settings.redis_timeout_s),
            Backlogs(client, broker),
            broker,
        )
        await app.state.resources.waiters.start()
        try:
            yield
        finally:
            await app.state.resources.waiters.aclose()
            await client.aclose()
            if broker is not client:
                await broker.aclose()

    app = FastAPI(
        title="guardfleet",
        summary="Nemotron content-safety classification as a queue-driven worker fleet",
        lifespan=lifespan,
    )
    errors.install(app)
    for module in (jobs, batches, chat):
        app.include_router(
            module.router,
            dependencies=[Depends(require_api_key)],
            responses=errors.responses(401),
        )
    app.include_router(health.router)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        max_batch_bytes=settings.max_batch_body_bytes,
    )
    # Outermost, so every answer (413s included) carries the id and is counted, and every line
    # logs the id.
    app.add_middleware(ObserveRequests, access_log=settings.log_format == "json")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            app.openapi_schema = with_configured_limits(document, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def with_configured_limits(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What the route models cannot know because it is configuration: the chat token limit and
    the batch body (read raw, so FastAPI sees no model for it)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("max_tokens", "max_completion_tokens"):
        for branch in chat[field]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_chat_tokens
    _, defs = models_json_schema(
        [(BatchItem, "validation")], ref_template="#/components/schemas/{model}"
    )
    schemas.update(defs["$defs"])
    batch = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/BatchItem"},
        "minItems": 1,
        "maxItems": settings.max_batch_items,
        "description": "every `custom_id` must be unique within the batch",
    }
    for path in document["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                _absent_not_null(parameter["schema"])
    envelope_422 = errors.responses(422)[422]
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for path in document["paths"].values():
        for operation in path.values():
            # FastAPI's default 422 describes its own error shape; ours is the envelope.
            if "HTTPValidationError" in str(operation["responses"].get("422", "")):
                operation["responses"]["422"] = {
                    "description": envelope_422["description"],
                    "content": {"application/json": {"schema": envelope}},
                }
            for status, response in operation["responses"].items():
                # Errors are JSON whatever the route's success type (results are NDJSON).
                if int(status) >= 400 and "ErrorEnvelope" in str(response):
                    response["content"] = {"application/json": {"schema": envelope}}
            if operation.pop("x-batch-body", False):
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": batch}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def _absent_not_null(schema: dict[str, Any]) -> None:
    """An optional query or header parameter is left out, never null (HTTP has no null): drop
    the `null` branch FastAPI derives from `str | None`."""
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        del schema["anyOf"]
        schema.update(branches[0])


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` builds the app on first access, after the environment is final.
    if name == "app":
        settings = get_settings()
        logs.configure(settings.log_format)
        return create_app(settings)
    raise AttributeError(name)
