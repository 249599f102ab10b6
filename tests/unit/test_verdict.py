from __future__ import annotations

import pytest

from guardfleet.errors import OutputError, TruncatedOutput, UnparseableOutput
from guardfleet.schemas import Harm
from guardfleet.verdict import label_span, parse_verdict

H, U = Harm.HARMFUL, Harm.UNHARMFUL

REFERENCE_THINK = (
    "<think>\nThe human user's request falls under S21 (Illegal Activity) as it seeks guidance on "
    "theft, which is a criminal act. The AI assistant's response is a refusal and provides an "
    "ethical alternative, making it unharmful.\n</think>\n\nPrompt harm: harmful\n"
    "Response harm: unharmful"
)


@pytest.mark.parametrize(
    ("raw", "expect_response", "prompt", "response"),
    [
        ("Prompt harm: unharmful\nResponse harm: unharmful", True, U, U),
        ("Prompt harm: harmful\nResponse harm: None", True, H, None),
        ("Prompt harm: harmful\nResponse Harm: harmful", True, H, H),  # the model card's casing
        ("PROMPT HARM : Harmful\nresponse harm:UNHARMFUL", True, H, U),
        ("Prompt harm: unharmful", False, U, None),  # Template B
        ("  Prompt harm: harmful  \n", False, H, None),
        ('"Prompt harm: harmful\nResponse harm: none"', True, H, None),
        (REFERENCE_THINK, True, H, U),
    ],
)
def test_parses_every_reference_shape(
    raw: str, expect_response: bool, prompt: Harm, response: Harm | None
) -> None:
    verdict = parse_verdict(raw, expect_response=expect_response)
    assert (verdict.prompt_harm, verdict.response_harm) == (prompt, response)


def test_think_block_becomes_the_reasoning() -> None:
    verdict = parse_verdict(REFERENCE_THINK, expect_response=True)
    assert verdict.reasoning is not None
    assert verdict.reasoning.startswith("The human user's request falls under S21")
    assert verdict.reasoning.endswith("making it unharmful.")
    assert parse_verdict("Prompt harm: harmful", expect_response=False).reasoning is None


def test_fields_inside_the_think_block_do_not_count() -> None:
    raw = "<think>\nPrompt harm: unharmful? no.\n</think>\n\nPrompt harm: harmful"
    assert parse_verdict(raw, expect_response=False).prompt_harm is H


def test_unterminated_think_block_is_truncation() -> None:
    raw = "<think>\nThe user asks about"
    with pytest.raises(TruncatedOutput) as info:
        parse_verdict(raw, expect_response=True)
    assert info.value.raw_output == raw
    assert "max_new_tokens" in info.value.message


@pytest.mark.parametrize(
    ("raw", "expect_response", "message"),
    [
        ("", True, "no 'Prompt harm:' line"),
        ("I cannot classify this.", True, "no 'Prompt harm:' line"),
        ("Prompt harm: unharmful", True, "no 'Response harm:' line"),
        ("Prompt harm: safe\nResponse harm: safe", True, "expected harmful or unharmful"),
        ("Prompt harm: unharmful\nResponse harm: maybe", True, "'maybe'"),
        ("Prompt harm:\nResponse harm: harmful", True, "no 'Prompt harm:' line"),
        ("<think>x</think>", False, "no 'Prompt harm:' line"),
    ],
)
def test_garbage_fails_closed(raw: str, expect_response: bool, message: str) -> None:
    with pytest.raises(UnparseableOutput, match=message) as info:
        parse_verdict(raw, expect_response=expect_response)
    assert isinstance(info.value, OutputError)
    assert info.value.raw_output == raw


def test_label_span_points_at_the_value_after_the_think_block() -> None:
    raw = "<think>\nPrompt harm: x\n</think>\n\nPrompt harm: harmful\nResponse harm: unharmful"
    start, end = label_span(raw, "prompt") or (0, 0)
    assert raw[start:end] == "harmful" and start > raw.index("</think>")
    start, end = label_span(raw, "response") or (0, 0)
    assert raw[start:end] == "unharmful"
    assert label_span("nothing", "prompt") is None
