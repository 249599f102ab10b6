"""One error envelope for every 4xx/5xx, OpenAI style:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Validation errors name the offending field in `param`; malformed JSON is a 400; Redis being
unreachable, or refusing commands (out of memory, a read-only replica, still loading), is a 503;
anything unexpected is a 500 in the same shape (and logged).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Set by `api.request_ids` on every request; read here by the 500 handler, which runs outside
# that middleware.
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_SCOPE_KEY = "guardfleet.request_id"

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """The body of every 4xx and 5xx. Some errors add context beside `error`: a refused batch
    lists its bad lines in `errors`, a sync timeout names the still-running `job`."""

    model_config = ConfigDict(extra="allow")
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "malformed JSON, or an option this server does not support",
    401: "missing or invalid API key",
    404: "no such resource (unknown, or expired after its TTL) or model",
    409: "the resource is not in a state that allows this",
    413: "request body over the size limit",
    422: "a field is invalid (named in `param`)",
    429: "the bulk queue is full: nothing was queued; retry after `Retry-After` seconds",
    500: "the request could not be completed",
    503: "Redis is unavailable or refusing writes, or no worker can serve a sync call now "
    "(none ready, or too many calls waiting); retry after `Retry-After` seconds",
    504: "no answer within the sync timeout; the job still runs",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these error statuses, all in the envelope."""
    return {code: {"model": ErrorEnvelope, "description": _DESCRIPTIONS[code]} for code in codes}


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.extra = extra or {}
        self.headers = headers


def error_body(
    status_code: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The envelope; also sent as the last event of a stream that fails after it started."""
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status_code, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status_code: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status_code, message, code, param)
    body.update(extra or {})
    return JSONResponse(body, status_code=status_code, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(
        exc.status_code,
        exc.message,
        code=exc.code,
        param=exc.param,
        extra=exc.extra,
        headers=exc.headers,
    )


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json"
        )
    messages = [f"{_location(e['loc'])}: {e['msg']}" for e in errors]
    return error_response(
        422, "; ".join(messages), code="invalid_value", param=_location(errors[0]["loc"])
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _broker_down(_: Request, exc: Exception) -> JSONResponse:
    # Unreachable, timing out, or (behind Sentinel) no master elected yet: usually seconds.
    log.warning("redis unavailable: %s", exc)
    return error_response(
        503,
        f"the job queue (Redis) is unavailable: {exc}",
        code="queue_unavailable",
        headers={"Retry-After": "2"},
    )


async def _redis_refused(_: Request, exc: Exception) -> JSONResponse:
    # OOM, READONLY, MISCONF...: Redis is up but will not take writes now; the client may retry
    # once the operator has fixed it, so this is the service's condition, not the request's.
    log.warning("redis refused a command: %s", exc)
    return error_response(
        503,
        f"the job store (Redis) refused the request: {exc}",
        code="store_unavailable",
        headers={"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Runs outside the request-id middleware (Starlette answers 500s last), so the id comes
    # from the scope, where that middleware left it.
    request_id = request.scope.get(REQUEST_ID_SCOPE_KEY, "")
    log.exception("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return error_response(
        500,
        f"internal server error (request id {request_id})",
        code="internal_error",
        headers={REQUEST_ID_HEADER: request_id},
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _broker_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _broker_down)
    app.add_exception_handler(redis.exceptions.ResponseError, _redis_refused)
    app.add_exception_handler(OperationalError, _broker_down)
    app.add_exception_handler(Exception, _unexpected)
