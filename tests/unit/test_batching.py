from __future__ import annotations

import pytest

from worker.batching import BatchPolicy, Pending, next_deadline, padded_tokens, take_batch

POLICY = BatchPolicy(max_batch_size=4, max_wait_ms=10, max_batch_tokens=1000)


def pending(*specs: tuple[int, str, float]) -> list[Pending[int]]:
    return [Pending(i, tokens, key, at) for i, (tokens, key, at) in enumerate(specs)]


def test_waits_while_not_full_and_young() -> None:
    queue = pending((10, "a", 0.0), (10, "a", 0.001))
    assert take_batch(queue, now=0.005, policy=POLICY) == []
    assert len(queue) == 2
    assert next_deadline(queue, POLICY) == pytest.approx(0.010)


def test_flushes_when_the_oldest_has_waited_long_enough() -> None:
    queue = pending((10, "a", 0.0), (12, "a", 0.001))
    batch = take_batch(queue, now=0.011, policy=POLICY)
    assert [p.item for p in batch] == [0, 1] and queue == []


def test_flushes_at_once_when_full_by_rows() -> None:
    queue = pending(*[(10, "a", 0.0)] * 6)
    batch = take_batch(queue, now=0.0, policy=POLICY)
    assert len(batch) == 4 and len(queue) == 2


def test_flushes_at_once_when_full_by_padded_tokens() -> None:
    # 3 rows x 400 = 1200 > 1000: only two fit, so the batch is full with two.
    queue = pending((400, "a", 0.0), (400, "a", 0.0), (400, "a", 0.0))
    batch = take_batch(queue, now=0.0, policy=POLICY)
    assert len(batch) == 2 and padded_tokens(batch) == 800


def test_only_one_generation_key_per_batch_and_oldest_first() -> None:
    queue = pending((10, "think", 0.0), (10, "no_think", 0.0), (10, "think", 0.0))
    batch = take_batch(queue, now=1.0, policy=POLICY)
    assert {p.key for p in batch} == {"think"} and [p.item for p in batch] == [0, 2]
    assert [p.item for p in take_batch(queue, now=1.0, policy=POLICY)] == [1]


def test_fills_with_similar_lengths_to_save_padding() -> None:
    queue = pending(
        (100, "a", 0.0), (900, "a", 0.0), (110, "a", 0.0), (95, "a", 0.0), (105, "a", 0.0)
    )
    batch = take_batch(queue, now=1.0, policy=POLICY)
    assert sorted(p.tokens for p in batch) == [95, 100, 105, 110]
    assert [p.tokens for p in queue] == [900]


def test_an_oversized_request_still_runs_alone() -> None:
    queue = pending((5000, "a", 0.0))
    assert [p.tokens for p in take_batch(queue, now=1.0, policy=POLICY)] == [5000]


def test_empty_queue() -> None:
    assert take_batch([], now=0.0, policy=POLICY) == []
    assert next_deadline([], POLICY) is None


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        BatchPolicy(max_batch_size=0)


def test_runs_at_once_when_nothing_more_is_coming() -> None:
    queue = pending((10, "a", 0.0))
    assert take_batch(queue, now=0.001, policy=POLICY, more_coming=True) == []
    assert [p.item for p in take_batch(queue, now=0.001, policy=POLICY, more_coming=False)] == [0]
