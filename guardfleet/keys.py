"""Redis key names, queue names and task names: the one place both services agree on them.

The job store's keys are split into parts so that it can spread over the shards of a Redis
Cluster, which runs a script or a transaction only on keys of one slot. A part is a hash tag,
two hex digits (`guardfleet:{3f}:...`), and it is written in every job and batch id: `job_3f...`
belongs to part `3f`. Everything one operation touches shares that tag: a job's record, channel
and stream; its part's open index, counters and outbox; a batch's keys and its items' jobs (an
item's id is minted in its batch's part). Whoever sweeps the fleet-wide sets reads every part.

`GUARDFLEET_STORE_PARTS` (1 to 256) says how many parts new ids are drawn from. A key's part is
read from its id, never from the setting, so the count may be raised at any time, but never
lowered: the parts above the new count would hold jobs and deliveries nobody sweeps.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable

PREFIX = "guardfleet"
MAX_PARTS = 256
_HEX = frozenset("0123456789abcdef")
# The part of an id not minted here (a typo in a URL, say): such a key never exists, but it still
# needs one slot with the keys a script reads beside it.
_FOREIGN = "xx"

# Celery queues. Sync calls (classify, chat) go to `interactive`, fire-and-forget jobs to `bulk`,
# so a bulk backlog cannot starve a caller who is waiting.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"
GPU_QUEUES = (QUEUE_INTERACTIVE, QUEUE_BULK)
QUEUE_WEBHOOKS = "webhooks"  # served by a worker without a model

TASK_RUN_JOB = "guardfleet.run_job"
TASK_DELIVER = "guardfleet.deliver_webhook"


# The webhook outbox, one per part: every delivery not yet settled, scored by when it is due (or
# until when it is leased to a queued task). Retries wait here, not as Celery countdowns, which a
# worker would hold in memory (and lose if killed) until due. Entries leave when settled, or when
# their delivery record has expired, so it holds at most the deliveries of one TTL.
def webhooks_due(tag: str) -> str:
    return f"{_part(tag)}:webhooks:due"


# Fleet-wide counters, one hash per part (the API adds them up): `jobs_ended:<status>`,
# `batch_items:<state>`, `webhook_attempts:<outcome>`, `webhook_deliveries:<final status>`. Each is
# bumped by the very script or transaction that makes the change, so a change is counted exactly
# once whichever process makes it; the API serves them as Prometheus counters (`api.metrics`).
def stats(tag: str) -> str:
    return f"{_part(tag)}:stats"


# On the broker: a random id the broker keeps for itself (renewed by whoever reads it). Each
# worker's heartbeat carries the id of the broker it consumes, and the API counts as ready only
# workers on its own broker: a worker given another GUARDFLEET_BROKER_URL would never see the
# API's jobs.
BROKER_ID = f"{PREFIX}:broker:id"


def id_tag(resource_id: str) -> str:
    """The part of a job or batch id: the two hex digits after its prefix."""
    tag = resource_id.partition("_")[2][:2]
    return tag if len(tag) == 2 and _HEX.issuperset(tag) else _FOREIGN


def part_tags(parts: int) -> list[str]:
    """The tags of the first `parts` parts: what a sweep of the fleet-wide sets reads."""
    return [f"{part:02x}" for part in range(parts)]


def new_id(prefix: str, parts: int = 1, tag: str | None = None) -> str:
    """A fresh id in part `tag`, or in one of the first `parts` parts drawn at random."""
    if tag is None:
        tag = f"{random.randrange(parts):02x}"
    return f"{prefix}_{tag}{uuid.uuid4().hex[2:]}"


def by_tag(resource_ids: Iterable[str]) -> dict[str, list[str]]:
    """Ids grouped by part, for writes to the per-part sets."""
    groups: dict[str, list[str]] = {}
    for resource_id in resource_ids:
        groups.setdefault(id_tag(resource_id), []).append(resource_id)
    return groups


def _part(tag: str) -> str:
    return f"{PREFIX}:{{{tag}}}"


def job_key(job_id: str) -> str:
    return f"{_part(id_tag(job_id))}:job:{job_id}"


# Every job that has not ended, scored by when it counts as stale: queued jobs a long deadline
# after they were queued, running ones a short lease their worker renews with each heartbeat. A
# worker's reconciler re-publishes stale jobs, which covers a message the broker lost (a worker
# holds the messages it took in memory only, and Redis can die while its reply carries one) and
# the jobs a dead worker was running.
def open_jobs(tag: str) -> str:
    return f"{_part(tag)}:jobs:open"


# One channel for the whole fleet, rarely used: a running job was cancelled, or someone started
# streaming it (payload: the job id). Each GPU worker listens, so its running jobs hear of both at
# once instead of polling their status (`worker.notices`).
JOB_NOTICES = f"{PREFIX}:jobs:notices"


def job_channel(job_id: str) -> str:
    """Pub/sub channel announcing that a job ended (payload: its final status): what long
    polls and sync calls wait for. Only jobs someone waits for announce (their record has
    `waited`): most jobs are polled or send a webhook, and nobody listens. Starting is not
    announced: nobody waits for it, and each waiter would re-read the record for nothing."""
    return f"{job_key(job_id)}:events"


def job_stream(job_id: str) -> str:
    """Redis Stream of a watched job's live events: status changes and text deltas (see
    `guardfleet.streams`). Only jobs someone streams have one; it is capped and expires."""
    return f"{job_key(job_id)}:stream"


def job_stream_channel(job_id: str) -> str:
    """Pub/sub channel on which each entry added to a job's stream is announced (payload: the
    entry's kind), so readers wait on the API's shared subscriber, not on a blocking read each.
    The scripts build it as the stream key plus ":new"."""
    return job_stream(job_id) + ":new"


# Workers' heartbeats share a tag of their own, so that readiness reads them with one MGET.
def worker_key(name: str) -> str:
    return f"{PREFIX}:{{fleet}}:worker:{name}"


# Names of workers with a heartbeat, scored by when it expires: readiness reads this instead of
# scanning the keyspace, which holds every job for a day.
WORKER_REGISTRY = f"{PREFIX}:{{fleet}}:workers"


def delivery_key(resource_id: str) -> str:
    """The webhook delivery of a job or batch: one per resource (its `webhook-id` is stable)."""
    return f"{_part(id_tag(resource_id))}:delivery:{resource_id}"


def delivery_lock_key(resource_id: str) -> str:
    """Held while one attempt of a delivery runs, so copies of its task never overlap."""
    return f"{delivery_key(resource_id)}:lock"


def batch_key(batch_id: str) -> str:
    return f"{_part(id_tag(batch_id))}:batch:{batch_id}"


def batch_state_key(batch_id: str) -> str:
    """Hash of counters and status, updated atomically as items finish."""
    return f"{batch_key(batch_id)}:state"


def batch_jobs_key(batch_id: str) -> str:
    """List of the batch's job ids, in input order."""
    return f"{batch_key(batch_id)}:jobs"


def batch_upload_key(batch_id: str) -> str:
    """The checked upload, kept until every item has been queued (the fan-out reads it)."""
    return f"{batch_key(batch_id)}:upload"


def batch_fanout_key(batch_id: str) -> str:
    """Hash: `cursor`, how many items are queued so far (each chunk advances it in the
    transaction that queues the chunk), and `cancel`, set by a cancel so that a chunk being
    queued at that moment is refused and written again as cancelled."""
    return f"{batch_key(batch_id)}:fanout"


# Batches whose items are not all queued yet, scored by when they are due (now, or the end of
# the lease a delivery worker holds while it fans one out; one set per part), and how many items
# they still hold: back-pressure counts those as waiting on the bulk lane. The counts are one
# hash for the whole fleet, read by each API process every fraction of a second, so they are
# written beside a batch's transactions rather than in them.
def batches_due(tag: str) -> str:
    return f"{_part(tag)}:batches:due"


BATCHES_PENDING = f"{PREFIX}:batches:pending"


def batch_done_key(batch_id: str) -> str:
    """Set of job ids already counted, so a redelivered job is never counted twice."""
    return f"{batch_key(batch_id)}:done"


# The fleet-wide sets of the layout before parts, which nothing reads any more: a worker that
# finds them not empty says what an upgrade without draining left behind (README, "Upgrading").
OLD_LAYOUT = {
    "open jobs": f"{PREFIX}:jobs:open",
    "webhooks due": f"{PREFIX}:webhooks:due",
    "batches not yet queued": f"{PREFIX}:batches:due",
}


def idempotency_key(scope: str, key: str) -> str:
    return f"{PREFIX}:idem:{scope}:{key}"
