"""Submitting jobs and waiting for them: the API's side of the job contract."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from api import metrics
from api.deps import Resources
from api.errors import APIError
from guardfleet.keys import delivery_key, job_channel, new_id
from guardfleet.queueing import queue_for, task_message
from guardfleet.schemas import (
    Batch,
    ChatInput,
    ClassifyRequest,
    Job,
    JobError,
    JobStatus,
    WebhookDelivery,
    utcnow,
)
from guardfleet.ssrf import UnsafeURL, check_url
from guardfleet.store import TransitionRefused

T = TypeVar("T", Job, Batch)

log = logging.getLogger(__name__)

# Re-read the record this often while waiting, in case a pub/sub message was missed (e.g. the
# waiter's connection blipped); events make the common case immediate.
_RECHECK_S = 10.0


def new_job(res: Resources, request: ClassifyRequest | ChatInput, **fields: Any) -> Job:
    """A job with an id drawn from every part of the store (`GUARDFLEET_STORE_PARTS`)."""
    metadata = request.metadata if isinstance(request, ClassifyRequest) else None
    job_id = new_id("job", res.settings.store_parts)
    return Job(id=job_id, request=request, metadata=metadata, **fields)


async def check_callback(res: Resources, url: str | None) -> None:
    """Refuse a callback URL at submit time (422) rather than fail to deliver hours later."""
    if url is None:
        return
    if not res.settings.webhook_secrets:
        raise APIError(
            422,
            "callbacks are not enabled on this server (the operator has not set "
            "GUARDFLEET_WEBHOOK_SECRETS)",
            param="callback_url",
            code="callbacks_disabled",
        )
    try:
        await run_in_threadpool(check_url, url, res.allow)  # resolves the host: blocking
    except UnsafeURL as exc:
        raise APIError(
            422, f"callback_url refused: {exc}", param="callback_url", code="unsafe_callback_url"
        ) from exc


async def with_webhook(res: Resources, item: T) -> T:
    """The job or batch with its webhook delivery record, if it has one."""
    if item.callback_url is None:  # no webhook, no record: spare the read on every poll
        return item
    raw = await res.redis.get(delivery_key(item.id))
    if raw is not None:
        item.webhook = WebhookDelivery.model_validate_json(raw)
    return item


async def submit(
    res: Resources, job: Job, interactive: bool, watch: bool = False, waited: bool = False
) -> Job:
    """Store and queue `job` in one step; a `watch`ed one streams its events from its first
    token, a `waited` one announces its end on its channel (`submit_and_wait`). A Redis error
    leaves neither record nor message (and answers 503)."""
    queue = queue_for(interactive)
    message = task_message(res.celery, job.id, queue)
    await res.store.create(job, queue, message, watch, waited)
    metrics.ACCEPTED.labels(queue).inc()
    log.info("job %s queued on %s", job.id, queue, extra={"job_id": job.id})
    return job


async def wait_for(res: Resources, job_id: str, timeout_s: float) -> Job | None:
    """Return the job once it is terminal or `timeout_s` has passed (None if it does not exist).

    Subscribes (through the process's shared subscriber) before reading, so a status change
    between the two is never lost; the read marks the job as waited for, so that its end is
    announced.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with res.waiters.watch(job_channel(job_id)) as changed:
        job = await res.store.get_waited(job_id)
        return await _until_ended(res, job, changed, deadline)


async def submit_and_wait(res: Resources, job: Job, timeout_s: float) -> Job:
    """A sync call: queue `job` on the interactive lane and return it once it is terminal or
    `timeout_s` has passed. Subscribed before the job exists, so its end cannot be missed and
    nothing needs reading until it is announced."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with res.waiters.watch(job_channel(job.id)) as changed:
        await submit(res, job, interactive=True, waited=True)
        return await _until_ended(res, job, changed, deadline) or job


async def _until_ended(
    res: Resources, job: Job | None, changed: asyncio.Event, deadline: float
) -> Job | None:
    """Re-read the job on each announcement (and every _RECHECK_S) until it is terminal."""
    loop = asyncio.get_running_loop()
    while job is not None and not job.status.terminal:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(remaining, _RECHECK_S))
        changed.clear()  # before the read: a change after it wakes us again
        job = await res.store.get(job.id)
    return job


def not_found(job_id: str) -> APIError:
    return APIError(
        404,
        f"no job {job_id!r} (unknown, or expired after its TTL)",
        code="job_not_found",
        param="id",
    )


async def get_or_404(res: Resources, job_id: str) -> Job:
    job = await res.store.get(job_id)
    if job is None:
        raise not_found(job_id)
    return job


async def cancel(res: Resources, job: Job, error: JobError | None = None) -> Job:
    """Cancel a queued or running job (409 once it has ended); `error` says why, when the
    service cancelled it rather than the client."""
    if job.status.terminal:
        raise APIError(
            409,
            f"job {job.id} is {job.status}; only queued or running jobs can be cancelled",
            code="not_cancellable",
        )
    cancelled = job.model_copy(
        update={"status": JobStatus.CANCELLED, "finished_at": utcnow(), "error": error}
    )
    try:
        await res.store.save(cancelled)
    except TransitionRefused as exc:
        raise APIError(
            409, f"job {job.id} ended before it could be cancelled", code="not_cancellable"
        ) from exc
    return cancelled
