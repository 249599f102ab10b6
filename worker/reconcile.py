"""Re-publish jobs that went stale, so a message the broker lost cannot lose its job.

Redis hands a message to a consumer (BRPOP), and from then on it exists only in that worker's
memory (kombu's unacknowledged messages are not kept in Redis, `guardfleet.queueing`): a worker
killed, or a Redis that dies while the reply is on its way, takes it along. Every open job is
therefore in its part's open index (`keys.open_jobs`) with a deadline (`GUARDFLEET_JOB_STALE_S`
after it was queued; once started, a lease that its worker renews with each heartbeat, so the
jobs of a worker that died come back within twice the heartbeat's TTL), and each GPU worker runs
this sweep over every part: a job past its deadline gets a new message (its `gen` goes up) and a
new deadline. Duplicates are harmless: a message starts a job only if the job is queued, or if it
is the message that started the current run, or newer than that run (see `guardfleet.store`), so
an original message that was merely slow is dropped once another has started the job.

Keep the deadline well above the time a job may legitimately wait in the queue or run: a job
re-published while its first message is still waiting loses nothing, but costs one more message.

A message a worker took and died with would wait out that whole deadline (hours), so each sweep
also looks for such jobs directly. A lane is a list, first in, first out, and every message
says when it was sent (`guardfleet.queueing.SENT_AT`): the oldest message still waiting dates
every message that has left the lane. A job still queued whose message was sent before every
lane's oldest (its deadline less `stale_s` is when its last message was queued) has had its
message taken by a worker that has not started it. A live worker starts a job milliseconds after
it takes the message, so a job found so by two sweeps in a row lost its message with its
worker, and is published again at once. The index does not say which lane a job is on, so the
search stops where every lane has moved past: a message lost from one lane while the other holds
an older backlog is found once that backlog has moved past it (at worst at the deadline), and a
backlog is never read through. Clocks of different machines may differ by `skew_s`; jobs
within it are left to the deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from guardfleet.keys import (
    GPU_QUEUES,
    OLD_LAYOUT,
    QUEUE_BULK,
    TASK_RUN_JOB,
    id_tag,
    job_key,
    open_jobs,
    part_tags,
)
from guardfleet.queueing import message_job_id, message_sent_at, sent_header
from guardfleet.replies import as_text, optional_text
from guardfleet.store import set_deadlines
from guardfleet.webhooks import SendTask
from worker.leases import DueSet

log = logging.getLogger(__name__)

# A new message generation for a job that is still open; forget it (nil) otherwise.
_BUMP = """
local h = redis.call('HMGET', KEYS[1], 'status', 'queue')
if h[1] ~= 'queued' and h[1] ~= 'running' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
return {redis.call('HINCRBY', KEYS[1], 'gen', 1), h[2] or ARGV[2]}
"""

# KEYS: job, open index. ARGV: job id, gen and deadline as a sweep saw them, new deadline, default
# lane. A new message generation if the job is still queued and untouched since (no other sweep
# published it meanwhile); nil otherwise.
_REVIVE = """
local h = redis.call('HMGET', KEYS[1], 'status', 'queue', 'gen')
if h[1] ~= 'queued' or (h[3] or '1') ~= ARGV[2] then return false end
if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1])) ~= tonumber(ARGV[3]) then return false end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return {redis.call('HINCRBY', KEYS[1], 'gen', 1), h[2] or ARGV[5]}
"""
Seen = tuple[str, float]  # a queued job's message gen and deadline, as a sweep read them


def left_by_an_older_version(client: redis.Redis) -> dict[str, int]:
    """What the fleet-wide sets of the layout before parts still hold (`keys.OLD_LAYOUT`)."""
    with client.pipeline(transaction=False) as pipe:
        for key in OLD_LAYOUT.values():
            pipe.zcard(key)
        counts = pipe.execute()
    return {what: int(n) for what, n in zip(OLD_LAYOUT, counts, strict=True) if n}


def _job_keys(job_id: str) -> list[str]:
    return [job_key(job_id), open_jobs(id_tag(job_id))]


class Reconciler:
    def __init__(
        self,
        client: redis.Redis,
        send_task: SendTask,
        stale_s: float,
        ttl_s: int,
        every_s: float = 5.0,
        limit: int = 100,
        *,
        broker: redis.Redis | None = None,
        run_lease_s: float = 0.0,
        skew_s: float = 2.0,
        parts: int = 1,
    ) -> None:
        """`broker` holds the lanes (the store's Redis if None); `run_lease_s` is how far ahead
        a running job's deadline lies, so that the search for lost messages skips those;
        `parts` is how many of the store's parts to sweep (`GUARDFLEET_STORE_PARTS`)."""
        self.client = client
        self.broker = client if broker is None else broker
        self.send_task = send_task
        self.stale_s = stale_s
        self.ttl_s = ttl_s
        self.every_s = every_s
        self.limit = limit
        self.run_lease_s = run_lease_s
        self.skew_s = skew_s
        self.indexes = [open_jobs(tag) for tag in part_tags(parts)]
        self._open = DueSet(client, self.indexes)  # leased until the job's next deadline
        self._bump = client.register_script(_BUMP)
        self._revive = client.register_script(_REVIVE)
        self._suspects: dict[str, Seen] = {}  # found by the last sweep; lost if found again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    def start(self) -> None:
        left = left_by_an_older_version(self.client)
        if left:
            log.error(
                "the store holds %s under the key names of a version before the store's parts; "
                "this version never reads them (drain a fleet before upgrading: README)",
                ", ".join(f"{count} {what}" for what, count in left.items()),
            )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> int:
        """Re-publish the stale jobs due now, and the jobs whose message was lost with the
        worker that took it; returns how many."""
        # Renewed here (and by each API process once a minute while it creates jobs), the
        # index outlives every job in it.
        with self.client.pipeline(transaction=False) as pipe:
            for index in self.indexes:
                pipe.expire(index, self.ttl_s)
            pipe.execute()
        due = self._open.take_due(self.stale_s, self.limit)
        published = self._publish(
            due,
            lambda job_id: self._bump(keys=_job_keys(job_id), args=[job_id, QUEUE_BULK]),
            "is stale",
        )
        lost = self._lost()
        return published + self._publish(
            list(lost),
            lambda job_id: self._revive(
                keys=_job_keys(job_id),
                args=[job_id, *lost[job_id], time.time() + self.stale_s, QUEUE_BULK],
            ),
            "lost its message with a worker",
        )

    def _publish(self, job_ids: list[str], bump: Callable[[str], Any], why: str) -> int:
        published = 0
        for i, job_id in enumerate(job_ids):
            bumped = bump(job_id)
            if not bumped:
                continue
            gen, queue = int(bumped[0]), as_text(bumped[1])
            log.warning("job %s %s; publishing it again (message %d)", job_id, why, gen)
            try:
                self.send_task(TASK_RUN_JOB, args=[job_id, gen], queue=queue, headers=sent_header())
            except Exception:
                # A broker on another server is away while the store answers: what this sweep
                # took is due again now, not at the end of its lease (`stale_s`, hours), so the
                # first sweep after the broker is back publishes it.
                set_deadlines(self.client, job_ids[i:], time.time())
                raise
            published += 1
        return published

    def _lost(self) -> dict[str, Seen]:
        """The queued jobs whose message has left every lane, found so by this sweep and the
        one before at the same gen and deadline (see the module's docstring)."""
        mark = self._mark()
        suspects: dict[str, Seen] = {}
        if mark is not None:
            left_before, waiting = mark
            now = time.time()
            # Queued jobs' deadlines are when their message was sent plus `stale_s`. Running
            # jobs' leases end within `run_lease_s` of now, so the range starts there (a queued
            # job whose deadline is that near falls due for the sweep above anyway); it ends
            # where every lane has moved past, so a backlog waiting on one lane never fills it.
            with self.client.pipeline(transaction=False) as pipe:
                for index in self.indexes:
                    pipe.zrangebyscore(
                        index,
                        f"({now + self.run_lease_s!r}",
                        f"({left_before + self.stale_s!r}",
                        start=0,
                        num=self.limit,
                        withscores=True,
                    )
                parts: list[list[tuple[bytes, float]]] = pipe.execute()
            entries = sorted((e for part in parts for e in part), key=lambda e: e[1])[: self.limit]
            pipe = self.client.pipeline(transaction=False)
            for member, _ in entries:
                pipe.hmget(job_key(as_text(member)), "status", "gen")
            for (member, deadline), (status, gen) in zip(entries, pipe.execute(), strict=True):
                job_id = as_text(member)
                if optional_text(status) == "queued" and job_id not in waiting:
                    suspects[job_id] = (optional_text(gen) or "1", deadline)
        lost = {
            job_id: seen for job_id, seen in suspects.items() if self._suspects.get(job_id) == seen
        }
        self._suspects = {k: v for k, v in suspects.items() if k not in lost}
        return lost

    def _mark(self) -> tuple[float, set[str]] | None:
        """A time every message sent before has left every lane (the earliest of the lanes'
        oldest waiting messages, less `skew_s`), and the jobs of those oldest messages; None
        if a lane's oldest entry does not say when it was sent (not a `run_job` message of
        ours, or one from a process older than `SENT_AT`): nothing is dated until it leaves."""
        marks, waiting = [], set()
        for lane in GPU_QUEUES:
            oldest = self.broker.lindex(lane, -1)
            if oldest is None:  # an empty lane: every message sent before now has left it
                marks.append(time.time())
                continue
            try:
                sent, job_id = message_sent_at(oldest), message_job_id(oldest)
            except (ValueError, LookupError, TypeError):
                return None
            if sent is None:
                return None
            marks.append(sent)
            waiting.add(job_id)
        return min(marks) - self.skew_s, waiting

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception as exc:  # Redis or the broker away: the leases bring them back
                log.warning("stale-job sweep failed: %s", exc)
