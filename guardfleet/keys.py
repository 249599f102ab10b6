"""Redis key names, queue names and task names: the one place both services agree on them."""

from __future__ import annotations

PREFIX = "guardfleet"

# Celery queues. Sync calls (classify, chat) go to `interactive`, fire-and-forget jobs to `bulk`,
# so a bulk backlog cannot starve a caller who is waiting.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"
GPU_QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK)

TASK_RUN_JOB = "guardfleet.run_job"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_channel(job_id: str) -> str:
    """Pub/sub channel announcing each status change of a job (payload: the new status)."""
    return f"{PREFIX}:job:{job_id}:events"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
