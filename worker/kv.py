"""The KV cache of a running set of rows, and the attention masks that go with it.

Rows are right-aligned in one tensor per layer, `[rows, kv_heads, columns, head_dim]`: every
decode step appends one column for all rows, and a row that joins later (with a shorter or longer
history) is padded on the left. Each cell records the position of the token it holds (`pos`,
-1 for padding), and the masks are computed from positions only, so a row sees exactly the
keys it would see alone: its own tokens at or before the query's position, and on sliding-window
layers only the last `window` of them. Nothing depends on where a row sits in the tensor.

transformers' attention layers call `update()` with each forward's new keys and values; the
model never learns that the cache is ours (a dict of masks skips its own mask building).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GROWTH = 128  # columns added at a time: one re-allocation per this many decode steps


class RowCache:
    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        columns: int = 0,
    ) -> None:
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.rows = rows
        self.length = 0  # columns in use
        cap = columns + GROWTH
        self.keys = [self._empty(rows, cap) for _ in range(layers)]
        self.values = [self._empty(rows, cap) for _ in range(layers)]
        self.pos = torch.full((rows, cap), -1, dtype=torch.long, device=device)

    def _empty(self, rows: int, columns: int) -> torch.Tensor:
        heads, dim = self.shape
        return torch.zeros(rows, heads, columns, dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return int(self.pos.shape[1])

    @property
    def cells(self) -> int:
        """Token slots held, padding included: what the KV budget counts."""
        return self.rows * self.length

    # transformers' side of the contract ------------------------------------------------------
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # our side --------------------------------------------------------------------------------
    def masks(
        self, query_pos: torch.Tensor, windows: dict[str, int | None], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Additive masks `[rows, 1, queries, keys]` per layer type for the next forward.

        A padding query (position -1) may look at every key: its output is thrown away, and a
        row with nothing to attend to would turn into NaN.
        """
        key_pos = torch.cat([self.pos[:, : self.length], query_pos], dim=1)[:, None, :]
        q = query_pos[:, :, None]
        causal = (key_pos >= 0) & (key_pos <= q)
        out = {}
        for kind, window in windows.items():
            allowed = causal if window is None else causal & (q - key_pos < window)
            allowed = allowed | (q < 0)
            blocked = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            blocked.masked_fill_(~allowed, torch.finfo(dtype).min)
            out[kind] = blocked[:, None]
        return out

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more before a forward (the layers write in place)."""
        need = self.length + columns
        if need <= self.capacity:
            return
        cap = need + GROWTH
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._empty(self.rows, cap)
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        pos = torch.full((self.rows, cap), -1, dtype=torch.long, device=self.device)
        pos[:, : self.length] = self.pos[:, : self.length]
        self.pos = pos

    def advance(self, query_pos: torch.Tensor) -> None:
        """Record the positions of the columns the last forward wrote."""
        end = self.length + query_pos.shape[1]
        self.pos[:, self.length : end] = query_pos
        self.length = end

    def repeat(self, rows: int, extra_columns: int) -> RowCache:
        """`rows` copies of this (one-row) cache: a shared prefix handed to a group of rows."""
        out = RowCache(
            len(self.keys), rows, *self.shape, self.dtype, self.device, self.length + extra_columns
        )
        for src, dst in ((self.keys, out.keys), (self.values, out.values)):
            for layer, tensor in enumerate(src):
                dst[layer][:, :, : self.length] = tensor[:1, :, : self.length]
        out.pos[:, : self.length] = self.pos[:1, : self.length]
        out.length = self.length
        return out

    @staticmethod
    def join(parts: Sequence[tuple[RowCache, Sequence[int]]]) -> RowCache:
        """One cache holding the given rows of each part, right-aligned, left padding trimmed.

        Used when rows leave (one part, the rows that stay) and when prefilled rows join the
        running set (two parts). Copies once; a decode step reads the whole cache anyway.
        """
        first = parts[0][0]
        picks = [
            (cache, torch.tensor(list(rows), dtype=torch.long, device=cache.device))
            for cache, rows in parts
            if len(rows)
        ]
        # The widest history among the chosen rows decides the width; empty columns go.
        width = 0
        for cache, index in picks:
            used = cache.pos[index, : cache.length] >= 0
            if used.any():
                first_used = int(used.any(dim=0).nonzero()[0])
                width = max(width, cache.length - first_used)
        total = sum(len(index) for _, index in picks)
        out = RowCache(len(first.keys), total, *first.shape, first.dtype, first.device, width)
        out.length = width
        row = 0
        for cache, index in picks:
            n, take = len(index), min(width, cache.length)
            src = slice(cache.length - take, cache.length)
            dst = slice(width - take, width)
            for store, target in ((cache.keys, out.keys), (cache.values, out.values)):
                for layer, tensor in enumerate(store):
                    target[layer][row : row + n, :, dst] = tensor[:, :, src].index_select(0, index)
            out.pos[row : row + n, dst] = cache.pos[:, src].index_select(0, index)
            row += n
        return out
