"""Redis key names, queue names and task names: the one place both services agree on them."""

from __future__ import annotations

PREFIX = "guardfleet"

# Celery queues. Sync calls (classify, chat) go to `interactive`, fire-and-forget jobs to `bulk`,
# so a bulk backlog cannot starve a caller who is waiting.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"
GPU_QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK)
QUEUE_WEBHOOKS = "webhooks"  # served by a worker without a model

TASK_RUN_JOB = "guardfleet.run_job"
TASK_DELIVER = "guardfleet.deliver_webhook"

# The webhook outbox: every delivery not yet settled, scored by when it is due (or until when it
# is leased to a queued task). Retries wait here, not as Celery countdowns, which a worker would
# hold in memory (and lose if killed) until due. Entries leave when settled, or
# when their delivery record has expired, so it holds at most the deliveries of one TTL.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


# Fleet-wide counters, one hash: `jobs_ended:<status>`, `batch_items:<state>`,
# `webhook_attempts:<outcome>`, `webhook_deliveries:<final status>`. Each is bumped by the very
# script or transaction that makes the change, so a change is counted exactly once whichever
# process makes it; the API serves them as Prometheus counters (`api.metrics`).
STATS = f"{PREFIX}:stats"


# On the broker: a random id the broker keeps for itself (renewed by whoever reads it). Each
# worker's heartbeat carries the id of the broker it consumes, and the API counts as ready only
# workers on its own broker: a worker given another GUARDFLEET_BROKER_URL would never see the
# API's jobs.
BROKER_ID = f"{PREFIX}:broker:id"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


# Every job that has not ended, scored by when it counts as stale: queued jobs a long deadline
# after they were queued, running ones a short lease their worker renews with each heartbeat. A
# worker's reconciler re-publishes stale jobs, which covers a message the broker lost (a worker
# holds the messages it took in memory only, and Redis can die while its reply carries one) and
# the jobs a dead worker was running.
OPEN_JOBS = f"{PREFIX}:jobs:open"


# One channel for the whole fleet, rarely used: a running job was cancelled, or someone started
# streaming it (payload: the job id). Each GPU worker listens, so its running jobs hear of both at
# once instead of polling their status (`worker.notices`).
JOB_NOTICES = f"{PREFIX}:jobs:notices"


def job_channel(job_id: str) -> str:
    """Pub/sub channel announcing that a job ended (payload: its final status): what long
    polls and sync calls wait for. Only jobs someone waits for announce (their record has
    `waited`): most jobs are polled or send a webhook, and nobody listens. Starting is not
    announced: nobody waits for it, and each waiter would re-read the record for nothing."""
    return f"{PREFIX}:job:{job_id}:events"


def job_stream(job_id: str) -> str:
    """Redis Stream of a watched job's live events: status changes and text deltas (see
    `guardfleet.streams`). Only jobs someone streams have one; it is capped and expires."""
    return f"{PREFIX}:job:{job_id}:stream"


def job_stream_channel(job_id: str) -> str:
    """Pub/sub channel on which each entry added to a job's stream is announced (payload: the
    entry's kind), so readers wait on the API's shared subscriber, not on a blocking read each.
    The scripts build it as the stream key plus ":new"."""
    return job_stream(job_id) + ":new"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


# Names of workers with a heartbeat, scored by when it expires: readiness reads this instead of
# scanning the keyspace, which holds every job for a day.
WORKER_REGISTRY = f"{PREFIX}:workers"


def delivery_key(resource_id: str) -> str:
    """The webhook delivery of a job or batch: one per resource (its `webhook-id` is stable)."""
    return f"{PREFIX}:delivery:{resource_id}"


def delivery_lock_key(resource_id: str) -> str:
    """Held while one attempt of a delivery runs, so copies of its task never overlap."""
    return f"{PREFIX}:delivery:{resource_id}:lock"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_state_key(batch_id: str) -> str:
    """Hash of counters and status, updated atomically as items finish."""
    return f"{PREFIX}:batch:{batch_id}:state"


def batch_jobs_key(batch_id: str) -> str:
    """List of the batch's job ids, in input order."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_upload_key(batch_id: str) -> str:
    """The checked upload, kept until every item has been queued (the fan-out reads it)."""
    return f"{PREFIX}:batch:{batch_id}:upload"


def batch_fanout_key(batch_id: str) -> str:
    """Hash: `cursor`, how many items are queued so far (each chunk advances it in the
    transaction that queues the chunk), and `cancel`, set by a cancel so that a chunk being
    queued at that moment is refused and written again as cancelled."""
    return f"{PREFIX}:batch:{batch_id}:fanout"


# Batches whose items are not all queued yet, scored by when they are due (now, or the end of
# the lease a delivery worker holds while it fans one out), and how many items they still hold:
# back-pressure counts those as waiting on the bulk lane.
BATCHES_DUE = f"{PREFIX}:batches:due"
BATCHES_PENDING = f"{PREFIX}:batches:pending"


def batch_done_key(batch_id: str) -> str:
    """Set of job ids already counted, so a redelivered job is never counted twice."""
    return f"{PREFIX}:batch:{batch_id}:done"


def idempotency_key(scope: str, key: str) -> str:
    return f"{PREFIX}:idem:{scope}:{key}"
