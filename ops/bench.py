"""guardfleet's benchmark: `make bench` (CPU) or `python ops/bench.py --profile gpu` (CUDA).

Everything is measured in one run, side by side, and reported as ratios to a baseline measured in
the same run, so the figures compare across machines. The table goes to stdout and to
docs/benchmarks.md (with the machine, the command and the date).

CPU profile
  engine  a synthetic Gemma 3 (hidden 512, 8 layers, the real layer pattern, random weights)
          fed default-taxonomy prompts rendered by the real templates, output forced to a
          fixed length. The continuous-batching engine against the static one it replaced
          (loaded from git history, see ops/bench_engine.py): decode step cost, no_think
          throughput, latency alone, a mixed no_think/think workload, head-of-line blocking of
          sync calls behind long generations; transformers' `generate_batch` on the same
          requests and its sliding-window masking against batch-1 `generate`.
  fleet   the demo model through API + Redis + a worker: per-job overhead beyond engine time at
          light load, and the running set a job joined under a 1,000-job burst.
GPU profile (`--compile` adds the CUDA-graph engine)
  the same tables on the Gemma-3-4B text architecture (hidden 2560, 34 layers, vocab 262,208,
  bf16, random weights), 512 no_think requests; `--smoke` runs this code path on the CPU with
  the small model in about two minutes, to check the script before spending device time.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from guardfleet.schemas import ClassifyRequest, Mode  # noqa: E402
from guardfleet.settings import Settings  # noqa: E402
from ops import bench_engine  # noqa: E402
from ops.bench_engine import percentile  # noqa: E402
from worker.engine import DEMO_MODEL_DIR, Engine  # noqa: E402
from worker.prompting import prepare  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def synthetic_engine(
    config: Gemma3TextConfig, device: str, dtype: str, workdir: Path, **settings: Any
) -> Engine:
    torch.manual_seed(0)
    with torch.device(device):  # random init where it will run: minutes faster for 4B on a GPU
        model = Gemma3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(workdir)
    del model
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(workdir)
    return Engine(Settings(model=str(workdir), device=device, dtype=dtype, **settings))


def cpu_config(vocab: int) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
        max_position_embeddings=4096,
    )


def gemma3_4b_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131_072,
        layer_types=[
            ("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)
        ],
    )


PLANS: dict[str, dict[str, Any]] = {
    # n no_think requests of user texts `lengths` tokens; static engine batch sizes; rows in the
    # continuous engine; think requests in the mixed run; backlog generation length; sync
    # probes; batch sizes for the step cost; KV budget (GPU: it is the CUDA-graph arena).
    "cpu": {"n": 64, "lengths": (20, 400), "static": [4, 16], "max_batch": 64, "think": 6,
            "backlog": 768, "probes": 20, "steps": [1, 32], "kv": None},
    "gpu": {"n": 512, "lengths": (100, 100), "static": [32, 128], "max_batch": 128,
            "think": 52, "backlog": 768, "probes": 30, "steps": [1, 32, 128], "kv": 128 * 2048},
    "smoke": {"n": 12, "lengths": (20, 60), "static": [4], "max_batch": 16, "think": 2,
              "backlog": 48, "probes": 4, "steps": [1, 4], "kv": 16 * 1024},
}  # fmt: skip
STATIC_DEFAULT_BATCH = 32  # the static engine's default max_batch_size

MODEL_TEXT = {
    True: "Gemma-3-4B text architecture, bf16",
    False: "synthetic Gemma 3 (hidden 512, 8 layers, the real layer pattern), fp32",
}


def section(lines: list[str], title: str, body: Callable[[], list[str]]) -> None:
    """Measure one table; a failure is recorded in its place and the run goes on."""
    try:
        part = [title, "", *body(), ""]
    except Exception as exc:
        part = [title, "", f"failed: {type(exc).__name__}: {str(exc)[:300]}", ""]
    print("\n".join(part), flush=True)
    lines += part


def engine_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    real_gpu = args.profile == "gpu" and not args.smoke
    plan = PLANS["smoke" if args.smoke else args.profile]
    dtype = "bfloat16" if real_gpu else "float32"
    vocab = len(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    config = gemma3_4b_config() if real_gpu else cpu_config(vocab)
    sizing = {"max_batch_size": plan["max_batch"], "kv_budget_tokens": plan["kv"]}
    graphed: Engine | None = None
    with tempfile.TemporaryDirectory() as tmp:
        engine = synthetic_engine(config, str(device), dtype, Path(tmp), **sizing)
        engines = bench_engine.Engines(engine, plan["max_batch"])
        if args.compile:
            graphed = Engine(Settings(model=tmp, device=str(device), dtype=dtype, compile=True,
                                      **sizing))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        # fp32: in bf16 the check compared attention kernels too (a one-ulp tie at one step of
        # one row on the H200, 2026-11-30), where it means to compare masks.
        tiny = synthetic_engine(
            bench_engine.small_gemma3_config(vocab, 16), str(device), "float32", Path(tmp)
        )
    n, lengths = plan["n"], plan["lengths"]
    no_think = bench_engine.classify_requests(engine, n, lengths, 12, seed=1)
    think = bench_engine.classify_requests(engine, plan["think"], lengths, 200, 2, Mode.THINK)
    backlog = bench_engine.classify_requests(engine, 32, (100, 100), plan["backlog"], 4)
    probes = bench_engine.classify_requests(engine, plan["probes"], (20, 60), 12, seed=5)
    for warm in (engine, graphed):
        if warm is not None:  # the prefix cache and kernels, outside every timing
            warm.generate(bench_engine.copies(no_think[:2]))
    new_text = "continuous, CUDA graphs" if graphed else "continuous"
    lines = [
        f"Model: {MODEL_TEXT[real_gpu]}, random weights. Static engine: `generate` per batch, "
        f"loaded from {bench_engine.STATIC_REV}; continuous engine: up to {plan['max_batch']} "
        f"running rows{', decode steps replayed as CUDA graphs' if graphed else ''}.",
        "",
    ]
    section(lines, "#### Decode step cost", lambda: bench_engine.step_costs(
        engines, no_think, plan["steps"], graphed))  # fmt: skip
    if graphed is not None:
        engines.new = graphed
    section(
        lines,
        f"#### no_think throughput: {n} requests (user texts {lengths[0]}-{lengths[1]} tokens, "
        "12 tokens out), all submitted at once",
        lambda: bench_engine.throughput(engines, no_think, plan["static"], new_text),
    )
    section(lines, "#### Latency at concurrency 1 (no_think, one request at a time)",
            lambda: bench_engine.alone(engines, probes))  # fmt: skip
    section(
        lines,
        f"#### Mixed workload: {n - plan['think']} no_think + {plan['think']} think (200 tokens), "
        f"shuffled, submitted at once (static engine at its default batch, {STATIC_DEFAULT_BATCH})",
        lambda: bench_engine.mixed(engines, no_think[plan["think"] :], think, STATIC_DEFAULT_BATCH),
    )
    section(
        lines,
        "#### Head-of-line: a sync no_think call every 200 ms while a backlog runs",
        lambda: bench_engine.head_of_line(engines, probes, backlog, 0.2, STATIC_DEFAULT_BATCH),
    )
    section(lines, "#### transformers' continuous batching", lambda: [
        *bench_engine.generate_batch_check(engine, no_think[:32]),
        bench_engine.sliding_window_check(tiny, 16),
    ])  # fmt: skip
    return lines


def fleet_section(args: argparse.Namespace) -> list[str]:
    """API + Redis + worker on the demo model, as subprocesses on loopback."""
    import httpx

    from ops import bench_streaming  # needs the API's client libraries; the GPU profile does not

    redis_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "GUARDFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GUARDFLEET_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str]) -> None:
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    try:
        spawn(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"])
        spawn([sys.executable, "-m", "worker", "--name", "bench@local", "--loglevel", "WARNING"])
        spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--port",
                str(api_port),
                "--log-level",
                "warning",
            ]
        )
        url = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: httpx.get(url + "/v1/health/ready", timeout=1).status_code == 200, 180)
        settings = Settings()
        engine = Engine(Settings(device="cpu"))
        rng = random.Random(2)
        texts = [
            bench_engine.user_text(engine.tokenizer, rng.randint(20, 120), rng)
            for _ in range(args.light)
        ]
        direct = []
        for text in texts:
            req = prepare(ClassifyRequest(prompt=text), engine, settings)
            t0 = time.perf_counter()
            engine.generate([req])
            direct.append((time.perf_counter() - t0) * 1000)
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post("/v1/classify", json={"prompt": "warm up"})
            fleet, overhead = [], []
            for text in texts:
                t0 = time.perf_counter()
                job = client.post("/v1/classify", json={"prompt": text}).json()
                wall = (time.perf_counter() - t0) * 1000
                fleet.append(wall)
                overhead.append(wall - job["result"]["inference_ms"])
            streaming = bench_streaming.stream_latency(
                url, env["GUARDFLEET_REDIS_URL"], texts[: args.streams]
            )
            burst_ids = burst(url, args.burst)
            sizes = collect_batch_sizes(client, burst_ids)
        max_batch = settings.max_batch_size
        joined = statistics.mean(sizes)
        return [
            f"### Fleet: demo model, API + Redis + one CPU worker (max_batch_size {max_batch})",
            "",
            "| measure | p50 | p95 |",
            "|---|---:|---:|",
            f"| direct engine call, ms ({args.light} requests) | {percentile(direct, 50):.1f} | "
            f"{percentile(direct, 95):.1f} |",
            f"| sync /v1/classify over HTTP, ms (same requests, one at a time) | "
            f"{percentile(fleet, 50):.1f} | {percentile(fleet, 95):.1f} |",
            f"| queue overhead per job = HTTP wall - engine time, ms | "
            f"{percentile(overhead, 50):.1f} | {percentile(overhead, 95):.1f} |",
            "",
            f"{args.burst}-job burst via POST /v1/jobs: a job joined a running set of "
            f"{joined:.1f} rows on average ({joined / max_batch:.2f} x max_batch_size)",
            "",
            *streaming,
        ]
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def burst(url: str, count: int) -> list[str]:
    import asyncio

    import httpx

    async def submit_all() -> list[str]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> str:
                async with sem:
                    r = await client.post("/v1/jobs", json={"prompt": f"How do I cook rice? {i}"})
                    return str(r.json()["id"])

            return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(submit_all())


def collect_batch_sizes(client: Any, ids: list[str]) -> list[int]:
    sizes: list[int] = []
    for job_id in ids:
        job = client.get(f"/v1/jobs/{job_id}?wait=60").json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"burst job {job_id} ended {job['status']}: {job.get('error')}")
        sizes.append(job["result"]["batch_size"])
    return sizes


def wait_for(check: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(every)
    raise RuntimeError("the stack did not become ready")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--requests", type=int, default=64, help="engine requests per config")
    parser.add_argument("--light", type=int, default=50, help="sequential fleet requests")
    parser.add_argument("--burst", type=int, default=1000, help="jobs in the fleet burst")
    parser.add_argument("--streams", type=int, default=20, help="think streams timed")
    parser.add_argument("--skip-fleet", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="also run the engine with GUARDFLEET_COMPILE"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="with --profile gpu: run its code path on the CPU with the small model, to check "
        "the script before spending device time (writes no results)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device("cuda:0" if args.profile == "gpu" and not args.smoke else "cpu")
    command = reproduce(sys.argv[1:])
    header = [
        f"## {args.profile.upper()} profile, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `{command.strip()}`",
        "",
    ]
    print("\n".join(header), flush=True)
    engine_lines = engine_section(args, device)
    lines = [*header, "### Engine", "", *engine_lines]
    if args.profile == "cpu" and not args.skip_fleet:
        lines += fleet_section(args)
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        write_results(args.out, args.profile, text)


def reproduce(argv: list[str]) -> str:
    """The command that reproduces this run: the GUARDFLEET_ settings in force and the
    arguments, less where the results went."""
    shown: list[str] = []
    for arg in argv:
        if shown and shown[-1] == "--out":
            shown.pop()
        elif not arg.startswith("--out="):
            shown.append(arg)
    if shown and shown[-1] == "--out":
        shown.pop()
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("GUARDFLEET_")]
    return " ".join([*knobs, "python ops/bench.py", *shown])


def write_results(path: Path, profile: str, section: str) -> None:
    """Keep one section per profile in docs/benchmarks.md, replacing this profile's."""
    marker = f"<!-- {profile} -->"
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = existing.split(marker)
    body = f"{marker}\n{section}\n{marker}"
    if len(parts) == 3:
        existing = parts[0] + body + parts[2]
    else:
        existing = existing.rstrip() + "\n\n" + body + "\n"
    path.parent.mkdir(exist_ok=True)
    path.write_text(existing)


if __name__ == "__main__":
    main()
