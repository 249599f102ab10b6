"""Live job events in Redis Streams: what the store and the worker write, how readers rebuild it.

A job that someone streams (a chat or classify call with `stream: true`, or a reader of
`GET /v1/jobs/{id}/events`) is *watched*: its record carries a `watch` field. For a watched job
the script that changes its status also adds the change to the job's stream, and the worker adds
the text it generates as deltas:

    kind=status  status=running   attempt=2
    kind=text    attempt=2  offset=118  delta="…"  tokens=31  t=1764460800.123

`offset` is how many characters of the attempt's text came before the delta; `t` is when its
newest token was generated (worker clock), so a reader can measure what the transport adds.

Why a stream and not pub/sub: entries stay (at most `MAX_ENTRIES`, expiring `TTL_S` after the
last write), so a reader that connects late, reconnects from the id it last saw, or reads slowly
still finds every delta, and the worker never waits for any reader. Offsets let a reader place
each delta exactly: one it has seen is recognised, a gap (entries trimmed or expired) is noticed
rather than glued over. The job record stays the source of truth: a reader that found a gap takes
the rest of the text from the finished job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from guardfleet.replies import as_text

MAX_ENTRIES = 10_000  # above any one attempt's token count (GUARDFLEET_MAX_CHAT_TOKENS <= 2048)
TTL_S = 600  # after the last entry; the finished job record outlives it

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def text_fields(
    attempt: int, offset: int, delta: str, tokens: int, t: float
) -> dict[FieldT, EncodableT]:
    return {
        "kind": "text",
        "attempt": attempt,
        "offset": offset,
        "delta": delta,
        "tokens": tokens,
        "t": f"{t:.6f}",
    }


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str  # "status" or "text"
    attempt: int
    status: str | None = None
    offset: int = 0
    delta: str = ""
    t: float | None = None

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: dict[Any, Any]) -> Entry:
        f = {as_text(k): as_text(v) for k, v in fields.items()}
        return cls(
            id=as_text(entry_id),
            kind=f.get("kind", ""),
            attempt=int(f.get("attempt", 0)),
            status=f.get("status"),
            offset=int(f.get("offset", 0)),
            delta=f.get("delta", ""),
            t=float(f["t"]) if "t" in f else None,
        )


class Transcript:
    """The text of a job's latest attempt, rebuilt from its entries in stream order."""

    def __init__(self) -> None:
        self.attempt = 0
        self.text = ""
        self.gap = False  # entries went missing: the text stops growing until the job ends

    def apply(self, entry: Entry) -> bool:
        """Take one entry; True when the text grew."""
        if entry.attempt > self.attempt:  # a new run of the job starts its text afresh
            self.attempt, self.text, self.gap = entry.attempt, "", False
        if entry.kind != "text" or entry.attempt < self.attempt or self.gap:
            return False
        if entry.offset > len(self.text):
            self.gap = True
            return False
        end = entry.offset + len(entry.delta)
        if end <= len(self.text):
            return False  # seen already
        self.text = self.text[: entry.offset] + entry.delta
        return True


class Diverged(Exception):
    """A retried attempt wrote text that differs from what a reader was already sent."""


def continuation(sent: str, text: str) -> str:
    """What of `text` is new to a reader that was sent `sent`.

    A job run again (its worker died) writes its text from the start; greedy decoding writes the
    same text, so the part already sent is skipped and the stream carries on seamlessly.
    """
    if len(text) <= len(sent):
        if sent.startswith(text):
            return ""
        raise Diverged(f"the retried generation differs after {_common(sent, text)} characters")
    if not text.startswith(sent):
        raise Diverged(f"the retried generation differs after {_common(sent, text)} characters")
    return text[len(sent) :]


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reasoning_so_far(raw: str) -> str | None:
    """The think trace in the model's text so far, without its tags: "" while that is not yet
    known, None once the text is known not to be a think block. A partly written closing tag
    is held back, so the result only ever grows as the text does."""
    body = raw.lstrip()
    if len(body) < len(THINK_OPEN):
        return "" if THINK_OPEN.startswith(body.lower()) else None
    if body[: len(THINK_OPEN)].lower() != THINK_OPEN:
        return None
    body = body[len(THINK_OPEN) :]
    end = body.lower().find(THINK_CLOSE)
    if end >= 0:
        return body[:end]
    for keep in range(min(len(THINK_CLOSE) - 1, len(body)), 0, -1):
        if THINK_CLOSE.startswith(body[-keep:].lower()):
            return body[:-keep]
    return body
