"""`Idempotency-Key` for creating jobs and batches.

Keys belong to the caller: each is stored under a digest of the caller's API key (or
"anonymous" when the server has no keys), so two callers who happen to pick the same key never
see each other's resources.

The first request with a key claims it with a fingerprint of its body and the id it will
create, as *pending* and only for `PENDING_TTL_S`; once the resource is created and queued the
claim is marked *done* and kept as long as results. So:
- a retry with the same body gets the original resource once it exists (200, replayed), and a
  `409 idempotency_in_progress` with `Retry-After` while the first request is still at work;
- the same key with a different body is a 422;
- a failure releases the claim at once, and a crash (the process died mid-request) leaves a
  pending claim that expires after `PENDING_TTL_S`: the key is never poisoned for a day.
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
PENDING_TTL_S = 30

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
    res: Resources,
    scope: str,
    key: str | None,
    body_fingerprint: str,
    new_id: str,
    caller: str,
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
    redis_key = idempotency_key(f"{scope}:{caller}", key)
    record = {"fingerprint": body_fingerprint, "id": new_id, "state": "pending"}
    if await res.redis.set(redis_key, json.dumps(record), nx=True, ex=PENDING_TTL_S):
        try:
            yield Claim(None)
        except BaseException:
            await res.redis.delete(redis_key)
            raise
        record["state"] = "done"
        await res.redis.set(redis_key, json.dumps(record), xx=True, ex=res.settings.result_ttl_s)
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
    if existing.get("state") != "done":
        raise APIError(
            409,
            "a request with this Idempotency-Key is still being processed; retry shortly",
            code="idempotency_in_progress",
            headers={"Retry-After": "1"},
        )
    yield Claim(str(existing["id"]))
