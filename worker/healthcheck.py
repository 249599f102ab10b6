"""Container healthcheck of a model worker: `python -m worker.healthcheck`; exit 0 means ready.

A worker is healthy only when *its own* heartbeat in Redis says its model is loaded. Another
worker's heartbeat must not count: with `--scale`, every replica would otherwise look healthy as
soon as the first one is. The worker's name is not known here (it depends on the device "auto"
chose, and replicas differ only by host name), so the heartbeat is recognised by its `host`,
which is the container's host name; `--name` narrows it to one node name when that is known.

It imports neither torch nor Celery, so a check every few seconds stays cheap.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from datetime import timedelta

import redis

from guardfleet import redis_conn
from guardfleet.keys import WORKER_REGISTRY, worker_key
from guardfleet.schemas import WorkerHeartbeat, utcnow
from guardfleet.settings import get_settings


def own_heartbeat(client: redis.Redis, host: str, name: str | None, ttl_s: int) -> str | None:
    """The name of a fresh, model-loaded heartbeat written from `host`, or None."""
    registered = client.zrangebyscore(WORKER_REGISTRY, time.time(), "+inf")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in registered]
    if name is not None:
        names = [n for n in names if n == name]
    if not names:
        return None
    horizon = utcnow() - timedelta(seconds=ttl_s)
    for raw in client.mget([worker_key(n) for n in names]):
        if raw is None:
            continue
        beat = WorkerHeartbeat.model_validate_json(raw)
        if beat.host == host and beat.loaded and beat.last_seen >= horizon:
            return beat.name
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the worker's node name (default: any from this host)")
    args = parser.parse_args()
    settings = get_settings()
    host = socket.gethostname()
    client = redis_conn.connect(settings)
    try:
        found = own_heartbeat(client, host, args.name, settings.heartbeat_ttl_s)
    except redis.RedisError as exc:
        sys.exit(f"unhealthy: Redis at {settings.redis_url} did not answer: {exc}")
    if settings.separate_broker:
        try:
            redis_conn.connect(settings, broker=True).ping()
        except redis.RedisError as exc:
            sys.exit(f"unhealthy: the broker's Redis at {settings.broker} did not answer: {exc}")
    if found is None:
        sys.exit(f"unhealthy: no fresh heartbeat with a loaded model from host {host}")
    print(f"healthy: {found}")


if __name__ == "__main__":
    main()
