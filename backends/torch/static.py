"""The speed path: a static-shape decode step, replayed as a CUDA graph (or compiled).

Eager decoding of a 26M model is launch-bound: ~400 small kernels a token. Here every input of
the step (token ids, position, cache, padding) lives in a fixed device buffer, so the whole step
is captured once per (batch bucket, cache length) and replayed with one launch. Sampling stays on
the device and tokens come back to the host in blocks of ``sync_every`` steps, so there is no
host sync per token; a stop found inside a block just discards the rest of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from minimind_core.params import SamplingParams

from . import sampling
from .cache import KVCache
from .model import MiniMindForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(n: int) -> int:
    """The captured batch size that serves ``n`` rows (rows beyond n are padding)."""
    return next((b for b in BATCH_BUCKETS if b >= n), n)


class StaticDecoder:
    """One decode step over a fixed cache; ``mode`` is "graph" (CUDA), "compile" or "eager"."""

    def __init__(self, model: MiniMindForCausalLM, cache: KVCache, mode: str) -> None:
        self.model, self.cache, self.mode = model, cache, mode
        device = cache.k.device
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        model.rope(cache.max_len, device, cache.k.dtype)
        self._fn = self._step
        if mode == "compile":
            self._fn = torch.compile(self._step, dynamic=False, fullgraph=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        logits = self.model.decode_static(self.tokens, self.cache, self.pos)
        self.pos.add_(1)
        return logits

    def _capture(self) -> None:
        # warm up on a side stream (as torch.cuda.graphs requires), then record one step
        pos = self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.pos.copy_(pos)
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        self.pos.copy_(pos)
        with torch.cuda.graph(self.graph):
            self.logits = self._fn()
        self.pos.copy_(pos)

    def start(self, length: int) -> None:
        """Continue after a prefill that filled ``length`` positions."""
        self.pos.fill_(length)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (device tensor [B]); returns next logits [B, V]."""
        self.tokens.copy_(tokens.view(-1, 1))
        if self.mode == "graph":
            if self.graph is None:
                self._capture()
            self.graph.replay()
            return self.logits
        return self._fn()


def static_steps(engine, prompts: list[list[int]], params: SamplingParams, mode: str,
                 sync_every: int) -> Iterator[np.ndarray]:
    """The token loop of TorchEngine on the static path (see the module docstring)."""
    n = len(prompts)
    bucket = batch_bucket(n)
    rows = prompts + [prompts[0]] * (bucket - n)  # padding rows, dropped on the way out
    model = engine.model
    model.set_dense_routing(True)
    try:
        with torch.inference_mode():
            # room for the block that may run past max_new_tokens before the host sees a stop
            logits = engine._prefill(rows, max(map(len, rows)) + params.max_new_tokens + sync_every)
            decoder = engine._static_decoder(mode)
            decoder.start(engine.cache.length)
            generator = None
            if params.seed is not None and not params.greedy:
                generator = torch.Generator(device=engine.device).manual_seed(params.seed)
            token = sampling.sample(logits, params, generator)
            block = torch.empty(bucket, sync_every, dtype=torch.long, device=engine.device)
            first = token.cpu().numpy()
        yield first[:n]  # the first token at once: time to first token
        while True:
            # never past the cache: it may be clamped to the context window
            steps = min(sync_every, engine.cache.max_len - engine.cache.length)
            if steps <= 0:
                return
            with torch.inference_mode():
                for j in range(steps):
                    token = sampling.sample(decoder.step(token), params, generator)
                    block[:, j] = token
                    engine.cache.length += 1
                columns = block[:, :steps].cpu().numpy().T  # the one host sync of the block
            for column in columns:
                yield column[:n]
    finally:
        model.set_dense_routing(False)
