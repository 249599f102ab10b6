"""Reading a batch upload: JSONL (one request per line) or a JSON array, every item with a
`custom_id`. The API checks an upload whole before accepting it, and the fan-out reads the same
stored bytes again with the same function, so both see exactly the same items in the same order.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from guardfleet.errors import InvalidBatch
from guardfleet.schemas import BatchItem

MAX_REPORTED_ERRORS = 100


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in exc.errors()
    )


def _rows(body: bytes) -> list[tuple[int, Any]]:
    """(line number, decoded JSON or the decoding error) per non-blank line, or per element of
    a JSON array when the body starts with `[` (content types are unreliable:
    `application/x-ndjson`, `application/jsonl` and `text/plain` are all seen for JSONL)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBatch(f"batch body is not UTF-8: {exc}", 400, "invalid_encoding") from exc
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidBatch(f"batch body is not valid JSON: {exc}", 400, "invalid_json") from exc
        if not isinstance(rows, list):
            raise InvalidBatch("a JSON batch must be an array of requests", 422, "invalid_value")
        return list(enumerate(rows, start=1))
    lines: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            lines.append((number, exc))
    return lines


def parse_items(body: bytes, max_items: int) -> list[BatchItem]:
    """Every item of the upload, or InvalidBatch naming each bad line (the first
    MAX_REPORTED_ERRORS of them; the message says how many there were)."""
    lines = _rows(body)
    if not lines:
        raise InvalidBatch("the batch has no requests", 422, "empty_batch")
    if len(lines) > max_items:
        raise InvalidBatch(
            f"the batch has {len(lines)} requests; at most {max_items} "
            "(GUARDFLEET_MAX_BATCH_ITEMS)",
            422,
            "batch_too_large",
        )
    items: list[BatchItem] = []
    problems: list[dict[str, object]] = []
    seen: dict[str, int] = {}
    for number, row in lines:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"invalid JSON: {row}")
            item = BatchItem.model_validate(row)
            if item.custom_id in seen:
                raise ValueError(
                    f"custom_id {item.custom_id!r} repeats line {seen[item.custom_id]}"
                )
            seen[item.custom_id] = number
            items.append(item)
        except ValidationError as exc:
            problems.append({"line": number, "message": _errors(exc)})
        except ValueError as exc:
            problems.append({"line": number, "message": str(exc)})
    if problems:
        summary = "; ".join(f"line {p['line']}: {p['message']}" for p in problems[:3])
        raise InvalidBatch(
            f"{len(problems)} invalid line(s), nothing was queued: {summary}",
            422,
            "invalid_batch",
            problems[:MAX_REPORTED_ERRORS],
        )
    return items
