"""MiniMind2-MoE as transformers' GraniteMoeShared: the one map between the two layouts.

The two compute the same block. GraniteMoeShared's router takes the softmax of the top-k router
logits, which is MiniMind2's softmax → top-k → renormalise (k > 1); its shared MLP is ungated and
added to the experts' sum like MiniMind2's shared experts; with the embedding, residual and logits
multipliers at 1 and the attention multiplier at 1/sqrt(head_dim), the rest is Llama's block.

Weights are written under the names the hub's Granite checkpoints carry
(``block_sparse_moe.input_linear`` [E, 2·ff, hidden], ``block_sparse_moe.output_linear``
[E, hidden, ff], ``block_sparse_moe.router.layer``): transformers 4.49 and later and vLLM load
them, and transformers 5 renames them on load to its own (``experts.gate_up_proj``,
``experts.down_proj``, ``router.weight``). The reader takes either spelling. Several shared experts
concatenate into one shared MLP ``shared_intermediate_size`` = ff × their number wide.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import ModelConfig, hf_common_fields

MODEL_TYPE = "granitemoeshared"
ARCHITECTURE = "GraniteMoeSharedForCausalLM"
MIN_TRANSFORMERS = "4.49.0"  # the first release with GraniteMoeShared
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")

# Written names (the hub's); transformers 5's own names read back as well.
ROUTER = "block_sparse_moe.router.layer.weight"
EXPERTS_GATE_UP = "block_sparse_moe.input_linear.weight"
EXPERTS_DOWN = "block_sparse_moe.output_linear.weight"
SHARED_GATE_UP = "shared_mlp.input_linear.weight"
SHARED_DOWN = "shared_mlp.output_linear.weight"
_READ_NAMES = {
    ROUTER: ROUTER, "block_sparse_moe.router.weight": ROUTER,
    EXPERTS_GATE_UP: EXPERTS_GATE_UP, "block_sparse_moe.experts.gate_up_proj": EXPERTS_GATE_UP,
    EXPERTS_DOWN: EXPERTS_DOWN, "block_sparse_moe.experts.down_proj": EXPERTS_DOWN,
    SHARED_GATE_UP: SHARED_GATE_UP, SHARED_DOWN: SHARED_DOWN,
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe\..+|shared_mlp\..+)$")


def check_expressible(config: ModelConfig) -> None:
    """Raise ValueError when GraniteMoeShared cannot compute this MiniMind2-MoE exactly."""
    fix = "export upstream's own layout instead: layout='minimind' (CLI: --layout minimind)"
    if not config.renormalize_topk:
        raise ValueError(
            f"this MiniMind2-MoE weights its top-{config.num_experts_per_tok} experts by their "
            f"softmax probabilities without renormalising them (top-1 routing, or "
            f"norm_topk_prob=False), which GraniteMoeShared cannot express; {fix}")
    if config.num_attention_heads * config.head_dim != config.hidden_size:
        raise ValueError(
            f"heads × head_dim = {config.num_attention_heads} × {config.head_dim} differs from "
            f"hidden_size {config.hidden_size}, and vLLM's GraniteMoeShared derives head_dim from "
            f"hidden_size; {fix}")


def granite_config(config: ModelConfig) -> dict[str, Any]:
    """config.json fields of the GraniteMoeShared form of a MiniMind2-MoE ``config``."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        **hf_common_fields(config),
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "intermediate_size": config.intermediate_size,  # one expert's FFN width
        "shared_intermediate_size": config.intermediate_size * config.n_shared_experts,
        "attention_multiplier": 1.0 / math.sqrt(config.head_dim),
        **{name: 1.0 for name in MULTIPLIERS},
        "output_router_logits": False,
    }


def check_granite_json(data: Mapping[str, Any], source: Any) -> None:
    """Refuse a GraniteMoeShared config.json that is not a MiniMind2-MoE export (scaled
    embeddings, residuals, logits or attention compute something else). Raises ValueError."""
    if data.get("model_type") != MODEL_TYPE:
        return
    heads = data.get("num_attention_heads") or 1
    head_dim = data.get("head_dim") or (data.get("hidden_size") or heads) // heads
    want = {**{name: 1.0 for name in MULTIPLIERS}, "attention_multiplier": head_dim ** -0.5}
    for name, value in want.items():
        got = data.get(name, 1.0)
        if not isinstance(got, (int, float)) or not math.isclose(got, value, rel_tol=1e-6):
            raise ValueError(
                f"{source}: a GraniteMoeShared model with {name}={got!r} (a MiniMind2-MoE export "
                f"has {value:.6g}); it is not a MiniMind model, so minimind-core cannot run it")


def to_granite(weights: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Checkpoint names → GraniteMoeShared's: router renamed, experts stacked, shared experts
    concatenated (gate rows, then up rows; down columns in the same order). Head left out (tied)."""
    out: dict[str, np.ndarray] = {}
    moe_layers = set()
    for key, value in weights.items():
        if ".mlp." not in key:
            if key != "lm_head.weight":
                out[key] = value
            continue
        moe_layers.add(key.split(".mlp.")[0])
    for p in sorted(moe_layers):
        m = p + ".mlp"
        experts = range(config.num_experts)
        out[f"{p}.{ROUTER}"] = weights[f"{m}.gate.weight"]
        out[f"{p}.{EXPERTS_GATE_UP}"] = np.stack([np.concatenate(
            [weights[f"{m}.experts.{e}.gate_proj.weight"], weights[f"{m}.experts.{e}.up_proj.weight"]])
            for e in experts])
        out[f"{p}.{EXPERTS_DOWN}"] = np.stack([weights[f"{m}.experts.{e}.down_proj.weight"]
                                               for e in experts])
        shared = [f"{m}.shared_experts.{s}" for s in range(config.n_shared_experts)]
        if shared:
            out[f"{p}.{SHARED_GATE_UP}"] = np.concatenate(
                [weights[f"{s}.gate_proj.weight"] for s in shared]
                + [weights[f"{s}.up_proj.weight"] for s in shared])
            out[f"{p}.{SHARED_DOWN}"] = np.concatenate(
                [weights[f"{s}.down_proj.weight"] for s in shared], axis=1)
    return out


def from_granite(weights: dict[str, np.ndarray], config_json: Mapping[str, Any] | None = None,
                 source: Any = "checkpoint") -> dict[str, np.ndarray]:
    """GraniteMoeShared names (either spelling) → checkpoint names; other weights pass through.

    The expert width comes from the stacked experts, so the shared MLP splits back into as many
    shared experts as it is expert widths wide. ``config_json`` (the config.json beside the
    weights) is checked with ``check_granite_json``; ValueError names ``source`` and the tensor.
    """
    if config_json:
        check_granite_json(config_json, source)
    layers: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        m = _LAYER_KEY.match(key)
        if m and m.group(2) in _READ_NAMES:
            layers.setdefault(f"model.layers.{m.group(1)}", {})[_READ_NAMES[m.group(2)]] = value
        else:
            out[key] = value
    for p, parts in layers.items():
        missing = {ROUTER, EXPERTS_GATE_UP, EXPERTS_DOWN} - set(parts)
        if missing:
            raise ValueError(f"{source}: {p} has GraniteMoeShared weights but no {p}.{min(missing)}")
        gate_up, down = parts[EXPERTS_GATE_UP], parts[EXPERTS_DOWN]
        if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[1] % 2:
            raise ValueError(f"{source}: {p}.{EXPERTS_GATE_UP} {list(gate_up.shape)} and {EXPERTS_DOWN} "
                             f"{list(down.shape)}: expected [E, 2·ff, hidden] and [E, hidden, ff]")
        ff = gate_up.shape[1] // 2
        out[f"{p}.mlp.gate.weight"] = parts[ROUTER]
        for e in range(gate_up.shape[0]):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :ff]
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = gate_up[e, ff:]
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = down[e]
        if SHARED_GATE_UP in parts or SHARED_DOWN in parts:
            out.update(_split_shared(p, parts, ff, source))
    return out


def _split_shared(p: str, parts: Mapping[str, np.ndarray], ff: int,
                  source: Any) -> dict[str, np.ndarray]:
    gate_up, down = parts.get(SHARED_GATE_UP), parts.get(SHARED_DOWN)
    if (gate_up is None or down is None or gate_up.ndim != 2 or down.ndim != 2
            or gate_up.shape[0] % (2 * ff) or down.shape[1] * 2 != gate_up.shape[0]):
        shapes = [list(getattr(t, "shape", [])) for t in (gate_up, down)]
        raise ValueError(f"{source}: {p}.shared_mlp: input/output_linear {shapes[0]} / {shapes[1]} are not "
                         f"[2·S·{ff}, hidden] / [hidden, S·{ff}] for S shared experts of width {ff}")
    width = gate_up.shape[0] // 2
    out = {}
    for s in range(width // ff):
        rows = slice(s * ff, (s + 1) * ff)
        out[f"{p}.mlp.shared_experts.{s}.gate_proj.weight"] = gate_up[:width][rows]
        out[f"{p}.mlp.shared_experts.{s}.up_proj.weight"] = gate_up[width:][rows]
        out[f"{p}.mlp.shared_experts.{s}.down_proj.weight"] = down[:, rows]
    return out


def installed_transformers_too_old() -> str | None:
    """The installed transformers' version when it predates GraniteMoeShared, else None (also
    when transformers is not installed: the folder may be meant for another machine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
    except PackageNotFoundError:
        return None
    return installed if _release(installed) < _release(MIN_TRANSFORMERS) else None


def _release(v: str) -> tuple[int, ...]:
    """"4.48.3" / "5.0.0rc1" → (4, 48, 3) / (5, 0, 0): the numeric release, enough to compare."""
    return tuple(int(m.group()) if (m := re.match(r"\d+", part)) else 0
                 for part in v.split(".")[:3])
