"""Bulk batches: many classify requests in one upload, collected as JSONL when done.

Input is JSONL (one request per line) or a JSON array; every item carries a `custom_id`. A batch
with any invalid line is refused whole (422), with each bad line listed by number: nothing is
queued, so fixing the file and resubmitting never duplicates work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api import backpressure, jobs, metrics
from api.deps import CallerDep, Resources, ResourcesDep
from api.errors import APIError, responses
from api.idempotency import IdempotencyKey, claim, fingerprint
from guardfleet.batches import BATCH_COMPLETED
from guardfleet.keys import QUEUE_BULK
from guardfleet.queueing import publish_jobs
from guardfleet.schemas import (
    Batch,
    BatchItem,
    BatchStatus,
    Job,
    JobStatus,
    RequestCounts,
    utcnow,
)

router = APIRouter(tags=["batches"])
log = logging.getLogger(__name__)
MAX_REPORTED_ERRORS = 100


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in exc.errors()
    )


def parse_items(body: bytes, max_items: int) -> list[BatchItem]:
    """JSONL, or a JSON array when the body starts with `[` (content types are unreliable:
    `application/x-ndjson`, `application/jsonl` and `text/plain` are all seen for JSONL)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"batch body is not UTF-8: {exc}", code="invalid_encoding") from exc
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise APIError(
                400, f"batch body is not valid JSON: {exc}", code="invalid_json"
            ) from exc
        if not isinstance(rows, list):
            raise APIError(422, "a JSON batch must be an array of requests", code="invalid_value")
        lines: list[tuple[int, Any]] = list(enumerate(rows, start=1))
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                lines.append((number, exc))
    if not lines:
        raise APIError(422, "the batch has no requests", code="empty_batch")
    if len(lines) > max_items:
        raise APIError(
            422,
            f"the batch has {len(lines)} requests; at most {max_items} "
            "(GUARDFLEET_MAX_BATCH_ITEMS)",
            code="batch_too_large",
        )
    items: list[BatchItem] = []
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, row in lines:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"invalid JSON: {row}")
            item = BatchItem.model_validate(row)
            if item.custom_id in seen:
                raise ValueError(
                    f"custom_id {item.custom_id!r} repeats line {seen[item.custom_id]}"
                )
            seen[item.custom_id] = number
            items.append(item)
        except ValidationError as exc:
            problems.append({"line": number, "message": _errors(exc)})
        except ValueError as exc:
            problems.append({"line": number, "message": str(exc)})
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS]
        summary = "; ".join(f"line {p['line']}: {p['message']}" for p in shown[:3])
        raise APIError(
            422,
            f"{len(problems)} invalid line(s), nothing was queued: {summary}",
            code="invalid_batch",
            extra={"errors": shown},
        )
    return items


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


@router.post(
    "/v1/batches",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"model": Batch, "description": "a replay of an earlier request with this key"},
        **responses(400, 404, 409, 413, 422, 429, 503),
    },
    # The body is read raw (JSONL or a JSON array); api.main declares the array form in the
    # OpenAPI document, with the item limit of the running configuration.
    openapi_extra={"x-batch-body": True},
)
async def create_batch(
    request: Request,
    res: ResourcesDep,
    caller: CallerDep,
    response: Response,
    callback_url: Annotated[str | None, Query(min_length=1, max_length=2048)] = None,
    idempotency_key: IdempotencyKey = None,
) -> Batch:
    """Queue every request on the bulk lane: a JSON array, or JSONL (one request per line, any
    content type). `callback_url` gets `moderation.batch.completed`."""
    body = await request.body()
    items = parse_items(body, res.settings.max_batch_items)
    await jobs.check_callback(res, callback_url)
    batch = Batch(request_counts=RequestCounts(total=len(items)), callback_url=callback_url)
    body_print = fingerprint(body, callback_url or "")
    async with claim(res, "batches", idempotency_key, body_print, batch.id, caller) as claimed:
        if claimed.replay_of is not None:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
            batch = await get_or_404(res, claimed.replay_of)
        else:
            await backpressure.admit_bulk(res, len(items))
            await _create(res, batch, items)
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return batch


async def _create(res: Resources, batch: Batch, items: list[BatchItem]) -> None:
    batch_jobs = [
        jobs.new_job(item.classify_request(), batch_id=batch.id, custom_id=item.custom_id)
        for item in items
    ]
    await res.batches.create(batch, batch_jobs)
    try:
        await run_in_threadpool(publish_jobs, res.celery, [j.id for j in batch_jobs], QUEUE_BULK)
        metrics.ACCEPTED.labels(QUEUE_BULK).inc(len(batch_jobs))
        log.info(
            "batch %s: %d jobs queued", batch.id, len(batch_jobs), extra={"batch_id": batch.id}
        )
    except Exception as exc:
        # Some jobs may be queued, others not: cancel what is still queued, so nothing waits
        # forever, and tell the client to resubmit.
        await res.batches.mark_cancelled(batch.id)
        await _cancel_queued(res, batch)
        raise APIError(
            503,
            f"could not queue the batch ({exc}); it was cancelled, resubmit it",
            code="queue_unavailable",
        ) from exc


async def get_or_404(res: Resources, batch_id: str) -> Batch:
    batch = await res.batches.get(batch_id)
    if batch is None:
        raise APIError(
            404,
            f"no batch {batch_id!r} (unknown, or expired after its TTL)",
            code="batch_not_found",
            param="id",
        )
    return await jobs.with_webhook(res, batch)


@router.get("/v1/batches/{batch_id}", responses=responses(404, 503))
async def get_batch(batch_id: str, res: ResourcesDep) -> Batch:
    return await get_or_404(res, batch_id)


@router.get(
    "/v1/batches/{batch_id}/results",
    response_class=NDJSONResponse,
    responses={
        200: {"description": "one JSON object per line", "content": {"application/x-ndjson": {}}},
        **responses(404, 503),
    },
)
async def batch_results(batch_id: str, res: ResourcesDep) -> NDJSONResponse:
    """One JSON line per item, in input order: its custom_id, status, and verdict or error."""
    await get_or_404(res, batch_id)

    async def lines() -> AsyncIterator[bytes]:
        async for chunk in res.batches.jobs(batch_id):
            out = [_result_line(job) for job in chunk if job is not None]
            yield "".join(json.dumps(line) + "\n" for line in out).encode()

    return NDJSONResponse(lines())


def _result_line(job: Job) -> dict[str, Any]:
    return {
        "custom_id": job.custom_id,
        "job_id": job.id,
        "status": job.status.value,
        "result": job.result.model_dump(mode="json") if job.result else None,
        "error": job.error.model_dump(mode="json") if job.error else None,
    }


@router.post("/v1/batches/{batch_id}/cancel", responses=responses(404, 409, 503))
async def cancel_batch(batch_id: str, res: ResourcesDep) -> Batch:
    """Cancel every item still queued; items already running finish and are counted."""
    batch = await get_or_404(res, batch_id)
    if batch.status is not BatchStatus.IN_PROGRESS or not await res.batches.mark_cancelled(
        batch_id
    ):
        raise APIError(
            409,
            f"batch {batch_id} is {batch.status}; only in-progress batches can be cancelled",
            code="not_cancellable",
        )
    await _cancel_queued(res, batch)
    return await get_or_404(res, batch_id)


async def _cancel_queued(res: Resources, batch: Batch) -> None:
    """Cancel every still-queued item of a batch already marked cancelled, a pipelined chunk at
    a time; items a worker started meanwhile are refused by the transition script and counted
    when they end."""
    async for chunk in res.batches.jobs(batch.id):
        queued = [
            job.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": utcnow()})
            for job in chunk
            if job is not None and job.status is JobStatus.QUEUED
        ]
        saved = await res.store.save_many(queued)
        cancelled = [job for job, ok in zip(queued, saved, strict=True) if ok]
        # The counting must run whatever the interpreter flags (`python -O` strips asserts).
        # A cancel never completes a batch (it is already `cancelled`); if it ever did, the
        # batch webhook would be missed, so say so loudly rather than stop the cancel.
        events = await res.batches.record_progress_many(cancelled)
        if BATCH_COMPLETED in events:
            log.error("cancelling batch %s reported it completed; no webhook is sent", batch.id)
