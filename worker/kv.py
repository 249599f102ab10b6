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
        headroom: int = GROWTH,
    ) -> None:
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.rows = rows
        self.length = 0  # columns in use
        self.fixed = False  # a view of an arena (worker/graphs.py): it never re-allocates
        cap = columns + headroom
        self.keys = [self._empty(rows, cap) for _ in range(layers)]
        self.values = [self._empty(rows, cap) for _ in range(layers)]
        self.pos = torch.full((rows, cap), -1, dtype=torch.long, device=device)

    def _empty(self, rows: int, columns: int) -> torch.Tensor:
        heads, dim = self.shape
        return torch.zeros(rows, heads, columns, dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return int(self.pos.shape[1])

    def view(self, rows: int, length: int) -> RowCache:
        """The first `rows` rows of this cache (an arena), sharing its memory."""
        out = object.__new__(RowCache)
        out.shape, out.dtype, out.device = self.shape, self.dtype, self.device
        out.rows, out.length, out.fixed = rows, length, True
        out.keys = [k[:rows] for k in self.keys]
        out.values = [v[:rows] for v in self.values]
        out.pos = self.pos[:rows]
        return out

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
        """Masks for the next forward, whose queries are at `query_pos` ([rows, queries])."""
        key_pos = torch.cat([self.pos[:, : self.length], query_pos], dim=1)
        return position_masks(key_pos, query_pos, windows, dtype)

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more before a forward (the layers write in place)."""
        need = self.length + columns
        if need <= self.capacity:
            return
        if self.fixed:  # admission keeps rows within the arena; getting here is a bug
            raise RuntimeError(f"KV arena overflow: {need} columns of {self.capacity}")
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
    def join(
        parts: Sequence[tuple[RowCache, Sequence[int]]], into: RowCache | None = None
    ) -> RowCache:
        """One cache holding the given rows of each part, right-aligned, left padding trimmed.

        Used when rows leave (one part, the rows that stay) and when prefilled rows join the
        running set (two parts). The result is new, or written into the arena `into` (then the
        parts may be views of it): one layer at a time, so copying never needs more than one
        layer's worth of extra memory.
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
        layers = len(first.keys)
        if into is None:
            out = RowCache(layers, total, *first.shape, first.dtype, first.device, width)
        else:
            out = into.view(total, 0)
        placed = []  # (part, its rows' index, destination rows, source and target columns)
        row = 0
        for cache, index in picks:
            take = min(width, cache.length)
            src, dst = slice(cache.length - take, cache.length), slice(width - take, width)
            placed.append((cache, index, slice(row, row + len(index)), src, dst))
            row += len(index)
        for layer in range(layers):
            for kind in ("keys", "values"):
                # An arena may be a part too: gather the layer aside before overwriting it.
                merged = first._empty(total, width) if into is not None else None
                target = getattr(out, kind)[layer] if merged is None else merged
                for cache, index, rows, src, dst in placed:
                    part = getattr(cache, kind)[layer][:, :, src]
                    target[rows, :, dst] = part.index_select(0, index)
                if merged is not None:
                    getattr(out, kind)[layer][:, :, :width] = merged
        pos = torch.full((total, width), -1, dtype=torch.long, device=first.device)
        for cache, index, rows, src, dst in placed:
            pos[rows, dst] = cache.pos[:, src].index_select(0, index)
        if into is not None:
            into.pos.fill_(-1)  # padding rows and columns of every bucket
        out.pos[:, :width] = pos
        out.length = width
        return out


def position_masks(
    key_pos: torch.Tensor, query_pos: torch.Tensor, windows: dict[str, int | None],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Additive masks `[rows, 1, queries, keys]` per layer type, from positions alone.

    A key is visible if it holds a token (position >= 0) at or before the query's position, and
    on sliding-window layers less than `window` positions before it. A padding query
    (position -1) may look at every key: its output is thrown away, and a row with nothing to
    attend to would turn into NaN.
    """
    keys = key_pos[:, None, :]
    q = query_pos[:, :, None]
    causal = (keys >= 0) & (keys <= q)
    out = {}
    for kind, window in windows.items():
        allowed = causal if window is None else causal & (q - keys < window)
        allowed = allowed | (q < 0)
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=key_pos.device)
        blocked.masked_fill_(~allowed, torch.finfo(dtype).min)
        out[kind] = blocked[:, None]
    return out
