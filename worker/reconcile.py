"""Re-publish jobs that went stale, so a message the broker lost cannot lose its job.

Redis hands a message to a consumer (BRPOP), and from then on it exists only in that worker's
memory (kombu's unacknowledged messages are not kept in Redis, `guardfleet.queueing`): a worker
killed, or a Redis that dies while the reply is on its way, takes it along. Every open job is
therefore in the `OPEN_JOBS` index with a deadline (`GUARDFLEET_JOB_STALE_S` after it was
queued; once started, a lease that its worker renews with each heartbeat, so the jobs of a
worker that died come back within twice the heartbeat's TTL), and each GPU worker runs this
sweep: a job past its deadline gets a new message (its `gen` goes up) and a new deadline.
Duplicates are harmless: a message starts a job only if the job is queued, or if it is the
message that started the current run, or newer than that run (see `guardfleet.store`), so an
original message that was merely slow is dropped once another has started the job.

Keep the deadline well above the time a job may legitimately wait in the queue or run: a job
re-published while its first message is still waiting loses nothing, but costs one more message.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from guardfleet.keys import OPEN_JOBS, QUEUE_BULK, TASK_RUN_JOB, job_key
from guardfleet.replies import as_text
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


class Reconciler:
    def __init__(
        self,
        client: redis.Redis,
        send_task: SendTask,
        stale_s: float,
        ttl_s: int,
        every_s: float = 5.0,
        limit: int = 100,
    ) -> None:
        self.client = client
        self.send_task = send_task
        self.stale_s = stale_s
        self.ttl_s = ttl_s
        self.every_s = every_s
        self.limit = limit
        self._open = DueSet(client, OPEN_JOBS)  # leased until the job's next deadline
        self._bump = client.register_script(_BUMP)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> int:
        """Re-publish the stale jobs due now; returns how many."""
        # Renewed here (and by each API process once a minute while it creates jobs), the
        # index outlives every job in it.
        self.client.expire(OPEN_JOBS, self.ttl_s)
        published = 0
        due = self._open.take_due(self.stale_s, self.limit)
        for i, job_id in enumerate(due):
            bumped = self._bump(keys=[job_key(job_id), OPEN_JOBS], args=[job_id, QUEUE_BULK])
            if not bumped:
                continue
            gen, queue = int(bumped[0]), bumped[1]
            queue = as_text(queue)
            log.warning("job %s is stale; publishing it again (message %d)", job_id, gen)
            try:
                self.send_task(TASK_RUN_JOB, args=[job_id, gen], queue=queue)
            except Exception:
                # A broker on another server is away while the store answers: what this sweep
                # took is due again now, not at the end of its lease (`stale_s`, hours), so the
                # first sweep after the broker is back publishes it.
                set_deadlines(self.client, due[i:], time.time())
                raise
            published += 1
        return published

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception as exc:  # Redis or the broker away: the leases bring them back
                log.warning("stale-job sweep failed: %s", exc)
