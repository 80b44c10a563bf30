"""The one sampler: pure numpy functions on [rows, vocab] logits, seeded per row.

Filter order (transformers'): repetition penalty → temperature → top-k → top-p → min-p → draw.
Each filter sets the logits it removes to -inf and always keeps the most likely token.

The draw is an inverse-CDF pick with a *counter-based* uniform: ``uniform(seed, step)`` is a pure
function of the row's seed and the index of the token being drawn (splitmix64 of both), not a
random stream. So a request draws the same tokens whether it runs alone or as any row of a batch,
streamed or not, and whichever decode implementation produced its logits; a device sampler
(``backends/torch/sampling.py``) computes the same uniforms with integer ops on the device.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from .params import SamplingParams

NEG_INF = np.float32(-np.inf)
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers
SEED_SALT = 0x6A09E667F3BCC909  # keeps seed 0 away from the all-zero state


def new_seed() -> int:
    """A fresh 63-bit seed for a request that gave none (still counter-based from there on)."""
    return secrets.randbits(63)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def uniform(seeds: Sequence[int] | np.ndarray, steps: Sequence[int] | np.ndarray) -> np.ndarray:
    """float64 [rows] in [0, 1): the uniform of draw ``steps[i]`` of the row seeded ``seeds[i]``.

    ``u = (mix(mix(seed ^ salt) + (step + 1) * golden) >> 11) / 2**53``; any int64 seed is taken
    modulo 2**64.
    """
    with np.errstate(over="ignore"):
        s = np.asarray([int(x) % (1 << 64) for x in np.atleast_1d(seeds)], dtype=np.uint64)
        t = np.asarray(np.atleast_1d(steps), dtype=np.uint64)
        key = _mix(s ^ np.uint64(SEED_SALT))
        x = _mix(key + (t + np.uint64(1)) * np.uint64(GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


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


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature → top-k → top-p → min-p on float32 logits [rows, vocab] (after the penalty)."""
    logits = top_k(np.asarray(logits, dtype=np.float32) / np.float32(params.temperature),
                   params.top_k)
    return min_p(top_p(logits, params.top_p), params.min_p)


def draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF pick of one token per row from filtered logits, with uniforms ``u`` [rows]."""
    cdf = np.cumsum(softmax(logits.astype(np.float64)), axis=-1)
    idx = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=-1)
    return np.minimum(idx, logits.shape[-1] - 1).astype(np.int64)


def sample(logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams],
           histories: Sequence[Sequence[int]], seeds: Sequence[int], steps: Sequence[int]
           ) -> np.ndarray:
    """One token per row of ``logits`` [rows, vocab] → int64 [rows].

    ``params`` is one SamplingParams for every row or one per row; ``histories`` each row's
    prompt + generated ids (read by the repetition penalty only); ``seeds`` and ``steps`` pick
    each row's uniform (``uniform``). Greedy rows (temperature 0) take the argmax.
    """
    logits = np.asarray(logits, dtype=np.float32)
    rows = logits.shape[0]
    per_row = [params] * rows if isinstance(params, SamplingParams) else list(params)
    out = np.empty(rows, dtype=np.int64)
    groups: dict[SamplingParams, list[int]] = {}
    for i, p in enumerate(per_row):
        groups.setdefault(p, []).append(i)
    for p, idx in groups.items():
        part = repetition_penalty(logits[idx], [histories[i] for i in idx], p.repetition_penalty,
                                  p.repetition_context_size)
        if p.greedy:
            out[idx] = part.argmax(axis=-1)
        else:
            u = uniform([seeds[i] for i in idx], [steps[i] for i in idx])
            out[idx] = draw(filter_logits(part, p), u)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64 for the sums, returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], top: int) -> list:
    """For each row of raw logits [rows, vocab]: the chosen token's logprob and the ``top``
    likeliest (ties: lower id first) as ``TokenLogprob``."""
    from .params import TokenLogprob

    lp = log_softmax(logits)
    out = []
    for row, token in zip(lp, tokens):
        best = []
        if top:
            ids = np.argpartition(-row, min(top, row.shape[0] - 1))[:top]
            ids = sorted(ids.tolist(), key=lambda i: (-row[i], i))
            best = [(int(i), float(row[i])) for i in ids]
        out.append(TokenLogprob(int(token), float(row[int(token)]), best))
    return out
