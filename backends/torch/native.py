"""The CPU float32 decode step with its small ops in C (``kernels.c``), matmuls in torch.

At batch 1 a decode step of the 26M model is ~35 matrix-vector products (the memory floor,
~9 ms here) and ~300 tiny torch ops (norms, RoPE, cache writes, attention, SiLU) whose dispatch
costs ~5 ms more. ``NativeDecoder`` keeps the products in torch (MKL, threaded, written into
preallocated buffers) and does everything between two products in one C call.

``kernels.c`` is compiled once per machine (cbuild.py) with the system C compiler (``$CC`` or
``cc``) into ``native/`` of minimind-core's cache (``$MINIMIND_CACHE``, default
``~/.cache/minimind-core``; ~0.4 s, no torch headers). Without a working compiler or cache folder, with
``MINIMIND_NATIVE=0`` or ``load(..., native=False)``, the engine keeps its plain torch decode
step: same numbers, slower.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from . import cbuild
from .cache import KVCache
from .model import MLP, MiniMindForCausalLM

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.c")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_lock = threading.Lock()
COMPILE_TIMEOUT = cbuild.COMPILE_TIMEOUT  # seconds; the file compiles in under one
MAX_HEAD_DIM = 1024  # kernels.c's MAX_HEAD_DIM: its per-head scratch arrays (attend refuses more)

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "add_rms_norm": [_p, _p, _p, _p, _i, _i, _f],
    "silu_mul": [_p, _p, _i, _i],
    "attend": [_p, _p, _p, _p, _p, _p, _p, _f, _p, _i, _i, _i, _i, _i, _i, _p],
}


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when disabled or no compiler works."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _build() or False
    return _lib or None


def _build() -> ctypes.CDLL | None:
    lib = cbuild.build(SOURCE, [()], purpose="CPU decode uses plain torch ops",
                       timeout=COMPILE_TIMEOUT)
    if lib is None:
        return None
    try:
        for name, args in SIGNATURES.items():
            getattr(lib, name).argtypes = args
    except AttributeError as e:  # a .so without our functions
        log.warning("native CPU kernels unavailable (%s); CPU decode uses plain torch ops", e)
        return None
    lib.attend.restype = _i
    return lib


def supported(model: MiniMindForCausalLM, device: torch.device, dtype: torch.dtype) -> bool:
    """Native decoding covers CPU float32 without an unmerged LoRA (merged is fine)."""
    if device.type != "cpu" or dtype != torch.float32 or model.config.head_dim > MAX_HEAD_DIM:
        return False
    return not any(layer.self_attn.lora for layer in model.model.layers)


def _ptr(t: torch.Tensor) -> int:
    if not t.is_contiguous():
        raise ValueError("native decode needs contiguous tensors")
    return t.data_ptr()


class NativeDecoder:
    """One decode step for a given cache: ``step(tokens, pos)`` -> logits [B, vocab].

    The buffers and the arguments of every C call are built once here, so a step is the
    embedding lookup, four ``torch.mm(out=)`` and four C calls per layer, and the head.
    """

    def __init__(self, model: MiniMindForCausalLM, cache: KVCache, lib: ctypes.CDLL) -> None:
        cfg, b = model.config, cache.batch
        self.model, self.cache, self.lib = model, cache, lib
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.eps, self.hidden = eps, hidden

        def buf(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device="cpu")

        self.x, self.xn, self.delta = buf(b, hidden), buf(b, hidden), buf(b, hidden)
        self.qkv, self.att = buf(b, (h + 2 * kv) * d), buf(b, h * d)
        self.h13, self.act = buf(b, 2 * cfg.intermediate_size), buf(b, cfg.intermediate_size)
        self.logits = buf(b, cfg.vocab_size)
        self.scores = buf(cache.max_len)
        model.rope(cache.max_len, torch.device("cpu"), torch.float32)
        self.cos, self.sin = model.rope_cos, model.rope_sin  # kept alive: their pointers are used
        self.layers = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qk_w = attn.qk_norm_weight.contiguous() if attn.qk_norm else None
            attend = (_ptr(self.qkv), _ptr(self.att), _ptr(cache.k[i]), _ptr(cache.v[i]),
                      _ptr(self.cos), _ptr(self.sin), qk_w.data_ptr() if qk_w is not None else None,
                      eps, _ptr(cache.pad), b, h, kv, d, cache.max_len)
            dense = isinstance(mlp, MLP) and mlp.w13 is not None
            self.layers.append((attn.wqkv.t(), attend, attn.o_proj.weight.t(),
                                layer.post_attention_layernorm.weight.data_ptr(),
                                mlp.w13.t() if dense else None,
                                mlp.down_proj.weight.t() if dense else mlp,
                                qk_w))  # qk_w kept alive: attend holds its pointer
        norms = [layer.input_layernorm.weight for layer in model.model.layers]
        self.norms = [w.data_ptr() for w in norms[1:]] + [model.model.norm.weight.data_ptr()]
        self.first_norm = norms[0].data_ptr()
        self.embed, self.head = model.model.embed_tokens.weight, model.lm_head.weight.t()
        self.rows = b

    def step(self, tokens: np.ndarray, pos: int) -> torch.Tensor:
        """Logits [B, vocab] for ``tokens`` [B] at cache position ``pos`` (writes the cache)."""
        lib, x, xn, delta, b, n, eps = (self.lib, self.x, self.xn, self.delta, self.rows,
                                        self.hidden, self.eps)
        xp, xnp, dp = x.data_ptr(), xn.data_ptr(), delta.data_ptr()
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1))
        if ids.numel() != b or not 0 <= pos < self.cache.max_len:  # C would write out of bounds
            raise ValueError(f"native step: {ids.numel()} tokens at position {pos} for a cache "
                             f"of {b} rows and {self.cache.max_len} positions")
        torch.index_select(self.embed, 0, ids, out=x)
        lib.add_rms_norm(xp, None, xnp, self.first_norm, b, n, eps)
        for (wqkv, attend, wo, post_norm, w13, down, _), next_norm in zip(self.layers, self.norms):
            torch.mm(xn, wqkv, out=self.qkv)
            if lib.attend(*attend, pos, self.scores.data_ptr()):
                raise RuntimeError("native attention refused its arguments (head size, position)")
            torch.mm(self.att, wo, out=delta)
            lib.add_rms_norm(xp, dp, xnp, post_norm, b, n, eps)
            if w13 is not None:
                torch.mm(xn, w13, out=self.h13)
                lib.silu_mul(self.act.data_ptr(), self.h13.data_ptr(), b, self.act.shape[1])
                torch.mm(self.act, down, out=delta)
            else:  # MoE: routing and experts stay in torch
                delta.copy_(down(xn[:, None]).view(b, n))
            lib.add_rms_norm(xp, dp, xnp, next_norm, b, n, eps)
        torch.mm(xn, self.head, out=self.logits)
        return self.logits.clone()  # the buffer is rewritten by the next step
