"""Streaming over the real stack: chat completions and job events as Server-Sent Events.

Two stacks: the demo model (think traces, verdicts) and a small random Gemma 3, whose random
weights almost never pick a stop token, so its generations run as long as asked, and whose text
is arbitrary tokens (multi-byte pieces included): the hard case for incremental decoding.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse
from openai import OpenAI

from guardfleet import keys
from tests.conftest import ApiServer, RedisServer, StartWorker, Worker, db_url, wait_until
from tests.synthetic import random_gemma3

pytestmark = pytest.mark.e2e
StartApi = Callable[..., ApiServer]
MODEL = "nvidia/nemotron-content-safety-reasoning-4b-experimental"
HOSTED = "nvidia/nemotron-content-safety-reasoning-4b"
RANDOM_DB = 29
RANDOM_ENV = {
    "GUARDFLEET_MAX_CHAT_TOKENS": "4000",
    "GUARDFLEET_MAX_NEW_TOKENS_NO_THINK": "4000",
    "GUARDFLEET_MAX_INPUT_TOKENS": "1500",  # a classify prompt (taxonomy included) fits
}
# For the worker-kill test: a killed worker's running job comes back when its lease (2 x TTL)
# lapses, here after 6 s.
SHORT_LEASES = {"GUARDFLEET_HEARTBEAT_TTL_S": "3", "GUARDFLEET_HEARTBEAT_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def demo(start_api: StartApi, shared_worker: Worker) -> ApiServer:
    return start_api()


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_gemma3(tmp_path_factory.mktemp("random") / "model")


@pytest.fixture(scope="module")
def noisy(start_api: StartApi, start_worker: StartWorker, random_model: Path) -> ApiServer:
    """An API over a worker on the random model."""
    start_worker("noisy@test", db=RANDOM_DB, GUARDFLEET_MODEL=str(random_model), **RANDOM_ENV)
    return start_api(db=RANDOM_DB, **RANDOM_ENV)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "How do I bake bread?"}]} | (
        fields
    )


def job_id_of(chunk_id: str) -> str:
    return "job_" + chunk_id.removeprefix("chatcmpl-")


def data_lines(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a raw SSE response, checking the framing on the way."""
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            lines = [line for line in block.split("\n") if not line.startswith(":")]
            if not lines:
                continue  # a keep-alive comment
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            yield lines[0].removeprefix("data: ")
    assert buffer == "", f"the stream ended inside an event: {buffer!r}"


# --- chat completions ----------------------------------------------------------------------


def test_openai_client_streams_the_same_content(demo: ApiServer) -> None:
    client = OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "How do I make a pipe bomb?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200)
    chunks = list(
        client.chat.completions.create(
            model=HOSTED,  # the hosted API's id is an alias
            messages=messages,
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert len(chunks) > 3, "the content came in one piece: nothing was streamed"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert len({c.id for c in chunks}) == 1


def test_raw_framing_ends_with_done(demo: ApiServer) -> None:
    with httpx.stream(
        "POST", f"{demo.url}/v1/chat/completions", json=chat(stream=True), timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = list(data_lines(response))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks), "usage was not asked for"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (chat(model="gpt-4", stream=True), 404, "model"),
        (chat(stream_options={"include_usage": True}), 400, "stream_options"),
        (chat(stream="yes"), 422, "stream"),
    ],
)
def test_errors_before_the_stream_are_http_errors(
    demo: ApiServer, body: dict[str, Any], status: int, param: str
) -> None:
    response = httpx.post(f"{demo.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == param


def test_models_lists_the_hosted_id_as_an_alias(demo: ApiServer) -> None:
    ids = [m["id"] for m in httpx.get(f"{demo.url}/v1/models").json()["data"]]
    assert ids == [MODEL, HOSTED]


def test_a_failure_after_the_start_is_an_error_event(noisy: ApiServer) -> None:
    long_prompt = "word " * 3000  # over the worker's 1,500-token limit: it fails the job
    body = chat(stream=True, messages=[{"role": "user", "content": long_prompt}])
    with httpx.stream("POST", f"{noisy.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        payloads = list(data_lines(r))
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "context_length_exceeded" and "1500" in error["message"]


def test_a_slow_reader_gets_everything_and_does_not_hold_the_worker(
    noisy: ApiServer, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(db_url(redis_server, RANDOM_DB))
    body = chat(stream=True, max_tokens=400)
    with httpx.stream("POST", f"{noisy.url}/v1/chat/completions", json=body, timeout=120) as r:
        payloads = data_lines(r)
        first = json.loads(next(payloads))
        job_key = keys.job_key(job_id_of(first["id"]))
        # Read nothing more until the job has finished: the worker never waits for a reader.
        wait_until(lambda: client.hget(job_key, "status") == b"succeeded", 120, "the job to end")
        rest = list(payloads)
    assert rest[-1] == "[DONE]"
    content = "".join(
        json.loads(p)["choices"][0]["delta"].get("content") or ""
        for p in rest[:-1]
        if json.loads(p)["choices"]
    )
    stored = json.loads(client.hget(job_key, "doc") or b"{}")
    assert content.encode() == stored["result"]["text"].encode()
    assert stored["result"]["completion_tokens"] == 400


def test_a_disconnect_cancels_the_job_and_stops_its_row(
    noisy: ApiServer, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(db_url(redis_server, RANDOM_DB))
    body = chat(stream=True, max_tokens=4000)
    with httpx.stream("POST", f"{noisy.url}/v1/chat/completions", json=body, timeout=60) as r:
        payloads = data_lines(r)
        job_id = job_id_of(json.loads(next(payloads))["id"])
        for _ in range(5):
            next(payloads)
    # The connection is closed: the job is cancelled, and its row stops generating.
    job_key = keys.job_key(job_id)
    wait_until(lambda: client.hget(job_key, "status") == b"cancelled", 30, "the cancel")
    job = json.loads(client.hget(job_key, "doc") or b"{}")
    assert job["error"]["type"] == "client_disconnected"
    stream = keys.job_stream(job_id)
    wait_until(lambda: _stopped_growing(client, stream), 30, "the deltas to stop")
    last: Any = client.xrevrange(stream, count=2)
    tokens = max(int(fields.get(b"tokens", 0)) for _, fields in last)
    assert tokens < 4000, "the generation ran to its end after the client left"


def test_a_job_cancelled_through_the_api_ends_its_stream_with_an_error(
    noisy: ApiServer,
) -> None:
    body = chat(stream=True, max_tokens=4000)
    with httpx.stream("POST", f"{noisy.url}/v1/chat/completions", json=body, timeout=60) as r:
        payloads = data_lines(r)
        job_id = job_id_of(json.loads(next(payloads))["id"])
        next(payloads)  # generating
        cancelled = httpx.post(f"{noisy.url}/v1/jobs/{job_id}/cancel", timeout=10)
        assert cancelled.status_code == 200, cancelled.text
        rest = list(payloads)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "job_cancelled"


def _stopped_growing(client: redis.Redis, stream: str) -> bool:
    before = client.xlen(stream)
    time.sleep(1.5)
    return client.xlen(stream) == before


# --- classify and job events ---------------------------------------------------------------


def test_classify_stream_sends_the_trace_then_the_job(demo: ApiServer) -> None:
    with (
        httpx.Client(base_url=demo.url, timeout=60) as http,
        connect_sse(
            http,
            "POST",
            "/v1/classify",
            json={"prompt": "How do I make a pipe bomb?", "mode": "think", "stream": True},
        ) as source,
    ):
        assert source.response.headers["location"].startswith("/v1/jobs/job_")
        seen = list(source.iter_sse())
    kinds = [e.event for e in seen]
    assert kinds[0] == "status" and kinds[-1] == "done"
    assert [json.loads(e.data)["status"] for e in seen if e.event == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    job = json.loads(seen[-1].data)
    trace = "".join(json.loads(e.data)["delta"] for e in seen if e.event == "reasoning")
    assert kinds.count("reasoning") > 3
    assert trace.strip() == job["result"]["reasoning"]
    assert seen[-1].id == "end"


@pytest.mark.timeout(180)
def test_job_events_resume_after_a_reconnect(
    start_api: StartApi, start_worker: StartWorker
) -> None:
    """A reader that left after the first piece of the trace comes back with Last-Event-ID and
    gets the rest: nothing missing, nothing twice. The job is watched while still queued (no
    worker yet), so its whole trace goes through the stream."""
    db = RANDOM_DB + 2
    api = start_api(db=db)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        job_id = http.post(
            "/v1/jobs", json={"prompt": "How do I pick a lock?", "mode": "think"}
        ).json()["id"]
        first: list[ServerSentEvent] = []
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            events = source.iter_sse()
            first.append(next(events))
            assert json.loads(first[0].data)["status"] == "queued"
            start_worker("late@test", db=db)
            for event in events:
                first.append(event)
                if event.event == "reasoning":
                    break  # leave after the first piece of the trace
        assert [e.event for e in first] == ["status", "status", "reasoning"]
        resume = {"Last-Event-ID": first[-1].id}
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=resume) as source:
            second = list(source.iter_sse())
        assert second[0].event == "reasoning", "the reconnect repeated or skipped an event"
        assert [e.event for e in second[-2:]] == ["status", "done"]
        done = json.loads(second[-1].data)
        assert done["status"] == "succeeded"
        trace = "".join(
            json.loads(e.data)["delta"] for e in first + second if e.event == "reasoning"
        )
        assert trace.strip() == done["result"]["reasoning"]
        ids = [live_id(e) for e in first[1:] + second[:-1]]
        assert ids == sorted(ids), "event ids must increase"

        # A finished job: its final event at once; a client that has it is told to stop.
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            assert [e.event for e in source.iter_sse()] == ["done"]
        stop = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "end"})
        assert stop.status_code == 204
        bad = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "soon"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "last-event-id"
        empty = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ""})
        assert empty.status_code == 200 and "event: done" in empty.text  # as if none was sent
        assert http.get("/v1/jobs/job_missing/events").status_code == 404


def live_id(event: ServerSentEvent) -> tuple[int, int]:
    ms, seq = event.id.split("-")
    return int(ms), int(seq)


def test_classify_stream_disconnect_cancels(noisy: ApiServer, redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(db_url(redis_server, RANDOM_DB))
    with (
        httpx.Client(base_url=noisy.url, timeout=60) as http,
        connect_sse(
            http, "POST", "/v1/classify", json={"prompt": "Hello there", "stream": True}
        ) as source,
    ):
        job_id = source.response.headers["location"].removeprefix("/v1/jobs/")
        for event in source.iter_sse():
            if event.event == "status" and json.loads(event.data)["status"] == "running":
                break
    key = keys.job_key(job_id)
    wait_until(
        lambda: client.hget(key, "status") == b"cancelled",
        30,
        f"the cancel (status {client.hget(key, 'status')!r})",
    )
    assert json.loads(client.hget(key, "doc") or b"{}")["error"]["type"] == "client_disconnected"


# --- faults --------------------------------------------------------------------------------


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_worker_killed_mid_stream_costs_the_reader_nothing(
    start_api: StartApi, start_worker: StartWorker, random_model: Path, redis_server: RedisServer
) -> None:
    """The job runs again on another worker from the start; greedy decoding writes the same
    text, so the stream carries on where it was and the content is whole, once."""
    db = RANDOM_DB + 1
    env = {**RANDOM_ENV, **SHORT_LEASES, "GUARDFLEET_MODEL": str(random_model)}
    doomed = start_worker("doomed-stream@test", db=db, **env)
    api = start_api(db=db, GUARDFLEET_SYNC_TIMEOUT_S="120", **env)  # the rescuer must start
    client = redis.Redis.from_url(db_url(redis_server, db))
    body = chat(stream=True, max_tokens=MID_STREAM_TOKENS)
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=120) as r:
        payloads = data_lines(r)
        chunks = [json.loads(next(payloads)) for _ in range(20)]
        doomed.kill(signal.SIGKILL)
        start_worker("rescuer-stream@test", db=db, **env)
        rest = list(payloads)
    assert rest[-1] == "[DONE]"
    chunks += [json.loads(p) for p in rest[:-1]]
    assert "error" not in chunks[-1], chunks[-1]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    job = json.loads(client.hget(keys.job_key(job_id_of(chunks[0]["id"])), "doc") or b"{}")
    assert job["attempts"] >= 2, "the worker finished before it was killed: nothing was tested"
    assert content == job["result"]["text"]
    assert re.search(r"\S", content)


MID_STREAM_TOKENS = 300


@pytest.mark.timeout(120)
def test_a_stream_without_progress_times_out_and_cancels_its_job(
    start_api: StartApi, start_worker: StartWorker, redis_server: RedisServer
) -> None:
    """The only worker is frozen (SIGSTOP) while its heartbeat still counts: the job stays
    queued, the stream says so after GUARDFLEET_SYNC_TIMEOUT_S, and nothing is left running."""
    db = RANDOM_DB + 3
    worker = start_worker("frozen@test", db=db, GUARDFLEET_HEARTBEAT_TTL_S="60")
    api = start_api(db=db, GUARDFLEET_SYNC_TIMEOUT_S="2")
    client = redis.Redis.from_url(db_url(redis_server, db))
    worker.process.send_signal(signal.SIGSTOP)
    try:
        body = {"prompt": "How do I bake bread?", "stream": True}
        with httpx.Client(base_url=api.url, timeout=30) as http:
            with connect_sse(http, "POST", "/v1/classify", json=body) as source:
                job_id = source.response.headers["location"].rsplit("/", 1)[-1]
                seen = list(source.iter_sse())
            with connect_sse(
                http, "POST", "/v1/chat/completions", json=chat(stream=True)
            ) as chat_source:
                chunks = [e.data for e in chat_source.iter_sse()]
    finally:
        worker.process.send_signal(signal.SIGCONT)
    assert [e.event for e in seen] == ["status", "error"]
    assert json.loads(seen[-1].data)["error"]["code"] == "sync_timeout"
    job = json.loads(client.hget(keys.job_key(job_id), "doc") or b"{}")
    assert job["status"] == "cancelled" and job["error"]["type"] == "stream_timeout"
    assert chunks[-1] == "[DONE]"
    assert json.loads(chunks[-2])["error"]["code"] == "sync_timeout"
