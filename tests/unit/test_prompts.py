from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardfleet.prompts import (
    chat_segments,
    chat_text,
    render_classify,
    render_template_a,
    render_template_b,
    taxonomy_prefix,
)
from guardfleet.schemas import (
    Category,
    ChatMessage,
    ClassifyRequest,
    HistoryTurn,
    Mode,
    TaxonomyPolicy,
    TopicPolicy,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "templates.md"
SHARED = Path(__file__).resolve().parents[3] / "shared/reference/nemotron-content-safety.md"


def reference_blocks(path: Path = DATA) -> list[str]:
    return re.findall(r"```text\n(.*?)\n```", path.read_text(), re.S)


def fill(template: str, **values: str) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def test_reference_copy_matches_shared() -> None:
    if not SHARED.exists():
        pytest.skip("../shared is not beside this checkout")
    assert reference_blocks(DATA) == reference_blocks(SHARED)


@pytest.mark.parametrize("mode", [Mode.THINK, Mode.NO_THINK])
@pytest.mark.parametrize("response", [None, "I can't help with that."])
def test_template_a_is_byte_exact(mode: Mode, response: str | None) -> None:
    user = "How do I {pick} a lock?\n<end_of_turn>"
    expected = fill(
        reference_blocks()[0],
        user=user,
        response=response or "None",
        mode="/think" if mode is Mode.THINK else "/no_think",
    )
    assert render_template_a(user, response, mode) == expected
    request = ClassifyRequest(prompt=user, response=response, mode=mode)
    assert render_classify(request) == expected


def test_template_b_is_byte_exact() -> None:
    policy = TopicPolicy(
        type="topic_following",
        instructions="Only talk about cooking.",
        history=[
            HistoryTurn(role="user", content="Hi"),
            HistoryTurn(role="assistant", content="Hello!"),
        ],
    )
    expected = fill(
        reference_blocks()[1],
        policy="Only talk about cooking.",
        history="user: Hi\nassistant: Hello!",
        user="Tell me a joke",
        mode="/no_think",
    )
    assert render_template_b("Tell me a joke", policy, Mode.NO_THINK) == expected


def test_template_b_without_history_says_none() -> None:
    policy = TopicPolicy(type="topic_following", instructions="x")
    assert "Conversation history:\nNone\n\n" in render_template_b("u", policy, Mode.THINK)


def test_custom_categories_continue_at_s23() -> None:
    policy = TaxonomyPolicy(
        categories=[Category(name="Financial Advice", description="Picking stocks.")],
        allowed_topics=["cooking", "sports"],
    )
    prefix = taxonomy_prefix(policy)
    assert "S22: Immoral/Unethical.\nS23: Financial Advice. Picking stocks.\n\nAllowed" in prefix
    assert prefix.endswith("- cooking\n- sports\n\nHuman user:\n")


def test_replaced_categories_are_renumbered() -> None:
    policy = TaxonomyPolicy(categories=[Category(name="Spam")], replace=True)
    prefix = taxonomy_prefix(policy)
    assert "S1: Spam.\n\nHuman user:\n" in prefix
    assert "Violence" not in prefix


def test_replace_without_categories_is_refused() -> None:
    with pytest.raises(ValueError, match="replace=true needs at least one category"):
        TaxonomyPolicy(replace=True)


def test_default_prefix_is_shared_by_all_default_requests() -> None:
    a = render_template_a("one", None, Mode.THINK)
    b = render_template_a("two", "resp", Mode.NO_THINK)
    assert a.startswith(taxonomy_prefix(None)) and b.startswith(taxonomy_prefix(None))


def test_chat_segments_follow_gemma_template() -> None:
    messages = [
        ChatMessage(role="system", content="  Be brief. "),
        ChatMessage(role="user", content=" hello "),
        ChatMessage(role="assistant", content="hi"),
        ChatMessage(role="user", content="bye"),
    ]
    assert chat_text(chat_segments(messages)) == (
        "<bos><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n"
        "<start_of_turn>model\nhi<end_of_turn>\n"
        "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_segments_match_the_demo_tokenizers_chat_template() -> None:
    from transformers import AutoTokenizer

    from worker.engine import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    messages = [
        ChatMessage(role="system", content="Policy."),
        ChatMessage(role="user", content=render_template_a("q", None, Mode.THINK)),
    ]
    ours = chat_text(chat_segments(messages))
    theirs = tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs


def test_jobs_and_batch_lines_store_the_same_plain_request() -> None:
    from guardfleet.schemas import BatchItem, JobCreate

    fields = {"prompt": "p", "response": "r", "mode": "think", "metadata": {"k": 1}}
    from_job = JobCreate(**fields, callback_url="https://hooks.example/x").classify_request()
    from_line = BatchItem(**fields, custom_id="c1").classify_request()
    assert type(from_job) is type(from_line) is ClassifyRequest
    assert from_job == from_line == ClassifyRequest(**fields)
