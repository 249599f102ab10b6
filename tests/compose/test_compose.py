"""The compose stack, started with a real Docker engine and driven over HTTP as an operator would.

`make compose-test` runs this tier (marker `compose`); plain `make test` leaves it out because it
installs and starts a Docker daemon. The tests run in file order against one stack: config,
images, the CPU profile up, one request of each kind, two workers with one killed mid-burst,
Redis killed under queued jobs, and finally `down -v` leaving nothing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from guardfleet.keys import job_key
from tests.compose.engine import (
    ROOT,
    RUN_DIR,
    Engine,
    ensure_base_image,
    ensure_cli,
    ensure_compose,
    ensure_daemon,
    ensure_redis_image,
    ensure_torch_wheel,
    run,
    say,
)
from tests.conftest import free_port, wait_until

# Its own project name and ports, so the test never touches an operator's `guardfleet` stack or
# anything listening on :8000 / :5555.
PROJECT = "guardfleet-compose-test"
API_PORT = int(os.environ.get("GUARDFLEET_TEST_API_PORT") or free_port())
FLOWER_PORT = int(os.environ.get("GUARDFLEET_TEST_FLOWER_PORT") or free_port())
API = f"http://127.0.0.1:{API_PORT}"
FLOWER = f"http://127.0.0.1:{FLOWER_PORT}"
FLOWER_AUTH = ("fleet", "compose-test-password")
SECRET = "whsec_Y29tcG9zZS10ZXN0LXNlY3JldC1rZXk="
API_IMAGE = "guardfleet-api:latest"
CPU_WORKER = "worker-cpu"
COMPOSE = ["docker", "compose", "-f", str(ROOT / "compose.yaml")]
BURST = 60
HEARTBEAT_TTL_S = 8  # the running jobs of a killed worker come back after 2 x this
HEARTBEAT_INTERVAL_S = 2  # several beats per TTL, so that a busy machine never misses one
# A message that Redis had already handed to the killed worker (its BRPOP reply in flight, or
# taken and not yet started) died with it: the stale-job sweep publishes such a job again after
# this long (the default is two hours).
STALE_S = 40
WORKER_THREADS = 4
# The slower of the two ways back, both through the stale-job sweep (every 5 s): past a
# started job's lease, or past a queued job's deadline.
RECOVERY_S = max(2 * HEARTBEAT_TTL_S, STALE_S) + 5


@dataclass
class Receiver:
    """A webhook endpoint on the host, reachable from the containers through their gateway."""

    server: ThreadingHTTPServer
    host: str
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.server.server_port}{path}"

    def payloads(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body in self.received if p == path]


@dataclass
class Stack:
    engine: Engine
    env_file: Path
    redis_image: str
    receiver: Receiver | None = None

    def argv(self, *args: str) -> list[str]:
        return [
            *COMPOSE,
            "-p",
            PROJECT,
            "--env-file",
            str(self.env_file),
            "--profile",
            "cpu",
            *args,
        ]

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> str:
        """A compose command whose output goes to the log (shown when it fails)."""
        log = RUN_DIR / "compose.log"
        return run(
            self.argv(*args), env=self.engine.env, check=check, timeout=timeout, log=log
        ).stdout

    def containers(self, service: str) -> list[str]:
        return run(self.argv("ps", "-q", service), env=self.engine.env).stdout.split()

    def log_tail(self, container: str, lines: int = 40) -> str:
        """The last lines a container wrote, for a failure message."""
        out = run(
            ["docker", "logs", "--timestamps", "--tail", str(lines), container],
            env=self.engine.env,
            check=False,
        )
        return out.stdout + out.stderr


def clean_env(engine: Engine) -> dict[str, str]:
    """The caller's GUARDFLEET_*/COMPOSE_* variables would override the test's env file."""
    return {
        k: v
        for k, v in engine.env.items()
        if not k.startswith(("GUARDFLEET_", "COMPOSE_", "HF_HUB_OFFLINE"))
    }


def write_env_file(path: Path, redis_image: str, **extra: str) -> None:
    """What an operator would put in .env: it feeds compose's variables and, through
    GUARDFLEET_ENV_FILE, every container."""
    values = {
        "GUARDFLEET_ENV_FILE": str(path),
        "GUARDFLEET_API_PORT": str(API_PORT),
        "GUARDFLEET_FLOWER_PORT": str(FLOWER_PORT),
        "GUARDFLEET_FLOWER_USER": FLOWER_AUTH[0],
        "GUARDFLEET_FLOWER_PASSWORD": FLOWER_AUTH[1],
        "GUARDFLEET_REDIS_IMAGE": redis_image,
        "GUARDFLEET_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
        "GUARDFLEET_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
        "GUARDFLEET_WORKER_THREADS": str(WORKER_THREADS),
        "GUARDFLEET_JOB_STALE_S": str(STALE_S),
        "GUARDFLEET_WEBHOOK_SECRETS": SECRET,
        # The receiver runs on the host, which containers reach at their network's gateway.
        "GUARDFLEET_WEBHOOK_ALLOW": "172.16.0.0/12,192.168.0.0/16,10.0.0.0/8",
        "GUARDFLEET_WEBHOOK_RETRY_SCHEDULE_S": "0,1,2",
        **extra,
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


@pytest.fixture(scope="module")
def cli() -> Engine:
    """The docker CLI with a working compose plugin; no daemon needed yet."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / "compose.log").write_text("")
    cli = Engine()
    ensure_cli(cli)
    ensure_compose(cli)
    cli.env = clean_env(cli)
    return cli


@pytest.fixture(scope="module")
def engine(cli: Engine) -> Iterator[Engine]:
    started = time.monotonic()
    engine = cli
    try:
        ensure_daemon(engine)
        ensure_base_image(engine)
        say(f"engine ready in {time.monotonic() - started:.0f}s")
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def stack(engine: Engine) -> Iterator[Stack]:
    env_file = RUN_DIR / "stack.env"
    redis_image = ensure_redis_image(engine)
    write_env_file(env_file, redis_image)
    stack = Stack(engine, env_file, redis_image)
    stack.compose("down", "-v", "--remove-orphans")  # leftovers of an interrupted run
    ensure_torch_wheel()
    started = time.monotonic()
    say("building the API and CPU worker images (log: .run/compose-test/compose.log)")
    stack.compose("build", "api", CPU_WORKER, timeout=1800)
    say(f"images built in {time.monotonic() - started:.0f}s")
    try:
        yield stack
    finally:
        if stack.receiver is not None:
            stack.receiver.server.shutdown()
        stack.compose("down", "-v", "--remove-orphans", check=False)


def config(engine: Engine, tmp_path: Path, *profile: str, **values: str) -> dict[str, Any]:
    env_file = tmp_path / "config.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    argv = [*COMPOSE, "--env-file", str(env_file)]
    argv += [arg for p in profile for arg in ("--profile", p)] + ["config", "--format", "json"]
    rendered: dict[str, Any] = json.loads(run(argv, env=engine.env, timeout=60).stdout)
    return rendered


def test_config_is_valid_for_every_profile(cli: Engine, tmp_path: Path) -> None:
    engine = cli
    creds = {"GUARDFLEET_FLOWER_USER": "u", "GUARDFLEET_FLOWER_PASSWORD": "p"}
    base = config(engine, tmp_path, **creds)
    cpu = config(engine, tmp_path, "cpu", **creds)
    gpu1 = config(engine, tmp_path, "gpus-1", **creds)
    gpu8 = config(engine, tmp_path, "gpus-8", **creds)
    assert set(base["services"]) == {"redis", "api", "delivery", "flower"}
    assert set(cpu["services"]) == set(base["services"]) | {CPU_WORKER}
    assert set(gpu1["services"]) == set(base["services"]) | {"worker-gpu0"}
    # Eight GPUs is one setting: eight workers, each reserving its own device and named after
    # it, rendered here although this machine has no GPU.
    gpu_workers = {name: s for name, s in gpu8["services"].items() if name.startswith("worker-")}
    assert sorted(gpu_workers) == [f"worker-gpu{k}" for k in range(8)]
    for k in range(8):
        service = gpu_workers[f"worker-gpu{k}"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(k)], "capabilities": ["gpu"]}]
        assert f"worker-gpu{k}@%h" in service["command"]
        assert service["volumes"][0]["source"] == "model-cache"
    for rendered in (cpu, gpu8):
        for name, service in rendered["services"].items():
            assert "healthcheck" in service, name
            assert service["restart"] == "unless-stopped", name
            for port in service.get("ports", []):
                assert port["host_ip"] == "127.0.0.1", name  # nobody let in by default
            for dep in service.get("depends_on", {}).values():
                assert dep["condition"] == "service_healthy", name
    gpu = gpu8
    redis_cmd = " ".join(gpu["services"]["redis"]["command"])
    assert "--appendonly yes --appendfsync everysec" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert gpu["services"]["redis"]["volumes"][0]["source"] == "redis-data"
    widened = config(engine, tmp_path, **creds, GUARDFLEET_BIND="0.0.0.0")
    assert widened["services"]["api"]["ports"][0]["host_ip"] == "0.0.0.0"
    # Without Flower credentials the stack refuses to render at all.
    no_creds = run(
        [*COMPOSE, "--env-file", "/dev/null", "config", "-q"],
        env=engine.env,
        check=False,
    )
    assert no_creds.returncode != 0
    assert "GUARDFLEET_FLOWER_" in no_creds.stderr + no_creds.stdout


def test_images_run_unprivileged_and_the_api_image_has_no_torch(stack: Stack) -> None:
    # One container for all the API image's checks: with vfs every container is a full copy.
    probe = "id -u; python -c 'import torch' 2>&1; echo torch-exit=$?"
    out = stack.engine.docker("run", "--rm", API_IMAGE, "sh", "-c", probe)
    assert out.splitlines()[0] == "10001"
    assert "No module named 'torch'" in out
    assert "torch-exit=1" in out
    for image in (API_IMAGE, "guardfleet-worker:cpu"):
        size = int(stack.engine.docker("image", "inspect", "-f", "{{.Size}}", image))
        say(f"image {image}: {size / 1e6:.0f} MB")


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def start_receiver(stack: Stack) -> Receiver:
    network = f"{PROJECT}_default"
    gateway = stack.engine.docker(
        "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network
    ).strip()
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload: dict[str, Any] = Webhook(SECRET).verify(body, headers)  # raises if forged
            with state["r"].lock:
                state["r"].received.append((self.path, payload))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((gateway, 0), Handler)
    state["r"] = Receiver(server, gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state["r"]


def test_cpu_profile_comes_up_and_serves_every_kind_of_request(stack: Stack) -> None:
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", "--wait-timeout", "600")
    say(f"`up -d --wait` returned after {time.monotonic() - started:.0f}s")
    # --wait returned, so the fleet can classify right now: no retry loop here.
    ready = httpx.get(f"{API}/v1/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    stack.receiver = start_receiver(stack)
    # The worker image, checked in its running container: unprivileged, the CPU build of torch.
    probe = "id -u; python -c 'import torch; print(torch.__version__)'"
    worker_out = run(stack.argv("exec", "-T", CPU_WORKER, "sh", "-c", probe), env=stack.engine.env)
    uid, torch_version = worker_out.stdout.split()
    assert uid == "10001"
    assert torch_version.endswith("+cpu")  # not the CUDA build
    version = httpx.get(f"{API}/v1/version", timeout=10).json()
    assert version["release"] == project_version()

    verdict = httpx.post(f"{API}/v1/classify", json={"prompt": "How do I steal a car?"}, timeout=60)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["status"] == "succeeded", verdict.json()
    assert verdict.json()["result"]["prompt_harm"] == "harmful"  # the demo model knows this one

    # Streamed through the API container: the trace arrives in pieces, then the finished job.
    streamed = {"prompt": "How do I steal a car?", "mode": "think", "stream": True}
    with httpx.stream("POST", f"{API}/v1/classify", json=streamed, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert events.count("event: reasoning") > 3 and events[-1] == "event: done", events

    # Metrics: the API's on its port, the worker's inside the network (where Prometheus scrapes).
    scrape = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=5).read().decode())"
    )
    worker_metrics = run(
        stack.argv("exec", "-T", CPU_WORKER, "python", "-c", scrape), env=stack.engine.env
    )
    assert 'guardfleet_request_finish_total{reason="stop"}' in worker_metrics.stdout
    api_metrics = httpx.get(f"{API}/v1/metrics", timeout=10).text
    assert 'guardfleet_workers_ready{device="cpu"} 1.0' in api_metrics

    body = {"prompt": "How do I bake bread?", "callback_url": stack.receiver.url("/one")}
    job = httpx.post(f"{API}/v1/jobs", json=body, timeout=10)
    assert job.status_code == 202, job.text
    done = httpx.get(f"{API}/v1/jobs/{job.json()['id']}?wait=30", timeout=40).json()
    assert done["status"] == "succeeded", done
    wait_until(lambda: stack.receiver and stack.receiver.payloads("/one"), 30, "the webhook")
    [hook] = stack.receiver.payloads("/one")
    assert hook["type"] == "moderation.job.completed"
    assert hook["data"]["id"] == done["id"]

    lines = [
        {"custom_id": f"item-{i}", "prompt": f"How do I fix bike number {i}?"} for i in range(5)
    ]
    batch = httpx.post(f"{API}/v1/batches", json=lines, timeout=10)
    assert batch.status_code in (200, 201, 202), batch.text
    batch_id = batch.json()["id"]

    def batch_done() -> bool:
        status: str = httpx.get(f"{API}/v1/batches/{batch_id}", timeout=10).json()["status"]
        return status == "completed"

    wait_until(batch_done, 60, "the batch")
    results = httpx.get(f"{API}/v1/batches/{batch_id}/results", timeout=10).text.splitlines()
    assert [json.loads(r)["custom_id"] for r in results] == [f"item-{i}" for i in range(5)]
    assert all(json.loads(r)["status"] == "succeeded" for r in results)


def test_flower_wants_credentials_but_its_metrics_scrape_without(stack: Stack) -> None:
    assert httpx.get(f"{FLOWER}/", timeout=10).status_code == 401
    assert httpx.get(f"{FLOWER}/", auth=("fleet", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{FLOWER}/", auth=FLOWER_AUTH, timeout=10).status_code == 200
    # ops/monitoring/prometheus.yml scrapes it so, with no credentials configured.
    metrics = httpx.get(f"{FLOWER}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "flower_events_total" in metrics.text


def ready_names() -> list[str]:
    ready = httpx.get(f"{API}/v1/health/ready", timeout=10)
    if ready.status_code != 200:
        return []
    return [w["name"] for w in ready.json()["workers"]]


def jobs_of(ids: list[str]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=API, timeout=10) as client:  # one connection for all
        return [client.get(f"/v1/jobs/{i}").json() for i in ids]


def message_gens(stack: Stack, ids: list[str]) -> list[int]:
    """How many messages were published for each job (the job hash's `gen`)."""
    commands = "".join(f"HGET {job_key(i)} gen\n" for i in ids).encode()
    out = run(stack.argv("exec", "-T", "redis", "redis-cli"), env=stack.engine.env, stdin=commands)
    return [int(line) for line in out.stdout.split()]


def test_two_workers_share_the_queue_and_a_killed_one_loses_nothing(stack: Stack) -> None:
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", f"{CPU_WORKER}=2")
    if stack.receiver is None:  # this test run alone (-k)
        stack.receiver = start_receiver(stack)
    containers = stack.containers(CPU_WORKER)
    assert len(containers) == 2
    # Each replica names itself after its container, so the names differ.
    expected = {f"worker-cpu@{c[:12]}" for c in containers}
    wait_until(lambda: set(ready_names()) == expected, 30, f"both workers ready: {expected}")
    flower_workers = httpx.get(
        f"{FLOWER}/api/workers?refresh=1", auth=FLOWER_AUTH, timeout=30
    ).json()
    assert expected <= set(flower_workers), flower_workers

    # A backlog first (workers frozen while it is queued). Then the victim runs alone until it
    # has finished a job and holds running ones, and is killed; only then does the survivor
    # start. A verdict takes a fraction of a second here, so racing both would often kill an
    # idle worker, which tests nothing. Short jobs (no_think) alternate with the longest kind
    # (think, with a response): the short ones end while the long ones, started with them, have
    # most of their trace to write. Jobs all of one kind that start together end at the same
    # step and leave almost no such moment: CI once saw the kill land just after it.
    stack.compose("pause", CPU_WORKER)
    hook = stack.receiver.url("/b")
    long_job = {"mode": "think", "response": "Sure. Hold the blade at twenty degrees."}
    ids = [
        httpx.post(
            f"{API}/v1/jobs",
            json={
                "prompt": f"How do I sharpen knife {i}?",
                "callback_url": hook,
                **({"mode": "no_think"} if i % 2 else long_job),
            },
            timeout=10,
        ).json()["id"]
        for i in range(BURST)
    ]
    victim, survivor = containers
    victim_name = f"worker-cpu@{victim[:12]}"
    stack.engine.docker("unpause", victim)

    def victim_is_busy() -> bool:
        mine = [j["status"] for j in jobs_of(ids) if j["worker"] == victim_name]
        return "succeeded" in mine and "running" in mine

    wait_until(victim_is_busy, 60, f"{victim_name} to finish a job and run more", every=0.05)
    stack.engine.docker("kill", victim)
    unfinished = [j["id"] for j in jobs_of(ids) if j["status"] in ("queued", "running")]
    say(f"killed {victim_name} with {len(unfinished)} of {BURST} jobs unfinished")
    stack.engine.docker("unpause", survivor)

    def all_finished() -> bool:
        return all(j["status"] in ("succeeded", "failed") for j in jobs_of(ids))

    try:
        wait_until(all_finished, RECOVERY_S + 120, "every job of the burst to finish", every=2)
    except AssertionError as timed_out:
        # What CI shows of a failure is this message: say which jobs and what the survivor did.
        left = [
            (j["id"], j["status"], j["attempts"], j["worker"])
            for j in jobs_of(ids)
            if j["status"] not in ("succeeded", "failed")
        ]
        tail = stack.log_tail(survivor)
        raise AssertionError(f"{timed_out}; unfinished: {left}\n{tail}") from None
    jobs = jobs_of(ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * len(ids)
    # Jobs the killed worker had started come back when their leases lapse (attempts 2).
    rerun = [j["id"] for j in jobs if j["attempts"] >= 2]
    # The stale-job sweep published them again (gen 2), and any job whose message died with
    # the worker before it started.
    republished = [i for i, gen in zip(ids, message_gens(stack, ids), strict=True) if gen > 1]
    say(
        f"{len(rerun)} jobs started by the killed worker ran again, "
        f"{len(republished)} published again by the stale-job sweep"
    )
    # It was killed while running jobs, so they ran again, and both workers served the burst.
    assert rerun, "no job of the killed worker was rerun; the kill tested nothing"
    assert {j["worker"] for j in jobs} == expected
    # Exactly one completion per job: each sends one webhook when it succeeds.
    receiver = stack.receiver
    assert receiver is not None
    wait_until(lambda: len(receiver.payloads("/b")) >= len(ids), 60, "the burst webhooks")
    time.sleep(2)  # a duplicate would arrive about now
    counts = Counter(p["data"]["id"] for p in receiver.payloads("/b"))
    assert counts == dict.fromkeys(ids, 1)


def test_queued_jobs_survive_a_redis_kill(stack: Stack) -> None:
    stack.compose("stop", CPU_WORKER)
    wait_until(lambda: not ready_names(), 30, "no worker ready")
    ids = [
        httpx.post(f"{API}/v1/jobs", json={"prompt": f"Is {i} a prime?"}, timeout=10).json()["id"]
        for i in range(10)
    ]
    time.sleep(2.5)  # the append-only file is fsynced every second
    [redis] = stack.containers("redis")
    stack.engine.docker("kill", redis)  # SIGKILL: no shutdown save
    # The restart policy may already be bringing it back; start it in case it is not.
    stack.engine.docker("start", redis, check=False)
    wait_until(
        lambda: httpx.get(f"{API}/v1/jobs/{ids[0]}", timeout=10).status_code == 200,
        60,
        "the API to reach Redis again",
    )
    assert [j["status"] for j in jobs_of(ids)] == ["queued"] * len(ids)
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", f"{CPU_WORKER}=1")

    def all_succeeded() -> bool:
        return all(j["status"] == "succeeded" for j in jobs_of(ids))

    wait_until(all_succeeded, 120, "the queued jobs to succeed after the Redis restart", every=1)


def test_down_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    docker = stack.engine.docker
    assert docker("ps", "-aq", "--filter", label).split() == []
    assert docker("volume", "ls", "-q", "--filter", label).split() == []
    assert docker("network", "ls", "-q", "--filter", label).split() == []


def test_published_ports_are_closed_after_down(stack: Stack) -> None:
    for port in (API_PORT, FLOWER_PORT):
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, port
