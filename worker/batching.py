"""Who joins the running set next: pure logic, no torch, no threads.

The model thread runs a set of rows one decode step at a time (continuous batching); between
steps it asks `admit()` which waiting requests to prefill and add. Two named knobs bound the set:

- `max_batch_size`: rows decoding or prefilling at once;
- `kv_budget_tokens`: KV cache cells. Rows are right-aligned in one cache, so it holds
  rows x the longest row; a row may grow to its prompt plus `max_new_tokens`, so admission
  counts rows x the largest such reservation and the cache never outgrows the budget.

Interactive requests (priority 0) go first, oldest first; bulk requests may fill the set only up
to `max_batch_size - interactive_reserve`, so a backlog of long bulk generations always leaves
room for a sync call to start at the next step. One admission shares one prefix (the KV of a
shared prefix is copied in, not recomputed); the others wait for the next step, which comes a
few milliseconds later.

`prefill_groups()` then cuts an admission into groups that are prefilled together. Prompts in a
group are padded to its longest, so groups hold prompts of similar length and at most
`chunk` padded tokens: a burst of 64 prompts of 20-400 tokens becomes many small groups that
start decoding one after another, instead of one group that computes twice its real tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    kv_budget_tokens: int = 1 << 18

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.kv_budget_tokens < 1:
            raise ValueError("batch policy values must be positive")

    @property
    def interactive_reserve(self) -> int:
        return self.max_batch_size // 8


@dataclass
class Pending(Generic[T]):
    item: T
    reserved: int  # prompt tokens + max_new_tokens: the KV cells the row may grow to
    prefill: int  # prompt tokens to compute (those after a shared prefix)
    prefix: Hashable  # rows of one prefill group share it
    priority: int  # 0 interactive, 1 bulk
    enqueued_at: float  # seconds, monotonic clock


def admit(
    waiting: list[Pending[T]], in_flight: Sequence[int], policy: BatchPolicy
) -> list[Pending[T]]:
    """Remove and return the next prefill group (maybe empty).

    `waiting` is in arrival order; `in_flight` holds the reservation of every row already
    running or prefilling.
    """
    rows, widest = len(in_flight), max(in_flight, default=0)
    chosen: list[Pending[T]] = []
    for candidate in sorted(waiting, key=lambda p: (p.priority, p.enqueued_at)):
        limit = policy.max_batch_size - (policy.interactive_reserve if candidate.priority else 0)
        wider = max(widest, candidate.reserved)
        if rows + 1 > limit or (rows + 1) * wider > policy.kv_budget_tokens:
            break  # strict order: a request that does not fit is not overtaken
        if chosen and candidate.prefix != chosen[0].prefix:
            continue
        chosen.append(candidate)
        rows, widest = rows + 1, wider
    taken = {id(p) for p in chosen}
    waiting[:] = [p for p in waiting if id(p) not in taken]
    return chosen


def prefill_groups(admitted: list[Pending[T]], chunk: int) -> list[list[Pending[T]]]:
    """Split an admission into groups of similar prompt length, each at most `chunk` padded
    tokens (a single longer prompt is a group of its own, prefilled in chunks)."""
    groups: list[list[Pending[T]]] = []
    for item in sorted(admitted, key=lambda p: p.prefill):
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * item.prefill <= chunk:
            group.append(item)
        else:
            groups.append([item])
    return groups
