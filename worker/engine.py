"""The model engine: the only module that imports transformers' models.

It loads one model on one device and advances rows one forward pass at a time, so requests can
join and leave a running set between decode steps (continuous batching):

    begin(requests)  -> Prefill   rows laid out for their first forward; shared prefix copied in
    prefill(p, n)    -> bool      at most ~n more prompt tokens; True once every row has a token
    join(b, p)       -> Batch     prefilled rows join the running set
    decode_step(b)   -> [Row]     one token for every running row; returns the rows that ended

The runner (worker/runner.py) decides who joins and when; `generate()` runs a group to the end,
for warm-up, tests and benchmarks. Masks are built from token positions (worker/kv.py), so each
row's tokens are the ones it would get alone, and greedy rows stay exactly greedy
(worker/sampling.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from guardfleet.prompts import END_OF_TURN
from guardfleet.settings import DEMO_MODEL, Settings
from worker import metrics
from worker.graphs import DecodeGraphs
from worker.kv import GROWTH, RowCache
from worker.sampling import Picker, Plan, Sampling, generator_for, label_token_ids
from worker.tokenization import TextEncoder

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def resolve_model(name: str) -> str:
    return str(DEMO_MODEL_DIR) if name == DEMO_MODEL else name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    # The first `prefix_len` prompt tokens are shared with other requests (the taxonomy part of
    # Template A); the engine computes their KV cache once and copies it into each row.
    prefix_len: int = 0
    # Called from the model thread with each new token as it is generated (for streaming).
    on_token: Callable[[int], None] | None = None
    # Set by anyone to drop the row at the next step (finish_reason "cancelled").
    cancel: threading.Event | None = None
    # 0 = interactive lane, 1 = bulk: the runner admits lower first when the running set is full.
    priority: int = 0
    # Benchmarks only: generate exactly max_new_tokens, ignoring stop tokens.
    force_length: bool = False

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.prompt_ids[: self.prefix_len])

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed, self.force_length)

    @property
    def reserved_tokens(self) -> int:
        """KV cells this request may grow to: what admission counts against the budget."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class GenResult:
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    # Per generated step: log P(tokens starting "harmful"), log P(tokens starting "unharmful").
    label_logprobs: list[tuple[float, float]] = field(default_factory=list)


@dataclass(eq=False)
class Row:
    """One request in flight: what it has generated so far and where its next token goes."""

    request: GenRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    label_logprobs: list[tuple[float, float]] = field(default_factory=list)
    finish: str | None = None
    error: Exception | None = None  # its token callback failed: the row ends, alone

    @property
    def next_position(self) -> int:
        # The last generated token is not in the cache yet: the next forward feeds it.
        return len(self.request.prompt_ids) + len(self.tokens) - 1

    def result(self) -> GenResult:
        return GenResult(self.tokens, self.finish or "length", self.label_logprobs)


@dataclass(eq=False)
class Prefill:
    """Rows whose prompts are being computed, `chunk` columns at a time."""

    rows: list[Row]
    cache: RowCache
    input_ids: torch.Tensor  # [rows, columns] still to compute, left-padded
    positions: torch.Tensor  # same shape, -1 on padding
    done: int = 0  # columns computed

    @property
    def remaining(self) -> int:
        return int(self.input_ids.shape[1]) - self.done


@dataclass(eq=False)
class Batch:
    """The running set: rows that have a first token and are decoding. What a step feeds the
    model stays on the device between steps; it is rebuilt only when rows join or leave."""

    rows: list[Row]
    cache: RowCache
    plan: Plan
    last: torch.Tensor  # [rows, 1]: each row's newest token, the next step's input
    positions: torch.Tensor  # [rows, 1]: its position


def _note_cancels(rows: list[Row]) -> None:
    for row in rows:
        if row.finish is None and row.request.cancel is not None and row.request.cancel.is_set():
            row.finish = "cancelled"


def default_kv_budget(device: torch.device, bytes_per_token: int) -> int:
    """KV cells to allow when none is configured: most of what is free on a GPU after the
    weights, 4 GiB on a CPU (which shares its memory with everything else)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(4096, int(free * 0.8) // bytes_per_token)
    return max(4096, (4 << 30) // bytes_per_token)


class Engine:
    PREFIX_CACHE_ENTRIES = 16  # distinct policies whose prefix KV stays resident

    def __init__(self, settings: Settings) -> None:
        self.model_name = settings.model
        self.reuse_prefix = settings.prefix_cache
        self._prefix_kv: OrderedDict[tuple[int, ...], RowCache] = OrderedDict()
        self.path = resolve_model(settings.model)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        started = time.perf_counter()
        self.tokenizer: Tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.encoder = TextEncoder(self.tokenizer)  # the only way client text becomes ids
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path,
            dtype=self.dtype,
            device_map={"": str(self.device)},  # accelerate places weights as they load
        )
        self.model.eval()
        pad_id = self.tokenizer.pad_token_id
        self.pad_id: int = self.tokenizer.eos_token_id if pad_id is None else pad_id
        text = self.model.config.get_text_config()
        if not getattr(text, "layer_types", None):
            raise ValueError(f"{self.path}: not a Gemma 3 model (no layer_types in its config)")
        # Masks per attention kind: sliding layers see only the last `sliding_window` positions.
        self.windows = {
            kind: (text.sliding_window if kind == "sliding_attention" else None)
            for kind in set(text.layer_types)
        }
        self.kv_shape = (text.num_hidden_layers, text.num_key_value_heads, text.head_dim)
        self.vocab_size = int(text.vocab_size)
        layers, heads, dim = self.kv_shape
        self.kv_bytes_per_token = 2 * layers * heads * dim * self.dtype.itemsize
        self.kv_budget = settings.kv_budget_tokens or default_kv_budget(
            self.device, self.kv_bytes_per_token
        )
        # The longest row one request may grow to; with graphs, the arena's width.
        self.max_row_tokens = self.kv_budget
        self.graphs: DecodeGraphs | None = None
        if settings.compile:
            rows = settings.max_batch_size
            self.max_row_tokens = self.kv_budget // rows
            arena = self._new_cache(rows, self.max_row_tokens, headroom=0)
            capture = self.device.type == "cuda"
            self.graphs = DecodeGraphs(self.model, arena, self.windows, self.pad_id, capture)
        # Measured (docs/benchmarks.md): 16k on an H200 took a burst from 0.88x to 1.34x of the
        # static engine with the same head-of-line tail; 1,024 keeps a 2-core CPU level with it.
        self.prefill_chunk = settings.prefill_chunk_tokens or (
            16384 if self.device.type == "cuda" else 1024
        )
        self.stop_ids = self._stop_ids()
        self.picker = Picker(label_token_ids(self.tokenizer), self.stop_ids, self.device)
        log.info(
            "loaded %s on %s (%s) in %.1fs; KV budget %d tokens, prefill chunk %d",
            self.path,
            self.device,
            self.dtype,
            time.perf_counter() - started,
            self.kv_budget,
            self.prefill_chunk,
        )

    def _stop_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        stops = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN.token)
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            stops.add(end_of_turn)
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return stops

    def check(self, request: GenRequest) -> None:
        """Refuse a request the model cannot run, before it can break a batch."""
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise IndexError(f"token id {bad[0]} is outside the vocabulary ({self.vocab_size})")
        if request.reserved_tokens > self.max_row_tokens:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                f"({request.max_new_tokens}) exceeds the {self.max_row_tokens} tokens one row "
                f"may hold (KV budget {self.kv_budget}"
                + (", divided among max_batch_size rows for CUDA graphs)" if self.graphs else ")")
            )

    # ---- the three steps --------------------------------------------------------------------
    def begin(self, requests: Sequence[GenRequest]) -> Prefill:
        """Lay out rows for prefill: [shared prefix | padding | rest of the prompt]."""
        first = requests[0].prefix if self.reuse_prefix else ()
        same = all(r.prefix == first and len(r.prompt_ids) > len(first) for r in requests)
        prefix = first if same else ()
        tails = [r.prompt_ids[len(prefix) :] for r in requests]
        width = max(len(t) for t in tails)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        positions = torch.full_like(ids, -1)
        for row, tail in enumerate(tails):
            ids[row, width - len(tail) :] = torch.tensor(tail)
            positions[row, width - len(tail) :] = torch.arange(len(prefix), len(prefix) + len(tail))
        if self.reuse_prefix:
            metrics.PREFIX_QUERIES.inc(sum(len(r.prompt_ids) for r in requests))
        if prefix:
            computed = prefix not in self._prefix_kv
            metrics.PREFIX_HITS.inc(len(prefix) * (len(requests) - computed))
            cache = self._prefix_cache(prefix).repeat(len(requests), width)
        else:
            cache = self._new_cache(len(requests), width)
        rows = [Row(r, generator_for(r.sampling, self.device)) for r in requests]
        return Prefill(rows, cache, ids.to(self.device), positions.to(self.device))

    @torch.inference_mode()
    def prefill(self, work: Prefill, tokens: int) -> bool:
        """Compute about `tokens` more prompt tokens (whole columns, at least one); once the last
        column is done, every row gets its first token. Returns whether that happened."""
        columns = min(work.remaining, max(1, tokens // len(work.rows)))
        span = slice(work.done, work.done + columns)
        logits = self._forward(work.cache, work.input_ids[:, span], work.positions[:, span])
        work.done += columns
        if work.remaining:
            return False
        self._advance(work.rows, logits, self._plan(work.rows))
        return True

    @torch.inference_mode()
    def decode_step(self, batch: Batch) -> list[Row]:
        """One token for every running row; rows that ended (or were cancelled) leave."""
        if self.graphs is not None:
            logits = self.graphs.step(batch.last, batch.positions, batch.cache.length)
            batch.cache.length += 1  # the step wrote this column's positions itself
        else:
            logits = self._forward(batch.cache, batch.last, batch.positions)
        chosen = self._advance(batch.rows, logits, batch.plan)
        batch.last, batch.positions = chosen[:, None], batch.positions + 1
        return self.drop_finished(batch)

    def join(self, batch: Batch | None, work: Prefill) -> Batch:
        """Prefilled rows join the running set (those already finished are not carried)."""
        _note_cancels(work.rows)
        keep = [i for i, r in enumerate(work.rows) if r.finish is None]
        if batch is None or not batch.rows:
            return self._batch([work.rows[i] for i in keep], self._join([(work.cache, keep)]))
        cache = self._join([(batch.cache, range(len(batch.rows))), (work.cache, keep)])
        return self._batch(batch.rows + [work.rows[i] for i in keep], cache)

    def drop_finished(self, batch: Batch) -> list[Row]:
        _note_cancels(batch.rows)
        ended = [r for r in batch.rows if r.finish is not None]
        if ended:
            keep = [i for i, r in enumerate(batch.rows) if r.finish is None]
            rest = self._batch([batch.rows[i] for i in keep], self._join([(batch.cache, keep)]))
            batch.rows, batch.cache, batch.plan = rest.rows, rest.cache, rest.plan
            batch.last, batch.positions = rest.last, rest.positions
        return ended

    def _join(self, parts: list[tuple[RowCache, Sequence[int]]]) -> RowCache:
        # With graphs the running set must live in the arena the captured steps read.
        return RowCache.join(parts, into=self.graphs.arena if self.graphs else None)

    def _batch(self, rows: list[Row], cache: RowCache) -> Batch:
        last = [[r.tokens[-1] if r.tokens else self.pad_id] for r in rows]
        return Batch(
            rows,
            cache,
            self._plan(rows),
            torch.tensor(last, device=self.device),
            torch.tensor([[r.next_position] for r in rows], device=self.device, dtype=torch.long),
        )

    def _plan(self, rows: list[Row]) -> Plan:
        return self.picker.plan([r.request.sampling for r in rows], [r.generator for r in rows])

    # ---- helpers ----------------------------------------------------------------------------
    def _forward(self, cache: RowCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache.reserve(ids.shape[1])
        with self._eager_attention():
            out = self.model(
                input_ids=ids,
                position_ids=positions.clamp(min=0),  # padding's position is never attended to
                attention_mask=cache.masks(positions, self.windows, self.dtype),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.advance(positions)
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def _eager_attention(self) -> AbstractContextManager[object]:
        """Keep cuDNN's attention out of forwards that are not captured as graphs. It plans per
        shape, and ours change every step: on an H200 it cost about 90 ms of host time per
        decode step (130 ms with it, 39 ms without, against `generate`'s 40-50 ms)."""
        if self.device.type != "cuda":
            return nullcontext()
        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        )

    def _advance(self, rows: list[Row], logits: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Append each row's next token; returns them as a device tensor to feed back."""
        chosen, picked, failed = self.picker.pick(logits, plan)
        for index, (row, (token, harm, unharm)) in enumerate(zip(rows, picked, strict=True)):
            row.label_logprobs.append((harm, unharm))
            if index in failed:
                row.error, row.finish = failed[index], "error"
                continue
            if token in self.stop_ids and not row.request.force_length:
                row.finish = "stop"
                continue
            row.tokens.append(token)
            if row.request.on_token is not None:
                try:
                    row.request.on_token(token)
                except Exception as exc:
                    row.error, row.finish = exc, "error"
                    continue
            if len(row.tokens) >= row.request.max_new_tokens:
                row.finish = "length"
        return chosen

    def _new_cache(self, rows: int, columns: int, headroom: int = GROWTH) -> RowCache:
        layers, heads, dim = self.kv_shape
        return RowCache(layers, rows, heads, dim, self.dtype, self.device, columns, headroom)

    def _prefix_cache(self, prefix: tuple[int, ...]) -> RowCache:
        cached = self._prefix_kv.get(prefix)
        if cached is None:
            cached = self._new_cache(1, len(prefix))
            with torch.inference_mode():
                ids = torch.tensor([prefix], device=self.device)
                self._forward(cached, ids, torch.arange(len(prefix), device=self.device)[None])
            self._prefix_kv[prefix] = cached
            while len(self._prefix_kv) > self.PREFIX_CACHE_ENTRIES:
                self._prefix_kv.popitem(last=False)
        self._prefix_kv.move_to_end(prefix)
        return cached

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Run a group to the end on its own (warm-up, tests, benchmarks)."""
        for request in requests:
            self.check(request)
        work = self.begin(requests)
        while not self.prefill(work, self.prefill_chunk):
            pass
        batch = self.join(None, work)
        while batch.rows:
            self.decode_step(batch)
        return [row.result() for row in work.rows]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def token_offsets(self, token_ids: Sequence[int], upto_char: int) -> int | None:
        """Index of the generated token whose text covers character `upto_char`.

        Decoded length only grows with the prefix, so a binary search needs log(n) decodes
        (a think trace is hundreds of tokens, and the label comes last).
        """
        if len(self.decode(token_ids)) <= upto_char:
            return None
        low, high = 0, len(token_ids) - 1
        while low < high:
            middle = (low + high) // 2
            if len(self.decode(token_ids[: middle + 1])) > upto_char:
                high = middle
            else:
                low = middle + 1
        return low

    def warm_up(self) -> None:
        """One real generation, so the first job is not the one that pays for lazy init."""
        ids = self.tokenizer.encode("warm up", add_special_tokens=True)
        self.generate([GenRequest(prompt_ids=list(ids), max_new_tokens=4)])
