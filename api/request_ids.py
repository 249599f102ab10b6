"""Every request observed once, outermost: its X-Request-ID (taken from the caller or made
here, returned on every answer, written on every log line of the request: `guardfleet.logs`),
its metrics (`api.metrics`), and, with JSON logs, its access line.

A caller's id is used when it looks like one: 20 to 200 characters of letters, digits and
`+/=@-_.:` (Heroku's rule, widened by `_.:`); anything else is replaced, never refused, since a
tracing header should not fail a request, and never logged as sent, since it is untrusted text.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.errors import REQUEST_ID_HEADER, REQUEST_ID_SCOPE_KEY
from guardfleet import logs

_VALID = re.compile(r"[A-Za-z0-9+/=@\-_.:]{20,200}")

access = logging.getLogger("api.access")


def choose(sent: str | None) -> str:
    return sent if sent is not None and _VALID.fullmatch(sent) else uuid.uuid4().hex


class ObserveRequests:
    """ASGI middleware; with `access_log`, one line per answered request (JSON logs replace
    uvicorn's access lines with these)."""

    def __init__(self, app: ASGIApp, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        request_id = choose(sent.decode("latin-1") if sent is not None else None)
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        started = time.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with logs.scope(request_id=request_id):
            try:
                await self.app(scope, receive, sending)
            finally:
                seconds = time.monotonic() - started
                # The route template, once routing has run (a 413 from BodyLimit never gets one).
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.record_request(route, scope["method"], status, seconds)
                if self.access_log:
                    access.info(
                        "%s %s %d",
                        scope["method"],
                        scope["path"],
                        status,
                        extra={
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "duration_ms": round(seconds * 1000, 1),
                        },
                    )
