"""Read MiniMind checkpoints of every form into (ModelConfig, weights by checkpoint key).

Forms: upstream ``.pth`` state dicts (``torch.load(weights_only=True, mmap=True)`` only),
``.safetensors`` files, transformers folders (config.json + single/sharded safetensors or
pytorch_model.bin) and unquantized MLX folders. Weights come back as numpy arrays under the
upstream key names (``model.layers.0.self_attn.q_proj.weight`` …); bf16 is widened to fp32
because numpy has no bf16 (lossless), and the file's dtype is reported separately.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import LoRA, merge_into
from .bailing import BAILING_MOE, bailing_moe_layout, from_bailing_moe
from .config import ModelConfig, config_from_json, infer_config
from .errors import CheckpointError
from .granite import from_granite

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # files read with torch.load
WEIGHT_SUFFIXES = TORCH_SUFFIXES + (".safetensors",)
# Key prefixes added by DDP (``module.``) and torch.compile (``_orig_mod.``), in any nesting.
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Buffers some exporters save that are not weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|freqs_cos|freqs_sin)$")
_LORA_KEY = re.compile(r"^(.*)\.lora\.([AB])\.weight$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.")


@dataclass
class Checkpoint:
    """A model's weights under checkpoint names, its config and where they came from."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    path: Path
    files: list[Path] = field(default_factory=list)
    file_dtype: str = "float32"
    source_config: dict[str, Any] | None = None

    @property
    def file_size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# --- public entry points ------------------------------------------------------------------

def load_checkpoint(path: str | Path, **overrides: Any) -> Checkpoint:
    """Read any supported checkpoint and infer its ModelConfig; ``overrides`` win over the file."""
    path = Path(path).expanduser()
    raw, files, source_config = read_raw(path)
    weights, file_dtype = normalize_weights(raw, path)
    weights = from_granite(weights, source_config, path)  # MiniMind2-MoE as GraniteMoeShared
    if source_config and source_config.get("model_type") == BAILING_MOE:
        weights = from_bailing_moe(weights, **bailing_moe_layout(source_config, path))
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        hints = config_from_json(source_config) if source_config is not None else {}
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    try:
        config = infer_config(shapes, hints=hints, overrides=overrides)
    except ValueError as e:  # name the file (and the config.json that contradicts it)
        raise CheckpointError(f"{path}: {str(e).replace('config.json', str(config_file), 1)}"
                              ) from None
    check_keys(weights, config, path)
    check_finite(weights, path)
    return Checkpoint(config, weights, path, files, file_dtype, source_config)


def check_finite(weights: Mapping[str, np.ndarray], path: Path, what: str = "tensor") -> None:
    """Raise CheckpointError naming the first tensor holding a NaN or an infinity.

    One pass over the weights (~0.15 s per 100M float32 parameters here, next to reading them);
    the temporary is one tensor's booleans.
    """
    for key, arr in weights.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise CheckpointError(f"{path}: {what} {key} holds {bad} NaN/infinite value(s); the "
                                  f"file is corrupt or the training diverged: use another "
                                  f"checkpoint")


def read_raw(path: Path) -> tuple[dict[str, Any], list[Path], dict[str, Any] | None]:
    """Read tensors as stored (no renaming) plus the config.json beside them, if any."""
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (expected a .pth/.safetensors file or a model folder "
            f"with config.json)")
    if path.is_dir():
        return _read_folder(path)
    config_file = path.parent / "config.json"
    source_config = _read_json(config_file) if config_file.is_file() else None
    return read_tensor_file(path), [path], source_config


def read_tensor_file(path: Path) -> dict[str, Any]:
    """Read one .pth/.pt/.bin or .safetensors file into {key: array-like}."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch_file(path)
    raise CheckpointError(f"{path}: unsupported file type {suffix!r}; expected one of "
                          f"{', '.join(WEIGHT_SUFFIXES)} or a model folder")


def strip_prefixes(key: str) -> str:
    """``module._orig_mod.model.norm.weight`` → ``model.norm.weight`` (every STRIP_PREFIXES, repeated)."""
    stripped = None
    while stripped != key:
        stripped = key
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
    return key


# --- safetensors (own reader: numpy has no bf16, and truncation deserves a clear message) ---

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "U32": np.uint32, "BOOL": np.bool_}
# Every dtype the safetensors format defines, with its width in bits (for the span check).
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
            "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64,
            "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
ST_MAX_HEADER = 100_000_000  # the safetensors library's limit on the JSON header
_USIZE = 1 << 64


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map a .safetensors file; bf16 tensors come back as ``Bf16`` (raw bits).

    The header is validated as the safetensors library does: a JSON object of tensor entries
    (dtype, shape, data_offsets) plus an optional ``__metadata__`` of strings; the tensors tile
    the data exactly (from 0, no gap, no overlap, to the end of the file) and each span is
    dtype size x shape. Anything else is a CheckpointError naming the file and the tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is truncated or empty (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > ST_MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is above "
                                  f"the format's {ST_MAX_HEADER})")
        if n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length) or truncated")
        header = _parse_st_header(f.read(n), path)
    data_size = size - 8 - n
    entries = _check_st_entries(header, data_size, path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for key, (dtype, shape, start, end) in entries.items():
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        arr = data[start:end].view(_ST_DTYPES[dtype]).reshape(shape)
        out[key] = Bf16(arr) if dtype == "BF16" else arr
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {dup!r} appears twice")
    return out


def _parse_st_header(raw: bytes, path: Path) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors header (it must be a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (it must be a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names "
                              f"to strings)")
    return header


def _check_st_entries(header: dict[str, Any], data_size: int, path: Path
                      ) -> dict[str, tuple[str, list[int], int, int]]:
    """Each entry's (dtype, shape, start, end), checked as safetensors' ``validate`` does."""
    entries = {}
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: its header entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_BITS:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets))
                or offsets[1] < offsets[0]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not [start, end]")
        count = 1
        for d in shape:
            count *= d
            if count >= _USIZE:
                raise CheckpointError(f"{where}: shape {shape} is too large")
        span = offsets[1] - offsets[0]
        if count * _ST_BITS[dtype] != span * 8:
            raise CheckpointError(f"{where}: data_offsets span {span} bytes, but {dtype} x "
                                  f"{shape} needs {count * _ST_BITS[dtype] / 8:g}")
        entries[key] = (dtype, shape, offsets[0], offsets[1])
    end = 0
    for key, (_, _, start, stop) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start != end:
            what = "overlaps the tensor before it" if start < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {key!r} starts at byte {start} and {what} "
                                  f"(expected {end}); the file is corrupt")
        end = stop
    if end != data_size:
        if end > data_size:
            raise CheckpointError(f"{path}: file is truncated (the tensors need {end} bytes of "
                                  f"data, it holds {data_size}); re-download or re-save it")
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor; the file "
                              f"is corrupt")
    return entries


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _USIZE


class Bf16:
    """A bf16 tensor as raw uint16 bits; widened to fp32 (exactly) when normalised."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.shape = bits.shape

    def to_f32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


# --- .pth -------------------------------------------------------------------------------------

def _read_torch_file(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path.name} (a PyTorch file) needs torch: "
                          f"pip install 'minimind-core[torch]' (the CPU wheel is enough)") from None
    import pickle
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch file, or truncated/corrupt; re-download or "
                              f"re-save it")
    try:
        # legacy files (_use_new_zipfile_serialization=False) cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head == b"PK")
    except (pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise CheckpointError(
            f"{path}: not a plain PyTorch state dict that can be loaded safely (weights_only=True "
            f"refused it: {str(e).splitlines()[0][:160]}); save the model with "
            f"torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, struct.error, OverflowError, MemoryError, RecursionError) as e:
        msg = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read the file, it is truncated or corrupt ({msg}); "
                              f"re-download or re-save it") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping) and _is_tensor_dict(obj[wrapper]):
                return dict(obj[wrapper])
        if _is_tensor_dict(obj):
            return dict(obj)
        if "state" in obj and "param_groups" in obj:
            raise CheckpointError(f"{path}: this is an optimizer state, not model weights; pass the "
                                  f"model file (e.g. out/full_sft_512.pth)")
        keys = ", ".join(list(map(str, obj))[:5])
        raise CheckpointError(f"{path}: not a model state dict (top-level keys: {keys}); pass a file "
                              f"saved with torch.save(model.state_dict(), path)")
    if isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{path}: holds a single tensor, not a model state dict")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a model state dict")


def _is_tensor_dict(d: Mapping) -> bool:
    import torch

    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


# --- folders (transformers, MLX) ----------------------------------------------------------------

def mlx_quantization(path: str | Path) -> dict[str, Any] | None:
    """The quantization block (bits, group size) of a quantized MLX folder; None for anything
    else. Packed weights hide their shapes, so only the MLX backend reads such a folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    block = _read_json(config_file).get("quantization")
    return dict(block) if isinstance(block, Mapping) and "bits" in block else None


def _read_folder(path: Path) -> tuple[dict[str, Any], list[Path], dict[str, Any] | None]:
    config_file = path / "config.json"
    source_config = _read_json(config_file) if config_file.is_file() else None
    if source_config and mlx_quantization(path):
        raise CheckpointError(f"{path}: a quantized MLX folder; load it with backend='mlx' "
                              f"(the torch backend needs a full-precision checkpoint)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
                for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file "
                                  f"names in this folder")
        shards = sorted(set(weight_map.values()))
        files = [path / s for s in shards]
    else:
        files = _weight_files(path)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: shard {missing[0].name} listed in the index is missing")
    if not files:
        raise FileNotFoundError(
            f"{path}: no weights found (looked for model.safetensors, *.safetensors, "
            f"pytorch_model.bin, *.pth)")
    raw: dict[str, Any] = {}
    for f in files:
        raw.update(read_tensor_file(f))
    return raw, files, source_config


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder without an index: one file, or the shards of one model.

    Upstream's ``out/`` holds several checkpoints side by side; merging them would be silent
    nonsense, so more than one unrelated file is an error that lists them.
    """
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model*.bin", "*.pth", "*.pt"):
        files = sorted(folder.glob(pattern))
        if len(files) > 1 and not all(_SHARD.search(f.name) for f in files):
            names = ", ".join(f.name for f in files[:6])
            raise CheckpointError(f"{folder}: holds several checkpoints ({names}); pass the file "
                                  f"to load, e.g. {files[0]}")
        if files:
            return files
    return []


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (a list, bad JSON, deep nesting) is refused."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a config file (its JSON is nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object ({{...}}), not a "
                              f"{type(data).__name__}")
    return data


# --- normalising names -------------------------------------------------------------------------

def _to_numpy(value: Any) -> tuple[np.ndarray, str]:
    if isinstance(value, np.ndarray):
        return value, str(value.dtype)
    if isinstance(value, Bf16):
        return value.to_f32(), "bfloat16"
    import torch

    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        t = value.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy(), dtype
    raise CheckpointError(f"unexpected value of type {type(value).__name__} in the checkpoint")


def normalize_weights(raw: Mapping[str, Any], path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Strip DDP/compile prefixes, unstack stacked experts, drop buffers; report the file dtype."""
    if raw and all(".lora." in k for k in raw):
        raise CheckpointError(f"{path}: this is a LoRA adapter, not a base model; pass it as "
                              f"lora={str(path)!r} (CLI: --lora) together with the base checkpoint")
    out: dict[str, np.ndarray] = {}
    dtypes: dict[str, int] = {}
    lora: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        key = strip_prefixes(key)
        if _IGNORED.search(key):
            continue
        if m := _LORA_KEY.match(key):  # saved after upstream's apply_lora: merged below
            lora.setdefault(m.group(1), {})[m.group(2)] = _to_numpy(value)[0]
            continue
        arr, dtype = _to_numpy(value)
        dtypes[dtype] = dtypes.get(dtype, 0) + arr.size
        out.update(_unstack_experts(key, arr))
    if "model.embed_tokens.weight" not in out and "lm_head.weight" in out:
        out["model.embed_tokens.weight"] = out["lm_head.weight"]
    if "lm_head.weight" in out and "model.embed_tokens.weight" in out:
        if out["lm_head.weight"] is not out["model.embed_tokens.weight"] and not np.array_equal(
                out["lm_head.weight"], out["model.embed_tokens.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from model.embed_tokens.weight, "
                                  f"but every MiniMind model ties them; this file is not a MiniMind model")
        del out["lm_head.weight"]
    file_dtype = max(dtypes, key=dtypes.get) if dtypes else "float32"
    if lora:
        out = _merge_saved_lora(out, lora, path)
    return out, file_dtype


def _merge_saved_lora(weights: dict[str, np.ndarray], lora: dict[str, dict[str, np.ndarray]],
                      path: Path) -> dict[str, np.ndarray]:
    """A state dict saved with LoRA layers attached computes W x + B(A x): fold them in."""
    broken = [name for name, pair in lora.items() if set(pair) != {"A", "B"}]
    if broken:
        raise CheckpointError(f"{path}: LoRA module {broken[0]} has only its "
                              f"{''.join(lora[broken[0]])} matrix")
    return merge_into(weights, LoRA({n: (p["A"], p["B"]) for n, p in lora.items()}, path=path))


_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp)\.(?:switch_mlp|experts)\.(gate_up_proj|gate_proj|"
                      r"up_proj|down_proj)(?:\.weight)?$")


def _unstack_experts(key: str, arr: np.ndarray) -> dict[str, np.ndarray]:
    """mlx_lm (`switch_mlp.*` [E, out, in]) and transformers 5 (`experts.gate_up_proj`) stack experts."""
    m = _STACKED.match(key)
    if not m or arr.ndim != 3:
        return {key: arr}
    base, name = m.groups()
    out = {}
    for e in range(arr.shape[0]):
        if name == "gate_up_proj":
            gate, up = np.split(arr[e], 2, axis=0)
            out[f"{base}.experts.{e}.gate_proj.weight"] = gate
            out[f"{base}.experts.{e}.up_proj.weight"] = up
        else:
            out[f"{base}.experts.{e}.{name}.weight"] = arr[e]
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key a model with this config has (head tied, so no lm_head), with its shape."""
    h, d, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }

    def mlp(prefix: str) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (ffn, h)
        shapes[f"{prefix}.up_proj.weight"] = (ffn, h)
        shapes[f"{prefix}.down_proj.weight"] = (h, ffn)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if config.use_moe:
            shapes[p + "mlp.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                mlp(f"{p}mlp.experts.{e}")
            for s in range(config.n_shared_experts):
                mlp(f"{p}mlp.shared_experts.{s}")
        else:
            mlp(p + "mlp")
    return shapes


def check_keys(weights: Mapping[str, np.ndarray], config: ModelConfig, path: Path) -> None:
    """Raise one clear error for missing, unexpected or mis-shaped tensors."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(weights))
    unexpected = sorted(set(weights) - set(want))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    bad = [(k, tuple(weights[k].shape), want[k]) for k in sorted(set(want) & set(weights))
           if tuple(weights[k].shape) != want[k]]
    if bad:
        k, got, exp = bad[0]
        problems.append(f"{len(bad)} tensor(s) with wrong shape, e.g. {k}: {list(got)} where the "
                        f"config needs {list(exp)}")
    not_float = [k for k in sorted(set(want) & set(weights)) if weights[k].dtype.kind != "f"]
    if not_float:
        k = not_float[0]
        problems.append(f"{len(not_float)} tensor(s) that are not floating point, e.g. {k} "
                        f"({weights[k].dtype})")
    if problems:
        raise CheckpointError(f"{path}: does not match a {config.kind} model "
                              f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers): "
                              + "; ".join(problems))
