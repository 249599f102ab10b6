"""Decode steps replayed as CUDA graphs (`GUARDFLEET_COMPILE=1`).

A decode step of a 4B model is about a thousand small kernels; at small batch the GPU finishes
each faster than Python launches the next. A CUDA graph records one step's launches once and
replays them with a single call. Graphs need fixed shapes and fixed addresses, so here the
running set's KV cache lives in one arena per layer, `[max rows, kv heads, max columns, dim]`,
and a step runs on a bucket of it: rows rounded up to a power of two, columns up to a multiple of
`COLUMN_STEP`. Padding rows and columns hold position -1 and are masked, exactly as in
worker/kv.py. One graph per bucket is captured the first time that bucket is needed; all of them
share one memory pool.

Everything a captured step does depends only on tensors that stay put: the token ids, positions
and write column are copied into fixed buffers before each replay. The new key and value go to
the write column with `index_copy_`, and attention reads the whole bucket. On a CPU (tests) the
same step runs without capturing, so the arena, the buckets and the masks are tested
everywhere; only the capture itself needs a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.kv import RowCache, position_masks

COLUMN_STEP = 256


def bucket(n: int, limit: int, step: int | None = None) -> int:
    """Rows: the next power of two; columns: the next multiple of `step`; never over `limit`."""
    if step is not None:
        return min(limit, -(-n // step) * step)
    size = 1
    while size < n:
        size *= 2
    return min(limit, size)


class _BucketView:
    """The cache object the model sees during a graphed step: one bucket of the arena."""

    def __init__(self, arena: RowCache, rows: int, columns: int, column: torch.Tensor) -> None:
        self.keys = [k[:rows, :, :columns] for k in arena.keys]
        self.values = [v[:rows, :, :columns] for v in arena.values]
        self.column = column

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        self.keys[layer_idx].index_copy_(2, self.column, key_states)
        self.values[layer_idx].index_copy_(2, self.column, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given; nothing asks


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        arena: RowCache,
        windows: dict[str, int | None],
        pad_id: int,
        capture: bool,
    ) -> None:
        self.model, self.arena, self.windows = model, arena, windows
        self.capture = capture
        rows, device = arena.rows, arena.device
        self.ids = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)
        self.query_pos = torch.full((rows, 1), -1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None

    @property
    def max_rows(self) -> int:
        return self.arena.rows

    @property
    def max_columns(self) -> int:
        return self.arena.capacity

    def step(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits for one decode step of the first `len(ids)` arena rows, writing column
        `length`; the caller then counts that column as used."""
        n = ids.shape[0]
        rows = bucket(n, self.max_rows)
        columns = bucket(length + 1, self.max_columns, COLUMN_STEP)
        self.ids[:n].copy_(ids)
        self.ids[n:rows].fill_(self.pad_id)
        self.query_pos[:n].copy_(positions)
        self.query_pos[n:rows].fill_(-1)
        self.column.fill_(length)
        if not self.capture:
            return self._body(rows, columns)[:n]
        key = (rows, columns)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, columns)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _body(self, rows: int, columns: int) -> torch.Tensor:
        query = self.query_pos[:rows]
        pos = self.arena.pos[:rows, :columns]
        pos.index_copy_(1, self.column, query)  # the new token's own column, before masking
        out = self.model(
            input_ids=self.ids[:rows],
            position_ids=query.clamp(min=0),
            attention_mask=position_masks(pos, query, self.windows, self.arena.dtype),
            cache=_BucketView(self.arena, rows, columns, self.column),
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def _capture(self, rows: int, columns: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up runs on a side stream, as capture requires; they write the same column with
        # the same inputs the replay will, so running them changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(rows, columns)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._body(rows, columns)
        self.pool = graph.pool()
        return graph, logits
