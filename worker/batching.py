"""When to run a batch and what goes in it: pure logic, no torch, no threads.

Two named knobs decide *when* (`max_batch_size`, `max_wait_ms`) and one decides *how much*
(`max_batch_tokens`, counting padding: a batch costs rows x its longest prompt). Only requests
with the same generation key (sampling settings, max_new_tokens) may share a batch, because
`generate` takes one set of settings.

The oldest request always goes into the next batch of its key, so nothing starves; the rest of
the batch is filled with the requests closest to it in length, which keeps padding low.

Waiting only pays when more requests are on their way: the caller says whether any are
(`more_coming`: task threads that took a job but have not submitted it yet). At light load
nothing is coming and a request runs at once instead of idling for `max_wait_ms`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_batch_tokens: int = 32_768

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_wait_ms < 0 or self.max_batch_tokens < 1:
            raise ValueError("batch policy values must be positive")


@dataclass
class Pending(Generic[T]):
    item: T
    tokens: int
    key: Hashable
    enqueued_at: float  # seconds, monotonic clock


def padded_tokens(batch: list[Pending[T]]) -> int:
    return len(batch) * max(p.tokens for p in batch) if batch else 0


def _fill(group: list[Pending[T]], policy: BatchPolicy) -> list[Pending[T]]:
    oldest = group[0]
    chosen = [oldest]
    for candidate in sorted(group[1:], key=lambda p: abs(p.tokens - oldest.tokens)):
        if len(chosen) == policy.max_batch_size:
            break
        if padded_tokens([*chosen, candidate]) <= policy.max_batch_tokens:
            chosen.append(candidate)
    return chosen


def take_batch(
    pending: list[Pending[T]], now: float, policy: BatchPolicy, more_coming: bool = True
) -> list[Pending[T]]:
    """Remove and return the batch to run now, or return [] if it is better to wait.

    `pending` is in arrival order. A batch runs when it is full (by rows or by tokens), when
    its oldest request has waited `max_wait_ms`, or when nothing more is coming.
    """
    if not pending:
        return []
    oldest = pending[0]
    group = [p for p in pending if p.key == oldest.key]
    batch = _fill(group, policy)
    full = len(batch) == policy.max_batch_size or len(batch) < len(group)
    waited_ms = (now - oldest.enqueued_at) * 1000.0
    if not full and more_coming and waited_ms < policy.max_wait_ms:
        return []
    taken = {id(p) for p in batch}
    pending[:] = [p for p in pending if id(p) not in taken]
    return sorted(batch, key=lambda p: p.tokens)


def next_deadline(pending: list[Pending[T]], policy: BatchPolicy) -> float | None:
    """When the oldest request's wait runs out (monotonic seconds), or None if idle."""
    if not pending:
        return None
    return pending[0].enqueued_at + policy.max_wait_ms / 1000.0
