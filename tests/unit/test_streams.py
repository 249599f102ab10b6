"""Rebuilding a job's text from its stream entries, and what a reader is sent of it."""

from __future__ import annotations

import pytest

from guardfleet.streams import Diverged, Entry, Transcript, continuation, reasoning_so_far


def text(entry_id: int, attempt: int, offset: int, delta: str) -> Entry:
    return Entry(id=f"{entry_id}-0", kind="text", attempt=attempt, offset=offset, delta=delta)


def running(entry_id: int, attempt: int) -> Entry:
    return Entry(id=f"{entry_id}-0", kind="status", attempt=attempt, status="running")


def test_deltas_in_order_make_the_text_and_repeats_are_ignored() -> None:
    t = Transcript()
    assert t.apply(running(1, 1)) is False
    assert t.apply(text(2, 1, 0, "<think>")) is True
    assert t.apply(text(3, 1, 7, "\nA")) is True
    assert t.apply(text(3, 1, 7, "\nA")) is False  # read twice (a reconnect): not doubled
    assert t.text == "<think>\nA"


def test_a_gap_stops_the_text_instead_of_gluing_it_wrong() -> None:
    t = Transcript()
    t.apply(text(1, 1, 0, "abc"))
    assert t.apply(text(3, 1, 6, "ghi")) is False  # "def" was trimmed away
    assert t.gap and t.text == "abc"
    assert t.apply(text(4, 1, 9, "jkl")) is False


def test_a_new_attempt_starts_the_text_afresh() -> None:
    t = Transcript()
    t.apply(text(1, 1, 0, "abc"))
    t.apply(running(2, 2))
    assert (t.attempt, t.text) == (2, "")
    assert t.apply(text(3, 1, 3, "late")) is False  # a straggler of the old attempt
    assert t.apply(text(4, 2, 0, "ab")) is True and t.text == "ab"


def test_a_retried_generation_continues_where_the_reader_was() -> None:
    assert continuation("", "abc") == "abc"
    assert continuation("abc", "ab") == ""  # the rerun has not caught up yet
    assert continuation("abc", "abcdef") == "def"
    with pytest.raises(Diverged):
        continuation("abc", "abX")
    with pytest.raises(Diverged):
        continuation("abc", "abXdef")


@pytest.mark.parametrize(
    ("raw", "trace"),
    [
        ("", ""),
        ("<thi", ""),  # not known yet
        ("Prompt harm: harmful", None),
        ("<think>\nThe user", "\nThe user"),
        ("<think>\nThe user</th", "\nThe user"),  # a closing tag in the making is held back
        ("<think>\nThe user <b>", "\nThe user <b>"),
        ("<think>\nThe user</think>\n\nPrompt harm: harmful", "\nThe user"),
        ("<THINK>x</Think>", "x"),
    ],
)
def test_the_trace_so_far(raw: str, trace: str | None) -> None:
    assert reasoning_so_far(raw) == trace


def test_the_trace_only_grows_as_the_text_does() -> None:
    raw = "<think>\nA < B, and </thin is not a tag</think>\nPrompt harm: unharmful"
    seen = ""
    for end in range(len(raw) + 1):
        trace = reasoning_so_far(raw[:end])
        if trace is None:
            continue
        assert trace.startswith(seen), (raw[:end], trace, seen)
        seen = trace
    assert seen == "\nA < B, and </thin is not a tag"
