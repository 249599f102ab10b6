"""The model engine: the only module that imports torch and transformers' models.

It loads one model on one device, warms it up, and runs `generate` over a batch of already
tokenized requests that share generation settings (the batcher guarantees that). For each row
it also keeps, at every step, how much probability the model put on tokens that begin
"harmful" versus "unharmful"; the caller picks the step where a label was decided.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.generation.streamers import BaseStreamer

from guardfleet.prompts import END_OF_TURN
from guardfleet.settings import DEMO_MODEL, Settings
from worker.tokenization import TextEncoder

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
LABELS = ("harmful", "unharmful")


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
    # Template A); the engine computes their KV cache once and reuses it.
    prefix_len: int = 0
    # Called from the model thread with each new token as it is generated (for streaming).
    on_token: Callable[[int], None] | None = None
    # Benchmarks only: generate exactly max_new_tokens, ignoring stop tokens.
    force_length: bool = False

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.prompt_ids[: self.prefix_len])

    @property
    def batch_key(self) -> Hashable:
        """Requests with different keys cannot share one `generate` call."""
        sampling = (
            (0.0, 1.0, None) if self.temperature <= 0 else (self.temperature, self.top_p, self.seed)
        )
        return (sampling, self.max_new_tokens, self.force_length, self.prefix)


@dataclass
class GenResult:
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    # Per generated step: log P(tokens starting "harmful"), log P(tokens starting "unharmful").
    label_logprobs: list[tuple[float, float]] = field(default_factory=list)


class LabelCapture(LogitsProcessor):
    """Records, per row and step, the log-probability mass on tokens that begin each label.

    Tokenizer-aware: a token counts for "harmful" if its text, case-folded and without leading
    spaces, is a non-empty prefix of "harmful" (" harmful", "harm", "H"...); likewise for
    "unharmful". The two sets are disjoint because the words differ in their first letter.
    Two numbers per row per step, so it costs nothing next to storing full logits.
    """

    def __init__(self, label_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.label_ids = label_ids
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.steps.append(
            torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in self.label_ids], dim=-1)
        )
        return scores


class TokenFanout(BaseStreamer):
    """Hands each row's new tokens to that request's callback, until the row stops."""

    def __init__(self, callbacks: list[Callable[[int], None] | None], stop_ids: set[int]) -> None:
        self.callbacks = callbacks
        self.stop_ids = stop_ids
        self.done = [cb is None for cb in callbacks]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        for row, tokens in enumerate(value.reshape(len(self.callbacks), -1).tolist()):
            for token in tokens:
                if self.done[row]:
                    break
                if token in self.stop_ids:
                    self.done[row] = True
                    break
                callback = self.callbacks[row]
                assert callback is not None
                callback(token)

    def end(self) -> None:
        self.done = [True] * len(self.callbacks)


def label_token_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    sets: tuple[list[int], list[int]] = ([], [])
    for token_id, text in enumerate(texts):
        piece = text.lstrip(" ").lower()
        if not piece:
            continue
        for index, label in enumerate(LABELS):
            if label.startswith(piece):
                sets[index].append(token_id)
    return sets


class Engine:
    PREFIX_CACHE_ENTRIES = 16  # distinct policies whose prefix KV stays resident

    def __init__(self, settings: Settings) -> None:
        self.model_name = settings.model
        self.reuse_prefix = settings.prefix_cache
        self._prefix_kv: OrderedDict[tuple[int, ...], Any] = OrderedDict()
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
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.stop_ids = self._stop_ids()
        harm, unharm = label_token_ids(self.tokenizer)
        self.label_ids = (
            torch.tensor(harm, device=self.device),
            torch.tensor(unharm, device=self.device),
        )
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            self.path,
            self.device,
            self.dtype,
            time.perf_counter() - started,
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

    @torch.inference_mode()
    def generate(self, batch: Sequence[GenRequest]) -> list[GenResult]:
        """Run one `generate` over requests with the same `batch_key`.

        Without a shared prefix, rows are left-padded. With one, each row is laid out as
        [prefix | padding | rest of the prompt]: the prefix KV is computed once and copied per
        row, and position ids follow the attention mask, so every row sees the positions it
        would have had alone.
        """
        if len({r.batch_key for r in batch}) != 1:
            raise ValueError("a batch must share its generation settings and prefix")
        first = batch[0]
        prefix = list(first.prefix) if self.reuse_prefix else []
        tails = [r.prompt_ids[len(prefix) :] for r in batch]
        if any(not tail for tail in tails):  # nothing left to prefill: run without reuse
            prefix, tails = [], [r.prompt_ids for r in batch]
        width = max(len(t) for t in tails)
        input_ids = torch.full((len(batch), len(prefix) + width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        input_ids[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        attention[:, : len(prefix)] = 1
        for row, tail in enumerate(tails):
            input_ids[row, input_ids.shape[1] - len(tail) :] = torch.tensor(tail)
            attention[row, input_ids.shape[1] - len(tail) :] = 1
        kwargs: dict[str, Any] = {}
        if prefix:
            past = copy.deepcopy(self._prefix_cache(tuple(prefix)))
            past.batch_repeat_interleave(len(batch))
            kwargs["cache"] = past
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            kwargs["do_sample"] = False
        if first.force_length:
            kwargs["min_new_tokens"] = first.max_new_tokens
        if any(r.on_token for r in batch):
            kwargs["streamer"] = TokenFanout([r.on_token for r in batch], self.stop_ids)
        capture = LabelCapture(self.label_ids)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=first.max_new_tokens,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            logits_processor=[capture],
            top_k=None,
            **kwargs,
        )
        new = out[:, input_ids.shape[1] :].tolist()
        steps = torch.stack(capture.steps, dim=1).tolist() if capture.steps else []
        results = []
        for row in range(len(batch)):
            tokens: list[int] = []
            finish = "length"
            for token in new[row]:
                if token in self.stop_ids and not first.force_length:
                    finish = "stop"
                    break
                tokens.append(token)
            logprobs = [(h, u) for h, u in steps[row][: len(tokens) + 1]] if steps else []
            results.append(GenResult(tokens, finish, logprobs))
        return results

    def _prefix_cache(self, prefix: tuple[int, ...]) -> Any:
        cached = self._prefix_kv.get(prefix)
        if cached is None:
            ids = torch.tensor([prefix], device=self.device)
            cached = self.model(input_ids=ids, use_cache=True).past_key_values
            self._prefix_kv[prefix] = cached
            while len(self._prefix_kv) > self.PREFIX_CACHE_ENTRIES:
                self._prefix_kv.popitem(last=False)
        self._prefix_kv.move_to_end(prefix)
        return cached

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
