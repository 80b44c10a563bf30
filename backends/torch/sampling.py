"""The sampler of ``minimind_core.sampling`` on the device: same contract, same filter order
(repetition penalty → temperature → top-k → top-p → min-p), same counter-based uniforms.

Used where moving [rows, vocab] logits to the host per token would cost more than the step (CUDA):
only the drawn ids cross. The uniforms are splitmix64 in int64 arithmetic (wrapping multiply,
masked shifts for the unsigned ones), so they are bit-identical to the host's; the draw is the
same inverse-CDF pick in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from minimind_core.params import SamplingParams
from minimind_core.sampling import GOLDEN, MIX1, MIX2, SEED_SALT


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _i64(MIX1)
    z = (z ^ _shr(z, 27)) * _i64(MIX2)
    return z ^ _shr(z, 31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """float64 [rows] in [0, 1): ``minimind_core.sampling.uniform`` on int64 device tensors."""
    key = _mix(seeds ^ _i64(SEED_SALT))
    x = _mix(key + (steps + 1) * _i64(GOLDEN))
    return _shr(x, 11).to(torch.float64) * 2.0 ** -53


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on float32 logits [rows, vocab]."""
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


def _penalise(logits: torch.Tensor, histories: Sequence[Sequence[int]], p: SamplingParams
              ) -> torch.Tensor:
    if p.repetition_penalty == 1.0:
        return logits
    out = logits.float().clone()
    for row, history in enumerate(histories):
        recent = history[-p.repetition_context_size:] if p.repetition_context_size else history
        if len(recent):
            ids = torch.as_tensor(sorted(set(recent)), dtype=torch.long, device=out.device)
            vals = out[row, ids]
            out[row, ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                                        vals * p.repetition_penalty)
    return out


def sample(logits: torch.Tensor, rows: Sequence) -> np.ndarray:
    """One token per row (``rows``: the token loop's rows, with params, history, seed and the
    number drawn so far) → int64 numpy [rows]."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    groups: dict[SamplingParams, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.params, []).append(i)
    for p, idx in groups.items():
        at = torch.as_tensor(idx, dtype=torch.long, device=logits.device)
        part = _penalise(logits[at].float(), [rows[i].history for i in idx], p)
        if p.greedy:
            out[at] = part.argmax(dim=-1)
            continue
        seeds = torch.as_tensor([_i64(int(rows[i].seed) % (1 << 64)) for i in idx],
                                dtype=torch.long, device=logits.device)
        steps = torch.as_tensor([rows[i].drawn for i in idx], dtype=torch.long,
                                device=logits.device)
        u = uniform(seeds, steps)
        cdf = filter_logits(part, p).double().softmax(dim=-1).cumsum(dim=-1)
        pick = (cdf < (u * cdf[:, -1])[:, None]).sum(dim=-1)
        out[at] = pick.clamp(max=logits.shape[-1] - 1)
    return out.cpu().numpy()
