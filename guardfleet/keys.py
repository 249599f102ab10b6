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

# Webhook retries wait here (score: when due), not as Celery countdowns: an ETA longer than the
# Redis visibility timeout would be redelivered over and over.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_channel(job_id: str) -> str:
    """Pub/sub channel announcing each status change of a job (payload: the new status)."""
    return f"{PREFIX}:job:{job_id}:events"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


# Names of workers with a heartbeat, scored by when it expires: readiness reads this instead of
# scanning the keyspace, which holds every job for a day.
WORKER_REGISTRY = f"{PREFIX}:workers"


def delivery_key(resource_id: str) -> str:
    """The webhook delivery of a job or batch: one per resource (its `webhook-id` is stable)."""
    return f"{PREFIX}:delivery:{resource_id}"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_state_key(batch_id: str) -> str:
    """Hash of counters and status, updated atomically as items finish."""
    return f"{PREFIX}:batch:{batch_id}:state"


def batch_jobs_key(batch_id: str) -> str:
    """List of the batch's job ids, in input order."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_done_key(batch_id: str) -> str:
    """Set of job ids already counted, so a redelivered job is never counted twice."""
    return f"{PREFIX}:batch:{batch_id}:done"


def idempotency_key(scope: str, key: str) -> str:
    return f"{PREFIX}:idem:{scope}:{key}"
