"""MlxEngine: the decode core on Apple MLX — the same shape as the torch backend's.

A slot cache whose rows each have their own length (``cache.py``), one prefill per row, one decode
step for every running row at its own position; the token loop and the sampler are the shared ones
of ``minimind_core.engine`` (logits come to the host as float32: 25 KB a row). Prompt ids always
come from the shared ChatFormatter, never from mlx_lm's tokenizer wrapper, so both backends feed
the model the same ids. Each engine computes on its own stream for its device, so loading a model
never changes MLX's global default device, and nothing draws from MLX's global random state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from minimind_core import paths
from minimind_core.checkpoint import (
    TORCH_SUFFIXES,
    Checkpoint,
    CheckpointError,
    check_keys,
    load_checkpoint,
    normalize_weights,
    read_safetensors,
)
from minimind_core.config import config_from_json, infer_config
from minimind_core.dtypes import DTYPE_NAMES
from minimind_core.engine import Engine
from minimind_core.tokenizer import Tokenizer, find_tokenizer

from .cache import SlotCache
from .load import (
    WEIGHTS_FILE,
    build_model,
    check_quantization,
    dtype_name,
    is_quantized_folder,
    load_quantized_folder,
    parse_dtype,
    quantization_of,
    save_weights,
)
from .load import quantize as quantize_weights
from .lora import set_lora
from .model import Model


def resolve_device(device: str | mx.Device | None) -> mx.Device:
    """Auto: the GPU (Metal) when MLX sees one, else the CPU."""
    if isinstance(device, mx.Device):
        return device
    gpu = mx.is_available(mx.gpu)
    if device in (None, "auto"):
        return mx.gpu if gpu else mx.cpu
    if device == "cpu":
        return mx.cpu
    if device in ("gpu", "metal", "mps", "cuda"):
        if not gpu:
            raise ValueError(f"device {device!r} asked for, but MLX sees no GPU here; use "
                             f"device='cpu' (or leave it on auto)")
        return mx.gpu
    raise ValueError(f"unknown device {device!r} for the mlx backend; use cpu, gpu or auto")


def resolve_dtype(dtype: str | mx.Dtype | None, device: mx.Device, file_dtype: str) -> mx.Dtype:
    """Auto: fp32 on the CPU; on the GPU fp16 (bf16 when the file is bf16), as the torch backend on MPS."""
    if dtype not in (None, "auto"):
        return parse_dtype(dtype)
    if device == mx.cpu:
        return mx.float32
    return mx.bfloat16 if file_dtype == "bfloat16" else mx.float16


def cache_root() -> Path:
    """Where ``.pth`` files converted on the fly are kept: ``mlx/`` in minimind-core's cache
    (``$MINIMIND_CACHE``, default ``~/.cache/minimind-core``)."""
    return paths.cache_root() / "mlx"


class MlxEngine(Engine):
    """MiniMind on MLX. Build with ``minimind_core.load(path, backend="mlx")``."""

    backend = "mlx"

    def __init__(self, model: Model, tokenizer: Tokenizer, *, device: mx.Device | None = None,
                 name: str = "minimind", info: dict[str, Any] | None = None) -> None:
        super().__init__(model.args, tokenizer, name=name, info=info)
        self.model = model
        self.device = device or mx.default_device()
        # All work runs on this stream, so the engine never changes MLX's global default device.
        self._stream = mx.new_thread_local_stream(self.device)

    @classmethod
    def load(cls, path: str | Path, *, device=None, dtype=None, tokenizer=None, lora=None,
             merge_lora: bool = False, quantize: int | None = None, q_group_size: int = 64,
             decode: str = "auto", **overrides: Any) -> MlxEngine:
        """Load an MLX folder (quantized or not), a transformers folder, a ``.safetensors`` file or
        a ``.pth`` file (converted once into a cache folder keyed by its sha256).

        device: "cpu", "gpu" or auto (gpu when Metal is there). dtype: float32 / float16 /
        bfloat16; auto = fp32 on the CPU, fp16 on the GPU (bf16 for bf16 files); a quantized
        folder keeps its own dtype on the GPU and computes in fp32 on the CPU (much faster
        there). quantize: 4 or 8 bits (None/0 = full precision), ``q_group_size`` 32/64/128.
        decode: "auto" or "eager" (MLX has one decode-step implementation, its own ops). Any
        ModelConfig field may be overridden.
        """
        if decode not in ("auto", "eager"):
            raise ValueError(f"decode={decode!r} is a torch backend implementation; the mlx "
                             f"backend runs decode='eager' (or 'auto')")
        dev = resolve_device(device)
        bits = check_quantization(quantize, q_group_size)
        if dtype not in (None, "auto"):
            parse_dtype(dtype)  # reject a bad dtype before reading anything
        path = Path(path).expanduser()
        info: dict[str, Any] = {"path": str(path)}
        if is_quantized_folder(path):
            model = load_quantized_folder(path, overrides)
            if dtype not in (None, "auto") or dev == mx.cpu:
                # MLX's CPU quantized matmul is ~50x slower in half precision than in fp32
                model.set_dtype(resolve_dtype(dtype, dev, "quantized"))
            tok = find_tokenizer(path, tokenizer)
            info["file_dtype"] = "quantized"
        else:
            ckpt, cached = load_source(path, overrides)
            dt = resolve_dtype(dtype, dev, ckpt.file_dtype)
            model = build_model(ckpt, dt)
            tok = find_tokenizer(ckpt.path, tokenizer)
            info["file_dtype"] = ckpt.file_dtype
            if cached is not None:
                info["mlx_cache"] = str(cached)
        if bits is not None:
            have = quantization_of(model)
            if have is None:
                quantize_weights(model, bits, q_group_size)
            elif (have["bits"], have["group_size"]) != (bits, q_group_size):
                raise ValueError(f"{path} is already quantized ({have['bits']} bits, group "
                                 f"{have['group_size']}); load a full-precision source to use "
                                 f"quantize={bits}, q_group_size={q_group_size}")
        # the norms stay floating point in a quantized model, so they tell the compute dtype
        info.update({"device": "gpu" if dev == mx.gpu else "cpu",
                     "dtype": dtype_name(model.model.norm.weight.dtype),
                     "quantization": quantization_of(model), "tokenizer": str(tok.path),
                     "decode": "eager"})
        name = path.stem if path.is_file() else path.name
        engine = cls(model, tok, device=dev, name=name or "minimind", info=info)
        if lora is not None:
            engine.set_lora(lora, merge=merge_lora)
        return engine

    def set_lora(self, lora: Any, merge: bool = False) -> None:
        """Apply (or with None remove) a LoRA adapter; implemented in backends.mlx.lora."""
        set_lora(self, lora, merge=merge)

    # ---- the decode core ------------------------------------------------------------------
    def _new_cache(self, slots: int, max_len: int) -> SlotCache:
        c = self.config
        return SlotCache(c.num_hidden_layers, slots, c.num_key_value_heads, max_len, c.head_dim,
                         self.model.model.norm.weight.dtype)

    def _copy_prefix(self, cache: SlotCache, src: int, dst: int, n: int) -> None:
        for layer in range(len(cache.keys)):
            cache.keys[layer][dst, :, :n] = cache.keys[layer][src, :, :n]
            cache.values[layer][dst, :, :n] = cache.values[layer][src, :, :n]
        mx.eval(*cache.keys, *cache.values)

    def _copy_cache(self, src: SlotCache, dst: SlotCache) -> None:
        n = src.max_len
        for layer in range(len(src.keys)):
            dst.keys[layer][:, :, :n] = src.keys[layer]
            dst.values[layer][:, :, :n] = src.values[layer]
        mx.eval(*dst.keys, *dst.values)

    def _prefill(self, cache: SlotCache, slot: int, ids: list[int]) -> mx.array:
        cache.check_room(slot, len(ids))
        start = int(cache.lengths[slot])
        with mx.stream(self._stream):
            logits = self.model(mx.array([ids], dtype=mx.int32),
                                cache.span(slot, start, len(ids)))[0, -1]
            mx.eval(logits, *cache.keys, *cache.values)
        cache.lengths[slot] = start + len(ids)
        return logits

    def _decode_step(self, cache: SlotCache, slots: np.ndarray, tokens: np.ndarray) -> mx.array:
        positions = cache.lengths[slots]
        if (positions >= cache.max_len).any():
            raise ValueError(f"a row is at the end of its cache ({cache.max_len} positions)")
        ids = mx.array(np.asarray(tokens, dtype=np.int32))[:, None]
        with mx.stream(self._stream):
            logits = self.model(ids, cache.rows(slots, positions))[:, -1]
            mx.eval(logits, *cache.keys, *cache.values)
        cache.lengths[slots] = positions + 1
        return logits

    def _logits(self, ids: list[int]) -> np.ndarray:
        with mx.stream(self._stream):
            out = self.model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32)
            mx.eval(out)
        return np.array(out)

    def _to_numpy(self, logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))

    def _stack(self, rows: list[mx.array]) -> mx.array:
        return mx.stack(rows)


# ---- sources ----------------------------------------------------------------------------------

def load_source(path: Path, overrides: Mapping[str, Any]) -> tuple[Checkpoint, Path | None]:
    """A full-precision checkpoint; ``.pth`` files go through the sha256-keyed cache (the hash
    computed once per path, size and mtime).

    Returns the checkpoint and the cache folder used (None when the source was read directly).
    """
    if path.is_file() and path.suffix.lower() in TORCH_SUFFIXES:
        return _load_pth_cached(path, overrides)
    return load_checkpoint(path, **overrides), None


def _load_pth_cached(path: Path, overrides: Mapping[str, Any]) -> tuple[Checkpoint, Path | None]:
    """Read a ``.pth`` once (needs torch), keep its weights as an MLX folder, reuse it after that.

    The cache holds weights only, in the file's own dtype (lossless); the config is inferred on
    every load exactly as ``load_checkpoint`` does for the ``.pth`` (shapes, the config.json
    beside it, the caller's overrides), so overrides never stick to the cache.
    """
    try:
        folder = cache_root() / _content_hash(path)
    except RuntimeError:  # no MINIMIND_CACHE and no home directory: convert, keep nothing
        return load_checkpoint(path, **overrides), None
    if (folder / WEIGHTS_FILE).is_file():
        try:
            return _read_cache(folder, path, overrides), folder
        except (CheckpointError, OSError, ValueError, KeyError):
            pass  # a damaged cache entry: convert again below
    ckpt = load_checkpoint(path, **overrides)
    try:
        _write_cache(ckpt, folder)
    except OSError as e:
        warnings.warn(f"could not cache the MLX conversion of {path} in {folder} ({e}); "
                      f"set MINIMIND_CACHE to a writable folder to make later loads faster",
                      stacklevel=3)
        return ckpt, None
    return ckpt, folder


def _content_hash(path: Path) -> str:
    """The file's sha256, hashed once per (path, size, mtime): hashing a 757 MB file takes ~3 s,
    so the result is kept in ``index/`` of the cache; a file rewritten in place gets a new mtime
    and is hashed again."""
    st = path.stat()
    where = str(path.resolve())
    stamp = {"path": where, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = cache_root() / "index" / (hashlib.sha256(where.encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text(encoding="utf-8"))
        if {k: known.get(k) for k in stamp} == stamp and len(str(known.get("sha256"))) == 64:
            return str(known["sha256"])
    except (OSError, ValueError, AttributeError):
        pass  # no entry yet, or a damaged one: hash below
    sha = paths.sha256_file(path)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**stamp, "sha256": sha}) + "\n", encoding="utf-8")
        os.replace(tmp, entry)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError:  # a read-only cache: hash again next time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return sha


def _write_cache(ckpt: Checkpoint, folder: Path) -> None:
    """The weights in the file's dtype plus a small ``config.json`` (dtype, source), written into
    a temporary sibling and renamed into place, so a reader never sees half an entry."""
    file_dtype = ckpt.file_dtype if ckpt.file_dtype in DTYPE_NAMES else "float32"
    model = build_model(ckpt, parse_dtype(file_dtype))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_weights(model, tmp)
        meta = {"minimind": {"dtype": file_dtype, "source": str(ckpt.path)}}
        (tmp / "config.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        if folder.exists():  # a damaged entry: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path, source: Path, overrides: Mapping[str, Any]) -> Checkpoint:
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("minimind", {})
    weights, _ = normalize_weights(read_safetensors(folder / WEIGHTS_FILE), folder)
    beside = source.parent / "config.json"
    source_config = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else None
    hints = config_from_json(source_config) if source_config else {}
    config = infer_config({k: tuple(v.shape) for k, v in weights.items()}, hints=hints,
                          overrides=overrides)
    check_keys(weights, config, source)
    return Checkpoint(config, weights, source, [source], meta.get("dtype", "float32"), source_config)
