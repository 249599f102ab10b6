"""Choosing each row's next token from its logits: per-row settings, one call per step.

Greedy rows take the arg-max of the raw logits, exactly what `generate(do_sample=False)` does, so
a greedy row's tokens do not depend on which rows run beside it. Sampled rows apply their own
temperature and nucleus (top-p) cut and draw from their own seeded generator, so a seed gives the
same text whatever else is in the batch.

Every row also records, per step, the log-probability mass on tokens that begin "harmful" and
"unharmful": two numbers per step, from which verdict scores are computed later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

LABELS = ("harmful", "unharmful")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    no_stop: bool = False  # benchmarks only: never pick a stop token

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def label_token_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids whose text, case-folded and without leading spaces, is a non-empty prefix of
    each label (" harmful", "harm", "H"...). Disjoint: the words differ in their first letter."""
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


def generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.greedy or sampling.seed is None:
        return None  # greedy draws nothing; unseeded rows share torch's global generator
    # Any integer a client sends is a valid seed: torch takes 64 bits.
    return torch.Generator(device=device).manual_seed(sampling.seed % (1 << 64))


@dataclass(frozen=True)
class Plan:
    """What a set of rows needs at each step, worked out once per change of the set: a decode
    step then costs one transfer from the device, whatever the rows want."""

    settings: tuple[Sampling, ...]
    generators: tuple[torch.Generator | None, ...]
    sampled: tuple[int, ...]  # rows that draw instead of taking the arg-max
    no_stop: torch.Tensor | None  # rows that may not stop (benchmarks)


class Picker:
    def __init__(self, label_ids: tuple[list[int], list[int]], stop_ids: set[int],
                 device: torch.device) -> None:  # fmt: skip
        self.device = device
        self.label_ids = [torch.tensor(ids, device=device) for ids in label_ids]
        self.stop_ids = torch.tensor(sorted(stop_ids), device=device)

    def plan(
        self, settings: Sequence[Sampling], generators: Sequence[torch.Generator | None]
    ) -> Plan:
        no_stop = [row for row, s in enumerate(settings) if s.no_stop]
        return Plan(
            tuple(settings),
            tuple(generators),
            tuple(row for row, s in enumerate(settings) if not s.greedy),
            torch.tensor(no_stop, device=self.device) if no_stop else None,
        )

    def pick(
        self, logits: torch.Tensor, plan: Plan
    ) -> tuple[torch.Tensor, list[tuple[int, float, float]], dict[int, Exception]]:
        """Next token per row (on the device, to feed back); per row on the host, the token and
        this step's label log-probabilities; and the rows whose draw failed (those rows alone
        must end: the others are unaffected)."""
        logits = logits.float()
        if plan.no_stop is not None:
            logits[plan.no_stop[:, None], self.stop_ids[None, :]] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        labels = torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in self.label_ids], -1)
        chosen = logits.argmax(dim=-1)
        failed: dict[int, Exception] = {}
        for row in plan.sampled:
            try:
                chosen[row] = _draw(logits[row], plan.settings[row], plan.generators[row])
            except RuntimeError as exc:
                failed[row] = exc
        # Token ids are below 2**24, exact in float32: one transfer carries all three columns.
        host = torch.cat([chosen[:, None].float(), labels], dim=-1).tolist()
        return chosen, [(int(t), h, u) for t, h, u in host], failed


def _draw(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    # Shifted so the largest logit is 0: a tiny temperature then gives 0 and -inf, never inf/inf.
    probs = torch.softmax((logits - logits.max()) / s.temperature, dim=-1)
    if s.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p, and always the
        # most likely one (a top_p below float32's resolution would otherwise drop everything).
        drop = torch.cumsum(ordered, dim=-1) - ordered >= s.top_p
        drop[0] = False
        ordered[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator)[0]
