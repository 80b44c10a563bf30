"""Sampling with mx ops: the same filters in the same order as ``minimind_core.sampling``
(temperature → top-k → top-p → min-p → draw; transformers' order).

mlx_lm's ``make_sampler`` applies top-p / min-p / top-k to the un-tempered log-probs and the
temperature only at the draw, so with temperature != 1 it keeps a different set of tokens than
the numpy and torch samplers; hence this module. The repetition penalty stays with mlx_lm's
logits processors (applied before the sampler, same convention as ours).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from minimind_core.params import SamplingParams

Sampler = Callable[[mx.array], mx.array]


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, top-k, top-p and min-p on logits (or log-probs) [B, V], as float32."""
    neg_inf = mx.array(-float("inf"), dtype=mx.float32)
    logits = logits.astype(mx.float32) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        # mx.topk leaves its k values unordered: the k-th largest is their minimum
        kth = mx.topk(logits, params.top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth, neg_inf, logits)
    if params.top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        remove_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) >= params.top_p
        # the most likely token always stays
        first = mx.arange(remove_sorted.shape[-1]) == 0
        remove_sorted = mx.logical_and(remove_sorted, mx.logical_not(first))
        remove = mx.put_along_axis(mx.zeros(remove_sorted.shape, dtype=mx.bool_), order,
                                   remove_sorted, axis=-1)
        logits = mx.where(remove, neg_inf, logits)
    if params.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < params.min_p * probs.max(axis=-1, keepdims=True), neg_inf, logits)
    return logits


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """One token per row of ``logits`` [B, V] as a uint32 array [B]; greedy when temperature is 0.

    ``key``: an ``mx.random.key`` for a reproducible draw; None draws from MLX's global state.
    """
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filter_logits(logits, params), axis=-1, key=key)


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler for ``mlx_lm.generate_step`` and the batch loop: log-probs [B, V] → tokens [B].

    With ``params.seed`` set, the sampler owns a PRNG key split once per call, so the same seed
    gives the same tokens and MLX's global random state is left alone.
    """
    if params.greedy or params.seed is None:
        return lambda logprobs: sample(logprobs, params)
    state = [mx.random.key(params.seed)]

    def seeded(logprobs: mx.array) -> mx.array:
        state[0], key = mx.random.split(state[0])
        return sample(logprobs, params, key)

    return seeded
