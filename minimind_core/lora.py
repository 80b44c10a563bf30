"""LoRA adapters: read upstream MiniMind LoRA files, validate them against a model, merge them.

Upstream (``model/model_lora.py``) attaches a LoRA to every ``nn.Linear`` whose input and output
widths are equal — ``self_attn.q_proj`` and ``self_attn.o_proj`` in every released model — and
saves ``{module}.lora.A.weight`` [rank, in] and ``{module}.lora.B.weight`` [out, rank]. The update is
``y = W x + B (A x)`` with no alpha and no scaling, so merging is ``W' = W + B @ A``
(``lora_delta``, the one place that formula lives). Backend-free: numpy only; reading a ``.pth``
needs torch, as for checkpoints.

mlx_lm adapter folders (``adapters.safetensors`` + ``adapter_config.json``, as written by
``python -m converters.to_mlx --lora-adapter-out``) read back too: their ``lora_a`` [in, r] and
``lora_b`` [r, out] with ``scale`` s become ``A = lora_a^T`` and ``B = s * lora_b^T``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import LoRA, LoraError, lora_delta, merge_into
from .checkpoint import (
    Bf16,
    CheckpointError,
    check_finite,
    expected_shapes,
    read_tensor_file,
    strip_prefixes,
)
from .config import ModelConfig

__all__ = ["LoRA", "LoraError", "load_lora", "lora_delta", "merge_into", "read_lora",
           "validate_lora"]

_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<part>[AB])\.weight$")
_MLX_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[ab])$")
MLX_ADAPTER_FILE = "adapters.safetensors"
MLX_ADAPTER_CONFIG = "adapter_config.json"


# --- reading ------------------------------------------------------------------------------------

def read_lora(path: str | Path) -> LoRA:
    """Read an upstream LoRA file (``.pth`` / ``.safetensors``) or an mlx_lm adapter folder.

    Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are stripped; each module needs
    both A [rank, in] and B [out, rank] with the same rank. Use ``load_lora`` to also check the
    adapter against a model.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path} (upstream keeps them in "
                                f"out/lora/{{name}}_{{hidden}}.pth)")
    if path.is_dir():
        return _read_mlx_adapter(path)
    try:
        raw = read_tensor_file(path)
    except ValueError as e:  # CheckpointError: say it is the LoRA that failed
        raise LoraError(f"cannot read the LoRA file: {e}") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    dtypes: set[str] = set()
    others = []
    for key, value in raw.items():
        key = strip_prefixes(key)
        m = _KEY.match(key)
        if not m:
            others.append(key)
            continue
        arr, dtype = _as_float32(value)
        dtypes.add(dtype)
        parts.setdefault(m["module"], {})[m["part"]] = arr
    if not parts:
        raise LoraError(f"{path}: not a LoRA file (no '<module>.lora.A.weight' keys; found e.g. "
                        f"{', '.join(others[:3]) or 'nothing'}); a base model goes in the path "
                        f"argument and the adapter in lora=")
    if others:
        raise LoraError(f"{path}: mixes LoRA and other tensors (e.g. {others[0]!r}); pass a LoRA "
                        f"file saved by upstream's save_lora")
    modules = {}
    for name in sorted(parts, key=_natural):
        got = parts[name]
        if set(got) != {"A", "B"}:
            missing = ({"A", "B"} - set(got)).pop()
            raise LoraError(f"{path}: LoRA module {name} has no {name}.lora.{missing}.weight")
        a, b = got["A"], got["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{path}: LoRA module {name} has A {list(a.shape)} and B "
                            f"{list(b.shape)}; expected A [rank, in] and B [out, rank]")
        modules[name] = (a, b)
    _check_finite(modules, path)
    file_dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    return LoRA(modules, path, file_dtype)


def _check_finite(modules: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """A NaN or an infinity in A or B would turn every output of that module into garbage."""
    tensors = {f"{name}.lora.{part}.weight": arr for name, pair in modules.items()
               for part, arr in zip("AB", pair)}
    try:
        check_finite(tensors, path, what="LoRA tensor")
    except CheckpointError as e:
        raise LoraError(str(e)) from None


def _read_mlx_adapter(folder: Path) -> LoRA:
    weights_file, config_file = folder / MLX_ADAPTER_FILE, folder / MLX_ADAPTER_CONFIG
    if not weights_file.is_file() or not config_file.is_file():
        raise LoraError(f"{folder}: a folder, but not an mlx_lm adapter folder (needs "
                        f"{MLX_ADAPTER_FILE} and {MLX_ADAPTER_CONFIG}); pass a LoRA .pth file")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise LoraError(f"{config_file}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{config_file}: must hold a JSON object, not a {type(cfg).__name__}")
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise LoraError(f"{folder}: fine_tune_type {cfg.get('fine_tune_type')!r} is not supported "
                        f"(only plain 'lora')")
    params = cfg.get("lora_parameters", {})
    scale = params.get("scale", 20.0) if isinstance(params, dict) else None  # mlx_lm's default
    if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
            or not np.isfinite(scale)):
        raise LoraError(f"{config_file}: lora_parameters.scale must be a finite number, got "
                        f"{scale!r}")
    try:
        raw = read_tensor_file(weights_file)
    except ValueError as e:
        raise LoraError(f"cannot read the LoRA file: {e}") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        m = _MLX_KEY.match(key)
        if not m:
            raise LoraError(f"{weights_file}: unexpected key {key!r} (only lora_a/lora_b supported)")
        parts.setdefault(m["module"], {})[m["part"]] = _as_float32(value)[0]
    modules = {}
    for name in sorted(parts, key=_natural):
        got = parts[name]
        if set(got) != {"lora_a", "lora_b"}:
            raise LoraError(f"{weights_file}: module {name} lacks lora_a or lora_b")
        a, b = got["lora_a"], got["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise LoraError(f"{weights_file}: module {name} has lora_a {list(a.shape)} and lora_b "
                            f"{list(b.shape)}; expected [in, rank] and [rank, out]")
        modules[name] = (np.ascontiguousarray(a.T), np.ascontiguousarray(scale * b.T))
    if not modules:
        raise LoraError(f"{weights_file}: holds no LoRA tensors")
    _check_finite(modules, weights_file)
    return LoRA(modules, folder, "float32", meta={"mlx_adapter_config": cfg})


def _as_float32(value: Any) -> tuple[np.ndarray, str]:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32), str(value.dtype)
    if isinstance(value, Bf16):
        return value.to_f32(), "bfloat16"
    dtype = str(value.dtype).removeprefix("torch.")
    return value.detach().float().numpy(), dtype


def _natural(name: str) -> list[Any]:
    """Sort key: layer numbers as numbers (layer 2 before layer 10)."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# --- validation ---------------------------------------------------------------------------------

def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` inside the decoder layers: module name → weight shape [out, in]."""
    return {key[: -len(".weight")]: shape for key, shape in expected_shapes(config).items()
            if key.startswith("model.layers.") and len(shape) == 2}


def square_modules(config: ModelConfig) -> list[str]:
    """The modules upstream's ``apply_lora`` attaches a LoRA to (square linears)."""
    return [name for name, (o, i) in linear_shapes(config).items() if o == i]


def validate_lora(lora: LoRA, config: ModelConfig) -> None:
    """Raise LoraError naming the first module that does not fit ``config``, with both shapes."""
    linears = linear_shapes(config)
    model = (f"this {config.kind} model (hidden {config.hidden_size}, "
             f"{config.num_hidden_layers} layers)")
    src = f"LoRA {lora.path}" if lora.path else "LoRA"
    if not lora.modules:
        raise LoraError(f"{src} holds no modules")
    for name in sorted(lora.modules, key=_natural):
        a, b = lora.modules[name]
        want = (b.shape[0], a.shape[1])
        desc = f"[{want[0]}, {want[1]}] (A {list(a.shape)}, B {list(b.shape)})"
        if name not in linears:
            raise LoraError(f"{src} does not fit {model}: its module {name} {desc} does not exist "
                            f"in the model; the adapter was trained for another model")
        have = linears[name]
        if want != have:
            raise LoraError(f"{src} does not fit {model}: module {name} is {desc} in the LoRA but "
                            f"{list(have)} in the model; the adapter was trained for another "
                            f"hidden size or generation")
        if have[0] != have[1]:
            raise LoraError(f"{src}: module {name} is not square ({list(have)}); upstream LoRA "
                            f"attaches only to square linears (q_proj, o_proj)")


def load_lora(lora: str | Path | LoRA, config: ModelConfig) -> LoRA:
    """Read (unless already read) and validate a LoRA against ``config``; nothing is applied."""
    if not isinstance(lora, LoRA):
        lora = read_lora(lora)
    validate_lora(lora, config)
    return lora

