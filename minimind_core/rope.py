"""RoPE frequencies, with upstream's YaRN extrapolation (FORMATS.md), written once for both backends."""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``f_i`` [head_dim/2] (float32, as upstream computes them) and the
    attention factor that multiplies cos/sin.

    With YaRN on: ``b(r) = d ln(L0 / (2 pi r)) / (2 ln theta)``, ``low = max(floor(b(beta_fast)), 0)``,
    ``high = min(ceil(b(beta_slow)), d/2 - 1)``, ``ramp_i = clamp((i - low) / max(high - low, 0.001), 0, 1)``,
    ``f_i' = f_i (1 - ramp_i + ramp_i / factor)``, applied when max positions / L0 > 1.
    """
    d, theta = config.head_dim, float(config.rope_theta)
    exponent = np.arange(0, d, 2, dtype=np.float32)[: d // 2] / np.float32(d)
    freqs = (1.0 / np.power(np.float32(theta), exponent)).astype(np.float32)
    yarn = config.yarn
    if yarn is None:
        return freqs, 1.0
    orig = yarn["original_max_position_embeddings"]
    factor, attn_factor = yarn["factor"], float(yarn["attention_factor"])
    if config.max_position_embeddings / orig > 1.0:
        def b(r: float) -> float:
            return d * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(b(yarn["beta_fast"])), 0)
        high = min(math.ceil(b(yarn["beta_slow"])), d // 2 - 1)
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / max(high - low, 0.001), 0, 1)
        freqs = (freqs * (1 - ramp + ramp / factor)).astype(np.float32)
    return freqs, attn_factor


def rope_cos_sin(config: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [length, head_dim] in the rotate-half layout ``cat(cos(t f), cos(t f))``."""
    freqs, attn_factor = rope_frequencies(config)
    angles = np.outer(np.arange(length, dtype=np.float32), freqs).astype(np.float32)
    cos = np.concatenate([np.cos(angles), np.cos(angles)], axis=-1) * attn_factor
    sin = np.concatenate([np.sin(angles), np.sin(angles)], axis=-1) * attn_factor
    return cos.astype(np.float32), sin.astype(np.float32)
