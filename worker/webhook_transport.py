"""The delivery worker's HTTP side of webhooks: one POST per attempt, bounded in every way a
receiver could abuse.

- Address pinning: the URL is checked again (DNS may have changed since submit) and the
  connection goes to the address that passed, with the callback's own Host header and TLS server
  name, so the certificate is verified for the host the client named.
- No connection reuse: every attempt opens its own connection and closes it. A pool keyed by
  origin would be keyed by the pinned IP, so a connection whose certificate was checked for one
  callback host could carry another host's delivery on the same IP; keying a pool by (host, IP,
  port) would be safe too, but deliveries go to many receivers, one POST per job, and the reuse
  it would buy is small next to getting that key wrong.
- Bounded time: `GUARDFLEET_WEBHOOK_TIMEOUT_S` is the deadline for the whole attempt (connect,
  TLS, sending, the response's headers and body). Every socket operation waits at most what is
  left of it, and connecting at most CONNECT_TIMEOUT_S, so a receiver that answers one byte at a
  time cannot hold a delivery thread for longer.
- Bounded memory: the status line and headers decide the outcome; at most MAX_BODY_BYTES of
  the body are read, then the connection is closed.
"""

from __future__ import annotations

import ssl
import time
import typing
from collections.abc import Iterable
from datetime import UTC, datetime

import certifi
import httpcore

from guardfleet.schemas import DeliveryAttempt, utcnow
from guardfleet.settings import Settings
from guardfleet.ssrf import AllowList, Resolver, UnsafeURL, check_url, resolve
from guardfleet.webhooks import Outcome, StoredDelivery, retry_after_s, sign

MAX_BODY_BYTES = 4096
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "guardfleet-webhooks/1"

_Timeout = type[httpcore.TimeoutException]


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every read, write and handshake ends by `deadline` (monotonic)."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self.inner = inner
        self.deadline = deadline

    def _left(self, timeout: float | None, error: _Timeout) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error("the attempt's deadline has passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self.inner.start_tls(ssl_context, server_hostname, left), self.deadline
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self.inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: float) -> None:
        self.inner = httpcore.SyncBackend()
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the attempt's deadline has passed")
        timeout = left if timeout is None else min(timeout, left)
        stream = self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("webhooks are delivered over TCP only")


class WebhookSender:
    """What the delivery worker keeps between attempts: only the TLS trust settings (a
    certificate store is costly to load). Connections are never kept; see the module doc."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        # certifi's roots, as httpx uses: the same receivers verify as before.
        self.ssl_context = ssl_context or ssl.create_default_context(cafile=certifi.where())


def attempt(
    delivery: StoredDelivery,
    settings: Settings,
    sender: WebhookSender,
    resolver: Resolver = resolve,
) -> Outcome:
    """One POST of `delivery`, never longer than `settings.webhook_timeout_s` in total."""
    started, at = time.perf_counter(), utcnow()
    deadline = time.monotonic() + settings.webhook_timeout_s

    def done(status: str, code: int | None = None, error: str | None = None) -> Outcome:
        ms = (time.perf_counter() - started) * 1000
        record = DeliveryAttempt(at=at, status_code=code, error=error, duration_ms=round(ms, 1))
        return Outcome(record, status)

    try:
        checked = check_url(delivery.url, AllowList(settings.webhook_allow), resolver)
    except UnsafeURL as exc:
        return done("refused", error=f"refused: {exc}")
    timestamp = utcnow().replace(microsecond=0)
    default_port = 443 if checked.scheme == "https" else 80
    host_header = checked.host if checked.port == default_port else f"{checked.host}:{checked.port}"
    headers = {
        "host": host_header,
        "content-type": "application/json",
        "accept": "*/*",
        "user-agent": USER_AGENT,
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": sign(
            settings.webhook_secrets, delivery.webhook_id, timestamp, delivery.payload
        ),
    }
    origin = httpcore.Origin(checked.scheme.encode(), str(checked.address).encode(), checked.port)
    url = httpcore.URL(
        scheme=origin.scheme, host=origin.host, port=origin.port, target=checked.path.encode()
    )
    phase = settings.webhook_timeout_s
    extensions: dict[str, typing.Any] = {
        "timeout": {"connect": min(CONNECT_TIMEOUT_S, phase), "read": phase, "write": phase}
    }
    if checked.scheme == "https":
        extensions["sni_hostname"] = checked.host
    connection = httpcore.HTTPConnection(
        origin,
        ssl_context=sender.ssl_context if checked.scheme == "https" else None,
        network_backend=_DeadlineBackend(deadline),
    )
    try:
        with (
            connection,
            connection.stream(
                "POST",
                url,
                headers=list(headers.items()),
                content=delivery.payload.encode(),
                extensions=extensions,
            ) as response,
        ):
            code = response.status
            retry_after = _header(response.headers, b"retry-after")
            _drain(response)
    except httpcore.TimeoutException:
        return done("retry", error=f"timed out after {settings.webhook_timeout_s:g}s")
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        return done("retry", error=f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= code < 300:
        return done("delivered", code)
    if code == 410:
        return done("gone", code, "410 Gone: the receiver asked for no more deliveries")
    outcome = done(
        "retry",
        code,
        f"HTTP {code}" + (" (redirects are not followed)" if 300 <= code < 400 else ""),
    )
    outcome.retry_after_s = retry_after_s(retry_after, datetime.now(UTC))
    return outcome


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _drain(response: httpcore.Response) -> None:
    """Read a small body to its end, and at most MAX_BODY_BYTES of a large one: the status has
    already decided the outcome, so a body that is slow, endless or broken changes nothing."""
    seen = 0
    try:
        for chunk in response.iter_stream():
            seen += len(chunk)
            if seen >= MAX_BODY_BYTES:
                return
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
        return
