"""Sampling as pure numpy functions on [batch, vocab] logits (transformers' order of filters).

Order: repetition penalty → temperature → top-k → top-p → min-p → draw. Each filter sets the
logits it removes to -inf and always keeps the most likely token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import SamplingParams

NEG_INF = np.float32(-np.inf)


def repetition_penalty(logits: np.ndarray, histories: Sequence[Sequence[int]], penalty: float,
                       context: int | None) -> np.ndarray:
    """Divide positive / multiply negative logits of tokens seen in each row's recent history."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, history in enumerate(histories):
        recent = history[-context:] if context else history
        if not len(recent):
            continue
        ids = np.unique(np.asarray(recent, dtype=np.int64))
        vals = out[row, ids]
        out[row, ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, NEG_INF, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    remove_sorted = mass_before >= p
    remove_sorted[:, 0] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, logits)


def min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``p`` times the top token's."""
    if p <= 0.0:
        return logits
    probs = softmax(logits)
    keep = probs >= p * probs.max(axis=-1, keepdims=True)
    return np.where(keep, logits, NEG_INF)


def sample(logits: np.ndarray, params: SamplingParams, histories: Sequence[Sequence[int]],
           rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of ``logits`` [B, V]; returns int64 [B]."""
    logits = np.asarray(logits, dtype=np.float32)
    logits = repetition_penalty(logits, histories, params.repetition_penalty,
                                params.repetition_context_size)
    if params.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = top_k(logits / np.float32(params.temperature), params.top_k)
    logits = min_p(top_p(logits, params.top_p), params.min_p)
    probs = softmax(logits.astype(np.float64))
    u = rng.random((probs.shape[0], 1))
    idx = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)
