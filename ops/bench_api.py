"""The producer and the store under load: accepted jobs/s, Redis commands per job (async and
sync), waiters, batches (time to accept, fan-out rate, cancel), and the broker on its own Redis
against one Redis for both.

Runs Redis, one API process (uvicorn, one event loop) and, for the per-job command counts, one
CPU worker on the demo model, all as subprocesses on loopback; the load comes from this process
over raw HTTP/1.1 connections (httpx's pool costs more CPU than the API it would measure once it
holds hundreds of connections). Everything shares this machine's cores, so the figures are a
floor for a machine where the load comes from elsewhere.

    python ops/bench_api.py            # writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.main import REDIS_CLIENT_NAME  # noqa: E402
from guardfleet.keys import batch_fanout_key, job_channel, part_tags, stats, worker_key  # noqa: E402
from ops.bench import free_port, machine, reproduce, wait_for, write_results  # noqa: E402

IDLE_S = 5


class Conn:
    """One keep-alive HTTP/1.1 connection: just enough of the protocol for JSON requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), json.loads(payload) if payload else None

    def close(self) -> None:
        self.writer.close()


class Stack:
    """Redis, the API and (on demand) a worker, stopped in reverse order."""

    def __init__(
        self, redis_max_connections: int, broker_apart: bool = False, parts: int = 1
    ) -> None:
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        # With `broker_apart`, a second Redis for the broker (GUARDFLEET_BROKER_URL).
        self.broker_port = free_port() if broker_apart else self.redis_port
        self.env = {
            **os.environ,
            "GUARDFLEET_REDIS_URL": self.url,
            "GUARDFLEET_BROKER_URL": f"redis://127.0.0.1:{self.broker_port}/0",
            "GUARDFLEET_DEVICE": "cpu",
            "GUARDFLEET_REDIS_MAX_CONNECTIONS": str(redis_max_connections),
            "GUARDFLEET_MAX_QUEUED_BULK": "1000000",
            "GUARDFLEET_STORE_PARTS": str(parts),
            "HF_HUB_OFFLINE": "1",
        }
        self.parts = parts
        self.checks = 0  # the commands `_succeeded` sent: taken out of the parts' counts
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        out = subprocess.DEVNULL
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Stack:
        for port in sorted({self.redis_port, self.broker_port}):
            self.spawn(["redis-server", "--port", str(port), "--save", "", "--maxclients", "20000"])
        self.redis = redis.Redis.from_url(self.url, decode_responses=True)
        self.broker = redis.Redis(port=self.broker_port, decode_responses=True)
        wait_for(self.broker.ping, 30)
        self.start_api()
        return self

    def start_api(self, pool: int | None = None) -> None:
        """(Re)start the API on its port (a fresh process has an empty Redis pool), with at
        most `pool` Redis connections if given."""
        if pool is not None:
            self.env["GUARDFLEET_REDIS_MAX_CONNECTIONS"] = str(pool)
        if self.api is not None:
            self.api.terminate()
            self.api.wait(timeout=30)
            self.procs.remove(self.api)
        self.api = self.spawn(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(self.api_port),
             "--log-level", "warning", "--backlog", "4096"]
        )  # fmt: skip
        wait_for(lambda: self.redis.ping() and self._live(), 60)

    def _live(self) -> bool:
        import httpx

        api = f"http://127.0.0.1:{self.api_port}/v1/health/live"
        return httpx.get(api, timeout=1).status_code == 200

    def start_worker(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "worker", "--name", "bench@api", "--loglevel", "WARNING"]
        proc = self.spawn(argv)
        wait_for(lambda: bool(self.redis.exists(worker_key("bench@api"))), 180)
        return proc

    def start_delivery(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "worker.delivery", "--name", "bench-hooks@api",
                "--loglevel", "WARNING"]  # fmt: skip
        return self.spawn(argv)

    def api_rss_mb(self) -> float:
        assert self.api is not None
        for line in Path(f"/proc/{self.api.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def api_connections(self) -> int:
        return sum(1 for c in self.redis.client_list() if c["name"] == REDIS_CLIENT_NAME)

    def __exit__(self, *_: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


Totals = tuple[float, float, float, float]


def commands(client: redis.Redis) -> Totals:
    """Commands served so far (excluding INFO itself), bytes in and out, and the CPU
    milliseconds Redis has used (its main thread does the commands' work)."""
    calls = sum(by_command(client).values())
    net: dict[str, Any] = client.info("stats")
    cpu: dict[str, Any] = client.info("cpu")
    cpu_ms = 1000 * (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
    return calls, net["total_net_input_bytes"], net["total_net_output_bytes"], cpu_ms


def by_command(client: redis.Redis) -> Counter[str]:
    stats: dict[str, Any] = client.info("commandstats")
    return Counter({k[8:]: v["calls"] for k, v in stats.items() if k != "cmdstat_info"})


def per_job(before: Totals, after: Totals, jobs: int) -> list[float]:
    return [(b - a) / jobs for a, b in zip(before, after, strict=True)]


async def submit(port: int, count: int, clients: int) -> tuple[list[str], float, Counter[int]]:
    """POST /v1/jobs `count` times from `clients` connections; ids, seconds, statuses."""
    ids: list[str] = []
    statuses: Counter[int] = Counter()
    todo = iter(range(count))

    async def client() -> None:
        conn = await Conn.open(port)
        for i in todo:
            status, job = await conn.request("POST", "/v1/jobs", {"prompt": f"Is {i} prime?"})
            statuses[status] += 1
            if status == 202:
                ids.append(job["id"])
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, time.perf_counter() - started, statuses


def accept(port: int, count: int, clients: int) -> tuple[list[str], float]:
    """`submit`, which must have had every job accepted (202); ids and seconds."""
    ids, seconds, statuses = asyncio.run(submit(port, count, clients))
    if statuses != Counter({202: count}):
        raise RuntimeError(f"submissions answered {dict(statuses)}")
    return ids, seconds


async def classify_each(port: int, count: int, clients: int) -> tuple[float, Counter[int]]:
    """POST /v1/classify (sync) `count` times from `clients` connections; seconds, statuses."""
    statuses: Counter[int] = Counter()
    todo = iter(range(count))

    async def client() -> None:
        conn = await Conn.open(port)
        for i in todo:
            body = {"prompt": f"Is {i} a square?"}
            statuses[(await conn.request("POST", "/v1/classify", body))[0]] += 1
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, statuses


async def poll_each(port: int, ids: list[str]) -> None:
    conn = await Conn.open(port)
    for job_id in ids:
        status, _ = await conn.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, status
    conn.close()


async def waiters(stack: Stack, ids: list[str], per_s: int) -> dict[str, float]:
    """A long poll (`?wait=60`) on every job, opened at `per_s` a second and then all waiting
    at once; then every job is cancelled."""
    port = stack.api_port
    opened: list[Conn] = []
    polls: list[asyncio.Task[tuple[int, Any]]] = []
    # Small waves (a hundredth of a second's worth each), so the load generator's own bursts do
    # not decide how many requests read Redis at the same moment.
    wave = max(1, per_s // 100)
    for start in range(0, len(ids), wave):
        conns = await asyncio.gather(*(Conn.open(port) for _ in ids[start : start + wave]))
        polls += [
            asyncio.create_task(c.request("GET", f"/v1/jobs/{i}?wait=60"))
            for c, i in zip(conns, ids[start : start + wave], strict=True)
        ]
        opened += conns
        await asyncio.sleep(0.01)
    channels = [job_channel(i) for i in ids]

    def all_waiting() -> bool:
        found = 0
        for start in range(0, len(channels), 1000):
            numsub = stack.redis.pubsub_numsub(*channels[start : start + 1000])
            found += sum(1 for _, n in numsub if n)
        return found == len(ids)

    started = time.perf_counter()
    while not all_waiting():
        if time.perf_counter() - started > 120:
            early = Counter(str(p.result())[:150] for p in polls if p.done())
            raise RuntimeError(f"the long polls did not all start waiting; answered: {early}")
        await asyncio.sleep(0.5)
    opened_s = time.perf_counter() - started
    held, rss = stack.api_connections(), stack.api_rss_mb()
    started = time.perf_counter()
    cancellers = [await Conn.open(port) for _ in range(16)]

    async def cancel(conn: Conn, mine: list[str]) -> None:
        for job_id in mine:
            await conn.request("POST", f"/v1/jobs/{job_id}/cancel")

    await asyncio.gather(*(cancel(c, ids[k::16]) for k, c in enumerate(cancellers)))
    answers = await asyncio.gather(*polls)
    answered_s = time.perf_counter() - started
    for conn in opened + cancellers:
        conn.close()
    ok = sum(1 for status, job in answers if status == 200 and job["status"] == "cancelled")
    return {
        "waiters": len(ids),
        "opened_s": opened_s,
        "connections": held,
        "rss_mb": rss,
        "answered": ok,
        "answered_s": answered_s,
    }


def batch_lines(count: int) -> bytes:
    return "".join(
        json.dumps({"custom_id": f"item-{n}", "prompt": f"How do I repot a fern? ({n})"}) + "\n"
        for n in range(count)
    ).encode()


def batches(stack: Stack, items: int) -> dict[str, float]:
    """Accept a batch of `items` lines with no delivery worker, then start one and time its
    fan-out; then cancel a second batch once all its items are queued."""
    import httpx

    api = f"http://127.0.0.1:{stack.api_port}"
    body = batch_lines(items)
    with httpx.Client(base_url=api, timeout=120) as http:
        http.post("/v1/batches", content=batch_lines(1))  # warm: scripts, connections
        time.sleep(0.3)  # let the cached bulk backlog lapse, as for any first submit
        before = commands(stack.redis)
        t0 = time.perf_counter()
        first = http.post("/v1/batches", content=body)
        accept_s = time.perf_counter() - t0
        accept_cmds = commands(stack.redis)[0] - before[0]
        if first.status_code != 202:
            raise RuntimeError(f"batch answered {first.status_code}: {first.text[:200]}")
        second = http.post("/v1/batches", content=body).json()["id"]
        cursor = batch_fanout_key(first.json()["id"])
        delivery = stack.start_delivery()
        wait_for(lambda: int(stack.redis.hget(cursor, "cursor") or 0) > 0, 120, every=0.005)
        started = time.perf_counter()
        wait_for(lambda: int(stack.redis.hget(cursor, "cursor") or 0) >= items, 600, every=0.01)
        fanned_s = time.perf_counter() - started
        key = batch_fanout_key(second)
        wait_for(lambda: int(stack.redis.hget(key, "cursor") or 0) >= items, 600, every=0.05)
        t0 = time.perf_counter()
        answer = http.post(f"/v1/batches/{second}/cancel").json()
        answer_s = time.perf_counter() - t0

        def cancelled() -> bool:
            return bool(http.get(f"/v1/batches/{second}").json()["status"] == "cancelled")

        wait_for(cancelled, 600, every=0.05)
        cancel_s = time.perf_counter() - t0
        done = http.get(f"/v1/batches/{second}").json()
        delivery.terminate()
        delivery.wait(timeout=30)
    return {
        "items": items,
        "accept_s": accept_s,
        "accept_cmds": accept_cmds,
        "fanout_per_s": items / fanned_s,
        "answer_s": answer_s,
        "answer_status": answer["status"],
        "cancel_s": cancel_s,
        "cancelled": done["request_counts"]["cancelled"],
    }


def run(args: argparse.Namespace) -> list[str]:
    with Stack(args.pool) as stack:
        # A job's whole life, on jobs a worker runs: submit, run, one poll.
        before = commands(stack.redis)
        ids, _ = accept(stack.api_port, args.run_jobs, args.clients)
        submitted = commands(stack.redis)
        worker = stack.start_worker()
        ran_from, mix = commands(stack.redis), by_command(stack.redis)
        t0 = time.monotonic()
        _until_succeeded(stack, len(ids))
        ran_s = time.monotonic() - t0
        ran_to = commands(stack.redis)
        mix = by_command(stack.redis) - mix
        asyncio.run(poll_each(stack.api_port, ids))
        polled = commands(stack.redis)
        time.sleep(IDLE_S)  # what the fleet costs Redis while nothing happens
        idle = commands(stack.redis)
        chatter, idle_cpu = (idle[0] - polled[0]) / IDLE_S, (idle[3] - polled[3]) / IDLE_S
        # The blocking path: submit, run and answer in one request.
        sync_s, statuses = asyncio.run(classify_each(stack.api_port, args.sync_calls, 8))
        if statuses != Counter({200: args.sync_calls}):
            raise RuntimeError(f"sync calls answered {dict(statuses)}")
        sync = per_job(idle, commands(stack.redis), args.sync_calls)
        sync[0] -= chatter * sync_s / args.sync_calls
        sync[3] -= idle_cpu * sync_s / args.sync_calls
        worker.terminate()
        worker.wait(timeout=60)

        # The producer alone: accepted jobs/s, then a long poll on each of those jobs.
        waiting, seconds = accept(stack.api_port, args.waiters, args.clients)
        # A fresh API process with a small pool: every waiter is answered on it, and what it
        # holds is what the waiters needed, not what the submitting burst opened.
        stack.start_api(args.waiter_pool)
        result = asyncio.run(waiters(stack, waiting, args.open_per_s))
        batch = batches(stack, args.batch_items)

    jobs = len(ids)
    run_cmds = per_job(ran_from, ran_to, jobs)
    run_cmds[0] -= chatter * ran_s / jobs
    run_cmds[3] -= idle_cpu * ran_s / jobs
    parts = [per_job(before, submitted, jobs), run_cmds, per_job(ran_to, polled, jobs)]
    total = [sum(column) for column in zip(*parts, strict=True)]

    def row(name: str, v: list[float]) -> str:
        return f"| {name} | {v[0]:.1f} | {v[1] / 1024:.2f} | {v[2] / 1024:.2f} | {v[3]:.3f} |"

    return [
        "### Accepting jobs: one API process",
        "",
        f"- **{args.waiters / seconds:.0f} jobs/s** accepted: {args.waiters} `POST /v1/jobs` "
        f"(202 each) from {args.clients} connections, no worker running",
        "",
        f"### Redis per async job ({jobs} jobs, one CPU worker on the demo model)",
        "",
        "| step | commands | KiB in | KiB out | Redis CPU ms |",
        "|---|---:|---:|---:|---:|",
        row("submit (`POST /v1/jobs`)", parts[0]),
        row(f"run (in {ran_s:.0f} s; idle chatter of {chatter:.0f}/s taken out)", parts[1]),
        row("one poll (`GET /v1/jobs/{id}`)", parts[2]),
        row("**whole job**", total),
        row(
            f"sync `POST /v1/classify`, whole call ({args.sync_calls} calls from 8 connections)",
            sync,
        ),
        "",
        f"At {total[3]:.3f} ms of Redis CPU a job, one Redis core (Redis runs commands on one "
        f"thread) would serve about **{1000 / total[3]:,.0f} jobs/s** like these.",
        "",
        "Commands of the run step, per job (Lua scripts' own calls count, as in INFO "
        "commandstats): " + ", ".join(f"{k} {n / jobs:.1f}" for k, n in mix.most_common(12)),
        "",
        f"### {result['waiters']:.0f} concurrent long polls on one API process (opened at "
        f"{args.open_per_s}/s)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| Redis connections a fresh API process held while they all waited (pool "
        f"{args.waiter_pool}, its pub/sub connection included) | "
        f"{result['connections']:.0f} |",
        f"| seconds until every poll was subscribed | {result['opened_s']:.1f} |",
        f"| API resident memory with all waiting, MiB | {result['rss_mb']:.0f} |",
        f"| polls answered `cancelled` after their jobs were cancelled | "
        f"{result['answered']:.0f} |",
        f"| seconds from the first cancel to the last answer | {result['answered_s']:.1f} |",
        "",
        f"### A {batch['items']:.0f}-line batch (no GPU worker)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| seconds to accept it (`POST /v1/batches`, answered `validating`) | "
        f"{batch['accept_s']:.2f} |",
        f"| Redis commands the accept cost | {batch['accept_cmds']:.0f} |",
        f"| items queued a second by one delivery worker (the fan-out) | "
        f"{batch['fanout_per_s']:,.0f} |",
        f"| seconds until `POST .../cancel` answered (`{batch['answer_status']}`), every item "
        f"queued | {batch['answer_s']:.2f} |",
        f"| seconds until the delivery worker had it `cancelled` | {batch['cancel_s']:.2f} |",
        f"| items counted cancelled | {batch['cancelled']:.0f} |",
        "",
    ]


def broker_apart(args: argparse.Namespace, rounds: int) -> list[str]:
    """One Redis against the broker on a second one, alternately on fresh stacks: accepted
    jobs/s, and what an async job (submit, run, one poll) costs each server."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    # Per kind of stack, per round, per server: commands, bytes in, bytes out, CPU ms a job.
    cost: dict[bool, list[list[list[float]]]] = {False: [], True: []}
    for _ in range(rounds):
        for apart in (False, True):
            with Stack(args.pool, broker_apart=apart) as stack:
                servers = [stack.redis, stack.broker] if apart else [stack.redis]
                before = [commands(r) for r in servers]
                ids, _ = accept(stack.api_port, args.apart_jobs, 16)
                worker = stack.start_worker()
                _until_succeeded(stack, len(ids))
                worker.terminate()
                worker.wait(timeout=60)
                asyncio.run(poll_each(stack.api_port, ids))
                # Idle chatter (heartbeats, sweeps) is not taken out here: both sides have it.
                cost[apart].append(
                    [
                        per_job(b, commands(r), len(ids))
                        for b, r in zip(before, servers, strict=True)
                    ]
                )
                _, seconds = accept(stack.api_port, args.apart_accept, args.clients)
                rates[apart].append(args.apart_accept / seconds)

    def cell(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    def mean(kind: bool, server: int, measure: int) -> float:
        return sum(r[server][measure] for r in cost[kind]) / rounds

    one = [mean(False, 0, m) for m in (0, 3)]
    store, broker = ([mean(True, i, m) for m in (0, 3)] for i in (0, 1))

    ratio = sum(rates[True]) / sum(rates[False])
    return [
        "### Broker on its own Redis (`GUARDFLEET_BROKER_URL`), against one Redis for both",
        "",
        f"Fresh stacks, one Redis and two alternately, {rounds} rounds: {args.apart_jobs} jobs "
        f"submitted, run by one CPU worker and polled once (commands per job, idle chatter "
        f"included), then {args.apart_accept} more accepted with no worker running.",
        "",
        "| measure | one Redis | store + broker |",
        "|---|---:|---:|",
        f"| jobs/s one API process accepts (each round) | {cell(rates[False])} | "
        f"{cell(rates[True])} |",
        f"| Redis commands per async job (mean of rounds) | {one[0]:.1f} | {store[0]:.1f} + "
        f"{broker[0]:.1f} |",
        f"| Redis CPU ms per async job (mean of rounds) | {one[1]:.3f} | {store[1]:.3f} + "
        f"{broker[1]:.3f} |",
        "",
        f"Accepted jobs/s with the broker apart: **{ratio:.2f}x** one Redis's (two writes a "
        "submit instead of one script).",
        "",
    ]


def parts_cost(args: argparse.Namespace) -> list[str]:
    """What the store's parts cost (`GUARDFLEET_STORE_PARTS`): each sweep reads every part, so
    an idle fleet (a GPU worker, a delivery worker, the API) sends Redis more commands the more
    parts there are. Fresh stacks, part counts alternately: idle commands/s and Redis CPU, then
    commands and CPU per async job (idle chatter included) and accepted jobs/s."""
    counts = (1, 16, 256)
    rows: dict[int, list[list[float]]] = {n: [] for n in counts}
    for _ in range(args.parts_rounds):
        for parts in counts:
            with Stack(args.pool, parts=parts) as stack:
                worker, delivery = stack.start_worker(), stack.start_delivery()
                time.sleep(IDLE_S)  # both sweeping
                before = commands(stack.redis)
                time.sleep(2 * IDLE_S)
                idle = per_job(before, commands(stack.redis), 2 * IDLE_S)
                before, checks = commands(stack.redis), stack.checks
                ids, _ = accept(stack.api_port, args.apart_jobs, 16)
                _until_succeeded(stack, len(ids))
                asyncio.run(poll_each(stack.api_port, ids))
                job = per_job(before, commands(stack.redis), len(ids))
                job[0] -= (stack.checks - checks) / len(ids)
                for proc in (worker, delivery):
                    proc.terminate()
                    proc.wait(timeout=60)
                _, seconds = accept(stack.api_port, args.apart_accept, args.clients)
                rows[parts].append([idle[0], idle[3], job[0], job[3], args.apart_accept / seconds])

    def cell(parts: int, measure: int, fmt: str) -> str:
        return ", ".join(format(r[measure], fmt) for r in rows[parts])

    lines = [
        "### The store's parts (`GUARDFLEET_STORE_PARTS`)",
        "",
        f"Fresh stacks, part counts alternately, {args.parts_rounds} rounds (one figure each): "
        f"an idle GPU worker and delivery worker for {2 * IDLE_S} s, then {args.apart_jobs} "
        f"jobs submitted, run and polled once (idle chatter included), then "
        f"{args.apart_accept} more accepted with no worker running.",
        "",
        "| measure | " + " | ".join(f"{n} part{'s' if n > 1 else ''}" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    for name, measure, fmt in (
        ("idle Redis commands/s", 0, ",.0f"),
        ("idle Redis CPU ms/s", 1, ".1f"),
        ("Redis commands per async job", 2, ".1f"),
        ("Redis CPU ms per async job", 3, ".3f"),
        ("jobs/s one API process accepts", 4, ",.0f"),
    ):
        lines.append(f"| {name} | " + " | ".join(cell(n, measure, fmt) for n in counts) + " |")
    return [*lines, ""]


def _until_succeeded(stack: Stack, jobs: int) -> None:
    wait_for(lambda: _succeeded(stack) >= jobs, 900)


def _succeeded(stack: Stack) -> int:
    """Jobs ended `succeeded` so far: one command a part, where reading each job would add
    dozens of commands per job to the very counts being measured."""
    with stack.redis.pipeline(transaction=False) as pipe:
        for tag in part_tags(stack.parts):
            pipe.hget(stats(tag), "jobs_ended:succeeded")
        found = pipe.execute()
    stack.checks += stack.parts
    return sum(int(n or 0) for n in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-jobs", type=int, default=1000, help="jobs a worker runs")
    parser.add_argument("--clients", type=int, default=64, help="submitting connections")
    parser.add_argument(
        "--waiters", type=int, default=10_000, help="jobs submitted, then long-polled at once"
    )
    parser.add_argument("--open-per-s", type=int, default=1000, help="long polls opened a second")
    parser.add_argument("--batch-items", type=int, default=50_000, help="lines per batch")
    parser.add_argument("--pool", type=int, default=100, help="GUARDFLEET_REDIS_MAX_CONNECTIONS")
    parser.add_argument("--sync-calls", type=int, default=200, help="sync classify calls")
    parser.add_argument(
        "--waiter-pool", type=int, default=16, help="the same, for the long-poll measurement"
    )
    parser.add_argument(
        "--apart-jobs", type=int, default=200, help="jobs run per stack, broker apart or not"
    )
    parser.add_argument(
        "--apart-accept", type=int, default=5000, help="jobs accepted per stack, the same"
    )
    parser.add_argument(
        "--apart-rounds", type=int, default=3, help="stacks of each kind, alternately"
    )
    parser.add_argument("--parts-rounds", type=int, default=2, help="stacks per part count")
    parser.add_argument(
        "--only-parts", action="store_true", help="measure the parts' cost alone (its section)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    header = [
        f"## API profile, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `{reproduce(sys.argv[1:]).replace('ops/bench.py', 'ops/bench_api.py')}`",
        "",
    ]
    if args.only_parts:
        header[0] = header[0].replace("API profile", "Store parts")
        text = "\n".join([*header, *parts_cost(args)])
        print(text)
        write_results(args.out, "parts", text)
        return
    text = "\n".join([*header, *run(args), *broker_apart(args, args.apart_rounds)])
    print(text)
    write_results(args.out, "api", text)


if __name__ == "__main__":
    main()
