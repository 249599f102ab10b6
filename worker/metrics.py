"""The worker's engine metrics for Prometheus, on `GUARDFLEET_WORKER_METRICS_PORT`.

Named as vLLM and the NIM name theirs (`num_requests_running`, `time_to_first_token_seconds`,
`e2e_request_latency_seconds`, `prompt_tokens_total`, ...), under a `guardfleet_` prefix, so
dashboards written for those read these with a changed prefix. Times are measured in the
worker: from the moment its task thread started the job, not from the API's accept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

RUNNING = Gauge("guardfleet_num_requests_running", "requests prefilling or generating")
WAITING = Gauge("guardfleet_num_requests_waiting", "requests waiting to join the running set")
MEMORY = Gauge("guardfleet_device_memory_used_bytes", "memory the model's device has allocated")
BATCH = Histogram(
    "guardfleet_batch_size",
    "rows in the running set when a request joined it",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE = Histogram(
    "guardfleet_request_queue_time_seconds", "model thread received -> prefill", buckets=_SECONDS
)
INFERENCE = Histogram(
    "guardfleet_request_inference_time_seconds", "prefill -> last token", buckets=_SECONDS
)
PREFILL = Histogram(
    "guardfleet_request_prefill_time_seconds", "prefill -> first token", buckets=_SECONDS
)
DECODE = Histogram(
    "guardfleet_request_decode_time_seconds", "first token -> last token", buckets=_SECONDS
)
FIRST_TOKEN = Histogram(
    "guardfleet_time_to_first_token_seconds", "job started -> first token", buckets=_SECONDS
)
END_TO_END = Histogram(
    "guardfleet_e2e_request_latency_seconds", "job started -> result written", buckets=_SECONDS
)
PROMPT_TOKENS = Counter("guardfleet_prompt_tokens", "prompt tokens prefilled")
GENERATION_TOKENS = Counter("guardfleet_generation_tokens", "tokens generated")
# In tokens, as vLLM counts them: hits / queries is the share of prompt tokens not recomputed.
PREFIX_QUERIES = Counter(
    "guardfleet_prefix_cache_queries", "prompt tokens looked up in the shared-prefix cache"
)
PREFIX_HITS = Counter(
    "guardfleet_prefix_cache_hits",
    "prompt tokens served from a shared prefix computed once (cached, or for the whole group)",
)
FINISHED = Counter(
    "guardfleet_request_finish",
    "requests ended, by reason: stop, length, cancelled, or the error type "
    "(truncated_output, unparseable_output, input_too_long, ...)",
    ["reason"],
)


def serve(port: int, load: Callable[[], tuple[int, int]], memory: Callable[[], int]) -> None:
    """Serve /metrics on `port` from a daemon thread; `load` gives (running, waiting)."""
    RUNNING.set_function(lambda: load()[0])
    WAITING.set_function(lambda: load()[1])
    MEMORY.set_function(memory)
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)
