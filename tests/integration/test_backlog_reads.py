"""A flood of submissions reads each lane's backlog once per interval, not once per request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import redis

from api.backlogs import DEPTH_CACHE_S
from tests.conftest import ApiServer, url_of

CLIENTS = 64
EACH = 5


async def _flood(url: str) -> list[int]:
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:

        async def client(n: int) -> list[int]:
            return [
                (await http.post("/v1/jobs", json={"prompt": f"Is {n}/{i} prime?"})).status_code
                for i in range(EACH)
            ]

        answers = await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return [status for statuses in answers for status in statuses]


def test_concurrent_submissions_share_one_backlog_read(
    private_redis: redis.Redis, start_api: Callable[..., ApiServer]
) -> None:
    api = start_api(url=url_of(private_redis))
    private_redis.config_resetstat()
    began = time.monotonic()
    statuses = asyncio.run(_flood(api.url))
    took = time.monotonic() - began
    assert statuses == [202] * (CLIENTS * EACH)
    stats = private_redis.info("commandstats")
    reads = int(stats.get("cmdstat_llen", {}).get("calls", 0))
    # One read per interval at most (and one to start with), whatever the concurrency: with a
    # read per request that found the figure stale, 64 requests at once made 64 reads.
    assert 1 <= reads <= took / DEPTH_CACHE_S + 2, (reads, took)
