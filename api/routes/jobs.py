"""Moderation jobs: fire-and-forget (`POST /v1/jobs`), polling, and the blocking classify call."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from pydantic import Field

from api import backpressure, jobs, live
from api.deps import CallerDep, ResourcesDep
from api.errors import APIError, responses
from api.idempotency import IdempotencyKey, claim, fingerprint
from api.job_events import END_ID
from api.job_events import job_events as events_of
from api.readiness import require_ready_worker
from guardfleet.schemas import ClassifyRequest, Job, JobCreate, JobStatus

router = APIRouter(tags=["jobs"])

# Failures that are the client's input, not the service: a sync caller gets them as a 4xx.
CLIENT_ERRORS = {"input_too_long", "invalid_input"}
MAX_POLL_WAIT_S = 60.0


@router.post(
    "/v1/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"model": Job, "description": "a replay of an earlier request with this key"},
        **responses(400, 409, 413, 422, 429, 503),
    },
)
async def create_job(
    body: JobCreate,
    res: ResourcesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Queue a classification on the bulk lane; poll `Location` (or `?wait=`) for the verdict,
    or give a `callback_url` to have it POSTed to you (signed, per Standard Webhooks)."""
    await jobs.check_callback(res, body.callback_url)
    job = jobs.new_job(res, body.classify_request(), callback_url=body.callback_url)
    body_print = fingerprint(body.model_dump_json())
    async with claim(res, "jobs", idempotency_key, body_print, job.id, caller) as claimed:
        if claimed.replay_of is None:
            await backpressure.admit_bulk(res)
            job = await jobs.submit(res, job, interactive=False)
        else:
            job = await replayed(res, claimed.replay_of, response)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


async def replayed(res: ResourcesDep, job_id: str, response: Response) -> Job:
    job = await res.store.get(job_id)
    if job is None:
        raise APIError(
            409,
            "a request with this Idempotency-Key is still being processed; retry shortly",
            code="idempotency_in_progress",
        )
    response.status_code = status.HTTP_200_OK
    response.headers["Idempotent-Replayed"] = "true"
    return await jobs.with_webhook(res, job)


@router.get("/v1/jobs/{job_id}", responses=responses(404, 422, 503))
async def get_job(
    job_id: str,
    res: ResourcesDep,
    wait: Annotated[float, Query(ge=0, le=MAX_POLL_WAIT_S, description="long-poll seconds")] = 0,
) -> Job:
    job = await jobs.get_or_404(res, job_id)
    if wait > 0 and not job.status.terminal:
        job = await jobs.wait_for(res, job_id, wait) or job
    return await jobs.with_webhook(res, job)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_model=None,
    responses={
        200: {
            "description": "the job's status changes, think trace and end, as Server-Sent "
            "Events (see api/job_events.py)",
            "content": {"text/event-stream": {"schema": live.SSE_EVENT_SCHEMA}},
        },
        204: {"description": "`Last-Event-ID: end`: the client already has the final event"},
        **responses(404, 422, 503),
    },
)
async def job_events(
    job_id: str,
    res: ResourcesDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="resume after this event (an `id` the stream sent); empty: from the start",
            pattern=r"^(|end|[0-9]+-[0-9]+)$",
        ),
    ] = None,
) -> Response:
    """Follow a job as it runs: resumable with `Last-Event-ID`; a finished job answers with
    its final event at once."""
    last_event_id = last_event_id or None  # the SSE spec's empty id: no event seen yet
    job = await live.watch(res, job_id)
    if job is None:
        raise jobs.not_found(job_id)
    if last_event_id == END_ID:
        if job.status.terminal:
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        last_event_id = None  # not the end of this job's current run: start afresh
    return live.event_stream(events_of(res, job, last_event_id))


@router.post("/v1/jobs/{job_id}/cancel", responses=responses(404, 409, 503))
async def cancel_job(job_id: str, res: ResourcesDep) -> Job:
    return await jobs.cancel(res, await jobs.get_or_404(res, job_id))


class ClassifyCall(ClassifyRequest):
    stream: Annotated[
        bool,
        Field(strict=True, description="answer with the job's events (Server-Sent Events)"),
    ] = False


@router.post(
    "/v1/classify",
    response_model=None,
    responses={
        200: {
            "model": Job,
            "description": "the finished job; with `stream: true`, the job's events as "
            "Server-Sent Events, ending with the finished job",
            "content": {"text/event-stream": {"schema": live.SSE_EVENT_SCHEMA}},
        },
        **responses(400, 413, 422, 503, 504),
    },
)
async def classify(body: ClassifyCall, res: ResourcesDep, response: Response) -> Job | Response:
    """Classify and wait (up to GUARDFLEET_SYNC_TIMEOUT_S) on the interactive lane.

    200 with the finished job (its `status` is `succeeded`, or `failed` with `error` when the
    model's output held no verdict); 422 when the input itself was refused (too long); 504 with
    the job id when no verdict came in time: the job still runs, poll it. With `stream: true`,
    the events of `GET /v1/jobs/{id}/events` instead, the think trace as it is written; leaving
    the stream cancels the job.
    """
    request = ClassifyRequest.model_validate(body.model_dump(exclude={"stream"}))
    await require_ready_worker(res)
    await backpressure.admit_interactive(res)
    if body.stream:
        job = await jobs.submit(res, jobs.new_job(res, request), interactive=True, watch=True)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        return live.event_stream(events_of(res, job, None, owned=True), headers)
    job = jobs.new_job(res, request)
    done = await jobs.submit_and_wait(res, job, res.settings.sync_timeout_s)
    location = f"/v1/jobs/{job.id}"
    if not done.status.terminal:
        raise APIError(
            504,
            f"no verdict within {res.settings.sync_timeout_s:g}s; job {job.id} is still "
            f"{done.status}: poll {location}",
            code="sync_timeout",
            extra={"job": {"id": job.id, "status": done.status}},
            headers={"Location": location},
        )
    if done.status is JobStatus.FAILED and done.error and done.error.type in CLIENT_ERRORS:
        raise APIError(
            422,
            done.error.message,
            code=done.error.type,
            param="prompt",
            extra={"job": {"id": job.id, "status": done.status}},
        )
    response.headers["Location"] = location
    return done
