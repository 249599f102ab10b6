"""The readiness heartbeat: a Redis key with a TTL, rewritten while the worker lives.

It is started only after the model is loaded and a warm-up generation succeeded, so its
existence means "this worker can serve now". Before each beat it asks `problem()` whether that is
still true; once the answer names a problem (a dead or stuck model thread) it deletes the key,
calls `on_problem` and beats no more. A worker that dies stops refreshing it and the key expires
after `heartbeat_ttl_s`; a worker that stops cleanly deletes it at once. Each beat also renews the
leases of the jobs the worker runs (`on_beat`), which lapse the same way when it dies.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import redis

from guardfleet.keys import WORKER_REGISTRY, worker_key
from guardfleet.schemas import WorkerHeartbeat, utcnow

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        device: str,
        model: str,
        queues: list[str],
        ttl_s: int,
        interval_s: float,
        jobs_done: Callable[[], int],
        problem: Callable[[], str | None] = lambda: None,
        on_problem: Callable[[str], None] = lambda reason: None,
        on_beat: Callable[[], None] = lambda: None,
        broker_id: Callable[[], str] = lambda: "",
    ) -> None:
        self.client = client
        self.key = worker_key(name)
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.jobs_done = jobs_done
        self.problem = problem
        self.on_problem = on_problem
        self.on_beat = on_beat  # more that a live worker renews with each beat (its jobs' leases)
        # Read again with each beat, so a broker that lost its id (flushed) has the new one in
        # the next beat.
        self.broker_id = broker_id
        self.record = WorkerHeartbeat(
            name=name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=device,
            model=model,
            loaded=True,
            queues=queues,
            started_at=utcnow(),
            last_seen=utcnow(),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        self.record.last_seen = utcnow()
        self.record.jobs_done = self.jobs_done()
        self.record.broker = self._broker()
        expires = self.record.last_seen.timestamp() + self.ttl_s
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.key, self.record.model_dump_json(), ex=self.ttl_s)
            pipe.zadd(WORKER_REGISTRY, {self.record.name: expires})
            pipe.zremrangebyscore(WORKER_REGISTRY, "-inf", expires - 24 * 3600)  # long gone
            pipe.expire(WORKER_REGISTRY, 24 * 3600)
            pipe.execute()
        self.on_beat()

    def _broker(self) -> str:
        """The broker's id; the last one known while the broker does not answer, so that a
        broker outage never stops the beat, nor the leases it renews."""
        try:
            return self.broker_id()
        except redis.RedisError as exc:
            log.warning("could not read the broker's id (keeping the last): %s", exc)
            return self.record.broker

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            reason = self.problem()
            if reason is not None:
                log.critical("leaving the fleet: %s", reason)
                self._forget()
                self.on_problem(reason)
                return
            try:
                self.beat()
            except redis.RedisError as exc:  # keep trying: Redis may come back before the TTL
                log.warning("heartbeat write failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 1)
        self._forget()

    def _forget(self) -> None:
        try:
            self.client.delete(self.key)
            self.client.zrem(WORKER_REGISTRY, self.record.name)
        except redis.RedisError as exc:
            log.warning("could not delete heartbeat (it will expire): %s", exc)
