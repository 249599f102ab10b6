"""Bulk batches: many classify requests in one upload, collected as JSONL when done.

Input is JSONL (one request per line) or a JSON array; every item carries a `custom_id`. An
upload with any invalid line is refused whole (422), with each bad line listed by number: nothing
is stored, so fixing the file and resubmitting never duplicates work. A valid one is stored in one
transaction and answered at once (`validating`); a delivery worker queues its items
(`guardfleet.fanout.FanOut`), and the batch moves to `in_progress`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import backpressure, jobs, metrics
from api.deps import CallerDep, Resources, ResourcesDep
from api.errors import APIError, responses
from api.idempotency import IdempotencyKey, claim, fingerprint
from guardfleet.batch_file import parse_items
from guardfleet.errors import InvalidBatch
from guardfleet.keys import QUEUE_BULK, new_id
from guardfleet.schemas import Batch, BatchItem, BatchStatus, Job, RequestCounts

router = APIRouter(tags=["batches"])
log = logging.getLogger(__name__)


async def read_items(body: bytes, max_items: int) -> list[BatchItem]:
    """Every item, checked off the event loop (50,000 lines take about half a second)."""
    try:
        return await run_in_threadpool(parse_items, body, max_items)
    except InvalidBatch as exc:
        extra = {"errors": exc.errors} if exc.errors else None
        raise APIError(exc.status, exc.message, code=exc.code, extra=extra) from exc


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
    items = await read_items(body, res.settings.max_batch_items)
    await jobs.check_callback(res, callback_url)
    batch = Batch(
        id=new_id("batch", res.settings.store_parts),
        request_counts=RequestCounts(total=len(items)),
        callback_url=callback_url,
    )
    body_print = fingerprint(body, callback_url or "")
    async with claim(res, "batches", idempotency_key, body_print, batch.id, caller) as claimed:
        if claimed.replay_of is not None:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
            batch = await get_or_404(res, claimed.replay_of)
        else:
            await backpressure.admit_bulk(res, len(items))
            await res.batches.create(batch, body)
            metrics.ACCEPTED.labels(QUEUE_BULK).inc(len(items))
            log.info(
                "batch %s: %d items stored", batch.id, len(items), extra={"batch_id": batch.id}
            )
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return batch


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
    """Answers at once, `cancelling`: a delivery worker then cancels every item not yet
    running (queued ones, and ones not queued yet, written as cancelled); the batch becomes
    `cancelled` once the items already running have finished and everything is counted."""
    batch = await get_or_404(res, batch_id)
    open_ = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    if batch.status not in open_ or not await res.batches.mark_cancelling(batch_id):
        raise APIError(
            409,
            f"batch {batch_id} is {batch.status}; only validating or in-progress batches can be "
            "cancelled",
            code="not_cancellable",
        )
    return await get_or_404(res, batch_id)
