"""A preallocated, static-shape KV cache (one tensor for all layers) for the torch backend.

Sequences in a batch are left-padded to one length, so every row writes at the same position and
one integer ``length`` describes the whole cache. Shapes never change after allocation, which is
what lets the decode step be captured as a CUDA graph.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values [layers, batch, kv_heads, max_len, head_dim] plus per-row left padding."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # positions filled so far (same for every row)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # left padding per row
        self.key_mask: torch.Tensor | None = None  # [B, 1, 1, max_len] True where a key is real

    def fits(self, batch: int, length: int, dtype: torch.dtype) -> bool:
        return batch == self.batch and length <= self.max_len and dtype == self.k.dtype

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Start a new batch; ``pad`` gives each row's count of left-padding positions."""
        self.length = 0
        if pad is None or not bool((pad > 0).any()):
            self.pad.zero_()
            self.key_mask = None
        else:
            self.pad.copy_(pad)
            idx = torch.arange(self.max_len, device=pad.device)
            self.key_mask = (idx[None, :] >= pad[:, None])[:, None, None, :]

    def update_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape write of one position ``pos`` (a 1-element device tensor); returns the
        whole cache so shapes never depend on how much of it is filled."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]

    def static_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """[B, 1, 1, max_len] True for keys a query at ``pos`` may see (real, not in the future)."""
        idx = torch.arange(self.max_len, device=pos.device)
        return ((idx[None, :] <= pos) & (idx[None, :] >= self.pad[:, None]))[:, None, None, :]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, d] at ``start`` and return the filled part of the cache."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
