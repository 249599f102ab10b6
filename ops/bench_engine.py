"""Engine measurements for ops/bench.py: the continuous-batching engine against the static one.

The static engine (one `generate` per batch, to completion) was replaced by continuous batching;
to compare them in one run, the benchmark loads it from git history (`STATIC_REV`) instead of
keeping dead code in the worker. Both run the same requests on the same weights:

- step cost: one decode step at batch 1 and 32, against `generate`'s per-step time;
- no_think throughput: 64 default-taxonomy requests submitted at once;
- mixed workload: 90% no_think (12 tokens), 10% think (200 tokens), p50/p95 per mode;
- head-of-line: sync no_think calls every 200 ms while 32 long generations run, p95 over idle p95;
- transformers' `generate_batch` on the no_think set, and whether its rows match batch-1
  `generate` on a model whose sliding window the prompts exceed (transformers issue 41184).
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import Gemma3TextConfig

from guardfleet.schemas import ClassifyRequest, Mode
from guardfleet.settings import Settings
from worker.batching import BatchPolicy
from worker.engine import Batch, Engine, GenRequest
from worker.prompting import prepare
from worker.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
STATIC_REV = "484b9f0"  # the last commit with the static engine
FILLER = [
    "please",
    "explain",
    "how",
    "the",
    "local",
    "library",
    "schedules",
    "its",
    "weekend",
    "reading",
    "groups",
    "for",
    "children",
    "and",
    "whether",
    "volunteers",
    "can",
    "help",
    "with",
    "the",
    "garden",
    "behind",
    "the",
    "old",
    "station",
    "near",
    "the",
    "river",
    "bank",
]


def small_gemma3_config(vocab: int, window: int) -> Gemma3TextConfig:
    """A small Gemma 3 with the real layer pattern (five sliding-window layers to one global)
    and a short window that prompts exceed many times over."""
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        max_position_embeddings=8192,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_static(rev: str = STATIC_REV) -> tuple[ModuleType, ModuleType]:
    """worker/engine.py and worker/batching.py as they were at `rev`, as private modules.

    Read from git, or from `.static/` where there is no git history (a copy of the working
    tree on a GPU machine): `git show REV:worker/engine.py > .static/engine.py`, likewise batching.
    """
    modules = []
    for name in ("engine", "batching"):
        copy = ROOT / ".static" / f"{name}.py"
        if copy.exists():
            source = copy.read_text()
        else:
            source = subprocess.run(
                ["git", "show", f"{rev}:worker/{name}.py"],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        path = Path(tempfile.mkdtemp()) / f"static_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"static_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


class StaticRunner:
    """The old model thread, minus its waiting: FIFO batches of one key, each run to the end."""

    def __init__(self, static: tuple[ModuleType, ModuleType], engine: Any, batch: int) -> None:
        self.engine_mod, self.batching = static
        self.engine = engine
        self.policy = self.batching.BatchPolicy(
            max_batch_size=batch, max_wait_ms=0, max_batch_tokens=10**9
        )
        self.pending: list[Any] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def submit(self, request: GenRequest) -> Future[Any]:
        old = self.engine_mod.GenRequest(
            request.prompt_ids,
            request.max_new_tokens,
            prefix_len=request.prefix_len,
            force_length=request.force_length,
        )
        future: Future[Any] = Future()
        with self.cond:
            self.pending.append(
                self.batching.Pending(
                    (old, future), len(old.prompt_ids), old.batch_key, time.monotonic()
                )
            )
            self.cond.notify()
        return future

    def loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                batch = self.batching.take_batch(self.pending, time.monotonic(), self.policy, False)
            results = self.engine.generate([p.item[0] for p in batch])
            for p, result in zip(batch, results, strict=True):
                p.item[1].set_result(result)

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()


def user_text(tokenizer: Any, tokens: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.append(rng.choice(FILLER))
    return " ".join(words)


def classify_requests(
    engine: Engine,
    n: int,
    lengths: tuple[int, int],
    new_tokens: int,
    seed: int,
    mode: Mode = Mode.NO_THINK,
) -> list[GenRequest]:
    rng, settings = random.Random(seed), Settings()
    out = []
    for _ in range(n):
        text = user_text(engine.tokenizer, rng.randint(*lengths), rng)
        request = prepare(ClassifyRequest(prompt=text, mode=mode), engine, settings)
        request.max_new_tokens, request.force_length = new_tokens, True
        out.append(request)
    return out


def drive(
    submit: Callable[[GenRequest], Future[Any]], schedule: list[tuple[float, GenRequest, str]]
) -> dict[str, list[float]]:
    """Submit each request at its offset (seconds); latency per tag, in ms, submit to result."""
    done: dict[str, list[float]] = {}
    lock = threading.Lock()
    waits: list[Future[Any]] = []
    started = time.perf_counter()
    for offset, request, tag in sorted(schedule, key=lambda s: s[0]):
        delay = started + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        future = submit(request)

        def record(f: Future[Any], tag: str = tag, t0: float = t0) -> None:
            with lock:
                done.setdefault(tag, []).append((time.perf_counter() - t0) * 1000)

        future.add_done_callback(record)
        waits.append(future)
    for future in waits:
        future.result(timeout=3600)
    done["wall"] = [(time.perf_counter() - started) * 1000]
    return done


def copies(requests: list[GenRequest]) -> list[GenRequest]:
    return [
        GenRequest(
            r.prompt_ids,
            r.max_new_tokens,
            prefix_len=r.prefix_len,
            force_length=r.force_length,
            priority=r.priority,
        )
        for r in requests
    ]


class Engines:
    """The new engine and the static one, on the same weights."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.new = engine
        self.static_mods = load_static()
        self.static = self.static_mods[0].Engine(
            Settings(
                model=engine.path, device=str(engine.device), dtype=str(engine.dtype).split(".")[1]
            )
        )
        self.max_batch = max_batch

    def run(
        self, which: str, schedule: list[tuple[float, GenRequest, str]], batch: int | None = None
    ) -> dict[str, list[float]]:
        batch = batch or self.max_batch
        if which == "static":
            static = StaticRunner(self.static_mods, self.static, batch)
            try:
                return drive(static.submit, schedule)
            finally:
                static.stop()
        runner = Runner(self.new, BatchPolicy(min(batch, self.max_batch), self.new.kv_budget))
        try:
            return drive(runner.submit, schedule)
        finally:
            runner.stop()


def decoding_batch(engine: Engine, requests: list[GenRequest]) -> Batch:
    """These rows prefilled and decoding, with no end in sight, and the step's CUDA graph (if
    any) captured."""
    work = engine.begin(copies(requests))
    for row in work.rows:
        row.request.force_length, row.request.max_new_tokens = True, 10**6
    while not engine.prefill(work, engine.prefill_chunk):
        pass
    batch = engine.join(None, work)
    for _ in range(3):  # a CUDA graph is captured on a bucket's first step
        engine.decode_step(batch)
    return batch


def _step_ms(engine: Engine, requests: list[GenRequest]) -> float:
    """ms per decode step of `engine` with these rows running."""
    batch = decoding_batch(engine, requests)
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(32):
        engine.decode_step(batch)
    sync(engine.device)
    return (time.perf_counter() - t0) / 32 * 1000


def step_costs(
    engines: Engines, prompt: list[GenRequest], sizes: list[int], graphed: Engine | None = None
) -> list[str]:
    """ms per decode step: ours vs `generate`'s, which is (T(33 tokens) - T(1)) / 32."""
    device = engines.new.device
    head = "| batch | generate ms/step | continuous ms/step | vs generate |"
    rule = "|---:|---:|---:|---:|"
    if graphed is not None:
        head, rule = head + " CUDA graphs ms/step | vs generate |", rule + "---:|---:|"
    lines = [head, rule]
    for size in sizes:
        rows = copies(prompt[:1] * size)
        timings = []
        for n in (1, 33):
            old = [engines.static_mods[0].GenRequest(r.prompt_ids, n, force_length=True)
                   for r in rows]  # fmt: skip
            engines.static.generate(old)
            sync(device)
            t0 = time.perf_counter()
            engines.static.generate(old)
            sync(device)
            timings.append(time.perf_counter() - t0)
        generate_ms = (timings[1] - timings[0]) / 32 * 1000
        ours = _step_ms(engines.new, rows)
        line = f"| {size} | {generate_ms:.1f} | {ours:.1f} | {ours / generate_ms:.2f}x |"
        if graphed is not None:
            graph_ms = _step_ms(graphed, rows)
            line += f" {graph_ms:.1f} | {graph_ms / generate_ms:.2f}x |"
        lines.append(line)
    return lines


def throughput(engines: Engines, requests: list[GenRequest], static_sizes: list[int],
               new_text: str = "continuous") -> list[str]:  # fmt: skip
    lines = [
        "| engine | class./s | vs static best | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = []
    for size in static_sizes:
        got = engines.run("static", [(0.0, r, "x") for r in copies(requests)], size)
        rows.append((f"static, batch {size}, prefix reuse", got))
    got = engines.run("new", [(0.0, r, "x") for r in copies(requests)])
    rows.append((f"{new_text}, up to {engines.max_batch} running", got))
    best = max(len(requests) / (g["wall"][0] / 1000) for _, g in rows[:-1])
    for name, g in rows:
        rate = len(requests) / (g["wall"][0] / 1000)
        lines.append(f"| {name} | {rate:.2f} | {rate / best:.2f}x | "
                     f"{percentile(g['x'], 50):.0f} | {percentile(g['x'], 95):.0f} |")  # fmt: skip
    return lines


def alone(engines: Engines, probes: list[GenRequest]) -> list[str]:
    """One request at a time: the latency a lone sync call sees from the engine."""
    lines = ["| engine | p50 ms | p95 ms |", "|---|---:|---:|"]
    for which in ("static", "new"):
        got: list[float] = []
        for request in copies(probes):
            got += engines.run(which, [(0.0, request, "x")], 1)["x"]
        lines.append(f"| {which} | {percentile(got, 50):.0f} | {percentile(got, 95):.0f} |")
    return lines


def mixed(engines: Engines, no_think: list[GenRequest], think: list[GenRequest],
          static_batch: int) -> list[str]:  # fmt: skip
    schedule = [(0.0, r, "no_think") for r in no_think] + [(0.0, r, "think") for r in think]
    random.Random(3).shuffle(schedule)
    lines = [
        "| engine | class./s | no_think p50 / p95 ms | think p50 / p95 ms |",
        "|---|---:|---:|---:|",
    ]
    for which in ("static", "new"):
        fresh = [(t, copies([r])[0], tag) for t, r, tag in schedule]
        g = engines.run(which, fresh, static_batch if which == "static" else None)
        rate = len(schedule) / (g["wall"][0] / 1000)
        lines.append(
            f"| {which} | {rate:.2f} | {percentile(g['no_think'], 50):.0f} / "
            f"{percentile(g['no_think'], 95):.0f} | {percentile(g['think'], 50):.0f} / "
            f"{percentile(g['think'], 95):.0f} |"
        )
    return lines


def head_of_line(engines: Engines, probes: list[GenRequest], backlog: list[GenRequest],
                 every_s: float, static_batch: int) -> list[str]:  # fmt: skip
    lines = [
        f"| engine | idle p95 ms | busy p95 ms (while {len(backlog)} x "
        f"{backlog[0].max_new_tokens}-token generations run) | busy / idle |",
        "|---|---:|---:|---:|",
    ]
    for which in ("static", "new"):
        batch = static_batch if which == "static" else None
        idle = engines.run(
            which, [(i * every_s, r, "probe") for i, r in enumerate(copies(probes))], batch
        )
        schedule = [(0.0, r, "backlog") for r in copies(backlog)]
        schedule += [(0.5 + i * every_s, r, "probe") for i, r in enumerate(copies(probes))]
        busy = engines.run(which, schedule, batch)
        i95, b95 = percentile(idle["probe"], 95), percentile(busy["probe"], 95)
        lines.append(f"| {which} | {i95:.0f} | {b95:.0f} | {b95 / i95:.1f}x |")
    return lines


def generate_batch_check(engine: Engine, requests: list[GenRequest]) -> list[str]:
    """transformers' continuous batching: throughput here, and rows vs batch-1 `generate`."""
    from transformers import GenerationConfig

    n = requests[0].max_new_tokens
    config = GenerationConfig(
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=engine.pad_id,
    )
    try:
        engine.model.generate_batch([requests[0].prompt_ids], generation_config=config)
        started = time.perf_counter()
        out = engine.model.generate_batch(
            [r.prompt_ids for r in requests], generation_config=config
        )
        rate = len(requests) / (time.perf_counter() - started)
    except Exception as exc:  # recorded, not hidden: it is one of the options compared
        return [f"- `generate_batch` failed: {type(exc).__name__}: {str(exc)[:160]}"]
    ours = engine.generate(copies(requests))
    outputs = [list(o.generated_tokens)[:n] for o in out.values()]
    ours_set = {tuple(r.token_ids) for r in ours}
    same = sum(tuple(o) in ours_set for o in outputs)
    return [
        f"- `generate_batch`: {rate:.2f} class./s on the no_think set; "
        f"{same} of {len(outputs)} rows equal our batch-1-identical output"
    ]


def sliding_window_check(engine: Engine, window: int) -> str:
    """Does `generate_batch` honour a sliding window the prompts exceed? Greedy rows vs
    batch-1 `generate` (the reference our own engine is tested against)."""
    from transformers import GenerationConfig

    rng = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, 2000, (n,), generator=rng).tolist()
        for n in (3 * window, 5 * window, 2 * window + 3, 7 * window)
    ]
    config = GenerationConfig(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=engine.pad_id,
    )
    reference = []
    for p in prompts:
        ids = torch.tensor([p], device=engine.device)
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
        reference.append(out[0, len(p) :].tolist())
    ours = [
        r.token_ids
        for r in engine.generate([GenRequest(p, 16, force_length=True) for p in prompts])
    ]
    try:
        got = engine.model.generate_batch(prompts, generation_config=config)
        theirs = [
            list(got[k].generated_tokens)[:16]
            for k in sorted(got, key=lambda k: int(str(k).split("_")[-1]))
        ]
    except Exception as exc:
        theirs_text = f"failed ({type(exc).__name__})"
    else:
        theirs_text = (
            f"{sum(a == b for a, b in zip(theirs, reference, strict=True))} of {len(prompts)}"
        )
    mine = sum(a == b for a, b in zip(ours, reference, strict=True))
    return (
        f"- sliding window {window}, prompts 2-7 windows long, 16 greedy tokens: rows equal to "
        f"batch-1 `generate`: ours {mine} of {len(prompts)}, `generate_batch` {theirs_text}"
    )
