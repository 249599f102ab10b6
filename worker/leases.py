"""Sorted sets of things that fall due (webhook retries, stale jobs), taken with a lease.

An entry is scored by when it is due. Taking it does not remove it: its score moves to the end
of a lease, so if the taker dies before dealing with it the entry falls due again and the next
sweep takes it. Whoever deals with an entry moves it to its next time or removes it.
"""

from __future__ import annotations

import time

import redis

from guardfleet.replies import as_text

# Take up to ARGV[3] entries due by ARGV[1], leasing each until ARGV[2].
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


class DueSet:
    def __init__(self, client: redis.Redis, key: str) -> None:
        self.key = key
        self._take = client.register_script(_TAKE_DUE)

    def take_due(self, lease_s: float, limit: int = 100) -> list[str]:
        """The members due now (at most `limit`), each leased for `lease_s`."""
        now = time.time()
        due = self._take(keys=[self.key], args=[now, now + lease_s, limit])
        return [as_text(m) for m in due]
