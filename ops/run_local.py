"""`make up`: run the whole stack on this machine until Ctrl-C.

Starts Redis (unless one already answers at GUARDFLEET_REDIS_URL), one worker on the best device,
the API on :8000 and Flower on :5555; waits until a worker is ready; prints where to go. Ctrl-C
(or SIGTERM) stops everything it started, and nothing it did not.

The API and Flower listen on 127.0.0.1 unless GUARDFLEET_BIND_HOST says otherwise: this stack
runs without API keys and lets webhooks call loopback, so anyone who could reach it from the
network could make it call services listening only on this machine.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guardfleet.settings import get_settings  # noqa: E402

API_PORT = int(os.environ.get("GUARDFLEET_API_PORT", "8000"))
FLOWER_PORT = int(os.environ.get("GUARDFLEET_FLOWER_PORT", "5555"))
RUN_DIR = ROOT / ".run"
LOOPBACK = "127.0.0.1"


def bind_host() -> str:
    return os.environ.get("GUARDFLEET_BIND_HOST", "").strip() or LOOPBACK


def service_commands(python: str, broker_url: str, host: str) -> dict[str, list[str]]:
    """The argv of every process `make up` starts besides Redis (Flower watches the broker)."""
    return {
        "worker": [python, "-m", "worker"],
        "delivery": [python, "-m", "worker.delivery"],
        "api": [python, "-m", "api", "--host", host, "--port", str(API_PORT)],
        "flower": [
            python,
            "-m",
            "celery",
            "-b",
            broker_url,
            "flower",
            f"--address={host}",
            f"--port={FLOWER_PORT}",
        ],
    }


def exposure_warning(host: str, api_keys: list[str]) -> str | None:
    """Binding beyond loopback without API keys lets the network use this stack, and with it
    the loopback callbacks `make up` allows: say so where the operator looks."""
    if host in (LOOPBACK, "localhost", "::1") or api_keys:
        return None
    return (
        f"WARNING: listening on {host} with no GUARDFLEET_API_KEYS: anyone who can reach this "
        "machine can submit jobs, and make the webhook worker call whatever "
        "GUARDFLEET_WEBHOOK_ALLOW admits"
    )


def say(message: str) -> None:
    print(f"[guardfleet] {message}", flush=True)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary:
        return binary
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("redis-server not found; installing it from Debian (apt-get install redis-server)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
        found = shutil.which("redis-server")
        if found:
            return found
    sys.exit(
        "redis-server is not installed. Install it (Debian/Ubuntu: sudo apt-get install "
        "redis-server; macOS: brew install redis) or point GUARDFLEET_REDIS_URL at a running Redis."
    )


def local_webhook_defaults() -> str:
    """A local stack should be able to call a receiver on this machine: unless the operator
    configured webhooks, sign with a secret made for this session and allow loopback."""
    if os.environ.get("GUARDFLEET_WEBHOOK_SECRETS"):
        return "  Webhooks: signed with GUARDFLEET_WEBHOOK_SECRETS."
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    os.environ["GUARDFLEET_WEBHOOK_SECRETS"] = secret
    os.environ.setdefault("GUARDFLEET_WEBHOOK_ALLOW", "127.0.0.1,::1,localhost")
    return (
        f"  Webhooks: signed with {secret} (made for this run; set GUARDFLEET_WEBHOOK_SECRETS\n"
        f"            to keep one); callbacks may reach {os.environ['GUARDFLEET_WEBHOOK_ALLOW']}"
    )


def main() -> None:
    settings = get_settings()
    RUN_DIR.mkdir(exist_ok=True)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, argv: list[str]) -> None:
        log = (RUN_DIR / f"{name}.log").open("wb")
        children.append((name, subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log)))
        say(f"started {name} (log: .run/{name}.log)")

    def shutdown(*_: object) -> None:
        say("stopping...")
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(children):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        sys.exit(0)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        shutdown()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if settings.separate_broker and not redis_answers(settings.broker):
        # Only the store's Redis is started here: a broker set apart is the operator's.
        sys.exit(f"no Redis answers at GUARDFLEET_BROKER_URL ({settings.broker})")
    if redis_answers(settings.redis_url):
        say(f"using the Redis already running at {settings.redis_url}")
    elif settings.redis_host_is_local:
        port = str(urlparse(settings.redis_url).port or 6379)
        spawn(
            "redis",
            [
                ensure_redis_binary(),
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(RUN_DIR),
            ],
        )
        deadline = time.monotonic() + 10
        while not redis_answers(settings.redis_url):
            if time.monotonic() > deadline:
                sys.exit("redis-server did not start; see .run/redis.log")
            time.sleep(0.1)
    else:
        sys.exit(f"no Redis answers at {settings.redis_url}")

    webhook_note = local_webhook_defaults()
    host = bind_host()
    warning = exposure_warning(host, settings.api_keys)
    if warning:
        say(warning)
    model = "the bundled demo model" if settings.model == "demo" else settings.model
    say(f"loading {model} on device {settings.device}")
    for name, argv in service_commands(sys.executable, settings.broker, host).items():
        spawn(name, argv)

    # A wildcard bind is reached through loopback from here.
    local = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    local = f"[{local}]" if ":" in local else local
    ready_url = f"http://{local}:{API_PORT}/v1/health/ready"
    deadline = time.monotonic() + 600
    while True:
        for name, proc in children:
            if proc.poll() is not None:
                say(f"{name} exited with {proc.returncode}; see .run/{name}.log")
                shutdown()
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            say("no worker became ready within 10 minutes; see .run/worker.log")
            shutdown()
        time.sleep(0.5)

    say("ready.")
    print(
        f"""
  API      http://{local}:{API_PORT}      (docs: http://{local}:{API_PORT}/docs)
  Flower   http://{local}:{FLOWER_PORT}
  Try:     curl -s {local}:{API_PORT}/v1/classify -H 'content-type: application/json' \\
             -d '{{"prompt": "How do I bake sourdough bread?"}}'

{webhook_note}
  Ctrl-C stops everything.
""",
        flush=True,
    )
    while True:
        for name, proc in children:
            if proc.poll() is not None:
                say(f"{name} exited with {proc.returncode}; see .run/{name}.log")
                shutdown()
        time.sleep(1)


if __name__ == "__main__":
    main()
