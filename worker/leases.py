"""Sorted sets of things that fall due (webhook retries, stale jobs), taken with a lease.

An entry is scored by when it is due. Taking it does not remove it: its score moves to the end
of a lease, so if the taker dies before dealing with it the entry falls due again and the next
sweep takes it. Whoever deals with an entry moves it to its next time or removes it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from guardfleet.redis_conn import eval_many
from guardfleet.replies import as_text

# Take up to ARGV[3] entries due by ARGV[1], leasing each until ARGV[2].
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


class DueSet:
    """One such set per part of the store (`guardfleet.keys`): a take reads each part's."""

    def __init__(self, client: redis.Redis, keys: Sequence[str]) -> None:
        self.client = client
        self.keys = list(keys)
        self._take = client.register_script(_TAKE_DUE)

    def take_due(self, lease_s: float, limit: int = 100) -> list[str]:
        """The members due now (at most `limit` from each part), each leased for `lease_s`."""
        now = time.time()
        args = [now, now + lease_s, limit]
        if len(self.keys) == 1:
            return [as_text(m) for m in self._take(keys=self.keys, args=args)]
        # Most parts have nothing due: a plain read of each costs one command where the script
        # costs two (its call and its read), and the script runs only where something is due.
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.zrangebyscore(key, "-inf", now, start=0, num=1)
            found = pipe.execute()
        calls = [([key], args) for key, first in zip(self.keys, found, strict=True) if first]
        replies = eval_many(self.client, self._take, calls) if calls else []
        return [as_text(m) for due in replies for m in due]
