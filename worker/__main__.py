"""Start one worker process on one device: `python -m worker --device cuda:0`.

One process per GPU: run this once per device (`ops/run_fleet.sh` does that for all GPUs).
"""

from __future__ import annotations

import argparse
import os
import socket

from guardfleet import logs
from guardfleet.keys import GPU_QUEUES


def main() -> None:
    # Idle OpenMP threads otherwise spin for a while after each batch, taking the CPU from the
    # Celery consumer and Redis on small machines (measured: about 1 ms less overhead per job).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cpu, cuda:N or auto (default: GUARDFLEET_DEVICE)")
    parser.add_argument("--name", help="Celery node name (default: worker-<device>@<host>)")
    parser.add_argument("--queues", default=",".join(GPU_QUEUES), help="in priority order")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    if args.device:
        os.environ["GUARDFLEET_DEVICE"] = args.device
    from guardfleet.settings import get_settings  # after the environment is final
    from worker.engine import resolve_device

    device = str(resolve_device(get_settings().device))  # name it after what "auto" chose
    name = args.name or f"worker-{device.replace(':', '')}@{socket.gethostname()}"
    log_format = get_settings().log_format
    logs.configure(log_format, args.loglevel, worker=name)
    if log_format == "json":
        quiet_libraries()
    from worker.celery_app import app
    from worker.consume import run_worker

    queues = [q for q in args.queues.split(",") if q]
    raise SystemExit(
        run_worker(
            app, name=name, queues=queues, loglevel=args.loglevel, quiet=log_format == "json"
        )
    )


def quiet_libraries() -> None:
    """JSON logs: transformers' records through our handler, no progress bars on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # huggingface_hub's (downloads) too


if __name__ == "__main__":
    main()
