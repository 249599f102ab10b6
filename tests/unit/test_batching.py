"""Admission into the running set: who joins next, and what bounds the set."""

from __future__ import annotations

import pytest

from worker.batching import BatchPolicy, Pending, admit, prefill_groups

POLICY = BatchPolicy(max_batch_size=8, kv_budget_tokens=1000)  # interactive reserve: 1 row


def waiting(*specs: tuple[int, str, int]) -> list[Pending[int]]:
    """(reserved tokens, prefix, priority) per request, in arrival order."""
    return [
        Pending(i, tokens, tokens, key, prio, float(i))
        for i, (tokens, key, prio) in enumerate(specs)
    ]


def test_an_idle_set_admits_everything_that_fits_at_once() -> None:
    queue = waiting(*[(100, "a", 0)] * 3)
    assert [p.item for p in admit(queue, [], POLICY)] == [0, 1, 2]
    assert queue == []


def test_rows_are_capped_by_max_batch_size() -> None:
    queue = waiting(*[(10, "a", 0)] * 12)
    assert len(admit(queue, [10, 10, 10], POLICY)) == 5
    assert len(queue) == 7


def test_the_budget_counts_rows_times_the_widest_reservation() -> None:
    # Rows are right-aligned in one cache: 4 rows x 200 fits in 1000 cells, a fifth does not.
    queue = waiting(*[(200, "a", 0)] * 6)
    assert len(admit(queue, [], POLICY)) == 5
    # One wide running row makes every row as expensive as it is.
    queue = waiting(*[(10, "a", 0)] * 6)
    assert len(admit(queue, [400], POLICY)) == 1


def test_interactive_requests_go_first_and_bulk_leaves_them_room() -> None:
    queue = waiting((10, "a", 1), (10, "a", 1), (10, "a", 0))
    assert [p.item for p in admit(queue, [], POLICY)] == [2, 0, 1]
    # Bulk may fill 7 of 8 rows; the last one is kept for a sync call.
    queue = waiting(*[(10, "a", 1)] * 3)
    assert len(admit(queue, [10] * 5, POLICY)) == 2
    assert len(admit(waiting((10, "a", 0)), [10] * 7, POLICY)) == 1


def test_a_group_shares_one_prefix_and_the_rest_waits() -> None:
    queue = waiting((10, "a", 0), (10, "b", 0), (10, "a", 0))
    assert [p.item for p in admit(queue, [], POLICY)] == [0, 2]
    assert [p.item for p in admit(queue, [], POLICY)] == [1]


def test_a_request_that_does_not_fit_is_not_overtaken() -> None:
    queue = waiting((900, "a", 0), (10, "a", 0))
    assert admit(queue, [100], POLICY) == []
    assert len(queue) == 2


def test_policy_values_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        BatchPolicy(max_batch_size=0)


def test_prefill_groups_hold_similar_lengths_within_the_chunk() -> None:
    admitted = waiting(*[(n, "a", 0) for n in (300, 20, 40, 25, 900, 35)])
    groups = [[p.prefill for p in g] for g in prefill_groups(admitted, chunk=128)]
    # Sorted by length; a group pads to its longest and stays within 128 padded tokens.
    assert groups == [[20, 25, 35], [40], [300], [900]]
    assert all(len(g) * max(g) <= 128 or len(g) == 1 for g in groups)
