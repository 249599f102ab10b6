"""Webhook retry rules and signatures, without a network."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from guardfleet.schemas import DeliveryAttempt, utcnow
from guardfleet.settings import Settings
from guardfleet.webhooks import (
    Outcome,
    StoredDelivery,
    next_delay,
    record,
    retry_after_s,
    sign,
)
from worker.webhook_transport import WebhookSender, attempt

SECRETS = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_dGhlIG5ldyBzZWNyZXQgYWZ0ZXIgcm90"]
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def delivery(url: str = "https://hooks.example/x") -> StoredDelivery:
    return StoredDelivery(
        webhook_id="msg_1",
        url=url,
        event="moderation.job.completed",
        payload='{"type":"moderation.job.completed"}',
    )


def test_each_secret_signs_and_each_signature_verifies() -> None:
    body = '{"a":1}'
    now = utcnow().replace(microsecond=0)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": sign(SECRETS, "msg_1", now, body),
    }
    assert len(headers["webhook-signature"].split(" ")) == len(SECRETS)
    for secret in SECRETS:  # a receiver holding either secret accepts it: rotation works
        assert Webhook(secret).verify(body, headers) == {"a": 1}
    with pytest.raises(Exception, match="No matching signature"):
        Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").verify(body, headers)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("999999", 86400.0),
        ("Sat, 28 Nov 2026 12:01:00 GMT", 60.0),
        ("soon", None),
        (None, None),
        ("", None),
    ],
)
def test_retry_after_parsing(value: str | None, seconds: float | None) -> None:
    assert retry_after_s(value, NOW) == seconds


def test_schedule_with_jitter_and_exhaustion() -> None:
    rng = random.Random(1)
    schedule = [0.0, 5.0, 300.0]
    assert next_delay(schedule, 0, rng) == 0.0
    assert 4.0 <= (next_delay(schedule, 1, rng) or 0) <= 6.0
    assert 240.0 <= (next_delay(schedule, 2, rng) or 0) <= 360.0
    assert next_delay(schedule, 3, rng) is None


def failed(code: int | None = 500, retry_after: float | None = None) -> Outcome:
    outcome = Outcome(DeliveryAttempt(at=NOW, status_code=code, duration_ms=1.0), "retry")
    outcome.retry_after_s = retry_after
    return outcome


def test_retry_after_overrides_the_schedule() -> None:
    settings = Settings(webhook_retry_schedule_s=[0.0, 5.0, 5.0])
    d = record(delivery(), failed(503, retry_after=120.0), settings, random.Random(0))
    assert d.status == "pending"
    assert d.next_attempt_at is not None
    assert d.next_attempt_at - utcnow() > timedelta(seconds=100)


def test_the_last_scheduled_failure_gives_up() -> None:
    settings = Settings(webhook_retry_schedule_s=[0.0, 1.0])
    d = delivery()
    for _ in range(2):
        d = record(d, failed(), settings, random.Random(0))
    assert (d.status, len(d.attempts), d.next_attempt_at) == ("failed", 2, None)


def test_delivery_rechecks_the_address_and_refuses_a_private_one() -> None:
    """DNS that changed since submit (a rebinding attack) is caught at delivery, unsent."""
    settings = Settings(webhook_secrets=SECRETS)
    outcome = attempt(
        delivery("https://rebound.example/x"),
        settings,
        WebhookSender(),
        resolver=lambda host, port: ["10.0.0.8"],
    )
    assert outcome.status == "refused"
    assert outcome.attempt.status_code is None
    assert "10.0.0.8" in (outcome.attempt.error or "")
    assert record(delivery(), outcome, settings, random.Random(0)).status == "failed"
