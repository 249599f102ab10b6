"""Where the time of a CUDA-graph decode step goes: one run on a GPU, about 5 minutes.

docs/benchmarks.md measured a graphed 4B decode step at 10.1 ms (batch 1) and 18.1 ms (batch
128) on an H200, where streaming the weights once would take about 2 ms, and a lone no_think
verdict at 160 ms p50. This script builds the same synthetic Gemma-3-4B engine as
`ops/bench.py --profile gpu --compile` (random weights, bf16, up to 128 rows, CUDA graphs) and
splits that time up:

1. ceilings: device-to-device copy bandwidth (the floor for streaming bytes);
2. step cost by batch: the engine's whole decode step, the graph replay alone, the token pick
   and its transfer, the host rest; bytes a step must read (weights + the KV bucket attention
   reads) and the floor they give at the measured bandwidth;
3. torch.profiler over graph replays (batch 1 and 32) and over the same step run eagerly
   (`DecodeGraphs._body`, not captured): kernels per step, time by kind, the top kernels, and
   GPU busy time against the span the kernels cover (idle gaps between them);
4. a lone no_think request through the runner (prefill vs decode), and one phase by phase;
5. baselines: a bf16 matmul against the lm_head weight, the bare model forward at batch 1
   (eager, and captured as a graph), and replay cost as the KV bucket widens.

Tables go to stdout and, where the environment variable OUT is set, to $OUT/profile.md (rewritten
after every section, so a run cut short keeps what it measured). Every section is guarded: one
that fails prints its error and the run goes on; sections are skipped past the time budget.

`--smoke` runs the same code path on the CPU with the bench's small model (no capture; host
clocks instead of CUDA events), to check the script before spending device time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ops import bench, bench_engine  # noqa: E402
from worker.batching import BatchPolicy  # noqa: E402
from worker.engine import DEMO_MODEL_DIR, Batch, Engine, GenRequest  # noqa: E402
from worker.graphs import COLUMN_STEP, DecodeGraphs, bucket  # noqa: E402
from worker.runner import Runner  # noqa: E402

MARK = "guardfleet_measured"  # the profiler range around the measured calls


# ---- reporting ------------------------------------------------------------------------------
class Report:
    """Markdown lines, printed as they come and kept in $OUT/profile.md."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.lines: list[str] = []
        out = os.environ.get("OUT")
        self.path = Path(out) / "profile.md" if out else None
        self.results: dict[str, Any] = {}  # figures later sections reuse
        self.summary: list[str] = []  # one line per key figure, printed last

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)

    def add(self, *lines: str) -> None:
        print("\n".join(lines), flush=True)
        self.lines += lines
        self.save()

    def save(self) -> None:
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text("\n".join(self.lines) + "\n")
            except OSError as exc:
                print(f"could not write {self.path}: {exc}", flush=True)

    def section(self, title: str, body: Callable[[], list[str]], needs_s: float = 0.0) -> None:
        """One guarded section: its table, or why there is none."""
        if self.left() < needs_s:
            self.log(f"skipped (time budget): {title}")
            self.add(
                title,
                "",
                f"skipped: {self.elapsed():.0f} s of a {self.budget_s:.0f} s budget used",
                "",
            )
            return
        self.log(f"start: {title}")
        try:
            lines = body()
        except Exception as exc:
            traceback.print_exc()
            lines = [f"failed: {type(exc).__name__}: {str(exc)[:400]}"]
        self.add(title, "", *lines, "")
        self.log(f"done: {title}")


def p50(values: list[float]) -> float:
    return statistics.median(values)


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" if value < 1 else f"{value:.2f}"


# ---- clocks ---------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU, the host clock on the CPU (smoke)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def each(self, fn: Callable[[], object], n: int, events: bool = True) -> list[float]:
        """ms of each of `n` calls, one at a time (the device idle before each). `events`:
        CUDA events around the call (device time); else the host clock up to a sync."""
        self.sync()
        out = []
        for _ in range(n):
            if self.cuda and events:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                self.sync()
                out.append((time.perf_counter() - t0) * 1000)
        return out

    def back_to_back(self, fn: Callable[[], object], n: int) -> float:
        """ms per call over `n` calls issued back to back, one sync at the end."""
        self.sync()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1000 / n


# ---- the engine, as the GPU bench builds it -------------------------------------------------
@dataclass
class Setup:
    engine: Engine
    graphs: DecodeGraphs
    clock: Clock
    smoke: bool
    sizes: list[int]
    reps: int  # timed calls per measurement
    prof_reps: int  # profiled calls
    prompt: list[GenRequest]  # the bench's no_think requests (user texts 100 tokens)
    probes: list[GenRequest]  # the bench's concurrency-1 probes (user texts 20-60 tokens)
    weight_bytes: int = 0
    bandwidth: float = 4.8e12  # bytes/s; replaced by the measured copy bandwidth
    bandwidth_note: str = "datasheet 4.8 TB/s"
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="profile_decode_")))


def build(args: argparse.Namespace, report: Report) -> Setup:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda:0")
    plan = bench.PLANS["smoke" if smoke else "gpu"]
    dtype = "float32" if smoke else "bfloat16"
    vocab = len(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    config = bench.cpu_config(vocab) if smoke else bench.gemma3_4b_config()
    sizing = {"max_batch_size": plan["max_batch"], "kv_budget_tokens": plan["kv"]}
    report.log(f"building the synthetic model on {device} ({dtype}), {sizing}")
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench.synthetic_engine(
            config, str(device), dtype, Path(tmp), compile=True, **sizing
        )
    assert engine.graphs is not None
    report.log("engine loaded; making requests and warming up")
    prompt = bench_engine.classify_requests(engine, 4, (100, 100), 12, seed=1)
    probes = bench_engine.classify_requests(engine, 12 if smoke else 20, (20, 60), 12, seed=5)
    engine.generate(bench_engine.copies(prompt[:2]))  # the prefix cache and kernels, as the bench
    sizes = [s for s in ([1, 4, 16] if smoke else [1, 8, 32, 128]) if s <= plan["max_batch"]]
    setup = Setup(
        engine,
        engine.graphs,
        Clock(device),
        smoke,
        sizes,
        reps=5 if smoke else 50,
        prof_reps=3 if smoke else 20,
        prompt=prompt,
        probes=probes,
    )
    setup.weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    report.log("warm")
    return setup


def environment(setup: Setup, args: argparse.Namespace) -> list[str]:
    engine, text = setup.engine, setup.engine.model.config.get_text_config()
    from transformers.integrations import sdpa_attention

    lines = [
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}), "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}",
        f"- machine: {bench.machine()}",
        f"- command: `{' '.join(['python', 'ops/profile_decode.py', *sys.argv[1:]])}`; "
        f"GUARDFLEET_ settings: "
        f"{sorted(f'{k}={v}' for k, v in os.environ.items() if k.startswith('GUARDFLEET_'))}",
        f"- model: hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab "
        f"{text.vocab_size}, {engine.dtype}; {setup.weight_bytes / 1e9:.2f} GB of weights "
        f"(lm_head tied to the embedding, counted once); KV {engine.kv_bytes_per_token} "
        f"bytes/token",
        f"- engine: arena {setup.graphs.max_rows} rows x {setup.graphs.max_columns} columns, "
        f"column step {COLUMN_STEP}, prefill chunk {engine.prefill_chunk}; prompts "
        f"{len(setup.prompt[0].prompt_ids)} tokens (shared prefix "
        f"{setup.prompt[0].prefix_len}), probes "
        f"{min(len(p.prompt_ids) for p in setup.probes)}-"
        f"{max(len(p.prompt_ids) for p in setup.probes)}",
        f"- transformers decodes GQA with pack_gqa (no repeat_kv copy): "
        f"{hasattr(sdpa_attention, 'pack_gqa')}",
    ]
    if setup.clock.cuda:
        props = torch.cuda.get_device_properties(0)
        enabled = {}
        for name in ("flash", "mem_efficient", "cudnn", "math"):
            check = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
            enabled[name] = check() if check is not None else "?"
        lines.append(
            f"- GPU: {props.name}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB; SDPA backends enabled: {enabled}"
        )
        lines.append(f"- nvidia-smi: {nvidia_smi()}")
    return lines


def nvidia_smi() -> str:
    try:
        got = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,"
                "utilization.gpu,memory.used",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return got.stdout.strip() or got.stderr.strip()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


# ---- 1. ceilings ----------------------------------------------------------------------------
def ceilings(setup: Setup) -> list[str]:
    clock, device = setup.clock, setup.engine.device
    elements = (1 << 30) if clock.cuda else (16 << 20)  # bf16: 2 GiB; smoke: 64 MiB fp32
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    src = torch.randn(elements, dtype=dtype, device=device)  # never time zeros (METHOD.md)
    dst = torch.empty_like(src)

    def copy() -> object:
        return dst.copy_(src)

    copy()
    ms = p50(clock.each(copy, 20))
    moved = 2 * src.numel() * src.element_size()
    setup.bandwidth = moved / (ms / 1000)
    setup.bandwidth_note = f"measured copy, {setup.bandwidth / 1e12:.2f} TB/s"
    floor = setup.weight_bytes / setup.bandwidth * 1000
    return [
        f"- device-to-device copy of {moved / 2e9:.2f} GB: {ms:.3f} ms p50, "
        f"**{setup.bandwidth / 1e12:.2f} TB/s** counting bytes read + written (the floors below "
        "use this)",
        f"- reading every weight once at that rate: **{floor:.2f} ms** "
        f"({setup.weight_bytes / 1e9:.2f} GB)",
    ]


# ---- 2. step cost by batch ------------------------------------------------------------------
def running_batch(setup: Setup, size: int) -> Batch:
    """`size` copies of the bench's no_think prompt, prefilled and decoding (as
    bench_engine._step_ms), with the step's graph captured."""
    batch = bench_engine.decoding_batch(setup.engine, setup.prompt[:1] * size)
    setup.clock.sync()
    return batch


def step_key(setup: Setup, batch: Batch, length: int | None = None) -> tuple[int, int]:
    graphs = setup.graphs
    length = batch.cache.length if length is None else length
    return bucket(len(batch.rows), graphs.max_rows), bucket(
        length + 1, graphs.max_columns, COLUMN_STEP
    )


def replay_fn(setup: Setup, batch: Batch, length: int | None = None) -> Callable[[], object]:
    """What one graphed step runs on the device: the captured graph's replay (CPU: its body).
    Sets the step's input buffers first, capturing the bucket if it is new."""
    graphs = setup.graphs
    length = batch.cache.length if length is None else length
    with torch.inference_mode():
        graphs.step(batch.last, batch.positions, length)
    key = step_key(setup, batch, length)
    if graphs.capture:
        return graphs.graphs[key][0].replay

    def body() -> object:
        with torch.inference_mode():
            return graphs._body(*key)

    return body


def kv_bytes(setup: Setup, rows: int, columns: int) -> int:
    """What attention reads per step: every layer's K and V over the whole bucket."""
    return int(rows * columns * setup.engine.kv_bytes_per_token)


def step_costs(setup: Setup, report: Report) -> list[str]:
    engine, clock, graphs, reps = setup.engine, setup.clock, setup.graphs, setup.reps
    bw = setup.bandwidth
    lines = [
        f"ms per step, p50 of {reps}. decode_step: the engine's whole step (host clock, as the "
        "bench). step(): buffer copies + replay. replay: the graph alone (CUDA events), one at a "
        "time and back to back. pick: logits to tokens and label log-probs, one device-to-host "
        "transfer. rest = decode_step - step() - pick. Floor: weights + KV bucket at "
        f"{bw / 1e12:.2f} TB/s.",
        "",
        "| batch | bucket rows x cols | decode_step | step() | replay | replay back to back "
        "| pick | rest | GB read (weights + KV) | floor ms | replay / floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    per_batch: dict[int, float] = {}
    for size in setup.sizes:
        if report.left() < 20:
            lines.append(f"| {size} | skipped: time budget | | | | | | | | | |")
            continue
        report.log(f"step cost at batch {size}")
        batch = running_batch(setup, size)
        decode = p50(clock.each(partial(engine.decode_step, batch), reps, events=False))

        def graph_step(b: Batch = batch) -> torch.Tensor:
            with torch.inference_mode():
                return graphs.step(b.last, b.positions, b.cache.length)

        stepped = p50(clock.each(graph_step, reps, events=False))
        logits = graph_step()
        with torch.inference_mode():
            pick = p50(
                clock.each(partial(engine.picker.pick, logits, batch.plan), reps, events=False)
            )
        fn = replay_fn(setup, batch)
        replay = p50(clock.each(fn, reps))
        b2b = clock.back_to_back(fn, reps)
        rows, cols = step_key(setup, batch)
        read = setup.weight_bytes + kv_bytes(setup, rows, cols)
        floor = read / bw * 1000
        per_batch[size] = replay
        report.summary.append(
            f"- batch {size}: decode_step {decode:.2f} ms = step() {stepped:.2f} (replay "
            f"{replay:.2f}, back to back {b2b:.2f}) + pick {pick:.2f} + rest "
            f"{decode - stepped - pick:.2f}; floor {floor:.2f} ms ({read / 1e9:.1f} GB)"
        )
        lines.append(
            f"| {size} | {rows} x {cols} | {fmt_ms(decode)} | {fmt_ms(stepped)} | "
            f"{fmt_ms(replay)} | {fmt_ms(b2b)} | {fmt_ms(pick)} | "
            f"{fmt_ms(decode - stepped - pick)} | {read / 1e9:.2f} | {floor:.2f} | "
            f"{replay / floor:.1f}x |"
        )

    report.results["replay_ms"] = per_batch
    lines.append("")
    lines.append(f"CUDA graphs captured so far: {len(graphs.graphs)} {sorted(graphs.graphs)}")
    return lines


# ---- 3. profiler ----------------------------------------------------------------------------
@dataclass
class Trace:
    kernels: list[tuple[str, float, float]]  # name, start µs, duration µs (device work)
    cpu_ops: list[tuple[str, float]]  # name, duration µs (nested: they overlap)
    wall_us: float  # the measured range
    calls: int


def profiled(
    setup: Setup,
    fn: Callable[[], object],
    calls: int,
    name: str,
    prepare: Callable[[], Callable[[], object]] | None = None,
) -> Trace:
    """Run `fn` `calls` times under torch.profiler and read its trace back. `prepare`, if
    given, runs inside the profiler first (a capture) and returns the function to call."""
    clock = setup.clock
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    if prepare is None:
        fn()  # once outside, so lazy init stays out
    clock.sync()
    with profile(activities=activities) as prof:
        if prepare is not None:
            fn = prepare()
            clock.sync()
        with record_function(MARK):
            for _ in range(calls):
                fn()
            clock.sync()
    path = setup.tmp / f"{name}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    path.unlink()
    mark = [e for e in events if e.get("name") == MARK and e.get("cat") == "user_annotation"]
    if not mark:
        mark = [e for e in events if e.get("name") == MARK]
    begin = float(mark[0]["ts"]) if mark else float("-inf")
    wall = float(mark[0].get("dur", 0)) if mark else 0.0
    kernels: list[tuple[str, float, float]] = []
    cpu_ops: list[tuple[str, float]] = []
    every = []  # device work before the marker too, in case the clocks do not line up
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, ts = str(e.get("cat", "")).lower(), float(e.get("ts", 0))
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            every.append((str(e.get("name")), ts, float(e.get("dur", 0))))
            if ts >= begin:
                kernels.append(every[-1])
        elif cat == "cpu_op" and ts >= begin:
            cpu_ops.append((str(e.get("name")), float(e.get("dur", 0))))
    if every and not kernels and prepare is None:
        print(f"{name}: no kernel after the marker; taking all {len(every)}", flush=True)
        kernels = every
    return Trace(kernels, cpu_ops, wall, calls)


KINDS = [  # first match wins; names lower-cased
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
    ("matmul (GEMM/GEMV)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    (
        "copy / index / fill",
        ("copy", "index", "cat", "gather", "scatter", "fill", "memcpy", "memset", "put_", "where"),
    ),
    (
        "reduction (norm, softmax, argmax)",
        ("reduce", "norm", "softmax", "logsumexp", "argmax", "max", "sum", "mean"),
    ),
    (
        "elementwise",
        (
            "elementwise",
            "vectorized",
            "unrolled",
            "pow",
            "mul",
            "add",
            "tanh",
            "gelu",
            "rsqrt",
            "neg",
            "cos",
            "sin",
            "clamp",
        ),
    ),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def busy_us(kernels: list[tuple[str, float, float]]) -> tuple[float, float]:
    """(union of kernel intervals, first start to last end), µs."""
    spans = sorted((start, start + dur) for _, start, dur in kernels)
    if not spans:
        return 0.0, 0.0
    total, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    total += cur_end - cur_start
    return total, spans[-1][1] - spans[0][0]


def trace_summary(trace: Trace) -> str:
    n = trace.calls
    if not trace.kernels:
        return f"no device kernels; {trace.wall_us / 1000 / n:.2f} ms wall per call profiled"
    busy, span = busy_us(trace.kernels)
    kinds: dict[str, float] = defaultdict(float)
    for name, _, dur in trace.kernels:
        kinds[kind_of(name)] += dur
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:3]
    return (
        f"{len(trace.kernels) / n:.0f} kernels, busy {busy / 1000 / n:.2f} ms, idle between "
        f"kernels {(span - busy) / 1000 / n:.2f} ms; "
        + ", ".join(f"{k} {v / 1000 / n:.2f} ms" for k, v in top)
    )


def kernel_report(trace: Trace, step_ms: float | None, top: int, what: str) -> list[str]:
    n = trace.calls
    wall_ms = trace.wall_us / 1000 / n
    if not trace.kernels:  # the CPU (smoke), or a profiler that shows no device work
        lines = [
            f"- no device kernels in the trace; wall {wall_ms:.2f} ms per {what} under the profiler"
        ]
        if trace.cpu_ops:
            lines += [
                "",
                "CPU ops (nested, so they overlap; smoke only):",
                "",
                "| op | calls/step | ms/step |",
                "|---|---:|---:|",
            ]
            agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for name, dur in trace.cpu_ops:
                agg[name][0] += 1
                agg[name][1] += dur
            for name, (count, dur) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
                lines.append(f"| `{name[:90]}` | {count / n:.1f} | {dur / 1000 / n:.3f} |")
        return lines
    busy, span = busy_us(trace.kernels)
    kernel_sum = sum(d for _, _, d in trace.kernels)
    ref = step_ms if step_ms is not None else wall_ms
    lines = [
        f"- {len(trace.kernels) / n:.0f} kernels (incl. memcpy/memset) per {what}; kernel time "
        f"{kernel_sum / 1000 / n:.3f} ms per {what} (sum of durations), GPU busy "
        f"{busy / 1000 / n:.3f} ms (union), kernels' span {span / 1000 / n:.3f} ms, so "
        f"**{(span - busy) / 1000 / n:.3f} ms idle between kernels** per {what}; wall under the "
        f"profiler {wall_ms:.3f} ms; % below are of {ref:.3f} ms "
        f"({'timed without the profiler' if step_ms is not None else 'wall under the profiler'})",
        f"- mean kernel {kernel_sum / len(trace.kernels):.1f} µs; kernels under 5 µs: "
        f"{sum(d < 5 for _, _, d in trace.kernels) / n:.0f} per {what}, together "
        f"{sum(d for _, _, d in trace.kernels if d < 5) / 1000 / n:.3f} ms",
        "",
        "| kind | kernels/step | ms/step | % of step |",
        "|---|---:|---:|---:|",
    ]
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    names: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, _, dur in trace.kernels:
        for table, key in ((kinds, kind_of(name)), (names, name)):
            table[key][0] += 1
            table[key][1] += dur
    for kind, (count, dur) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        ms = dur / 1000 / n
        lines.append(f"| {kind} | {count / n:.0f} | {ms:.3f} | {ms / ref * 100:.1f}% |")
    lines += [
        "",
        f"Top {top} kernels by total time:",
        "",
        "| kernel | kind | calls/step | ms/step | % of step | µs/call |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (count, dur) in sorted(names.items(), key=lambda kv: -kv[1][1])[:top]:
        ms = dur / 1000 / n
        short = name.replace("|", "/")[:90]
        lines.append(
            f"| `{short}` | {kind_of(name)} | {count / n:.1f} | {ms:.3f} | "
            f"{ms / ref * 100:.1f}% | {dur / count:.1f} |"
        )
    return lines


def save_kernels(trace: Trace, label: str) -> None:
    """Every kernel name with its calls and µs per step, as CSV under $OUT (for later reading)."""
    out = os.environ.get("OUT")
    if not out or not trace.kernels:
        return
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, _, dur in trace.kernels:
        agg[name][0] += 1
        agg[name][1] += dur
    rows = ["kind,calls_per_step,us_per_step,name"]
    for name, (count, dur) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        clean = name.replace('"', "'")
        rows.append(f'{kind_of(name)},{count / trace.calls:.2f},{dur / trace.calls:.2f},"{clean}"')
    Path(out, f"kernels_{label}.csv").write_text("\n".join(rows) + "\n")


def profile_steps(setup: Setup, report: Report, size: int, eager: bool) -> list[str]:
    """Kernels of one graphed step at `size` rows (replays; recaptured under the profiler if the
    replays show none), and with `eager` the same step's body run without capture."""
    graphs, clock = setup.graphs, setup.clock
    batch = running_batch(setup, size)
    rows, cols = step_key(setup, batch)
    fn = replay_fn(setup, batch)
    step_ms = report.results.get("replay_ms", {}).get(size)
    lines = [f"Bucket {rows} rows x {cols} columns; {setup.prof_reps} calls profiled.", ""]
    what = "replayed" if graphs.capture else "run (smoke: no capture)"
    report.log(f"profiling {setup.prof_reps} graph replays at batch {size}")
    trace = profiled(setup, fn, setup.prof_reps, f"graph_{size}")
    if graphs.capture and len(trace.kernels) < 20 * setup.prof_reps:
        lines.append(
            f"- replays of the graph captured earlier showed {len(trace.kernels)} "
            "kernels: recapturing it under the profiler"
        )
        report.log("graph replay hid its kernels; recapturing under the profiler")

        def capture() -> Callable[[], object]:
            with torch.inference_mode():
                graph, _ = graphs._capture(rows, cols)
            return graph.replay

        trace = profiled(setup, fn, setup.prof_reps, f"graph_{size}_re", prepare=capture)
    lines += [f"**Graph {what}, batch {size}**", ""]
    lines += kernel_report(trace, step_ms, 25, "step")
    report.summary.append(f"- graph step, batch {size}: {trace_summary(trace)}")
    save_kernels(trace, f"graph_b{size}")
    if eager:
        report.log(f"profiling the same step eagerly at batch {size}")

        def body() -> object:
            with torch.inference_mode():
                return graphs._body(rows, cols)

        eager_ms = p50(clock.each(body, max(3, setup.prof_reps // 2), events=False))
        calls = max(3, setup.prof_reps // 4)
        trace = profiled(setup, body, calls, f"eager_{size}")
        lines += [
            "",
            f"**Same step eager (`DecodeGraphs._body`, not captured; SDPA backends as "
            f"at capture), batch {size}**: {eager_ms:.2f} ms p50 host wall per step "
            f"without the profiler; {calls} calls profiled",
            "",
        ]
        lines += kernel_report(trace, None, 25, "step")
        save_kernels(trace, f"eager_b{size}")
        report.summary.append(
            f"- eager step, batch {size}: {eager_ms:.2f} ms host wall; {trace_summary(trace)}"
        )

    return lines


# ---- 4. a lone no_think request -------------------------------------------------------------
def alone(setup: Setup, report: Report) -> list[str]:
    engine, clock, graphs = setup.engine, setup.clock, setup.graphs
    captured = len(graphs.graphs)
    runner = Runner(engine, BatchPolicy(1, engine.kv_budget))
    walls, queue, prefill, decode, tokens = [], [], [], [], []
    try:
        runner.submit(bench_engine.copies(setup.probes[:1])[0]).result(timeout=600)  # warm
        for request in bench_engine.copies(setup.probes):
            t0 = time.perf_counter()
            timed = runner.submit(request).result(timeout=600)
            walls.append((time.perf_counter() - t0) * 1000)
            queue.append(timed.queue_wait_ms)
            prefill.append(timed.prefill_ms)
            decode.append(timed.inference_ms - timed.prefill_ms)
            tokens.append(len(timed.result.token_ids))
    finally:
        runner.stop()
    lines = [
        f"{len(walls)} probes through the runner, one at a time, as the bench's concurrency-1 "
        f"table ({statistics.mean(tokens):.0f} tokens out each; CUDA graphs captured during "
        f"them: {len(graphs.graphs) - captured}).",
        "",
        "| measure | p50 ms | p95 ms |",
        "|---|---:|---:|",
    ]
    for name, values in (
        ("submit -> result (the bench's latency)", walls),
        ("queue wait", queue),
        ("admitted -> first token (prefill)", prefill),
        ("first token -> last (decode steps)", decode),
        (
            "rest (wall - queue - inference)",
            [w - q - p - d for w, q, p, d in zip(walls, queue, prefill, decode, strict=True)],
        ),
    ):
        lines.append(
            f"| {name} | {bench_engine.percentile(values, 50):.1f} | "
            f"{bench_engine.percentile(values, 95):.1f} |"
        )

    # Phase by phase, synchronised after each: the same engine calls the runner makes.
    phases: dict[str, list[float]] = defaultdict(list)
    steps_ms: list[float] = []
    forwards = 0
    for request in bench_engine.copies(setup.probes[:3]):
        clock.sync()
        t0 = time.perf_counter()
        work = engine.begin([request])
        clock.sync()
        t1 = time.perf_counter()
        forwards = 1
        while not engine.prefill(work, engine.prefill_chunk):
            forwards += 1
        clock.sync()
        t2 = time.perf_counter()
        batch = engine.join(None, work)
        clock.sync()
        t3 = time.perf_counter()
        steps = 0
        while batch.rows:
            s0 = time.perf_counter()
            engine.decode_step(batch)
            steps_ms.append((time.perf_counter() - s0) * 1000)
            steps += 1
        clock.sync()
        t4 = time.perf_counter()
        for name, ms in (
            ("begin (layout, shared-prefix KV copy)", t1 - t0),
            (f"prefill ({forwards} eager forward(s))", t2 - t1),
            ("join (rows into the graph arena)", t3 - t2),
            (f"decode ({steps} steps)", t4 - t3),
            ("total", t4 - t0),
        ):
            phases[name].append(ms * 1000)
    lines += [
        "",
        "One probe phase by phase (median of 3, synchronised after each phase):",
        "",
        "| phase | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {p50(values):.2f} |" for name, values in phases.items()]
    lines.append(f"| one decode step (p50 of {len(steps_ms)}) | {p50(steps_ms):.2f} |")

    # The prefill forward under the profiler: how much of its wall the GPU is busy.
    request = setup.probes[0]

    def prefill_once() -> object:
        work = engine.begin(bench_engine.copies([request]))
        while not engine.prefill(work, engine.prefill_chunk):
            pass
        return work

    trace = profiled(setup, prefill_once, 3, "prefill")
    lines += [
        "",
        f"**Prefill of one probe ({len(request.prompt_ids) - request.prefix_len} tokens "
        "after the shared prefix), eager, under the profiler**",
        "",
    ]
    lines += kernel_report(trace, None, 10, "prefill")
    save_kernels(trace, "prefill")
    pct = bench_engine.percentile
    report.summary.append(
        f"- lone no_think: {pct(walls, 50):.1f} ms p50 = prefill {pct(prefill, 50):.1f} + decode "
        f"{pct(decode, 50):.1f} ({statistics.mean(tokens) - 1:.0f} steps, one "
        f"{p50(steps_ms):.2f} ms) + queue {pct(queue, 50):.1f}; prefill profile: "
        f"{trace_summary(trace)}"
    )
    return lines


# ---- 5. baselines ---------------------------------------------------------------------------
def baselines(setup: Setup, report: Report) -> list[str]:
    engine, clock = setup.engine, setup.clock
    model, device, dtype = engine.model, engine.device, engine.dtype
    weight = model.get_output_embeddings().weight
    hidden = int(weight.shape[1])
    head_bytes = weight.numel() * weight.element_size()
    lines = [
        "| baseline | ms p50 | weight GB/s | note |",
        "|---|---:|---:|---|",
    ]
    for rows in (1, 32, 128):
        x = torch.randn(rows, hidden, dtype=dtype, device=device)
        with torch.inference_mode():
            ms = p50(clock.each(partial(torch.nn.functional.linear, x, weight), setup.reps))
        lines.append(
            f"| [{rows}, {hidden}] x lm_head^T ({tuple(weight.shape)}) | {ms:.3f} | "
            f"{head_bytes / (ms / 1000) / 1e9:.0f} | {head_bytes / 1e9:.2f} GB of "
            "weight |"
        )
    forward = bare_forward(setup)
    report.log("bare model forward, eager")
    eager = p50(clock.each(forward, max(3, setup.reps // 5), events=False))
    lines.append(
        f"| model forward, 1 token, no cache, eager (host wall) | {eager:.2f} | "
        f"{setup.weight_bytes / (eager / 1000) / 1e9:.0f} | every weight once; "
        "launch-bound if far over the floor |"
    )
    trace = profiled(setup, forward, 3, "bare_eager")
    if trace.kernels:
        busy, _ = busy_us(trace.kernels)
        lines.append(
            f"| (eager forward's kernels) | {busy / 1000 / 3:.2f} busy | | "
            f"{len(trace.kernels) / 3:.0f} kernels per forward |"
        )
    lines.append(
        f"| floor: weights once at {setup.bandwidth_note} | "
        f"{setup.weight_bytes / setup.bandwidth * 1000:.2f} | | |"
    )
    return lines


def bare_forward(setup: Setup) -> Callable[[], object]:
    """The model's forward of one token at batch 1, no cache, no mask of ours: every weight
    read once, none of the engine around it."""
    engine = setup.engine
    ids = torch.randint(10, 2000, (1, 1), device=engine.device)

    def forward() -> object:
        with torch.inference_mode(), engine._eager_attention():
            return engine.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    return forward


def bare_graph(setup: Setup, report: Report) -> list[str]:
    """The bare forward captured as a CUDA graph: weights + per-kernel cost, nothing else.
    Last but one: a capture that fails could leave the device unusable for what follows."""
    clock = setup.clock
    if not clock.cuda:
        return ["- skipped: capture needs CUDA (smoke)"]
    forward = bare_forward(setup)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    ms = p50(clock.each(graph.replay, setup.reps))
    floor = setup.weight_bytes / setup.bandwidth * 1000
    lines = [
        f"- 1-token forward at batch 1 as a CUDA graph (no KV cache, no engine mask, no pick): "
        f"**{ms:.2f} ms** p50, {setup.weight_bytes / (ms / 1000) / 1e9:.0f} GB/s of weights; "
        f"floor {floor:.2f} ms at {setup.bandwidth_note}",
    ]
    trace = profiled(setup, graph.replay, 5, "bare_graph")
    lines += kernel_report(trace, ms, 12, "forward")
    save_kernels(trace, "bare_graph")
    report.summary.append(
        f"- bare 1-token forward as a graph: {ms:.2f} ms (floor {floor:.2f}); "
        f"{trace_summary(trace)}"
    )

    return lines


def column_sweep(setup: Setup, report: Report) -> list[str]:
    """Replay cost as the KV bucket widens: the attention's share, by difference."""
    graphs, clock = setup.graphs, setup.clock
    widths = [c for c in (256, 512, 1024, 2048) if c <= graphs.max_columns]
    lines = [
        "Graph replay (CUDA events, p50) with the bucket forced to each width (inputs as the "
        "step's; new buckets are captured first).",
        "",
        "| batch | columns | replay ms | KV read GB | floor ms (weights + KV) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size in sorted({1, max(setup.sizes)}):
        if report.left() < 15:
            lines.append(f"| {size} | skipped: time budget | | | |")
            continue
        report.log(f"column sweep at batch {size}")
        batch = running_batch(setup, size)
        points = []
        for width in widths:
            fn = replay_fn(setup, batch, width - 1)
            rows, cols = step_key(setup, batch, width - 1)
            ms = p50(clock.each(fn, max(5, setup.reps // 2)))
            kv = kv_bytes(setup, rows, cols)
            floor = (setup.weight_bytes + kv) / setup.bandwidth * 1000
            points.append((kv, ms, cols))
            lines.append(f"| {size} | {cols} | {ms:.3f} | {kv / 1e9:.2f} | {floor:.2f} |")
        if len(points) > 1 and points[-1][0] > points[0][0]:
            (kv0, ms0, _), (kv1, ms1, _) = points[0], points[-1]
            rate = (kv1 - kv0) / max(ms1 - ms0, 1e-9) * 1000
            report.summary.append(
                f"- KV width at batch {size}: replay {ms0:.2f} ms at {points[0][2]} columns, "
                f"{ms1:.2f} ms at {points[-1][2]}: attention reads KV at {rate / 1e12:.2f} TB/s"
            )
            lines.append(
                f"| {size} | slope | {(ms1 - ms0) / (kv1 - kv0) * 1e9:.3f} ms/GB | "
                f"{rate / 1e12:.2f} TB/s effective | |"
            )

    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the same path on the CPU, small model"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which sections are skipped (420; smoke 170)",
    )
    args = parser.parse_args()
    budget = args.budget or (170.0 if args.smoke else 420.0)
    report = Report(budget)
    torch.set_flush_denormal(True)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on the CPU")
    report.add(
        f"# Decode step profile, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        f"{' (smoke, CPU)' if args.smoke else ''}",
        "",
    )
    try:
        setup = build(args, report)
    except Exception:
        traceback.print_exc()
        report.add("failed to build the engine: nothing measured", "")
        sys.exit(1)
    report.section("## Environment", lambda: environment(setup, args))
    report.section("## Ceilings", lambda: ceilings(setup))
    report.section("## Decode step cost by batch", lambda: step_costs(setup, report), 60)
    report.section(
        "## Kernels of one step, batch 1", lambda: profile_steps(setup, report, 1, eager=True), 40
    )
    mid = 32 if 32 in setup.sizes else setup.sizes[-1]
    report.section(
        f"## Kernels of one step, batch {mid}",
        lambda: profile_steps(setup, report, mid, eager=False),
        30,
    )
    report.section("## A lone no_think request (concurrency 1)", lambda: alone(setup, report), 30)
    report.section("## Weight-streaming baselines", lambda: baselines(setup, report), 20)
    report.section(
        "## Replay cost against KV bucket width", lambda: column_sweep(setup, report), 30
    )
    report.section(
        "## The bare model forward as a CUDA graph", lambda: bare_graph(setup, report), 20
    )
    if report.left() > 60 and max(setup.sizes) != mid:
        top = max(setup.sizes)
        report.section(
            f"## Kernels of one step, batch {top}",
            lambda: profile_steps(setup, report, top, eager=False),
            30,
        )
    if setup.clock.cuda:
        report.add(f"- nvidia-smi at the end: {nvidia_smi()}", "")
    report.add(
        "## Summary",
        "",
        f"- ceiling: {setup.bandwidth_note}; weights {setup.weight_bytes / 1e9:.2f} GB",
        *report.summary,
        "",
    )
    shutil.rmtree(setup.tmp, ignore_errors=True)
    report.log(
        f"finished in {report.elapsed():.0f} s"
        + (f"; tables in {report.path}" if report.path else "")
    )


if __name__ == "__main__":
    main()
