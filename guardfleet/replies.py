"""Redis replies as Python text and bytes: our clients do not decode responses (job documents
are decoded once, by pydantic), so a reply may be bytes, or str where a test's client decodes."""

from __future__ import annotations

from typing import Any


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def optional_text(value: Any) -> str | None:
    """A field that may be missing (None stays None) or a number (as its text)."""
    return (
        None if value is None else as_text(value) if isinstance(value, bytes | str) else str(value)
    )
