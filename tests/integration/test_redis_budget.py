"""What a job costs the one Redis every job passes through, counted as Redis counts it (`INFO
commandstats`: a script's own calls count). `make bench-api` measures the same on 1,000 jobs and
writes the figures; this keeps them from creeping back up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from guardfleet.keys import job_channel, stats
from tests.conftest import ApiServer, StartWorker, url_of, wait_until

# The store in one part (GUARDFLEET_STORE_PARTS=1, the default): its keys.
STATS = stats("00")

JOBS = 40
# 18.1-18.3 in make bench-api; 32.5 before kombu's unacknowledged-message bookkeeping went and
# the start, submit and end scripts were trimmed. Background chatter (heartbeats, sweeps, idle
# BRPOPs: about 3 commands a second) is counted too: 19.0 here on the 2-core test machine, and
# more where the jobs run slower.
WHOLE_JOB_BUDGET = 21


@pytest.fixture
def api(
    request: pytest.FixtureRequest,
    private_redis: redis.Redis,
    start_worker: StartWorker,
    start_api: Callable[..., ApiServer],
) -> ApiServer:
    """A worker and an API on a Redis of the test's own, so that every command counted is
    theirs (or the test's)."""
    url = url_of(private_redis)
    start_worker(f"{request.node.name.removeprefix('test_')}@test", url=url)  # its own log
    return start_api(url=url)


def _calls(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})


@pytest.mark.timeout(240)
def test_an_async_job_costs_redis_at_most_twenty_one_commands(
    private_redis: redis.Redis, api: ApiServer
) -> None:
    """Submit, run on a real worker, one poll: the whole life of a fire-and-forget job."""

    def ended() -> int:
        return int(private_redis.hget(STATS, "jobs_ended:succeeded") or 0)

    with httpx.Client(base_url=api.url, timeout=30) as http:
        warm = http.post("/v1/jobs", json={"prompt": "How do I bake bread?"}).json()
        assert http.get(f"/v1/jobs/{warm['id']}?wait=60").json()["status"] == "succeeded"
        private_redis.config_resetstat()
        checks = 0

        def all_ended() -> bool:
            nonlocal checks
            checks += 1
            return ended() >= JOBS + 1

        ids = [
            http.post("/v1/jobs", json={"prompt": f"How do I plant tomatoes? #{i}"}).json()["id"]
            for i in range(JOBS)
        ]
        wait_until(all_ended, 120, "every job to succeed", every=0.2)
        statuses = [http.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids]
    assert statuses == ["succeeded"] * JOBS

    calls = _calls(private_redis)
    calls["hget"] -= checks  # this test's own reads of the counter
    del calls["config|resetstat"]
    assert calls.total() / JOBS <= WHOLE_JOB_BUDGET, calls
    # kombu's bookkeeping of unacknowledged messages (a MULTI/EXEC as each message is taken,
    # another as it is acknowledged) stays off: the job store's leases cover a dead worker.
    assert calls["multi"] == calls["exec"] == 0, calls
    assert private_redis.exists("unacked", "unacked_index") == 0


SYNC_CALLS = 20


@pytest.mark.timeout(240)
def test_a_sync_call_reads_its_job_once_it_has_ended(
    private_redis: redis.Redis, api: ApiServer
) -> None:
    """The API subscribes to the job's channel before it creates the job, so it reads the
    record once, when the end is announced, not also right after queueing it."""
    with httpx.Client(base_url=api.url, timeout=60) as http:
        body = {"prompt": "How do I bake bread?"}
        assert http.post("/v1/classify", json=body).json()["status"] == "succeeded"  # warm
        listener = private_redis.pubsub()  # type: ignore[no-untyped-call]
        listener.psubscribe(job_channel("job_00*"))  # every job of the store's one part
        assert listener.get_message(timeout=5) is not None  # the subscribe confirmation
        private_redis.config_resetstat()
        answers = [http.post("/v1/classify", json=body).json() for _ in range(SYNC_CALLS)]
    assert [a["status"] for a in answers] == ["succeeded"] * SYNC_CALLS
    calls = _calls(private_redis)
    # Per call: the start and end scripts each read the record, and the API reads it once.
    assert calls["hmget"] <= 3 * SYNC_CALLS, calls
    announced = [m for _ in range(SYNC_CALLS + 1) if (m := listener.get_message(timeout=1))]
    assert [m["data"] for m in announced] == [b"succeeded"] * SYNC_CALLS
