"""guardfleet's benchmark: `make bench` (CPU) or `python ops/bench.py --profile gpu` (CUDA).

Everything is measured in one run, side by side, and reported as ratios to a baseline measured in
the same run, so the figures compare across machines. The table goes to stdout and to
docs/benchmarks.md (with the machine, the command and the date).

CPU profile
  engine  a synthetic Gemma 3 (hidden 512, 8 layers, random weights) behind the real engine, fed
          default-taxonomy prompts rendered by the real templates with user texts of 20-400
          tokens, output forced to 12 tokens (a no_think verdict); batch sizes 1/4/16/32, with
          and without prefix reuse; transformers' continuous batching (`generate_batch`) on the
          same requests; model FLOP/s against this machine's dense-matmul rate.
  fleet   the demo model through API + Redis + a worker: per-job overhead beyond engine time at
          light load, and the mean batch the worker formed under a 1,000-job burst.
GPU profile
  the Gemma-3-4B text architecture (hidden 2560, 34 layers, vocab 262,208, bf16, random
  weights): no_think (12 tokens) and think (200 tokens) classifications/s, prefill tokens/s,
  model FLOP utilisation, and p50 latency at concurrency 1.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from guardfleet.schemas import ClassifyRequest  # noqa: E402
from guardfleet.settings import Settings  # noqa: E402
from worker.batching import BatchPolicy, Pending, take_batch  # noqa: E402
from worker.engine import DEMO_MODEL_DIR, Engine, GenRequest  # noqa: E402
from worker.prompting import prepare  # noqa: E402

FILLER_TEXT = (
    "please explain how the local library schedules its weekend reading groups for children and "
    "whether volunteers can help with the garden behind the old station near the river bank"
)
WORDS = tuple(FILLER_TEXT.split())


@dataclass
class Row:
    label: str
    values: dict[str, str]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Dense matmul FLOP/s of this machine: the ceiling model FLOP/s is compared against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        count += 1
    sync(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def user_text(tokenizer: Any, tokens: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


class FlopCounter:
    """Model FLOPs of the tokens a forward pass really computes (padding and reused prefix
    excluded): 2 x linear weights per token, attention 4 x heads x head_dim x context per layer,
    and the LM head once per generated token."""

    def __init__(self, config: Gemma3TextConfig, model: torch.nn.Module) -> None:
        self.config = config
        lm_head = config.vocab_size * config.hidden_size
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        self.per_token = 2 * (linear - lm_head)
        self.lm_head = 2 * lm_head
        self.windows = [
            config.sliding_window if kind == "sliding_attention" else None
            for kind in config.layer_types or []
        ]

    def attention(self, position: int) -> int:
        heads, dim = self.config.num_attention_heads, self.config.head_dim
        return sum(4 * heads * dim * min(position + 1, w or position + 1) for w in self.windows)

    def request(self, prompt: int, computed_from: int, generated: int) -> int:
        prefill = sum(self.per_token + self.attention(p) for p in range(computed_from, prompt))
        decode = sum(
            self.per_token + self.attention(prompt + i) for i in range(max(generated - 1, 0))
        )
        return prefill + decode + self.lm_head * generated


def synthetic_engine(config: Gemma3TextConfig, device: str, dtype: str, workdir: Path) -> Engine:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(workdir)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(workdir)
    return Engine(Settings(model=str(workdir), device=device, dtype=dtype))


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


def make_requests(
    engine: Engine, n: int, lengths: tuple[int, int], new_tokens: int, seed: int
) -> list[GenRequest]:
    rng = random.Random(seed)
    settings = Settings()
    out = []
    for _ in range(n):
        text = user_text(engine.tokenizer, rng.randint(*lengths), rng)
        req = prepare(ClassifyRequest(prompt=text), engine, settings)
        req.max_new_tokens, req.force_length = new_tokens, True
        out.append(req)
    return out


def run_engine(
    engine: Engine, requests: list[GenRequest], batch_size: int, reuse: bool, flops: FlopCounter
) -> dict[str, float]:
    """Feed all requests through the batcher's own batch formation; time each batch."""
    engine.reuse_prefix = reuse
    policy = BatchPolicy(max_batch_size=batch_size, max_wait_ms=0, max_batch_tokens=10**9)
    pending = [Pending(r, len(r.prompt_ids), r.batch_key, 0.0) for r in requests]
    engine.generate([requests[0]])  # warm the prefix cache and kernels outside the timing
    latencies: list[float] = []
    model_flops = 0
    started = time.perf_counter()
    while batch := take_batch(pending, now=1.0, policy=policy, more_coming=False):
        t0 = time.perf_counter()
        results = engine.generate([p.item for p in batch])
        sync(engine.device)
        latencies += [time.perf_counter() - t0] * len(batch)
        for p, result in zip(batch, results, strict=True):
            computed_from = p.item.prefix_len if reuse else 0
            model_flops += flops.request(p.tokens, computed_from, len(result.token_ids))
    elapsed = time.perf_counter() - started
    return {
        "rate": len(requests) / elapsed,
        "p50": percentile(latencies, 50) * 1000,
        "p95": percentile(latencies, 95) * 1000,
        "flops": model_flops / elapsed,
        "prefill_tokens": sum(len(r.prompt_ids) for r in requests) / elapsed,
    }


def run_continuous_batching(engine: Engine, requests: list[GenRequest]) -> float | str:
    """transformers' own continuous batching (paged KV, block sharing), if it runs here."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=requests[0].max_new_tokens,
        min_new_tokens=requests[0].max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=engine.pad_id,
    )
    try:
        engine.model.generate_batch([requests[0].prompt_ids], generation_config=config)
        started = time.perf_counter()
        engine.model.generate_batch([r.prompt_ids for r in requests], generation_config=config)
        return len(requests) / (time.perf_counter() - started)
    except Exception as exc:  # recorded, not hidden: it is one of the options compared
        return f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def engine_section(
    args: argparse.Namespace, device: torch.device
) -> tuple[list[str], dict[str, Any]]:
    gpu = args.profile == "gpu"
    real_gpu = gpu and not args.smoke
    dtype = torch.bfloat16 if real_gpu else torch.float32
    peak = matmul_rate(device, dtype, 8192 if real_gpu else 2048, 3.0)
    tokenizer_vocab = len(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    config = gemma3_4b_config() if real_gpu else cpu_config(tokenizer_vocab)
    with tempfile.TemporaryDirectory() as tmp:
        engine = synthetic_engine(
            config, str(device), "bfloat16" if real_gpu else "float32", Path(tmp)
        )
    flops = FlopCounter(config, engine.model)
    lines = [
        f"Dense matmul rate ({'bf16 8192' if real_gpu else 'fp32 2048'}^3, this run): "
        f"{peak / 1e9:,.0f} GFLOP/s",
        "",
    ]
    facts: dict[str, Any] = {"peak": peak}
    sizes = [1, 4, 16, 32] + ([64, 128] if real_gpu else [])
    n = args.requests
    lengths = (100, 100) if gpu else (20, 400)
    for label, new_tokens in [("no_think (12 tokens)", 12)] + (
        [("think (200 tokens)", 200)] if gpu else []
    ):
        requests = make_requests(engine, n, lengths, new_tokens, seed=1)
        lines += [
            f"### {label}, {n} requests, user texts {lengths[0]}-{lengths[1]} tokens",
            "",
            "| batch | prefix reuse | class./s | vs batch 1 | vs no reuse | p50 ms | p95 ms "
            "| prefill tok/s | model FLOP/s | of matmul rate |",
            "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base: float | None = None
        for size in sizes:
            results = {}
            for reuse in (False, True):
                results[reuse] = r = run_engine(engine, requests, size, reuse, flops)
                base = base or r["rate"]
                lines.append(
                    f"| {size} | {'yes' if reuse else 'no'} | {r['rate']:.2f} | "
                    f"{r['rate'] / base:.2f}x | {r['rate'] / results[False]['rate']:.2f}x | "
                    f"{r['p50']:.0f} | {r['p95']:.0f} | {r['prefill_tokens']:,.0f} | "
                    f"{r['flops'] / 1e9:,.1f} G | {r['flops'] / peak:.0%} |"
                )
                facts[f"{label}/{size}/{reuse}"] = r
            print("\n".join(lines[-2:]), flush=True)
        if not gpu:
            cb = run_continuous_batching(engine, requests)
            best = max(facts[f"{label}/{s}/True"]["rate"] for s in sizes)
            cb_text = (
                f"{cb:.2f} class./s ({cb / best:.2f}x our best)" if isinstance(cb, float) else cb
            )
            lines += [
                "",
                f"transformers continuous batching (`generate_batch`), same requests: {cb_text}",
            ]
        lines.append("")
        if gpu:
            single = run_engine(engine, requests[:32], 1, True, flops)
            lines.append(f"p50 latency at concurrency 1 ({label}): {single['p50']:.0f} ms\n")
    return lines, facts


def fleet_section(args: argparse.Namespace) -> list[str]:
    """API + Redis + worker on the demo model, as subprocesses on loopback."""
    import httpx

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
        texts = [user_text(engine.tokenizer, rng.randint(20, 120), rng) for _ in range(args.light)]
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
            burst_ids = burst(url, args.burst)
            sizes = collect_batch_sizes(client, burst_ids)
        max_batch = settings.max_batch_size
        job_weighted = statistics.mean(sizes)
        batch_weighted = len(sizes) / sum(1 / s for s in sizes)
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
            f"{args.burst}-job burst via POST /v1/jobs: mean formed batch {batch_weighted:.1f} "
            f"({batch_weighted / max_batch:.2f} x max_batch_size; per job: {job_weighted:.1f})",
            "",
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


def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
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
    parser.add_argument("--skip-fleet", action="store_true")
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
    command = "python ops/bench.py " + " ".join(sys.argv[1:])
    header = [
        f"## {args.profile.upper()} profile, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `{command.strip()}`",
        "",
    ]
    print("\n".join(header), flush=True)
    engine_lines, _ = engine_section(args, device)
    lines = [*header, "### Engine", "", *engine_lines]
    if args.profile == "cpu" and not args.skip_fleet:
        lines += fleet_section(args)
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        write_results(args.out, args.profile, text)


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
