"""Sampling on the device, with no host sync: the same filters and order as
``minimind_core.sampling`` (temperature → top-k → top-p → min-p → draw).

The draw is ``argmax(p / E)`` with ``E ~ Exp(1)``, which picks index i with probability p_i
(the exponential-race form of Gumbel-max) and needs no ``multinomial`` (gpt-fast's trick).
Repetition penalty needs each row's history, so requests that use it sample on the host.
"""

from __future__ import annotations

import torch

from minimind_core.params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on float32 logits [B, V]."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = logits.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        remove_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True),
                                    float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] as an int64 device tensor [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def on_device(params: SamplingParams) -> bool:
    """Whether these parameters can be sampled without the token history."""
    return params.repetition_penalty == 1.0
