"""The KV cache of the MLX backend: slots with their own lengths, as the torch backend's.

Keys and values are one ``[slots, kv_heads, max_len, head_dim]`` array per layer. A prefill writes
one row's span into its slot; a decode step writes one position per row and reads each row's keys
up to the longest position, masked per row. ``view`` gives a layer the small object the model's
attention talks to (mlx_lm's cache protocol: ``offset``, ``update_and_fetch``) plus its mask.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from minimind_core.slots import Slots


class SlotCache(Slots):
    """Per-layer key/value arrays over ``Slots`` bookkeeping."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: mx.Dtype) -> None:
        super().__init__(slots, max_len)
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (every slot)."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def span(self, slot: int, start: int, length: int) -> list[SpanView]:
        """Views that prefill positions ``start..start+length`` of ``slot``, one per layer."""
        return [SpanView(self, i, slot, start, length) for i in range(len(self.keys))]

    def rows(self, slots: np.ndarray, positions: np.ndarray) -> list[RowsView]:
        """Views that feed one token per row at ``positions[i]`` of ``slots[i]``."""
        shared = (mx.array(slots.astype(np.int32)), mx.array(positions.astype(np.int32)),
                  int(positions.max()) + 1)
        return [RowsView(self, i, slots, positions, shared) for i in range(len(self.keys))]


class SpanView:
    """One row's prefill into its slot (chunked when ``start > 0``)."""

    def __init__(self, cache: SlotCache, layer: int, slot: int, start: int, length: int) -> None:
        self.cache, self.layer, self.slot = cache, layer, slot
        self.offset, self.end = start, start + length

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        keys[self.slot, :, self.offset:self.end] = k[0]
        values[self.slot, :, self.offset:self.end] = v[0]
        s = slice(self.slot, self.slot + 1)
        return keys[s, :, :self.end], values[s, :, :self.end]

    def mask(self) -> Any:
        t = self.end - self.offset
        if self.offset == 0:
            return "causal" if t > 1 else None
        q = mx.arange(self.offset, self.end)[:, None]
        return q >= mx.arange(self.end)[None]  # causal, aligned to the cache end


class RowsView:
    """One decode position per row, each row at its own offset."""

    def __init__(self, cache: SlotCache, layer: int, slots: np.ndarray, positions: np.ndarray,
                 shared: tuple[mx.array, mx.array, int]) -> None:
        self.cache, self.layer = cache, layer
        self.slots, self.positions = slots, positions
        self._slots, self.offset, self.end = shared  # offset: per-row RoPE positions

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        for i, (slot, pos) in enumerate(zip(self.slots.tolist(), self.positions.tolist())):
            keys[slot, :, pos:pos + 1] = k[i]
            values[slot, :, pos:pos + 1] = v[i]
        return keys[self._slots, :, :self.end], values[self._slots, :, :self.end]

    def mask(self) -> mx.array:
        return (mx.arange(self.end)[None] <= self.offset[:, None])[:, None, None, :]
