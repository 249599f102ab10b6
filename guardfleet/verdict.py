"""Parse the model's text into a verdict, failing closed.

Accepted shapes (field names case-insensitive, as the model card writes `Response Harm`):

    [<think>\\n...\\n</think>\\n\\n]Prompt harm: harmful|unharmful
    [Response harm: harmful|unharmful|None]

A think block that never closes, a missing field or an unknown value raises a typed error that
carries the raw output: a guessed verdict would be worse than none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guardfleet.errors import TruncatedOutput, UnparseableOutput
from guardfleet.schemas import Harm

_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)
_FIELD = re.compile(r'^\s*"?(prompt|response)\s+harm\s*:\s*(\S+)\s*$', re.I | re.M)


@dataclass(frozen=True)
class ParsedVerdict:
    prompt_harm: Harm
    response_harm: Harm | None
    reasoning: str | None


def _harm(value: str, raw: str, field: str) -> Harm:
    try:
        return Harm(value.lower().strip('".,'))
    except ValueError:
        raise UnparseableOutput(
            f"{field} harm has value {value!r}, expected harmful or unharmful", raw
        ) from None


def split_reasoning(raw: str) -> tuple[str | None, str]:
    """Return (trace, rest): the think block's text and what follows it."""
    lowered = raw.lower()
    if "<think>" in lowered and "</think>" not in lowered:
        raise TruncatedOutput(
            "the reasoning trace has no closing </think>: max_new_tokens was too small", raw
        )
    match = _THINK.search(raw)
    if match is None:
        return None, raw
    return match.group(1).strip(), raw[match.end() :]


def parse_verdict(raw: str, *, expect_response: bool) -> ParsedVerdict:
    """`expect_response` is False for Template B, which has only the `Prompt harm:` line."""
    reasoning, rest = split_reasoning(raw)
    fields: dict[str, str] = {}
    for name, value in _FIELD.findall(rest):
        fields.setdefault(name.lower(), value)
    if "prompt" not in fields:
        raise UnparseableOutput("no 'Prompt harm:' line in the model output", raw)
    prompt_harm = _harm(fields["prompt"], raw, "Prompt")
    response_harm: Harm | None = None
    if expect_response:
        if "response" not in fields:
            raise UnparseableOutput("no 'Response harm:' line in the model output", raw)
        if fields["response"].lower().strip('".,') != "none":
            response_harm = _harm(fields["response"], raw, "Response")
    return ParsedVerdict(prompt_harm, response_harm, reasoning)


def label_span(raw: str, field: str) -> tuple[int, int] | None:
    """Character span of the value of `field` ("prompt" or "response") after any think block,
    used to find the generation step at which the label was decided."""
    match = _THINK.search(raw)
    start = match.end() if match else 0
    for m in _FIELD.finditer(raw, start):
        if m.group(1).lower() == field:
            return m.start(2), m.end(2)
    return None
