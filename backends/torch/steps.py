"""The decode-step implementations of the torch backend: interchangeable, one chosen per engine.

Every implementation is a callable ``step(slots, positions, tokens) -> logits [rows, vocab]``
over one ``KVCache``: row ``i`` feeds ``tokens[i]`` at position ``positions[i]`` of cache slot
``slots[i]`` and gets the next logits. The engine advances the lengths; the token loop, the
sampler and everything else are the same whichever step runs.

- ``eager``: plain torch ops (``MiniMindForCausalLM.decode``); any device, dtype, LoRA.
- ``native``: CPU float32 with the small ops in C (``native.py``).
- ``compiled``: the static-shape step over every slot of the cache (fixed buffers for ids and
  positions; rows that sit out write to the cache's scratch position) under ``torch.compile``,
  replayed as a CUDA graph on CUDA. The first call compiles (tens of seconds on a CPU, minutes
  for large models); a new cache shape compiles again.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import KVCache
from .model import MiniMindForCausalLM, Rows

DECODE_CHOICES = ("auto", "eager", "native", "compiled")


def _contiguous(slots: np.ndarray) -> slice | None:
    """``slice(a, b)`` when the slots are a, a+1, …, b-1 (their keys are then a view)."""
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
        return slice(int(slots[0]), int(slots[-1]) + 1)
    return None


class EagerStep:
    """Plain torch ops; the keys of the rows' slots are a view when the slots are contiguous."""

    name = "eager"

    def __init__(self, model: MiniMindForCausalLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache

    def __call__(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray
                 ) -> torch.Tensor:
        device = self.cache.device
        s = torch.as_tensor(slots, dtype=torch.long, device=device)
        p = torch.as_tensor(positions, dtype=torch.long, device=device)
        view = _contiguous(slots)
        where = Rows(s, p, view if view is not None else s, int(positions.max()) + 1)
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)[:, None]
        return self.model.decode(ids, self.cache, where)


class CompiledStep:
    """Every slot of the cache each step, all inputs in fixed buffers: compiled by torch.compile,
    and on CUDA captured once as a graph and replayed (one launch per token)."""

    name = "compiled"

    def __init__(self, model: MiniMindForCausalLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        device, n = cache.device, cache.slots
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.full((n,), cache.scratch, dtype=torch.long, device=device)
        self._where = Rows(torch.arange(n, device=device), self.positions, slice(0, n),
                           cache.max_len + 1)
        self._fn = torch.compile(self._step, dynamic=False, fullgraph=False)
        self.graph = None if device.type != "cuda" else False  # False: not captured yet
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        return self.model.decode(self.tokens, self.cache, self._where)

    def _capture(self) -> None:
        # warm up on a side stream (as torch.cuda.graphs requires), then record one step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._fn()

    def __call__(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray
                 ) -> torch.Tensor:
        device = self.cache.device
        pos = np.full(self.cache.slots, self.cache.scratch, dtype=np.int64)
        pos[slots] = positions
        ids = np.zeros(self.cache.slots, dtype=np.int64)
        ids[slots] = tokens
        self.positions.copy_(torch.from_numpy(pos))
        self.tokens.copy_(torch.from_numpy(ids)[:, None])
        self.model.set_dense_routing(True)  # MoE without data-dependent shapes
        try:
            if self.graph is None:
                logits = self._fn()
            else:
                if self.graph is False:
                    self._capture()
                self.graph.replay()
                logits = self.logits
        finally:
            self.model.set_dense_routing(False)
        return logits[torch.as_tensor(slots, dtype=torch.long, device=device)]
