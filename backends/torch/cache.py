"""The KV cache of the torch backend: preallocated slots, each row with its own length.

Keys and values are ``[layers, slots, kv_heads, max_len + 1, head_dim]``: the extra last position
is scratch, where a static-shape step writes the rows that sit out the step. A request takes a free slot
(as llama.cpp's server does), is prefilled into it, decodes one position a step, and gives the
slot back; rows never share positions and nothing is padded, so a row's numbers do not depend on
the other rows, and a row can join or leave between two decode steps without touching the rest.
Slots rather than pages: shapes stay fixed (what a CUDA graph and the C attention need), and at
MiniMind's sizes a slot of the whole window costs megabytes, not gigabytes.
"""

from __future__ import annotations

import torch

from minimind_core.slots import Slots


class KVCache(Slots):
    """Slots of keys and values plus each slot's filled length (``Slots``)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(slots, max_len)
        shape = (layers, slots, kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = max_len  # the position rows that sit out a static step write to

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (every slot)."""
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write one position per row: k, v [rows, kv_heads, 1, d] at (slots[i], positions[i])."""
        self.k[layer, slots, :, positions] = k[:, :, 0]
        self.v[layer, slots, :, positions] = v[:, :, 0]

    def write_span(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, kv_heads, T, d] of one row at ``start`` and return its filled keys."""
        end = start + k.shape[2]
        self.k[layer, slot, :, start:end] = k[0]
        self.v[layer, slot, :, start:end] = v[0]
        return self.k[layer, slot:slot + 1, :, :end], self.v[layer, slot:slot + 1, :, :end]

    def rows(self, layer: int, slots: torch.Tensor | slice, end: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given slots up to position ``end`` [rows, kv, end, d]: a view
        when ``slots`` is a slice, a gathered copy otherwise."""
        if isinstance(slots, slice):
            return self.k[layer, slots, :, :end], self.v[layer, slots, :, :end]
        return (self.k[layer].index_select(0, slots)[:, :, :end],
                self.v[layer].index_select(0, slots)[:, :, :end])
