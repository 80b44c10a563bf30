"""LoRA on the MLX backend: unmerged (default), merged, hot-swapped, removed; mlx_lm adapter folders.

Unmerged: each LoRA module (``q_proj`` / ``o_proj``) is wrapped in mlx_lm's own ``LoRALinear`` with
``scale`` 1.0, ``lora_a = A^T`` and ``lora_b = B^T``, so ``y = W x + B (A x)`` exactly as upstream —
and exactly what stock ``mlx_lm.load(folder, adapter_path=...)`` builds from the adapter folder
``write_adapter`` writes. Merged: the module is replaced by one holding ``W + B @ A``
(``minimind_core.lora.lora_delta``, summed in float32; a quantized layer is dequantized, merged and
quantized again with its own settings). Either way the original module objects are kept — MLX
arrays are immutable — and putting them back restores the base model bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.lora import LoRALinear

from minimind_core.config import ModelConfig
from minimind_core.lora import (
    LoRA,
    LoraError,
    load_lora,
    lora_delta,
)

if TYPE_CHECKING:  # the backend's engine; its module imports this one
    from minimind_core.engine import Engine as MlxEngine


def set_lora(engine: MlxEngine, lora: str | Path | LoRA | None, merge: bool = False) -> None:
    """Apply the adapter ``lora`` (a path or a read LoRA), replacing any other; None removes it.

    The adapter is read and validated before anything changes, so a bad file leaves the engine
    as it was. ``merge=True`` folds ``W + B @ A`` into the weights (faster decoding).
    """
    with engine.exclusive():
        new = None if lora is None else load_lora(lora, engine.config)
        if new is not None:
            for name in new.modules:  # every module must be a plain linear here (not an expert row)
                _linear(engine.model, name)
        _remove(engine)
        if new is None:
            return
        dtype = engine.model.model.norm.weight.dtype  # the compute dtype, also when quantized
        originals = {}
        for name, (a, b) in new.modules.items():
            parent, leaf, base = _locate(engine.model, name)
            originals[name] = base
            layer = _merged(base, a, b) if merge else _wrapped(base, a, b, dtype)
            parent.update_modules({leaf: layer})
        mx.eval(engine.model.parameters())
        engine._lora_originals = originals
        engine.lora_path = str(new.path) if new.path is not None else "<in memory>"
        engine.info["lora_merged"] = merge


def _remove(engine: MlxEngine) -> None:
    for name, base in getattr(engine, "_lora_originals", {}).items():
        parent, leaf, _ = _locate(engine.model, name)
        parent.update_modules({leaf: base})
    engine._lora_originals = {}
    engine.lora_path = None
    engine.info.pop("lora_merged", None)


def _wrapped(base: nn.Module, a: np.ndarray, b: np.ndarray, dtype: mx.Dtype) -> LoRALinear:
    layer = LoRALinear.from_base(base, r=a.shape[0], dropout=0.0, scale=1.0)
    layer.lora_a = mx.array(np.ascontiguousarray(a.T)).astype(dtype)  # [in, r]
    layer.lora_b = mx.array(np.ascontiguousarray(b.T)).astype(dtype)  # [r, out]
    return layer


def _merged(base: nn.Module, a: np.ndarray, b: np.ndarray) -> nn.Module:
    quantized = isinstance(base, nn.QuantizedLinear)
    if quantized:
        weight = mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size,
                               bits=base.bits, mode=base.mode)
    else:
        weight = base.weight
    out_dims, in_dims = weight.shape
    fused = nn.Linear(in_dims, out_dims, bias=False)
    fused.weight = (weight.astype(mx.float32) + mx.array(lora_delta(a, b))).astype(weight.dtype)
    if quantized:
        return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
    return fused


def _locate(model: nn.Module, name: str) -> tuple[Any, str, nn.Module]:
    """(parent module, attribute name, module) for ``model.layers.0.self_attn.q_proj``."""
    node: Any = model
    *path, leaf = name.split(".")
    try:
        for part in path:
            node = node[int(part)] if isinstance(node, list) else getattr(node, part)
        return node, leaf, getattr(node, leaf)
    except (AttributeError, IndexError, ValueError):
        raise LoraError(f"LoRA module {name}: the MLX model has no such module") from None


def _linear(model: nn.Module, name: str) -> nn.Module:
    _, _, module = _locate(model, name)
    base = module.linear if isinstance(module, LoRALinear) else module
    if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
        raise LoraError(f"LoRA module {name} is a {type(base).__name__} in the MLX model, not a "
                        f"linear layer; merge the adapter into the weights first "
                        f"(python -m converters.merge_lora)")
    return base


# --- mlx_lm adapter folders ---------------------------------------------------------------------

def adapter_folder_contents(lora: LoRA, config: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and ``adapter_config.json`` of an mlx_lm adapter folder equal to ``lora``.

    mlx_lm builds one rank and one set of layer ``keys`` for all ``num_layers`` layers, so
    modules of smaller rank are padded with zero rows/columns and absent modules get zero
    tensors — both add exactly nothing — and ``scale`` is 1.0 (upstream has no scaling).
    """
    rank = lora.rank
    leaves = sorted({name.split(".", 3)[3] for name in lora.modules})  # self_attn.q_proj, ...
    dims = {}
    tensors: dict[str, np.ndarray] = {}
    for name, (a, b) in lora.modules.items():
        a_pad = np.zeros((rank, a.shape[1]), np.float32)
        b_pad = np.zeros((b.shape[0], rank), np.float32)
        a_pad[: a.shape[0]], b_pad[:, : b.shape[1]] = a, b
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(a_pad.T)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(b_pad.T)
        dims[name.split(".", 3)[3]] = (a.shape[1], b.shape[0])
    for i in range(config.num_hidden_layers):
        for leaf in leaves:
            name = f"model.layers.{i}.{leaf}"
            if f"{name}.lora_a" not in tensors:
                d_in, d_out = dims[leaf]
                tensors[f"{name}.lora_a"] = np.zeros((d_in, rank), np.float32)
                tensors[f"{name}.lora_b"] = np.zeros((rank, d_out), np.float32)
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": config.num_hidden_layers,
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": leaves},
        "minimind": {"source": str(lora.path) if lora.path else None,
                     "note": "upstream MiniMind LoRA: y = W x + B (A x), no scaling"},
    }
    return tensors, adapter_config
