"""Redis clients for the job store (`GUARDFLEET_REDIS_URL`) and the broker
(`GUARDFLEET_BROKER_URL`, by default the same server): each a plain Redis, or one behind Redis
Sentinel.

With `sentinel://host:26379;sentinel://host2:26379/0` (kombu's form: one URL per sentinel, joined
by `;`, the database on the last) and a master name, every client asks the sentinels for the
current master and asks again after a failover, and Celery's broker does the same through
kombu's sentinel transport.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel

from guardfleet.settings import Settings

SCHEME = "sentinel"


def is_sentinel(url: str) -> bool:
    return urlparse(url).scheme == SCHEME


def parse_sentinels(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """The sentinels' addresses, the database number and the password of a sentinel URL."""
    addresses, db, password = [], 0, None
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        if parsed.scheme != SCHEME or not parsed.hostname:
            raise ValueError(f"not a sentinel://host[:port] URL: {part!r}")
        addresses.append((parsed.hostname, parsed.port or 26379))
        password = parsed.password or password
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return addresses, db, password


def _server(settings: Settings, broker: bool) -> tuple[str, str]:
    """The URL and sentinel master name of the job store's Redis, or of the broker's."""
    if broker:
        return settings.broker, settings.broker_master
    return settings.redis_url, settings.redis_sentinel_master


def connect(settings: Settings, broker: bool = False) -> redis.Redis:
    """A client of the job store's Redis (the broker's with `broker`), with the configured
    timeouts."""
    url, master_name = _server(settings, broker)
    options = _timeouts(settings)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    addresses, db, password = parse_sentinels(url)
    watchers = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        addresses, sentinel_kwargs=_timeouts(settings)
    )
    assert master_name  # the settings refuse a sentinel URL without one
    master = watchers.master_for(  # type: ignore[no-untyped-call]
        master_name, db=db, password=password, **options
    )
    return cast(redis.Redis, master)


class _BlockingSentinelPool(async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's connections, found through the sentinels, bounded as the plain pool is: a
    request waits for a free connection instead of opening one more."""


def connect_async(settings: Settings, client_name: str, broker: bool = False) -> aioredis.Redis:
    """The API's client of the job store (the broker with `broker`): a bounded pool of
    `GUARDFLEET_REDIS_MAX_CONNECTIONS` where a request waits up to the Redis timeout for a free
    connection."""
    url, master_name = _server(settings, broker)
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "client_name": client_name,  # tells the API's connections apart in CLIENT LIST
    }
    if not is_sentinel(url):
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        return aioredis.Redis.from_pool(pool)
    addresses, db, password = parse_sentinels(url)
    watchers = async_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        addresses, sentinel_kwargs=_timeouts(settings)
    )
    assert master_name
    sentinel_pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        master_name,
        watchers,
        db=db,
        password=password,
        connection_class=async_sentinel.SentinelManagedConnection,
        **options,
    )
    return aioredis.Redis.from_pool(sentinel_pool)


def _timeouts(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }


def broker_options(settings: Settings) -> dict[str, Any]:
    """What kombu's transport needs beyond the broker URL to find the master."""
    if not is_sentinel(settings.broker):
        return {}
    return {
        "master_name": settings.broker_master,
        "sentinel_kwargs": _timeouts(settings),
    }
