"""TorchEngine: the Engine interface on PyTorch (static KV cache, fused projections, SDPA)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_core.checkpoint import Checkpoint, load_checkpoint
from minimind_core.dtypes import canonical_dtype
from minimind_core.engine import Engine
from minimind_core.params import SamplingParams
from minimind_core.tokenizer import Tokenizer, find_tokenizer

from . import native as native_lib
from .cache import KVCache
from .lora import set_lora
from .model import MiniMindForCausalLM
from .sampling import on_device
from .static import StaticDecoder, static_steps

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_MAX_ROW_KEYS = 4096  # batch x attended keys up to which the native CPU step runs
CACHE_STEP = 256  # cache lengths are rounded up to this, so one cache serves many requests


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
    """MiniMind on PyTorch. Build with ``minimind_core.load(path, backend="torch")``."""

    backend = "torch"

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Tokenizer, *, name: str = "minimind",
                 info: dict[str, Any] | None = None, static: str | None = None,
                 sync_every: int = 8, native: bool = True) -> None:
        super().__init__(model.config, tokenizer, name=name, info=info)
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache: KVCache | None = None
        if static not in (None, "eager", "compile", "graph"):
            raise ValueError(f"static must be None, 'eager', 'compile' or 'graph', got {static!r}")
        if static == "graph" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use static='compile' or None on "
                             f"{self.device.type}")
        self.static, self.sync_every = static, sync_every
        self._decoders: dict[str, Any] = {}  # per cache: static steps and the native step
        # CPU float32: the small ops of a decode step run in C (backends/torch/native.py)
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self._native = native_lib.library() if native and cpu_fp32 and static is None else None
        self._weights_changed()

    @classmethod
    def load(cls, path: str | Path, *, device=None, dtype=None, tokenizer=None, lora=None,
             merge_lora: bool = False, compile: bool = False, cuda_graphs: bool | None = None,
             quantize: int | None = None, q_group_size: int | None = None,
             threads: int | None = None, native: bool = True, **overrides: Any) -> TorchEngine:
        """Read a checkpoint (any supported form), find its tokenizer and build the engine.

        On CUDA the decode step runs as a CUDA graph unless ``cuda_graphs=False``;
        ``compile=True`` compiles the static decode step with torch.compile (CPU or GPU).
        On CPU in float32 the decode step's small ops run in C (``backends/torch/native.py``)
        unless ``native=False``; the numbers are the same either way.
        """
        if quantize or q_group_size:
            raise ValueError(f"quantize={quantize} is for the MLX backend (backend='mlx'); the "
                             "torch backend runs float32/float16/bfloat16 (dtype=...)")
        ckpt = load_checkpoint(path, **overrides)
        tok = find_tokenizer(ckpt.path, tokenizer)
        engine = cls.from_checkpoint(ckpt, tok, device=device, dtype=dtype, compile=compile,
                                     cuda_graphs=cuda_graphs, threads=threads, native=native)
        if lora is not None:
            engine.set_lora(lora, merge=merge_lora)
        return engine

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, tokenizer: Tokenizer, *, device=None,
                        dtype=None, compile: bool = False, cuda_graphs: bool | None = None,
                        threads: int | None = None, native: bool = True) -> TorchEngine:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu":
            torch.set_num_threads(cpu_threads(ckpt.config.num_parameters(), threads))
        model = build_model(ckpt, dev, dt)
        info = {"path": str(ckpt.path), "file_dtype": ckpt.file_dtype, "device": str(dev),
                "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                "dtype": str(dt).removeprefix("torch."), "tokenizer": str(tokenizer.path)}
        use_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        static = "graph" if use_graphs else ("compile" if compile else None)
        return cls(model, tokenizer, name=Path(ckpt.path).stem, info=info, static=static,
                   native=native)

    def _steps(self, prompts: list[list[int]], params: SamplingParams):
        if self.static is None or not on_device(params):
            return super()._steps(prompts, params)
        return static_steps(self, prompts, params, self.static,
                            1 if self.device.type == "cpu" else self.sync_every)

    def _static_decoder(self, mode: str) -> StaticDecoder:
        """One captured/compiled step per cache (the cache fixes batch bucket and length)."""
        if mode not in self._decoders:
            self._decoders[mode] = StaticDecoder(self.model, self.cache, mode)
        return self._decoders[mode]

    def set_lora(self, lora: Any, merge: bool = False) -> None:
        """Apply (or with None remove) a LoRA adapter; implemented in backends.torch.lora."""
        set_lora(self, lora, merge=merge)  # calls _weights_changed while it holds the engine

    def _weights_changed(self) -> None:
        """Drop the steps built on the old weights (a captured graph replays old kernels; an
        unmerged LoRA rules the native step out) and say which decode step now runs."""
        self._decoders.clear()
        self._use_native = self._native is not None and native_lib.supported(
            self.model, self.device, self.dtype)
        self.info["decode"] = self.static or ("native" if self._use_native else "eager")

    # ---- backend steps ------------------------------------------------------------------
    def _ensure_cache(self, batch: int, length: int) -> KVCache:
        length = min(-(-length // CACHE_STEP) * CACHE_STEP, self.config.max_position_embeddings)
        if self.cache is None or not self.cache.fits(batch, length, self.dtype):
            c = self.config
            self.cache = None  # free the old one (and the steps captured on it) first
            self._decoders.clear()
            self.cache = KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, length,
                                 c.head_dim, self.dtype, self.device)
        return self.cache

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]], max_len: int) -> torch.Tensor:
        longest = max(map(len, prompts))
        cache = self._ensure_cache(len(prompts), max_len)
        pad_id = self.config.pad_token_id
        ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts],
                           dtype=torch.long, device=self.device)
        pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long, device=self.device)
        cache.reset(pad)
        logits = self.model(ids, cache, 0, last_only=True)
        cache.length = longest
        return logits[:, -1]

    def _native_decoder(self) -> native_lib.NativeDecoder | None:
        """The C-assisted CPU step for the current cache, when it covers this model's state."""
        if not self._use_native:
            return None
        if "native" not in self._decoders:
            self._decoders["native"] = native_lib.NativeDecoder(self.model, self.cache,
                                                                self._native)
        return self._decoders["native"]

    @torch.inference_mode()
    def _decode(self, tokens: np.ndarray) -> torch.Tensor:
        cache = self.cache
        step = self._native_decoder()
        # the C attention is single-threaded: past a few thousand (row, key) pairs per step,
        # torch's threaded batched matmuls win (measured: equal at 4 rows x 1024 keys)
        if step is not None and (cache.batch == 1 or cache.batch * (cache.length + 1)
                                 <= NATIVE_MAX_ROW_KEYS):
            logits = step.step(tokens, cache.length)
        else:
            ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)[:, None]
            logits = self.model(ids, cache, cache.length)[:, -1]
        cache.length += 1
        return logits

    @torch.inference_mode()
    def _logits(self, ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float().cpu().numpy()

    def _to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _sample(self, logits, params: SamplingParams, histories, rng) -> np.ndarray:
        if params.greedy and params.repetition_penalty == 1.0:  # argmax on the device
            return logits.argmax(dim=-1).cpu().numpy()
        return super()._sample(logits, params, histories, rng)


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
