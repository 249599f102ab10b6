"""`Idempotency-Key` for creating jobs and batches.

The first request with a key claims it (SET NX, kept as long as results) together with a
fingerprint of its body and the id it will create. A retry with the same body gets the original
resource back; the same key with a different body is a 422. If creating fails, the claim is
released so the client can simply retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Header

from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import idempotency_key

MAX_KEY_LENGTH = 255

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="a retry with the same key and body returns the first result (200)",
    ),
]


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class Claim:
    replay_of: str | None  # the id created by the first request with this key, if any


@asynccontextmanager
async def claim(
    res: Resources, scope: str, key: str | None, body_fingerprint: str, new_id: str
) -> AsyncIterator[Claim]:
    if key is None:
        yield Claim(None)
        return
    if not key or len(key) > MAX_KEY_LENGTH:
        raise APIError(
            422,
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters",
            param="Idempotency-Key",
            code="invalid_value",
        )
    redis_key = idempotency_key(scope, key)
    record = json.dumps({"fingerprint": body_fingerprint, "id": new_id})
    if await res.redis.set(redis_key, record, nx=True, ex=res.settings.result_ttl_s):
        try:
            yield Claim(None)
        except BaseException:
            await res.redis.delete(redis_key)
            raise
        return
    raw = await res.redis.get(redis_key)
    existing = json.loads(raw) if raw else {}
    if existing.get("fingerprint") != body_fingerprint:
        raise APIError(
            422,
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    yield Claim(str(existing["id"]))
