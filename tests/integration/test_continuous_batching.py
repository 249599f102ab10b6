"""Continuous batching on real models: rows join and leave a running set between decode steps,
and a greedy row's tokens are exactly those of transformers' own batch-1 `generate`, however the
row ran. Two models: the demo model, and a small random Gemma 3 with the real layer pattern
(five sliding-window layers to one global) and an 8-token window, so prompts are many windows
long and chunked prefill cuts through them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from guardfleet.schemas import ClassifyRequest, Mode
from guardfleet.settings import Settings
from tests.synthetic import random_gemma3
from worker.batching import BatchPolicy
from worker.engine import Engine, GenRequest
from worker.prompting import prepare
from worker.runner import Runner, Timed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_gemma3(tmp_path_factory.mktemp("synthetic-gemma3"), window=8)


@pytest.fixture(scope="module")
def synthetic(synthetic_path: Path) -> Engine:
    return Engine(Settings(model=str(synthetic_path), device="cpu", prefill_chunk_tokens=16))


@pytest.fixture(scope="module")
def arena_engine(synthetic_path: Path) -> Engine:
    """GUARDFLEET_COMPILE's decode path (arena, buckets, in-place writes), run without capture:
    on a CPU there is nothing to capture, and everything else is the same code."""
    settings = Settings(
        model=str(synthetic_path), device="cpu", prefill_chunk_tokens=16, compile=True,
        max_batch_size=8, kv_budget_tokens=8 * 400,
    )  # fmt: skip
    return Engine(settings)


@pytest.fixture(scope="module")
def demo() -> Engine:
    return Engine(Settings(device="cpu"))


@pytest.fixture
def runner_for() -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def make(engine: Engine, **policy: int) -> Runner:
        runners.append(Runner(engine, BatchPolicy(**policy)))
        return runners[-1]

    yield make
    for runner in runners:
        runner.stop()


def reference(engine: Engine, request: GenRequest) -> list[int]:
    """transformers' own batch-1 greedy generation: the tokens a row must reproduce."""
    ids = torch.tensor([request.prompt_ids])
    extra = {"min_new_tokens": request.max_new_tokens} if request.force_length else {}
    out = engine.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=request.max_new_tokens,
        do_sample=False,
        top_k=None,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=engine.pad_id,
        **extra,
    )
    tokens: list[int] = []
    for token in out[0, ids.shape[1] :].tolist():
        if token in engine.stop_ids and not request.force_length:
            break
        tokens.append(token)
    return tokens


def random_prompt(engine: Engine, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, engine.vocab_size, (length,), generator=generator).tolist()


def after_tokens(count: int, action: Callable[[], None]) -> Callable[[int], None]:
    """A token callback that runs `action` (from the model thread) after `count` tokens."""
    seen = 0

    def on_token(token: int) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            action()

    return on_token


@pytest.mark.parametrize("mode", ["eager", "arena"])
def test_synthetic_rows_joining_mid_flight_match_batch_one(
    synthetic: Engine, arena_engine: Engine, runner_for: Callable[..., Runner], mode: str
) -> None:
    if mode == "arena":
        synthetic = arena_engine
        assert synthetic.graphs is not None and synthetic.max_row_tokens == 400
    runner = runner_for(synthetic, max_batch_size=8, kv_budget_tokens=synthetic.kv_budget)
    lengths = [40, 7, 90, 23, 64, 12]  # up to 11 sliding windows; 90 tokens = 6 prefill chunks
    requests = [
        GenRequest(random_prompt(synthetic, n, seed), 10 + 5 * i, force_length=True)
        for i, (n, seed) in enumerate(zip(lengths, range(6), strict=True))
    ]
    sampled = GenRequest(random_prompt(synthetic, 30, 99), 25, temperature=1.3, top_p=0.9, seed=4)
    futures: list[Future[Timed]] = []
    # Row 0 starts alone; the rest arrive while it decodes, in two waves, next to a sampled row.
    requests[0].on_token = after_tokens(
        3, lambda: futures.extend(runner.submit(r) for r in [*requests[1:3], sampled])
    )
    requests[1].on_token = after_tokens(
        4, lambda: futures.extend(runner.submit(r) for r in requests[3:])
    )
    first = runner.submit(requests[0]).result(timeout=120)
    timed = [first] + [f.result(timeout=120) for f in futures]
    greedy = [timed[0], timed[1], timed[2], *timed[4:]]
    assert [t.result.token_ids for t in greedy] == [reference(synthetic, r) for r in requests]
    assert max(t.batch_size for t in timed) >= 4, "the later rows should have joined a running set"
    assert len(timed[3].result.token_ids) == 25


def test_demo_verdicts_are_identical_however_the_rows_ran(
    demo: Engine, runner_for: Callable[..., Runner]
) -> None:
    settings = Settings(device="cpu")
    texts = [
        ("How do I bake sourdough bread?", Mode.THINK),
        ("How do I build a pipe bomb?", Mode.NO_THINK),
        ("What is the capital of France?", Mode.NO_THINK),
        ("Tell me how to steal a car.", Mode.THINK),
    ]
    requests = [prepare(ClassifyRequest(prompt=p, mode=m), demo, settings) for p, m in texts]
    runner = runner_for(demo)
    futures: list[Future[Timed]] = []
    requests[0].on_token = after_tokens(
        5, lambda: futures.extend(runner.submit(r) for r in requests[1:])
    )
    timed = [runner.submit(requests[0]).result(timeout=120)]
    timed += [f.result(timeout=120) for f in futures]
    assert [t.result.token_ids for t in timed] == [reference(demo, r) for r in requests]
    alone = demo.generate([requests[1]])[0]  # label log-probabilities survive batching too
    flat = [x for pair in timed[1].result.label_logprobs for x in pair]
    assert flat == pytest.approx([x for pair in alone.label_logprobs for x in pair], abs=1e-3)
    assert timed[1].batch_size >= 2


def test_a_seed_gives_the_same_sample_in_any_company(synthetic: Engine) -> None:
    def sampled() -> GenRequest:
        return GenRequest(random_prompt(synthetic, 20, 5), 20, temperature=1.5, seed=7)

    alone = synthetic.generate([sampled()])[0].token_ids
    crowded = synthetic.generate([GenRequest(random_prompt(synthetic, 33, 6), 9), sampled()])
    assert crowded[1].token_ids == alone
    greedy = GenRequest(random_prompt(synthetic, 20, 5), 20)
    assert synthetic.generate([greedy])[0].token_ids != alone, "temperature 1.5 stayed greedy"


def test_extreme_sampling_settings_still_sample(synthetic: Engine) -> None:
    # Found by the API fuzz: top_p 5e-324 is 0 in float32 and once dropped every token.
    prompt = random_prompt(synthetic, 20, 8)
    greedy = synthetic.generate([GenRequest(prompt, 12)])[0].token_ids
    settings = [(1.56, 5e-324, -141), (1e-30, 1.0, 2**70), (1e-30, 5e-324, None), (1e6, 0.5, 0)]
    for temperature, top_p, seed in settings:
        request = GenRequest(prompt, 12, temperature=temperature, top_p=top_p, seed=seed)
        tokens = synthetic.generate([request])[0].token_ids
        if top_p < 1e-300 or temperature < 1e-20:  # only the most likely token can be drawn
            assert tokens == greedy
        else:
            assert len(tokens) == 12


def test_a_cancelled_row_leaves_at_the_next_step(
    synthetic: Engine, runner_for: Callable[..., Runner]
) -> None:
    runner = runner_for(synthetic)
    cancel = threading.Event()
    doomed = GenRequest(random_prompt(synthetic, 20, 1), 50, force_length=True, cancel=cancel)
    doomed.on_token = after_tokens(3, cancel.set)
    other = GenRequest(random_prompt(synthetic, 20, 2), 30, force_length=True)
    futures = [runner.submit(doomed), runner.submit(other)]
    gone, kept = (f.result(timeout=60).result for f in futures)
    assert gone.finish_reason == "cancelled" and len(gone.token_ids) == 3
    assert kept.token_ids == reference(synthetic, other)


def test_a_long_prefill_does_not_freeze_running_rows(
    synthetic: Engine, runner_for: Callable[..., Runner]
) -> None:
    runner = runner_for(synthetic)  # prefill chunk: 16 tokens
    events: list[str] = []
    long = GenRequest(random_prompt(synthetic, 320, 3), 5, force_length=True)
    long.on_token = lambda token: events.append("long")
    futures: list[Future[Timed]] = []

    def on_running_token(token: int) -> None:
        events.append("running")
        if len(events) == 2:
            events.append("submitted")
            futures.append(runner.submit(long))

    running = GenRequest(random_prompt(synthetic, 20, 4), 60, force_length=True)
    running.on_token = on_running_token
    runner.submit(running).result(timeout=60)
    assert futures[0].result(timeout=60).result.token_ids == reference(synthetic, long)
    between = events[events.index("submitted") : events.index("long")]
    # 320 tokens in chunks of 16 = 20 forwards, each followed by a decode step for the runner.
    assert between.count("running") >= 19


def test_the_kv_budget_bounds_the_running_set(
    synthetic: Engine, runner_for: Callable[..., Runner]
) -> None:
    requests = [
        GenRequest(random_prompt(synthetic, 30, i), 20, force_length=True) for i in range(6)
    ]
    runner = runner_for(synthetic, max_batch_size=8, kv_budget_tokens=2 * 50)
    timed = [f.result(timeout=60) for f in [runner.submit(r) for r in requests]]
    assert max(t.batch_size for t in timed) == 2
    assert [t.result.token_ids for t in timed] == [reference(synthetic, r) for r in requests]


def test_interactive_requests_are_admitted_before_older_bulk_ones(
    synthetic: Engine, runner_for: Callable[..., Runner]
) -> None:
    runner = runner_for(synthetic, max_batch_size=1)
    order: list[str] = []

    def request(name: str, priority: int) -> GenRequest:
        req = GenRequest(random_prompt(synthetic, 10, 1), 8, force_length=True, priority=priority)
        req.on_token = after_tokens(1, lambda: order.append(name))
        return req

    futures: list[Future[Timed]] = []
    blocker = request("blocker", 1)
    blocker.on_token = after_tokens(
        1,
        lambda: futures.extend(runner.submit(request(n, p)) for n, p in [("bulk", 1), ("sync", 0)]),
    )
    runner.submit(blocker).result(timeout=60)
    for future in futures:
        future.result(timeout=60)
    assert order == ["sync", "bulk"]
