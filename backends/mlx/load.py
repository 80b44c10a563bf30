"""Building, quantizing, saving and re-loading the MLX model (shared by MlxEngine and the converter).

Full-precision sources go through ``minimind_core.checkpoint`` (the one reader of every format);
quantized MLX folders, whose packed weights hide their shapes, load through mlx_lm's own
``load_model`` with this package's model class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from minimind_core.checkpoint import Checkpoint, CheckpointError
from minimind_core.dtypes import canonical_dtype

from .model import Model, model_classes

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
QUANT_MODE = "affine"
MAX_SHARD_BYTES = 5 << 30  # mlx_lm's shard size (5 GiB); one file below it
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """"float16" / "bf16" / mx.float32 … → mx dtype; anything else raises ValueError."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    return DTYPES[canonical_dtype(dtype)]


def check_quantization(bits: int | None, group_size: int) -> int | None:
    """Validate quantization settings; 0 / None mean full precision. Returns bits or None."""
    if bits in (None, 0, False):
        return None
    if bits not in QUANT_BITS or isinstance(bits, bool):
        raise ValueError(f"unsupported quantization bits {bits!r}; choose 4 or 8 (0 = full precision)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported quantization group size {group_size!r}; choose from "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return int(bits)


def build_model(ckpt: Checkpoint, dtype: mx.Dtype) -> Model:
    """Instantiate the MLX model for ``ckpt.config`` and load its weights in ``dtype``."""
    model = Model(ckpt.config)
    weights = {k: mx.array(np.ascontiguousarray(v)).astype(dtype) for k, v in ckpt.weights.items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def quantize(model: nn.Module, bits: int, group_size: int = 64) -> dict[str, Any]:
    """Quantize every Linear/Embedding whose input width the group size divides, as mlx_lm does.

    Returns the ``quantization`` block mlx_lm writes into config.json. Layers left out stay in full
    precision; loaders (ours and mlx_lm's) tell them apart by the absence of ``.scales``.
    """
    def predicate(_path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, mode=QUANT_MODE, class_predicate=predicate)
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits, "mode": QUANT_MODE}


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The quantization in force (bits, group size), or None for a full-precision model."""
    for _, module in model.named_modules():
        # QuantizedLinear, QuantizedEmbedding and mlx_lm's QuantizedSwitchLinear all carry these
        if all(hasattr(module, a) for a in ("bits", "group_size", "scales")):
            return {"group_size": module.group_size, "bits": module.bits,
                    "mode": getattr(module, "mode", QUANT_MODE)}
    return None


def save_weights(model: nn.Module | Mapping[str, mx.array], folder: Path,
                 max_shard_bytes: int | None = None) -> list[str]:
    """Write a model's parameters (or flat ``{name: array}`` weights) as ``model.safetensors``,
    or as shards plus an index above 5 GiB."""
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    params = model.parameters() if isinstance(model, nn.Module) else dict(model)
    weights = dict(sorted(tree_flatten(params)))
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(folder / WEIGHTS_FILE), shards[0], metadata={"format": "mlx"})
        return [WEIGHTS_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def read_config(folder: Path) -> dict[str, Any] | None:
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def is_quantized_folder(path: Path) -> bool:
    """An MLX folder whose config.json carries mlx_lm's quantization block."""
    if not path.is_dir():
        return False
    config = read_config(path) or {}
    block = config.get("quantization") or config.get("quantization_config")
    return isinstance(block, Mapping) and "bits" in block


def load_quantized_folder(path: Path, overrides: Mapping[str, Any] | None = None) -> Model:
    """Load a quantized MLX folder with mlx_lm's loader and this package's model class."""
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(path, get_model_classes=model_classes(overrides))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no model*.safetensors in this MLX folder") from None
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: the quantized weights do not match its config.json "
                              f"({msg}); re-convert it with python -m converters.to_mlx") from None
    return model
