"""One pub/sub connection per API process, shared by everything that waits for a job.

A waiter (a long poll, a sync call) needs to hear the moment its job's status changes. Giving
each its own Redis pub/sub connection made the number of waiters the number of connections:
1,500 long polls took Redis past its client limit. Here one subscriber connection carries every
channel some waiter is interested in; a channel is subscribed when its first waiter arrives and
unsubscribed when its last one leaves, and each message wakes that channel's waiters.

Waiters use it as a hint, never as the truth: a wake-up means "read the record again", and a
waiter re-reads the record every few seconds anyway, so a message lost to a reconnect only
delays an answer. After a reconnect redis-py subscribes the same channels again, and every
waiter is woken once, since messages may have been published while the connection was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from guardfleet.keys import PREFIX

log = logging.getLogger(__name__)

# Always subscribed, so that the connection never leaves subscribed mode: redis-py health-checks
# (and reads replies on) a pub/sub connection that has no subscription, which would race the
# reader task.
_ANCHOR = f"{PREFIX}:waiters"
_RETRY_S = 0.5  # between attempts to reach Redis again after the connection failed


@dataclass
class _Channel:
    subscribed: asyncio.Future[None]
    events: set[asyncio.Event] = field(default_factory=set)


class Waiters:
    """The process's subscriber: `watch(channel)` gives an event set on each message."""

    def __init__(self, client: aioredis.Redis, confirm_timeout_s: float) -> None:
        self._pubsub = client.pubsub()
        self._confirm_timeout_s = confirm_timeout_s
        self._channels: dict[str, _Channel] = {}
        # Subscribe and unsubscribe commands go out in the order the table changed, so that a
        # channel left and at once re-entered ends up subscribed.
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    @property
    def channels(self) -> int:
        """How many channels some waiter is watching now."""
        return len(self._channels)

    async def start(self) -> None:
        """Connect lazily: an API started while Redis is down comes up and answers 503s."""
        self._reader = asyncio.create_task(self._read(), name="waiters")

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Event]:
        """Subscribed to `channel` on entry (its confirmation received, so any message published
        after entry arrives); the event is set on each message until exit."""
        event = asyncio.Event()
        async with self._lock:
            entry = self._channels.get(channel)
            if entry is None:
                entry = _Channel(asyncio.get_running_loop().create_future())
                self._channels[channel] = entry
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    del self._channels[channel]
                    raise
            entry.events.add(event)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(entry.subscribed), self._confirm_timeout_s)
            except TimeoutError as exc:
                raise redis.exceptions.TimeoutError(
                    f"Redis did not confirm the subscription to {channel}"
                ) from exc
            yield event
        finally:
            await self._leave(channel, entry, event)

    async def _leave(self, channel: str, entry: _Channel, event: asyncio.Event) -> None:
        async with self._lock:
            entry.events.discard(event)
            if entry.events or self._channels.get(channel) is not entry:
                return
            del self._channels[channel]
            # If the connection is down, the reconnect drops the channel (`_forget_strays`).
            with contextlib.suppress(redis.exceptions.RedisError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        connected = False
        while True:
            try:
                if not connected:
                    await self._connect()
                    connected = True
                message = await self._pubsub.get_message(timeout=None)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                if connected:
                    log.warning("waiters: lost the Redis pub/sub connection; reconnecting")
                connected = False
                await asyncio.sleep(_RETRY_S)
                continue
            if message is not None:
                self._dispatch(message)

    async def _connect(self) -> None:
        """(Re)connect, under the lock so that no waiter's SUBSCRIBE opens a second connection;
        redis-py subscribes again every channel it knew."""
        async with self._lock:
            await self._pubsub.subscribe(_ANCHOR)
            # Channels whose waiters left while the connection was down.
            known = {c.decode() if isinstance(c, bytes) else c for c in self._pubsub.channels}
            strays = known - self._channels.keys() - {_ANCHOR}
            if strays:
                await self._pubsub.unsubscribe(*strays)
        self._wake_all()  # whatever was published while the connection was down

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        entry = self._channels.get(channel.decode() if isinstance(channel, bytes) else channel)
        if entry is None:
            return
        if message["type"] == "subscribe":
            if not entry.subscribed.done():
                entry.subscribed.set_result(None)
        elif message["type"] == "message":
            for event in entry.events:
                event.set()

    def _wake_all(self) -> None:
        for entry in self._channels.values():
            for event in entry.events:
                event.set()
