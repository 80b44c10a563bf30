"""TorchEngine: the decode core on PyTorch — a slot KV cache, one prefill, and one decode step
chosen from interchangeable implementations (``steps.py``: eager, native, compiled)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_core.checkpoint import Checkpoint, load_checkpoint
from minimind_core.dtypes import canonical_dtype
from minimind_core.engine import Engine, Row
from minimind_core.tokenizer import Tokenizer, find_tokenizer

from . import native as native_lib
from .cache import KVCache
from .lora import set_lora
from .model import MiniMindForCausalLM
from .quantized import check_quantization, quantize_model
from .sampling import sample as device_sample
from .steps import DECODE_CHOICES, CompiledStep, EagerStep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_MAX_ROW_KEYS = 4096  # rows x attended keys up to which "auto" keeps the native CPU step
DEPRECATED = {"native", "compile", "cuda_graphs", "static"}  # the old switches, now decode=


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Auto: cuda, then mps, then cpu."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but it is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Auto: bf16 on CUDA when supported else fp16; fp16 on MPS; fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return DTYPES[canonical_dtype(dtype)]


class TorchEngine(Engine):
    """MiniMind on PyTorch. Build with ``minimind_core.load(path, backend="torch")``.

    ``decode`` picks the decode-step implementation: "eager" (plain torch ops), "native" (CPU
    float32, small ops in C), "compiled" (static shapes under torch.compile; a CUDA graph on
    CUDA) or "auto": compiled on CUDA, native on CPU float32 when the C kernels build (eager for
    large batches with long contexts, where torch's threaded matmuls win), else eager.
    """

    backend = "torch"

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Tokenizer, *, name: str = "minimind",
                 info: dict[str, Any] | None = None, decode: str = "auto") -> None:
        super().__init__(model.config, tokenizer, name=name, info=info)
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if decode not in DECODE_CHOICES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}; got {decode!r}")
        self.decode = decode
        model.build_rope(self.device, self.dtype)  # the whole window, once
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self._native = native_lib.library() if cpu_fp32 and decode in ("auto", "native") else None
        self._impls: dict[str, Any] = {}  # implementation name -> step built on the cache
        self._weights_changed()

    @classmethod
    def load(cls, path: str | Path, *, device=None, dtype=None, tokenizer=None, lora=None,
             merge_lora: bool = False, decode: str = "auto", quantize: int | None = None,
             q_group_size: int | None = None, threads: int | None = None,
             **overrides: Any) -> TorchEngine:
        """Read a checkpoint (any supported form), find its tokenizer and build the engine.

        ``decode``: "auto", "eager", "native" or "compiled" (see the class). ``quantize``: 8 or
        4 bits, weight-only, per group of ``q_group_size`` (32/64/128, default 64) inputs: every
        linear and the embedding (``quantized.py``); on CPU float32 the native step multiplies
        with int8/int4 kernels, elsewhere the dequantized weights run. The old switches
        ``native=``, ``compile=``, ``cuda_graphs=`` and ``static=`` still work, with a
        DeprecationWarning.
        """
        decode = _decode_from_deprecated(decode, {k: overrides.pop(k) for k in list(overrides)
                                                  if k in DEPRECATED})
        quant = check_quantization(quantize, q_group_size)
        ckpt = load_checkpoint(path, **overrides)
        tok = find_tokenizer(ckpt.path, tokenizer)
        engine = cls.from_checkpoint(ckpt, tok, device=device, dtype=dtype, decode=decode,
                                     threads=threads, quantize=quant)
        if lora is not None:
            engine.set_lora(lora, merge=merge_lora)
        return engine

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, tokenizer: Tokenizer, *, device=None,
                        dtype=None, decode: str = "auto", threads: int | None = None,
                        quantize: tuple[int, int] | None = None) -> TorchEngine:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu":
            torch.set_num_threads(cpu_threads(ckpt.config.num_parameters(), threads))
        model = build_model(ckpt, dev, dt)
        quantization = quantize_model(model, *quantize) if quantize else None
        info = {"quantization": quantization, "path": str(ckpt.path), "file_dtype": ckpt.file_dtype, "device": str(dev),
                "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                "dtype": str(dt).removeprefix("torch."), "tokenizer": str(tokenizer.path)}
        return cls(model, tokenizer, name=Path(ckpt.path).stem, info=info, decode=decode)

    def set_lora(self, lora: Any, merge: bool = False) -> None:
        """Apply (or with None remove) a LoRA adapter; implemented in backends.torch.lora."""
        set_lora(self, lora, merge=merge)  # calls _weights_changed while it holds the engine

    def _weights_changed(self) -> None:
        """Drop the steps built on the old weights (a captured graph replays old kernels; an
        unmerged LoRA rules the native step out) and decide which step runs now."""
        self._impls.clear()
        native_ok = self._native is not None and native_lib.supported(
            self.model, self.device, self.dtype)
        if self.decode == "native" and not native_ok:
            raise ValueError(f"decode='native' cannot run here: {self._native_reason()}; "
                             f"use decode='eager' or 'compiled' (or 'auto')")
        if self.decode == "auto":
            self._impl = "compiled" if self.device.type == "cuda" else (
                "native" if native_ok else "eager")
        else:
            self._impl = self.decode
        self.info["decode"] = self._impl

    def _native_reason(self) -> str:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return f"it is for CPU float32 (this engine: {self.device.type} {self.dtype})"
        if self._native is None:
            return "the C kernels could not be built (no compiler, or MINIMIND_NATIVE=0)"
        return "an unmerged LoRA is loaded (merge it: merge_lora=True)"

    # ---- the decode core ----------------------------------------------------------------
    def _new_cache(self, slots: int, max_len: int) -> KVCache:
        c = self.config
        self._impls.clear()  # steps hold the old cache's buffers
        return KVCache(c.num_hidden_layers, slots, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.device)

    def _copy_prefix(self, cache: KVCache, src: int, dst: int, n: int) -> None:
        cache.k[:, dst, :, :n].copy_(cache.k[:, src, :, :n])
        cache.v[:, dst, :, :n].copy_(cache.v[:, src, :, :n])

    def _copy_cache(self, src: KVCache, dst: KVCache) -> None:
        n = src.max_len
        dst.k[:, :, :, :n].copy_(src.k[:, :, :, :n])
        dst.v[:, :, :, :n].copy_(src.v[:, :, :, :n])

    def _cache_for(self, slots: int, max_len: int) -> KVCache:
        cache = super()._cache_for(slots, max_len)
        if self._impl == "compiled" and cache.slots > 2 * slots and not cache.used.any():
            # the compiled step computes every slot: do not run 1 row through 16
            self._cache = None
            self._impls.clear()
            cache = self._cache = self._new_cache(slots, cache.max_len)
        return cache

    def _step(self, name: str, cache: KVCache):
        step = self._impls.get(name)
        if step is None or step.cache is not cache:
            if name == "native":
                step = native_lib.NativeStep(self.model, cache, self._native)
            elif name == "compiled":
                step = CompiledStep(self.model, cache)
            else:
                step = EagerStep(self.model, cache)
            self._impls[name] = step
        return step

    def _prefill(self, cache: KVCache, slot: int, ids: list[int]) -> torch.Tensor:
        return self._prefill_rows(cache, [(slot, ids)])[0]

    @torch.inference_mode()
    def _prefill_rows(self, cache: KVCache, parts: list[tuple[int, list[int]]]
                      ) -> torch.Tensor:
        for slot, ids in parts:
            cache.check_room(slot, len(ids))
        slots = [slot for slot, _ in parts]
        starts = [int(cache.lengths[slot]) for slot in slots]
        lengths = [len(ids) for _, ids in parts]
        x = torch.tensor([[t for _, ids in parts for t in ids]], dtype=torch.long,
                         device=self.device)
        logits = self.model.prefill(x, cache, slots, starts, lengths)
        for slot, start, n in zip(slots, starts, lengths):
            cache.lengths[slot] = start + n
        return logits

    @torch.inference_mode()
    def _decode_step(self, cache: KVCache, slots: np.ndarray, tokens: np.ndarray
                     ) -> torch.Tensor:
        positions = cache.lengths[slots]
        if (positions >= cache.max_len).any():
            raise ValueError(f"a row is at the end of its cache ({cache.max_len} positions)")
        name = self._impl
        # the C attention is single-threaded: past a few thousand (row, key) pairs per step,
        # torch's threaded batched matmuls win (measured: equal at 4 rows x 1024 keys)
        if (name == "native" and self.decode == "auto" and len(slots) > 1
                and len(slots) * (int(positions.max()) + 1) > NATIVE_MAX_ROW_KEYS):
            name = "eager"
        logits = self._step(name, cache)(slots, positions, tokens)
        cache.lengths[slots] = positions + 1
        return logits

    @torch.inference_mode()
    def _logits(self, ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float().cpu().numpy()

    def _to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(rows)

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> np.ndarray:
        if self.device.type == "cuda":  # the same sampler contract on the device: B ids cross
            return device_sample(logits, rows)
        return super()._sample(logits, rows)


def _decode_from_deprecated(decode: str, old: dict[str, Any]) -> str:
    """``decode`` from the switches it replaced (``native=``, ``compile=``, ``cuda_graphs=``,
    ``static=``), each with a DeprecationWarning; the same behaviour as before."""
    if not old:
        return decode
    warnings.warn(f"{', '.join(f'{k}=' for k in old)} is deprecated; use decode='auto'|'eager'|"
                  f"'native'|'compiled'", DeprecationWarning, stacklevel=3)
    if old.get("compile") or old.get("static") in ("compile", "graph") or old.get("cuda_graphs"):
        return "compiled"
    if old.get("native") is False or old.get("cuda_graphs") is False or old.get("static") == "eager":
        return "eager"
    return decode


def cpu_threads(parameters: int, threads: int | None) -> int:
    """Intra-op threads for CPU decoding (process-wide in torch): ``threads`` when given, else one
    per ~12M parameters up to the cores. A decode step is hundreds of small ops; for a small model
    every extra thread adds a barrier per op (measured: the 0.46M demo decodes at 464 tok/s on one
    thread and 17 on two when the other core is busy)."""
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        return threads
    cores = os.cpu_count() or 1
    return max(1, min(cores, parameters // 12_000_000))


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> MiniMindForCausalLM:
    """Instantiate the network on the meta device and assign the checkpoint's tensors."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(ckpt.config)
    state = {k: torch.tensor(np.asarray(v)).to(device=device, dtype=dtype)
             for k, v in ckpt.weights.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight  # keep the tie after assign
    model.eval().requires_grad_(False)
    model.fuse()
    return model
