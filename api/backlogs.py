"""Each lane's backlog as one API process knows it: read from Redis at most every
`DEPTH_CACHE_S`, one read at a time (what `api.backpressure` admits against)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from guardfleet.keys import BATCHES_PENDING, QUEUE_BULK

DEPTH_CACHE_S = 0.2


class Backlogs:
    """Each lane's backlog as this process last read it, plus what it admitted since.

    When the figure is stale, the first request to need it reads Redis and every other request
    arriving meanwhile waits for that same read: at 64 concurrent submissions a stale figure
    used to cost 64 reads at once, every interval.
    """

    def __init__(self, client: aioredis.Redis, broker: aioredis.Redis | None = None) -> None:
        self.client = client  # the job store: batch items not queued yet
        self.broker = client if broker is None else broker  # the lanes' lists
        self._known: dict[str, tuple[int, float]] = {}  # lane -> (depth, monotonic time read)
        self._reading: dict[str, asyncio.Future[None]] = {}

    async def get(self, queue: str) -> int:
        """Messages waiting on `queue`, as of at most DEPTH_CACHE_S ago."""
        known = self._known.get(queue)
        if known is not None and time.monotonic() - known[1] < DEPTH_CACHE_S:
            return known[0]
        reading = self._reading.get(queue)
        if reading is None:
            reading = self._reading[queue] = asyncio.ensure_future(self._read(queue))
            reading.add_done_callback(lambda _: self._reading.pop(queue, None))
        # Shielded: a caller that goes away (a client disconnect) must not cancel the read the
        # others are waiting for.
        await asyncio.shield(reading)
        return self._known[queue][0]

    def add(self, queue: str, count: int) -> None:
        """Count `count` jobs admitted to `queue` until the next read sees them."""
        depth, read_at = self._known[queue]
        self._known[queue] = (depth + count, read_at)

    async def _read(self, queue: str) -> None:
        read_at = time.monotonic()
        depth = int(await self.broker.llen(queue))
        if queue == QUEUE_BULK:
            # Batch items not queued yet count too, or batches accepted a moment apart would
            # each see the lane as it was before the other's fan-out.
            depth += sum(int(n) for n in await self.client.hvals(BATCHES_PENDING))
        self._known[queue] = (depth, read_at)
