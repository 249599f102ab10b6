"""A property-based fuzz of the whole HTTP API from its own OpenAPI document (schemathesis).

The real stack: uvicorn with API keys on, Redis, a worker on the demo model. The schemathesis
CLI runs every phase (examples, coverage, fuzzing, stateful) with `--checks all` for a bounded
time: no 5xx, every response as documented (status, content type, body schema, the error
envelope for every 4xx), schema-valid requests accepted and schema-violating ones refused.

A schema cannot say three things a real client does, so the hook below (loaded into the CLI
with SCHEMATHESIS_HOOKS) does them for requests meant to be valid, and nothing else:
- `callback_url` names a receiver that exists (a schema cannot say "resolves to a public
  address"): a local one the fuzzed server allow-lists;
- an `Idempotency-Key` is fresh per request (reusing one with another body is refused by
  design, and a schema describes one request, not a sequence);
- a batch's `custom_id`s are unique (JSON Schema cannot say "unique by property").

And one status the checks do not expect by default is a right answer here: 413, for a body over
GUARDFLEET_MAX_BODY_BYTES, whether or not its fields are valid (a schema limits each field's
length, not the whole body's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import Case
from schemathesis.hooks import HookContext

from tests.conftest import ROOT, ApiServer, StartWorker, webhook_receiver

pytestmark = pytest.mark.faults

DB = 15
API_KEY = "fuzz-key"
RECEIVER_ENV = "GUARDFLEET_FUZZ_RECEIVER"
FUZZ_SECONDS = int(os.environ.get("GUARDFLEET_FUZZ_SECONDS", "120"))
SEED = int(os.environ.get("GUARDFLEET_FUZZ_SEED", "20261129"))
STACK_ENV = {
    "GUARDFLEET_WEBHOOK_SECRETS": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "GUARDFLEET_WEBHOOK_ALLOW": "127.0.0.1",
    # Small limits keep the one CPU worker ahead of the fuzzer; the document states them.
    "GUARDFLEET_MAX_CHAT_TOKENS": "32",
    "GUARDFLEET_DEFAULT_CHAT_TOKENS": "16",
    "GUARDFLEET_MAX_BATCH_ITEMS": "10",
    "GUARDFLEET_MAX_NEW_TOKENS_THINK": "64",
}


@schemathesis.hook
def filter_case(context: HookContext, case: Case[Any]) -> bool:
    """Drop a case labelled valid that carries a part generated invalid: when the coverage phase
    cannot build a valid body for a parameter's case it falls back to an invalid one (a bare
    `0`) yet still calls the case valid, and the positive-data check would then blame the API
    for refusing it."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    return all(part.mode.is_positive for part in meta.components.values())


@schemathesis.hook
def map_case(context: HookContext, case: Case[Any]) -> Case[Any]:
    """What a real client supplies and a schema cannot (see the module doc), for valid requests
    only: a request meant to be invalid is left exactly as generated."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    receiver = os.environ[RECEIVER_ENV]
    body: Any = case.body
    if case.headers and "idempotency-key" in case.headers:
        case.headers["idempotency-key"] = uuid.uuid4().hex
    path = case.operation.path
    if path == "/v1/jobs" and isinstance(body, dict) and body.get("callback_url") is not None:
        body["callback_url"] = receiver
    if path == "/v1/batches" and case.query and case.query.get("callback_url") is not None:
        case.query["callback_url"] = receiver
    if path == "/v1/batches" and isinstance(body, list):
        ids = [item["custom_id"] for item in body]
        if len(set(ids)) != len(ids):
            for index, item in enumerate(body):
                item["custom_id"] = f"{index}-{item['custom_id']}"[:256]
    return case


CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", 401, 403, 404, 409, 413, 429, "5xx"]
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    """A webhook endpoint that answers 204 to everything."""
    with webhook_receiver() as (url, _):
        yield url


@pytest.fixture(scope="module")
def stack(
    start_worker: StartWorker, start_api: Callable[..., ApiServer], receiver: str
) -> ApiServer:
    start_worker("fuzz@test", db=DB, **STACK_ENV)
    return start_api(db=DB, GUARDFLEET_API_KEYS=API_KEY, **STACK_ENV)


def test_the_api_keeps_its_openapi_contract_under_fuzzing(
    stack: ApiServer, receiver: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.faults.test_api_fuzz",
        "PYTHONPATH": str(ROOT),
        RECEIVER_ENV: receiver,
    }
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{stack.url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--max-time",
            str(FUZZ_SECONDS),
            "--seed",
            str(SEED),
            # One worker: concurrent generation trips a CPython 3.11 bug in `ast` (hypothesis
            # describes its lambdas from their source), reported as a runtime error.
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 600,
    )
    elapsed = time.monotonic() - started
    log = tmp_path / "schemathesis.log"
    log.write_text(run.stdout + run.stderr)
    summary = summarise(report, elapsed)
    print(summary)
    # The CLI prints failures (with a curl line to reproduce each) before its summary.
    start = min(
        (i for i in (run.stdout.find("= FAILURES ="), run.stdout.find("= ERRORS =")) if i >= 0),
        default=0,
    )
    details = run.stdout[start:][:30000]
    assert run.returncode == 0, f"{summary} (full output: {log})\n{details}\n{run.stderr[-3000:]}"


def summarise(report: Path, elapsed: float) -> str:
    """The run's figures, for the test log."""
    if not report.exists():
        return f"schemathesis wrote no report (ran {elapsed:.0f}s)"
    data = json.loads(report.read_text())
    cases = data["test_cases"]
    phases = {name: phase["status"] for name, phase in data["phases"].items()}
    return (
        f"schemathesis {data['schemathesis_version']}, seed {data['seed']}: "
        f"{cases['generated']} cases in {data['running_time']:.0f}s "
        f"({elapsed:.0f}s with start-up), {cases['with_failures']} with failures, "
        f"{len(data['errors'])} errors; phases {phases}"
    )
