"""Would torch.compile's fusion shrink the CUDA-graph decode step? One GPU run, a few minutes.

`ops/profile_decode.py` found a graphed 4B decode step at batch 1 to be about 2,970 kernels, most
of them elementwise, copies and norms of 1-3 µs each: about 9.7 ms where reading the weights
once takes 1.8 ms. Inductor fuses such chains into a few kernels per layer. This probe compiles
the model's forward (`torch.compile`, default mode, static shapes), captures the same bucket as
a CUDA graph around it, and reports the replay time, the kernel count, the compile time, and
whether the compiled step's logits pick the same tokens as the eager kernels'.

    python ops/probe_compiled_step.py            # on a GPU
    python ops/probe_compiled_step.py --smoke    # the same path on the CPU, no capture

It measures only; the engine does not compile anything yet (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from ops import bench
from ops import profile_decode as pd
from worker.graphs import DecodeGraphs


def kernels_per_step(fn: Callable[[], object], reps: int) -> tuple[int, float]:
    """Kernels per call and their summed device time (ms) per call, over `reps` calls."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    total_us = sum(e.device_time for e in events)
    return len(events) // reps, total_us / 1000 / reps


_RETIRED: list[object] = []


def fresh_graphs(graphs: DecodeGraphs) -> None:
    """Start capturing anew. Graphs captured before stay alive: they share one memory pool, and
    freeing one while the pool lives trips the caching allocator (torch 2.11)."""
    _RETIRED.append(graphs.graphs)
    graphs.graphs = {}


def probe(setup: pd.Setup, report: pd.Report, eager_model: torch.nn.Module, size: int) -> str:
    graphs, clock = setup.graphs, setup.clock
    graphs.model = eager_model
    fresh_graphs(graphs)  # every bucket captured again, of the eager model's kernels
    batch = pd.running_batch(setup, size)
    key = pd.step_key(setup, batch)
    replay = pd.replay_fn(setup, batch)
    before = pd.p50(clock.each(replay, setup.reps))
    with torch.inference_mode():
        want = graphs._body(*key).argmax(-1)
    kernels_before = kernels_per_step(replay, 10) if clock.cuda else (0, 0.0)
    report.log(f"batch {size}: eager-kernel graph {before:.2f} ms; compiling")

    graphs.model = cast(torch.nn.Module, torch.compile(eager_model, dynamic=False))
    fresh_graphs(graphs)
    began = time.perf_counter()
    replay = pd.replay_fn(setup, batch)  # compiles (warm-up runs), then captures
    compile_s = time.perf_counter() - began
    after = pd.p50(clock.each(replay, setup.reps))
    with torch.inference_mode():
        got = graphs._body(*key).argmax(-1)
    kernels_after = kernels_per_step(replay, 10) if clock.cuda else (0, 0.0)
    same = int((want == got).sum())
    row = (
        f"| {size} | {key[0]} x {key[1]} | {before:.2f} | {kernels_before[0]} | "
        f"{kernels_before[1]:.2f} | {after:.2f} | {kernels_after[0]} | "
        f"{kernels_after[1]:.2f} | {before / after:.2f}x | {compile_s:.0f} | "
        f"{same} of {len(want)} |"
    )
    report.log(row)
    graphs.model = eager_model
    fresh_graphs(graphs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sizes", default="1,32")
    parser.add_argument(
        "--eager-attention",
        action="store_true",
        help="keep attention out of the compiled code (as captured, cuDNN's kernel at large batch)",
    )
    args = parser.parse_args()
    if args.eager_attention:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # Each layer's attention becomes a graph break: inductor fuses what lies between them,
        # and attention runs the kernel it would run uncompiled.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = torch.compiler.disable(ALL_ATTENTION_FUNCTIONS["sdpa"])
    args.budget = None
    report = pd.Report(600.0)
    setup = pd.build(args, report)
    graphs = setup.graphs
    sizes = [int(s) for s in args.sizes.split(",")]
    torch._dynamo.config.cache_size_limit = 64
    eager_model = graphs.model
    rows: list[str] = []
    for size in sizes:
        try:
            rows.append(probe(setup, report, eager_model, size))
        except Exception as exc:  # keep what the other sizes measured
            report.log(f"batch {size} failed: {type(exc).__name__}: {exc}")
            graphs.model = eager_model
    lines = [
        f"- {bench.machine()}; torch {torch.__version__}; attention "
        f"{'left out of the compiled code' if args.eager_attention else 'compiled too'}",
        "",
        "| batch | bucket | graph of eager kernels ms | kernels | kernel ms | graph of compiled "
        "ms | kernels | kernel ms | speed-up | compile + capture s | same greedy token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "compiled.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
