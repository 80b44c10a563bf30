"""MiniMind2-MoE as stock mlx_lm's ``bailing_moe``: the weight-name map in both directions.

``bailing_moe`` computes MiniMind2-MoE exactly (rotate-half RoPE, softmax router renormalised only
when top-k > 1, ungated shared experts) under its own names: q/k/v fused as
``attention.query_key_value``, the shared experts one wider FFN. ``converters.to_mlx`` writes it
(``to_bailing_moe``); ``checkpoint.py`` and the MLX model read it back (``from_bailing_moe``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError

BAILING_MOE = "bailing_moe"
_BAILING_RENAMES = (("model.embed_tokens.", "model.word_embeddings."),
                    (".self_attn.o_proj.", ".attention.dense."),
                    (".mlp.gate.", ".mlp.gate.gate_proj."))
_QKV = re.compile(r"^(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(\w+)$")
_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.shared_experts)\.(\d+)\.(\w+_proj)\.(\w+)$")
_BAILING_QKV = re.compile(r"^(model\.layers\.\d+)\.attention\.query_key_value\.(\w+)$")
_BAILING_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.shared_experts)\.(\w+_proj)\.(\w+)$")


def to_bailing_moe(weights: Mapping[str, Any], concatenate: Any) -> dict[str, Any]:
    """Our names → bailing_moe's: q/k/v rows joined into ``attention.query_key_value``, the
    shared experts joined into one wider FFN (gate/up rows, down columns), the router under
    ``mlp.gate.gate_proj``, the embedding as ``word_embeddings``.

    Works on quantized weights too (``.weight``/``.scales``/``.biases`` are joined alike) and on
    any array type; ``concatenate(arrays, axis)`` is numpy's or mlx's.
    """
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    shared: dict[tuple[str, str, str], dict[int, Any]] = {}
    for key, value in weights.items():
        if m := _QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m := _SHARED.match(key):
            shared.setdefault((m.group(1), m.group(3), m.group(4)), {})[int(m.group(2))] = value
        else:
            for ours, theirs in _BAILING_RENAMES:
                if ours in f".{key}":
                    key = f".{key}".replace(ours, theirs, 1)[1:]
                    break
            out[key] = value
    for (layer, param), parts in qkv.items():
        out[f"{layer}.attention.query_key_value.{param}"] = concatenate(
            [parts["q"], parts["k"], parts["v"]], 0)
    for (base, proj, param), parts in shared.items():
        out[f"{base}.{proj}.{param}"] = concatenate(
            [parts[s] for s in sorted(parts)], -1 if proj == "down_proj" else 0)
    return out


def from_bailing_moe(weights: Mapping[str, Any], *, heads: int, kv_heads: int, head_dim: int,
                     n_shared: int) -> dict[str, Any]:
    """bailing_moe's names → ours (the inverse of ``to_bailing_moe``), for any array type."""
    out: dict[str, Any] = {}
    q, kv = heads * head_dim, kv_heads * head_dim
    for key, value in weights.items():
        if m := _BAILING_QKV.match(key):
            layer, param = m.groups()
            if value.shape[0] != q + 2 * kv:
                raise CheckpointError(f"{key}: {value.shape[0]} rows, but {heads} heads and "
                                      f"{kv_heads} kv heads of {head_dim} need {q + 2 * kv}")
            for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)),
                               ("v", slice(q + kv, q + 2 * kv))):
                out[f"{layer}.self_attn.{name}_proj.{param}"] = value[rows]
        elif (m := _BAILING_SHARED.match(key)) and n_shared:
            base, proj, param = m.groups()
            axis = -1 if proj == "down_proj" else 0
            width = value.shape[axis]
            if width % n_shared:
                raise CheckpointError(f"{key}: width {width} does not split into {n_shared} "
                                      f"shared experts")
            step = width // n_shared
            for s in range(n_shared):
                part = value[..., s * step:(s + 1) * step] if axis else value[s * step:(s + 1) * step]
                out[f"{base}.{s}.{proj}.{param}"] = part
        else:
            for ours, theirs in _BAILING_RENAMES:
                if theirs in f".{key}":
                    key = f".{key}".replace(theirs, ours, 1)[1:]
                    break
            out[key] = value
    return out


def bailing_moe_layout(data: Mapping[str, Any], path: Path) -> dict[str, int]:
    """The numbers ``from_bailing_moe`` needs, from a bailing_moe config.json."""
    try:
        heads = int(data["num_attention_heads"])
        layout = {"heads": heads, "kv_heads": int(data["num_key_value_heads"]),
                  "head_dim": int(data["hidden_size"]) // heads,
                  "n_shared": int(data.get("num_shared_experts") or 0)}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: a bailing_moe config.json without valid head counts "
                              f"({e!r}); re-convert it with python -m converters.to_mlx") from None
    return layout
