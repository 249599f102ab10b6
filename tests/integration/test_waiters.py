"""Waiting requests share the API process's one pub/sub connection (`api.waiters`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import redis.asyncio as aioredis

from api.main import REDIS_CLIENT_NAME
from api.waiters import Waiters
from guardfleet.keys import job_channel, job_stream_channel
from tests.conftest import ApiServer, RedisServer, db_url, queue_backlog

WAITERS = 1000
POOL = 8  # GUARDFLEET_REDIS_MAX_CONNECTIONS: far fewer connections than waiters


def _subscribed(client: redis.Redis, ids: list[str]) -> int:
    """How many of the jobs' channels have a subscriber (pub/sub is server-wide, not per db)."""
    channels = [job_channel(i) for i in ids]
    counts = [count for _, count in client.pubsub_numsub(*channels)]
    return sum(1 for count in counts if count > 0)


def _api_clients(client: redis.Redis, db: int) -> list[dict[str, str]]:
    """The API's connections on `db` (other tests' API processes use other databases)."""
    return [
        c for c in client.client_list() if int(c["db"]) == db and c["name"] == REDIS_CLIENT_NAME
    ]


async def _get(url: str, path: str) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 GET on its own connection. httpx's pool is quadratic in its connections: a
    thousand open long polls cost its client half a minute of CPU."""
    host, port = urlsplit(url).hostname or "", urlsplit(url).port or 80
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()  # to the server's close
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def _until(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.2)


def test_a_thousand_long_polls_share_one_subscriber_and_survive_its_reconnect(
    redis_server: RedisServer, start_api: Callable[..., ApiServer]
) -> None:
    db = 39
    url = db_url(redis_server, db)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    api = start_api(db=db, GUARDFLEET_REDIS_MAX_CONNECTIONS=str(POOL))
    # No worker: every job stays queued until the test cancels it.
    _, ids = queue_backlog(url, [f"Is {i} a prime?" for i in range(WAITERS)])

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
            started = time.monotonic()
            polls = [asyncio.create_task(_get(api.url, f"/v1/jobs/{i}?wait=50")) for i in ids]
            await _until(lambda: _subscribed(client, ids) == WAITERS, 60, "every poll waiting")
            held = len(_api_clients(client, db))
            assert 1 <= held <= POOL, f"{held} Redis connections for {WAITERS} waiters"

            # Drop the subscriber's connection: it comes back with every channel subscribed.
            [subscriber] = [c["id"] for c in _api_clients(client, db) if "P" in c["flags"]]
            assert client.client_kill_filter(_id=subscriber) == 1
            await _until(lambda: _subscribed(client, ids) == WAITERS, 30, "the re-subscription")

            cancels: Counter[int] = Counter()
            for chunk in range(0, WAITERS, 50):  # httpx's pool, too, is slow with 1,000 queued
                sent = [http.post(f"/v1/jobs/{i}/cancel") for i in ids[chunk : chunk + 50]]
                cancels.update(r.status_code for r in await asyncio.gather(*sent))
            assert cancels == {200: WAITERS}
            answers = await asyncio.gather(*polls)
            # Woken by their events, long before the 50 s poll ran out.
            assert time.monotonic() - started < 45
            return answers

    answers = asyncio.run(scenario())
    assert Counter(status for status, _ in answers) == {200: WAITERS}
    assert Counter(job["status"] for _, job in answers) == {"cancelled": WAITERS}
    assert _subscribed(client, ids) == 0, "channels left subscribed after their waiters left"


STREAMS = 200


async def _stream(url: str, path: str) -> list[str]:
    """The event names of one Server-Sent Events response, read to its end."""
    host, port = urlsplit(url).hostname or "", urlsplit(url).port or 80
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()  # to the server's close, after the last event
    writer.close()
    return [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]


def test_idle_streams_do_not_hold_redis_connections(
    redis_server: RedisServer, start_api: Callable[..., ApiServer]
) -> None:
    """Many more streams than pooled connections: each waits on the shared subscriber, so none
    starves for a connection while the others wait (a blocking read each would hold one)."""
    db = 45
    url = db_url(redis_server, db)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    api = start_api(
        db=db, GUARDFLEET_REDIS_MAX_CONNECTIONS=str(POOL), GUARDFLEET_REDIS_OUTAGE_S="3"
    )
    _, ids = queue_backlog(url, [f"Is {i} a square?" for i in range(STREAMS)])

    async def scenario() -> list[list[str]]:
        streams = [asyncio.create_task(_stream(api.url, f"/v1/jobs/{i}/events")) for i in ids]
        # Idle for longer than a request may wait for a pooled connection (the Redis timeout,
        # 2 s) and than Redis errors are retried (3 s here): readers that each held a connection
        # while waiting would starve the rest into `error` events.
        await asyncio.sleep(6)
        held = len(_api_clients(client, db))
        assert 1 <= held <= POOL + 1, f"{held} Redis connections for {STREAMS} streams"
        channels = [job_stream_channel(i) for i in ids]
        assert sum(1 for _, n in client.pubsub_numsub(*channels) if n > 0) == STREAMS
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
            for chunk in range(0, STREAMS, 50):
                sent = [http.post(f"/v1/jobs/{i}/cancel") for i in ids[chunk : chunk + 50]]
                assert {r.status_code for r in await asyncio.gather(*sent)} == {200}
        return await asyncio.gather(*streams)

    events = asyncio.run(scenario())
    assert Counter(tuple(e) for e in events) == {("status", "status", "done"): STREAMS}


class _LosesOneCancel(Waiters):
    """A reader that loses the first cancel sent to it, as one was seen lost inside redis-py
    under load (the API process then never finished its shutdown)."""

    async def _read(self) -> None:
        try:
            await super()._read()
        except asyncio.CancelledError:
            await super()._read()


def test_closing_ends_a_reader_that_lost_a_cancel(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(db_url(redis_server, 55))
        waiters = _LosesOneCancel(client, confirm_timeout_s=5)
        await waiters.start()
        async with waiters.watch("guardfleet:test:lost-cancel"):  # connected and subscribed
            pass
        await asyncio.wait_for(waiters.aclose(), 10)
        await client.aclose()

    asyncio.run(main())
