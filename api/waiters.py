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
from guardfleet.redis_conn import initialize, subscriber_elsewhere
from guardfleet.replies import as_text

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
        self._client = client
        self._pubsub = client.pubsub()
        self._confirm_timeout_s = confirm_timeout_s
        # Every channel subscribed, or about to be, or about to be left.
        self._channels: dict[str, _Channel] = {}
        # Changes not sent yet. They go out together, one SUBSCRIBE and one UNSUBSCRIBE for
        # everything that arrived meanwhile: a thousand waiters arriving at once are two
        # commands, not a thousand round trips in a row.
        self._subscribe: set[str] = set()
        self._unsubscribe: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one flush or reconnect at a time
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._losses = 0  # connections lost so far

    async def start(self) -> None:
        """Connect lazily: an API started while Redis is down comes up and answers 503s."""
        self._reader = asyncio.create_task(self._read(), name="waiters")

    async def aclose(self) -> None:
        self._closing = True
        tasks = [task for task in (self._reader, self._flusher) if task is not None]
        for task in tasks:
            # Cancelled until it ends: one cancel can be lost on its way through redis-py
            # (seen under load, in about one shutdown in a few hundred: the reader, its cancel
            # requested, back waiting for messages), and the API process then never finished
            # its shutdown.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=_RETRY_S)
        await asyncio.gather(*tasks, return_exceptions=True)  # how each ended, collected
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Event]:
        """Subscribed to `channel` on entry (its confirmation received, so any message published
        after entry arrives); the event is set on each message until exit."""
        event = asyncio.Event()
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel(asyncio.get_running_loop().create_future())
            self._subscribe.add(channel)
            self._schedule()
        self._unsubscribe.discard(channel)
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
            entry.events.discard(event)
            if not entry.events:
                self._unsubscribe.add(channel)
                self._schedule()

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="waiters-flush")

    async def _flush(self) -> None:
        async with self._lock:
            while self._subscribe or self._unsubscribe:
                # Left again before anything was sent: nothing to send for it.
                leaving = {c for c in self._unsubscribe if not self._channels[c].events}
                self._unsubscribe.clear()
                for channel in leaving:
                    del self._channels[channel]
                subscribe = self._subscribe - leaving
                self._subscribe.clear()
                unsubscribe = leaving - subscribe
                try:
                    if subscribe:
                        await self._pubsub.subscribe(*subscribe)
                    if unsubscribe:
                        await self._pubsub.unsubscribe(*unsubscribe)
                except redis.exceptions.RedisError:
                    # The connection is down: the reconnect sends what is still wanted, and
                    # the waiters meanwhile time out with 503s.
                    return

    async def _connect(self) -> None:
        """(Re)connect and make the server's subscriptions the table's: redis-py subscribes
        again every channel it knew; channels left meanwhile are dropped, and channels whose
        SUBSCRIBE never went out are sent."""
        async with self._lock:
            await initialize(self._client)
            if self._losses and (moved := subscriber_elsewhere(self._client, self._losses)):
                old, self._pubsub = self._pubsub, moved
                with contextlib.suppress(Exception):  # its node is away: nothing to tell it
                    await old.aclose()  # type: ignore[no-untyped-call]
            await self._pubsub.subscribe(_ANCHOR)
            known = {as_text(c) for c in self._pubsub.channels}
            strays = known - self._channels.keys() - {_ANCHOR}
            if strays:
                await self._pubsub.unsubscribe(*strays)
            self._subscribe |= self._channels.keys() - known
        self._schedule()
        self._wake_all()  # whatever was published while the connection was down

    async def _read(self) -> None:
        connected = False
        while not self._closing:
            try:
                if not connected:
                    await self._connect()
                    connected = True
                message = await self._pubsub.get_message(timeout=None)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                if connected:
                    log.warning("waiters: lost the Redis pub/sub connection; reconnecting")
                connected = False
                self._losses += 1
                await asyncio.sleep(_RETRY_S)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        entry = self._channels.get(as_text(channel))
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
