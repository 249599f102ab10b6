"""From a job request to token ids, and from generated tokens to a verdict or a completion."""

from __future__ import annotations

import math

from guardfleet.errors import InputTooLong, OutputError, TruncatedOutput
from guardfleet.prompts import (
    BOS,
    START_OF_TURN,
    chat_segments,
    expects_response_verdict,
    render_classify,
    taxonomy_prefix,
)
from guardfleet.schemas import (
    ChatInput,
    ChatMessage,
    ClassifyRequest,
    Completion,
    Harm,
    Mode,
    Scores,
    TopicPolicy,
    Verdict,
)
from guardfleet.settings import Settings
from guardfleet.verdict import label_span, parse_verdict
from worker.engine import Engine, GenRequest
from worker.runner import Timed

_PREFIX_IDS: dict[tuple[int, str], list[int]] = {}
_PREFIX_IDS_MAX = 256


def shared_prefix_len(engine: Engine, ids: list[int], request: ClassifyRequest) -> int:
    """How many leading tokens of `ids` are the taxonomy prefix shared by every request with
    this policy (0 for Template B). The prefix's last token is left out because it may merge
    with the start of the user's text, and the result is checked against the actual ids, so a
    tokenizer that merges across the boundary only loses the reuse, never the right answer."""
    if isinstance(request.policy, TopicPolicy):
        return 0
    text = "user\n" + taxonomy_prefix(request.policy)
    key = (id(engine.tokenizer), text)
    prefix = _PREFIX_IDS.get(key)
    if prefix is None:
        if len(_PREFIX_IDS) >= _PREFIX_IDS_MAX:
            _PREFIX_IDS.clear()
        prefix = _PREFIX_IDS[key] = engine.encoder.segments([BOS, START_OF_TURN, text])
    n = len(prefix) - 1
    return n if n > 0 and ids[:n] == prefix[:n] else 0


def prepare(request: ClassifyRequest | ChatInput, engine: Engine, settings: Settings) -> GenRequest:
    if isinstance(request, ClassifyRequest):
        messages = [ChatMessage(role="user", content=render_classify(request))]
        max_new = (
            settings.max_new_tokens_think
            if request.mode is Mode.THINK
            else settings.max_new_tokens_no_think
        )
        temperature, top_p, seed = 0.0, 1.0, None  # classification is always greedy
    else:
        messages = request.messages
        max_new = request.max_tokens
        temperature, top_p, seed = request.temperature, request.top_p, request.seed
    ids = engine.encoder.segments(chat_segments(messages))
    if len(ids) > settings.max_input_tokens:
        raise InputTooLong(
            f"input is {len(ids)} tokens; this service accepts at most "
            f"{settings.max_input_tokens} (GUARDFLEET_MAX_INPUT_TOKENS)"
        )
    prefix_len = (
        shared_prefix_len(engine, ids, request) if isinstance(request, ClassifyRequest) else 0
    )
    return GenRequest(ids, max_new, temperature, top_p, seed, prefix_len=prefix_len)


def label_score(engine: Engine, timed: Timed, text: str, field: str) -> float | None:
    """P(harmful) / (P(harmful) + P(unharmful)) at the step where `field`'s label was emitted."""
    span = label_span(text, field)
    if span is None or not timed.result.label_logprobs:
        return None
    step = engine.token_offsets(timed.result.token_ids, span[0])
    if step is None or step >= len(timed.result.label_logprobs):
        return None
    harm, unharm = timed.result.label_logprobs[step]
    if math.isinf(harm) and math.isinf(unharm):
        return None
    return 1.0 / (1.0 + math.exp(unharm - harm))


def interpret(
    request: ClassifyRequest | ChatInput, timed: Timed, engine: Engine, settings: Settings
) -> Verdict | Completion:
    text = engine.decode(timed.result.token_ids)
    costs = {
        "model": settings.model,
        "prompt_tokens": timed.prompt_tokens,
        "completion_tokens": len(timed.result.token_ids),
        "batch_size": timed.batch_size,
        "queue_wait_ms": round(timed.queue_wait_ms, 2),
        "inference_ms": round(timed.inference_ms, 2),
    }
    if isinstance(request, ChatInput):
        finish = "stop" if timed.result.finish_reason == "stop" else "length"
        return Completion(text=text, finish_reason=finish, **costs)
    expect_response = expects_response_verdict(request)
    try:
        parsed = parse_verdict(text, expect_response=expect_response)
    except OutputError as exc:
        if timed.result.finish_reason == "length":
            raise TruncatedOutput(
                f"output was cut off at {len(timed.result.token_ids)} tokens before a complete "
                f"verdict ({exc.message}); raise GUARDFLEET_MAX_NEW_TOKENS_{request.mode.name}",
                text,
            ) from exc
        raise
    scores = Scores(
        prompt_harm=label_score(engine, timed, text, "prompt"),
        response_harm=(
            label_score(engine, timed, text, "response")
            if parsed.response_harm is not None
            else None
        ),
    )
    prompt_harm, response_harm = parsed.prompt_harm, parsed.response_harm
    if settings.score_threshold is not None:
        prompt_harm = _threshold(scores.prompt_harm, prompt_harm, settings.score_threshold)
        if response_harm is not None:
            response_harm = _threshold(
                scores.response_harm, response_harm, settings.score_threshold
            )
    return Verdict(
        prompt_harm=prompt_harm,
        response_harm=response_harm,
        reasoning=parsed.reasoning,
        raw_output=text,
        scores=scores,
        **costs,
    )


def _threshold(score: float | None, generated: Harm, threshold: float) -> Harm:
    """With a threshold set, the score decides; without a score the generated label stands."""
    if score is None:
        return generated
    return Harm.HARMFUL if score >= threshold else Harm.UNHARMFUL
