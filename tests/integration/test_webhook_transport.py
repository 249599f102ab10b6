"""One delivery attempt against real local receivers: TLS server-name checks on the pinned
address, no connection shared between callback hosts, and receivers that try to hold the
delivery worker (a huge body, a slow drip). Servers count what they managed to send, so the
assertions are about bytes and connections, not about how fast this machine is."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from guardfleet.settings import Settings
from guardfleet.webhooks import StoredDelivery
from worker.webhook_transport import WebhookSender, attempt

SECRETS = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
HOST_A, HOST_B = "hooks-a.example", "hooks-b.example"


def delivery(url: str) -> StoredDelivery:
    return StoredDelivery(
        webhook_id="msg_t", url=url, event="moderation.job.completed", payload='{"ok":true}'
    )


def to_loopback(host: str, port: int) -> list[str]:
    """Both callback names live on one address, as on a shared hosting or ingress IP."""
    return ["127.0.0.1"]


@dataclass
class TLSReceiver:
    port: int
    server_names: list[str | None] = field(default_factory=list)  # SNI, per TLS handshake
    connections: list[int] = field(default_factory=list)  # client port, per request
    hosts: list[str] = field(default_factory=list)  # Host header, per request


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_receiver(ca: trustme.CA, request: pytest.FixtureRequest) -> Iterator[TLSReceiver]:
    """An HTTPS receiver on 127.0.0.1 with keep-alive, whose certificate names the hosts given
    by the test's `cert_names` parameter."""
    names: list[str] = request.param
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    state: dict[str, TLSReceiver] = {}

    def on_sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        state["r"].server_names.append(name)

    context.sni_callback = on_sni

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep the connection open for reuse

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            state["r"].connections.append(self.client_address[1])
            state["r"].hosts.append(self.headers["host"])
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def get_request(self) -> tuple[Any, Any]:
            sock, addr = self.socket.accept()
            return context.wrap_socket(sock, server_side=True), addr

    server = Server(("127.0.0.1", 0), Handler)
    state["r"] = TLSReceiver(server.server_port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state["r"]
    server.shutdown()
    server.server_close()


def sender_trusting(ca: trustme.CA) -> WebhookSender:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return WebhookSender(context)


SETTINGS = Settings(webhook_secrets=SECRETS, webhook_allow=[HOST_A, HOST_B], webhook_timeout_s=10)


@pytest.mark.parametrize("tls_receiver", [[HOST_A]], indirect=True)
def test_the_certificate_is_checked_for_the_callback_host_on_the_pinned_address(
    tls_receiver: TLSReceiver, ca: trustme.CA
) -> None:
    """The receiver's certificate names only hooks-a; hooks-b shares its address. A delivery to
    hooks-b must fail verification, even right after hooks-a's succeeded on that address."""
    sender = sender_trusting(ca)
    url = f"https://{HOST_A}:{tls_receiver.port}/a"
    outcome = attempt(delivery(url), SETTINGS, sender, to_loopback)
    assert (outcome.status, outcome.attempt.status_code) == ("delivered", 200)
    assert tls_receiver.server_names == [HOST_A]
    assert tls_receiver.hosts == [f"{HOST_A}:{tls_receiver.port}"]

    other = attempt(
        delivery(f"https://{HOST_B}:{tls_receiver.port}/b"), SETTINGS, sender, to_loopback
    )
    assert other.status == "retry"
    assert "certificate verify failed" in (other.attempt.error or ""), other.attempt.error
    assert tls_receiver.hosts == [f"{HOST_A}:{tls_receiver.port}"], "nothing reached it for b"


@pytest.mark.parametrize("tls_receiver", [[HOST_A, HOST_B]], indirect=True)
def test_two_hosts_on_one_address_never_share_a_connection(
    tls_receiver: TLSReceiver, ca: trustme.CA
) -> None:
    sender = sender_trusting(ca)
    for host in (HOST_A, HOST_B, HOST_A):
        url = f"https://{host}:{tls_receiver.port}/x"
        assert attempt(delivery(url), SETTINGS, sender, to_loopback).status == "delivered"
    assert tls_receiver.server_names == [HOST_A, HOST_B, HOST_A]  # one handshake each
    assert len(set(tls_receiver.connections)) == 3


@dataclass
class RawReceiver:
    """A TCP server for one connection, answering with whatever `talk` writes; `sent` counts
    the bytes it wrote before the client hung up (or it finished)."""

    port: int
    thread: threading.Thread
    sent: int = 0

    def wait(self) -> int:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the receiver never saw the client hang up"
        return self.sent


Talk = Callable[[socket.socket], Iterator[bytes]]


def raw_receiver(talk: Talk) -> RawReceiver:
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = RawReceiver(listener.getsockname()[1], threading.Thread())

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)  # the request: small, arrives at once
            try:
                for chunk in talk(conn):
                    conn.sendall(chunk)
                    receiver.sent += len(chunk)
            except OSError:  # the client closed: what we wanted to see
                pass

    receiver.thread = threading.Thread(target=serve, daemon=True)
    receiver.thread.start()
    return receiver


HUGE = 256 * 1024 * 1024


def huge_body(conn: socket.socket) -> Iterator[bytes]:
    yield f"HTTP/1.1 200 OK\r\ncontent-length: {HUGE}\r\n\r\n".encode()
    chunk = b"\0" * 65536
    for _ in range(HUGE // len(chunk)):
        yield chunk


def drip(prefix: bytes) -> Talk:
    def talk(conn: socket.socket) -> Iterator[bytes]:
        yield prefix
        for _ in range(200):  # 10 s at this pace unless the client hangs up
            time.sleep(0.05)
            yield b"x"

    return talk


LOCAL = Settings(webhook_secrets=SECRETS, webhook_allow=["127.0.0.1"], webhook_timeout_s=1)


def test_a_huge_body_is_not_read() -> None:
    receiver = raw_receiver(huge_body)
    outcome = attempt(delivery(f"http://127.0.0.1:{receiver.port}/"), LOCAL, WebhookSender())
    assert (outcome.status, outcome.attempt.status_code) == ("delivered", 200)
    # What it could push before noticing: socket buffers, not the 256 MiB it offered.
    assert receiver.wait() < 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("prefix", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nx-slow: ", "retry"),  # headers that never end: no answer
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", "delivered"),  # body drips
    ],
)
def test_a_slow_drip_is_cut_at_the_attempts_deadline(prefix: bytes, status: str) -> None:
    """Every byte comes well within the per-read timeout; only a deadline for the whole
    attempt ends it, long before the 200 bytes the receiver would drip."""
    receiver = raw_receiver(drip(prefix))
    outcome = attempt(delivery(f"http://127.0.0.1:{receiver.port}/"), LOCAL, WebhookSender())
    assert outcome.status == status, outcome.attempt
    if status == "retry":
        assert outcome.attempt.error == "timed out after 1s"
    assert receiver.wait() - len(prefix) < 200
