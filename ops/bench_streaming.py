"""What streaming adds: per-token times over HTTP against the engine's own, on a running stack.

Each text delta in a job's Redis Stream carries when its newest token was generated (worker
clock); each SSE event carries the id of the entry it came from. Client, worker and API share
this machine's clock, so `received - generated` is the transport: worker -> Redis Stream ->
API -> Server-Sent Events -> client.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import redis
from httpx_sse import connect_sse

from guardfleet.keys import job_stream
from guardfleet.streams import Entry
from ops.bench_engine import percentile


def _diffs(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def stream_latency(url: str, redis_url: str, texts: list[str]) -> list[str]:
    """Think-mode classify streams, one at a time; the table's lines."""
    store = redis.Redis.from_url(redis_url)
    first_token, first_event, transport, gaps_engine, gaps_http = [], [], [], [], []
    events_total = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        for text in texts:
            body = {"prompt": text, "mode": "think", "stream": True}
            received: dict[str, float] = {}
            sent = time.time()
            with connect_sse(http, "POST", "/v1/classify", json=body) as source:
                job_id = source.response.headers["location"].rsplit("/", 1)[-1]
                for event in source.iter_sse():
                    if event.event == "reasoning":
                        received[event.id] = time.time()
            found: Any = store.xrange(job_stream(job_id))
            generated = {
                entry.id: entry.t
                for entry in (Entry.parse(i, f) for i, f in found)
                if entry.kind == "text" and entry.t is not None
            }
            if not received or not generated:
                continue
            pairs = [(generated[i], at) for i, at in received.items() if i in generated]
            first_token.append((min(generated.values()) - sent) * 1000)
            first_event.append((min(received.values()) - sent) * 1000)
            transport += [(at - made) * 1000 for made, at in pairs]
            gaps_engine += [d * 1000 for d in _diffs([made for made, _ in pairs])]
            gaps_http += [d * 1000 for d in _diffs([at for _, at in pairs])]
            events_total += len(pairs)
    rows = [
        ("time to first token, engine: request sent -> first token generated", first_token),
        ("time to first trace event over HTTP: request sent -> event received", first_event),
        ("transport per event: token generated -> event received", transport),
        ("time between trace events, engine (generated)", gaps_engine),
        ("time between trace events over HTTP (received)", gaps_http),
    ]
    lines = [
        f"Streaming: {len(texts)} think-mode `POST /v1/classify` streams one at a time, "
        f"{events_total} reasoning events; ms",
        "",
        "| measure | p50 | p95 |",
        "|---|---:|---:|",
    ]
    for name, values in rows:
        lines.append(f"| {name} | {percentile(values, 50):.1f} | {percentile(values, 95):.1f} |")
    return [*lines, ""]
