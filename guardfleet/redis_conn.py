"""Redis clients from `GUARDFLEET_REDIS_URL`: a plain Redis, or one behind Redis Sentinel.

With `sentinel://host:26379;sentinel://host2:26379/0` (kombu's form: one URL per sentinel, joined
by `;`, the database on the last) and `GUARDFLEET_REDIS_SENTINEL_MASTER`, every client asks the
sentinels for the current master and asks again after a failover, and Celery's broker does the
same through kombu's sentinel transport. Store and broker stay one Redis, as everywhere else:
the sentinels only say which server that is now.
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


def connect(settings: Settings) -> redis.Redis:
    """A client of the job store (and broker) Redis, with the configured timeouts."""
    options = _timeouts(settings)
    if not is_sentinel(settings.redis_url):
        return redis.Redis.from_url(settings.redis_url, **options)
    addresses, db, password = parse_sentinels(settings.redis_url)
    watchers = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        addresses, sentinel_kwargs=_timeouts(settings)
    )
    assert settings.redis_sentinel_master  # the settings refuse a sentinel URL without it
    master = watchers.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, db=db, password=password, **options
    )
    return cast(redis.Redis, master)


class _BlockingSentinelPool(async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's connections, found through the sentinels, bounded as the plain pool is: a
    request waits for a free connection instead of opening one more."""


def connect_async(settings: Settings, client_name: str) -> aioredis.Redis:
    """The API's client: a bounded pool of `GUARDFLEET_REDIS_MAX_CONNECTIONS` where a request
    waits up to the Redis timeout for a free connection."""
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "client_name": client_name,  # tells the API's connections apart in CLIENT LIST
    }
    if not is_sentinel(settings.redis_url):
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options)
        return aioredis.Redis.from_pool(pool)
    addresses, db, password = parse_sentinels(settings.redis_url)
    watchers = async_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        addresses, sentinel_kwargs=_timeouts(settings)
    )
    assert settings.redis_sentinel_master
    sentinel_pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
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
    """What kombu's transport needs beyond the URL to find the master."""
    if not is_sentinel(settings.redis_url):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _timeouts(settings),
    }
