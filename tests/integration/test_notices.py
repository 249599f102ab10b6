"""Running jobs hear of cancels and new readers through one subscription per worker
(`worker.notices`), instead of each reading its status twice a second while it waits."""

from __future__ import annotations

import pytest
import redis

from guardfleet.keys import stats
from guardfleet.schemas import JobStatus
from tests.conftest import StartWorker, queue_backlog, url_of, wait_until

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
STATS = stats("00")

JOBS = 40


@pytest.mark.timeout(240)
def test_waiting_jobs_do_not_poll_their_status(
    private_redis: redis.Redis, start_worker: StartWorker
) -> None:
    """One row at a time and a task thread per job: most jobs wait seconds for their turn,
    which used to cost a status read per job every half second."""
    url = url_of(private_redis)
    start_worker(
        "notices@test",
        url=url,
        GUARDFLEET_MAX_BATCH_SIZE="1",
        GUARDFLEET_WORKER_THREADS=str(JOBS),
    )
    private_redis.config_resetstat()
    store, ids = queue_backlog(
        url, [f"How do I sharpen a kitchen knife, take {i}?" for i in range(JOBS)]
    )
    # Counted, not read job by job: a read of the job is an HMGET too.
    wait_until(
        lambda: int(private_redis.hget(STATS, "jobs_ended:succeeded") or 0) >= JOBS,
        180,
        "every job to succeed",
    )
    calls = private_redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    assert all((j := store.get(i)) and j.status is JobStatus.SUCCEEDED for i in ids)
    # Two per job are the start and end scripts' own reads; polling added one per half second
    # of every job's wait.
    assert calls <= 2 * JOBS + 2, f"{calls} HMGETs for {JOBS} jobs"
