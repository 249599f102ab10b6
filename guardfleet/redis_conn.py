"""Redis clients for the job store (`GUARDFLEET_REDIS_URL`) and the broker
(`GUARDFLEET_BROKER_URL`, by default the same server): each a plain Redis, or one behind Redis
Sentinel; the job store may also be a Redis Cluster (`GUARDFLEET_REDIS_CLUSTER`).

With `sentinel://host:26379;sentinel://host2:26379/0` (kombu's form: one URL per sentinel, joined
by `;`, the database on the last) and a master name, every client asks the sentinels for the
current master and asks again after a failover, and Celery's broker does the same through
kombu's sentinel transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as async_cluster
import redis.asyncio.sentinel as async_sentinel
import redis.cluster
import redis.sentinel
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

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
    if settings.redis_cluster and not broker:
        # Typed as the plain client: the store calls only what both have.
        return cast(redis.Redis, redis.cluster.RedisCluster.from_url(url, **options))
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
    if settings.redis_cluster and not broker:
        del options["timeout"]  # a pool option; the cluster client keeps a pool per node
        return cast(aioredis.Redis, async_cluster.RedisCluster.from_url(url, **options))
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


async def initialize(client: aioredis.Redis) -> None:
    """Learn a Redis Cluster's slots now, if `client` is one. redis-py 8.1's asyncio cluster
    client does so at its first command, but not before a transaction or a subscription (which
    then fail), so the callers of those call this first; it costs nothing once done."""
    if isinstance(client, async_cluster.RedisCluster):
        await client.initialize()


def subscriber_elsewhere(client: aioredis.Redis, turn: int) -> Any | None:
    """For a Redis Cluster, a new pub/sub on its `turn`-th node (counting round), to move a
    subscription off a node that stopped answering: redis-py's cluster pub/sub stays with the
    node it first connected to, dead or not. Any node will do, since a classic `PUBLISH`
    reaches every node. None for one Redis, whose pub/sub reconnects by itself."""
    if not isinstance(client, async_cluster.RedisCluster):
        return None
    nodes = client.get_nodes()
    return client.pubsub(node=nodes[turn % len(nodes)]) if nodes else None


def eval_many(
    client: redis.Redis, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[EncodableT]]]
) -> list[Any]:
    """Run `script` once per (keys, args) in one pipeline; the replies in order.

    Sent as plain `EVALSHA` commands: redis-py 8.1 refuses a script object's call in a Redis
    Cluster pipeline, and this also spares a plain Redis the `SCRIPT EXISTS` that such a call
    costs. Calls the server did not know the script for (restarted, failed over) are run again
    once it is loaded; nothing that ran is run twice."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            for i in todo:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            replies = pipe.execute(raise_on_error=False)
        missing = []
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, NoScriptError) and attempt == 0:
                missing.append(i)
            elif isinstance(reply, Exception):
                raise reply
            else:
                results[i] = reply
        if not missing:
            break
        client.script_load(script.script)
        todo = missing
    return results
