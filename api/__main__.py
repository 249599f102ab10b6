"""`python -m api [uvicorn options]`: the API as the compose stack and `make up` run it.

The same as `uvicorn api.main:app [options]` (every uvicorn option passes through, and uvicorn
still reads `WEB_CONCURRENCY`), plus what uvicorn cannot do for metrics: with several processes
behind one port, a scrape reaches one of them at random, so each process keeps its counters in a
file of a shared directory (prometheus-client's multiprocess mode) and whichever one answers
reports the sum. The directory is `PROMETHEUS_MULTIPROC_DIR` when set, emptied first (a restarted
API starts its counters at zero, which Prometheus reads as a reset), else a fresh temporary one
removed at exit.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn.main

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def main(argv: list[str] | None = None) -> None:
    given = os.environ.get(MULTIPROC_DIR)
    directory = Path(given or tempfile.mkdtemp(prefix="guardfleet-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    # Before anything imports prometheus_client: it picks its value store at import, and
    # uvicorn's spawned processes inherit the environment.
    os.environ[MULTIPROC_DIR] = str(directory)
    try:
        uvicorn.main.main(
            args=["api.main:app", *(sys.argv[1:] if argv is None else argv)],
            prog_name="python -m api",
        )
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
