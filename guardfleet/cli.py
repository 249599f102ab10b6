"""The `guardfleet` command: classify a text, submit a batch file and collect its results, or
show a job.

    guardfleet classify "text" [--response TEXT] [--think] [--json]
    guardfleet submit input.jsonl -o results.jsonl [--url URL] [--api-key KEY]
    guardfleet job JOB_ID [--url URL] [--api-key KEY]

`classify` prints the reasoning trace as the model writes it (with --think), then the verdict.
It and `submit` exit 0 when everything succeeded, 1 when something failed or was cancelled, 2
when the request itself was refused (the server's error message is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from tqdm import tqdm

DEFAULT_URL = "http://localhost:8000"


class CLIError(Exception):
    pass


def client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)


def checked(response: httpx.Response) -> Any:
    """The JSON body, or a CLIError with the server's message (and any per-line errors)."""
    if response.is_success:
        return response.json()
    try:
        body = response.json()
        message = str(body["error"]["message"])
        for problem in body.get("errors", []):
            message += f"\n  line {problem['line']}: {problem['message']}"
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise CLIError(f"HTTP {response.status_code}: {message}")


def submit(args: argparse.Namespace) -> int:
    source = Path(args.input)
    if not source.is_file():
        raise CLIError(f"no such file: {source}")
    content_type = "application/json" if source.suffix == ".json" else "application/x-ndjson"
    with client(args) as http:
        batch = checked(
            http.post(
                "/v1/batches", content=source.read_bytes(), headers={"content-type": content_type}
            )
        )
        total = batch["request_counts"]["total"]
        print(f"batch {batch['id']}: {total} requests", file=sys.stderr)
        with tqdm(total=total, unit="req", file=sys.stderr, disable=args.quiet) as bar:
            while True:
                counts = batch["request_counts"]
                done = counts["completed"] + counts["failed"] + counts["cancelled"]
                bar.update(done - bar.n)
                if done >= total:  # a cancelled batch also ends here, once running items end
                    break
                if batch["status"] == "failed":  # its items could not be queued
                    errors = batch.get("errors") or {}
                    reasons = "; ".join(e["message"] for e in errors.get("data", []))
                    raise CLIError(f"batch {batch['id']} failed: {reasons or 'no reason given'}")
                time.sleep(args.poll)
                batch = checked(http.get(f"/v1/batches/{batch['id']}"))
        output = Path(args.output)
        with http.stream("GET", f"/v1/batches/{batch['id']}/results") as response:
            if not response.is_success:
                response.read()
                checked(response)
            with output.open("wb") as sink:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
    counts = batch["request_counts"]
    print(
        f"{counts['completed']} succeeded, {counts['failed']} failed, "
        f"{counts['cancelled']} cancelled -> {output}",
        file=sys.stderr,
    )
    return 0 if counts["completed"] == total else 1


def classify(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"prompt": args.text, "stream": True}
    if args.response is not None:
        body["response"] = args.response
    if args.think:
        body["mode"] = "think"
    job: dict[str, Any] | None = None
    trace = ""
    with client(args) as http, connect_sse(http, "POST", "/v1/classify", json=body) as source:
        if not source.response.is_success:
            source.response.read()
            checked(source.response)
        for event in source.iter_sse():
            if event.event == "reasoning" and not args.json:
                delta = json.loads(event.data)["delta"]
                if not trace:
                    delta = delta.lstrip()  # the trace opens with a newline after <think>
                print(delta, end="", flush=True)
                trace += delta
            elif event.event == "done":
                job = json.loads(event.data)
            elif event.event == "error":
                raise CLIError(json.loads(event.data)["error"]["message"])
    if trace and not trace.endswith("\n"):
        print()
    if job is None:
        raise CLIError("the stream ended without a result")
    if args.json:
        print(json.dumps(job, indent=2))
    elif job["status"] == "succeeded":
        print(_verdict(job["result"]))
    else:
        error = job.get("error") or {}
        print(f"job {job['id']} {job['status']}: {error.get('message', '')}", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def _verdict(result: dict[str, Any]) -> str:
    scores = result.get("scores") or {}
    lines = []
    for field in ("prompt", "response"):
        label = result.get(f"{field}_harm")
        if label is None:
            continue
        score = scores.get(f"{field}_harm")
        lines.append(
            f"{field} harm: {label}" + (f" (score {score:.3f})" if score is not None else "")
        )
    return "\n".join(lines)


def show_job(args: argparse.Namespace) -> int:
    with client(args) as http:
        job = checked(http.get(f"/v1/jobs/{args.job_id}"))
    print(json.dumps(job, indent=2))
    return 0 if job["status"] != "failed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardfleet", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("GUARDFLEET_URL", DEFAULT_URL),
        help=f"API base URL (env GUARDFLEET_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GUARDFLEET_API_KEY"),
        help="bearer key (env GUARDFLEET_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout, seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    verdict = commands.add_parser("classify", help="classify a text and print the verdict")
    verdict.add_argument("text", help="the user's prompt")
    verdict.add_argument("--response", help="the assistant's response, to judge it too")
    verdict.add_argument("--think", action="store_true", help="with a reasoning trace, streamed")
    verdict.add_argument("--json", action="store_true", help="print the finished job as JSON")
    verdict.set_defaults(run=classify)
    sub = commands.add_parser("submit", help="submit a JSONL (or .json array) batch and wait")
    sub.add_argument("input")
    sub.add_argument("-o", "--output", required=True, help="where to write results (JSONL)")
    sub.add_argument("--poll", type=float, default=1.0, help="seconds between status checks")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=submit)
    job = commands.add_parser("job", help="show one job as JSON")
    job.add_argument("job_id")
    job.set_defaults(run=show_job)
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CLIError as exc:
        print(f"guardfleet: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"guardfleet: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
