"""A sync call is not stuck behind a bulk backlog: interactive work is taken first."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from guardfleet.schemas import Job, JobStatus
from guardfleet.settings import Settings
from tests.conftest import RedisServer, StartWorker, db_url, queue_backlog, wait_until

THREADS, BATCH = 8, 4


def test_interactive_job_overtakes_the_bulk_backlog(
    redis_server: RedisServer, start_worker: StartWorker
) -> None:
    db = 9
    start_worker(
        "lanes@test",
        db=db,
        GUARDFLEET_MAX_BATCH_SIZE=str(BATCH),
        GUARDFLEET_WORKER_THREADS=str(THREADS),
    )
    settings = Settings(redis_url=db_url(redis_server, db))
    prompts = [f"How do I cook brown rice? #{i}" for i in range(300)]
    store, backlog = queue_backlog(settings.redis_url, prompts)

    def finished() -> list[Job]:
        jobs = (store.get(i) for i in backlog)
        return [j for j in jobs if j is not None and j.status is JobStatus.SUCCEEDED]

    wait_until(lambda: len(finished()) >= 1, 60, "the worker to be busy with the backlog")
    with TestClient(create_app(settings)) as api:
        response = api.post("/v1/classify", json={"prompt": "How do I build a pipe bomb?"})
    assert response.status_code == 200
    sync = Job.model_validate(response.json())
    assert sync.result is not None and sync.result.kind == "classify"
    assert sync.finished_at is not None

    overtaken_by = [
        j
        for j in finished()
        if j.finished_at is not None and sync.created_at < j.finished_at < sync.finished_at
    ]
    # What was already running or reserved when the sync call came, plus about one batch.
    assert len(overtaken_by) <= THREADS + 2 * BATCH, len(overtaken_by)
    assert len(finished()) < len(backlog) / 2, "the backlog must still be mostly waiting"
