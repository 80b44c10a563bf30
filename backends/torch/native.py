"""The CPU float32 decode step with its small ops in C (``kernels.c``), matmuls in torch.

At batch 1 a decode step of the 26M model is ~35 matrix-vector products (the memory floor,
~9 ms here) and ~300 tiny torch ops (norms, RoPE, cache writes, attention, SiLU) whose dispatch
costs ~5 ms more. ``NativeStep`` keeps the products in torch (MKL, threaded, written into
preallocated buffers) and does everything between two products in one C call.

A step is a plan of calls built once per batch size; runs of C calls in it (all of them for a
quantized model, whose products are C too) go to ``run_ops`` as one array, so Python makes one
call per run instead of one per op.

``kernels.c`` is compiled once per machine (cbuild.py) with the system C compiler (``$CC`` or
``cc``) into ``native/`` of minimind-core's cache (``$MINIMIND_CACHE``, default
``~/.cache/minimind-core``; ~0.4 s, no torch headers). Without a working compiler or cache folder, with
``MINIMIND_NATIVE=0`` or ``load(..., decode="eager")``, the engine keeps its plain torch decode
step: same numbers, slower.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import cbuild
from .cache import KVCache
from .model import MLP, MiniMindForCausalLM
from .quant import MMQ_ERRORS

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
    "attend": [_p, _p, _p, _p, _p, _p, _p, _f, _p, _p, _i, _i, _i, _i, _i, _i, _i, _p],
    "run_ops": [_p, _i, _p],
}
OP_NORM, OP_SILU, OP_ATTEND, OP_MMQ = range(4)  # kernels.c's OP_* kinds


class _Op(ctypes.Structure):
    """kernels.c's ``op_t``: one call for ``run_ops``."""

    _fields_ = [("kind", ctypes.c_int64), ("fn", ctypes.c_void_p), ("p", ctypes.c_void_p * 10),
                ("n", ctypes.c_int64 * 10), ("f", ctypes.c_float)]


@dataclass(frozen=True)
class COp:
    """A C call of a step's plan: its kind, pointer and integer arguments in the function's
    order, its float (eps), and for a product the address of qkernels.c's ``mmq_matmul``."""

    kind: int
    ptrs: tuple[int | None, ...]
    ints: tuple[int, ...]
    f: float = 0.0
    fn: int | None = None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when disabled or no compiler works."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _build() or False
    return _lib or None


def _build() -> ctypes.CDLL | None:
    lib = cbuild.build(SOURCE, [("-ffp-contract=off",)], purpose="CPU decode uses plain torch ops",
                       timeout=COMPILE_TIMEOUT)
    if lib is None:
        return None
    try:
        for name, args in SIGNATURES.items():
            getattr(lib, name).argtypes = args
    except AttributeError as e:  # a .so without our functions
        log.warning("native CPU kernels unavailable (%s); CPU decode uses plain torch ops", e)
        return None
    lib.attend.restype = lib.run_ops.restype = _i
    return lib


def supported(model: MiniMindForCausalLM, device: torch.device, dtype: torch.dtype) -> bool:
    """Native decoding covers CPU float32 without an unmerged LoRA (merged is fine)."""
    if device.type != "cpu" or dtype != torch.float32 or model.config.head_dim > MAX_HEAD_DIM:
        return False
    return not any(layer.self_attn.lora for layer in model.model.layers)


def _mm(weight: torch.Tensor, quant=None):
    """``bind(x, out)`` -> out = x @ weight^T into the preallocated ``out``: a call of torch's
    matmul (MKL) for a float weight; for a quantized one a ``COp`` of the int8/int4 kernel, or
    its torch arithmetic when the kernels are not built (``quant.QuantWeight.bind``)."""
    if quant is not None:
        def bind(x: torch.Tensor, out: torch.Tensor):
            args = quant.kernel_args(x, out)
            if args is None:
                return quant.bind(x, out)
            fn, ptrs, ints = args
            return COp(OP_MMQ, ptrs, ints, fn=fn)
        return bind
    wt = weight.t()
    return lambda x, out: partial(torch.mm, x, wt, out=out)


def _run_ops(lib: ctypes.CDLL, ops: ctypes.Array, calls: list[COp]) -> None:
    """One ``run_ops`` call of ``ops``, the packed ``calls`` (kept to read back what runs);
    a failure raised as the error of the op's own kind."""
    status = ctypes.c_int(0)
    failed = lib.run_ops(ops, len(calls), ctypes.byref(status))
    if not failed:
        return
    if calls[failed - 1].kind == OP_ATTEND:
        raise ValueError("native attention refused its arguments (a slot or position outside "
                         "the cache or the RoPE table, or the head size)")
    raise RuntimeError(f"qkernels.c mmq_matmul: {MMQ_ERRORS.get(status.value, status.value)}")


def _link(lib: ctypes.CDLL, plan: list) -> list:
    """The plan with each run of consecutive ``COp``s packed into one ``run_ops`` call."""
    out, run = [], []

    def flush() -> None:
        if not run:
            return
        ops = (_Op * len(run))()
        for op, c in zip(ops, run):
            op.kind, op.fn, op.f = c.kind, c.fn, c.f
            for k, v in enumerate(c.ptrs):
                op.p[k] = v
            for k, v in enumerate(c.ints):
                op.n[k] = v
        out.append(partial(_run_ops, lib, ops, list(run)))
        run.clear()

    for item in plan:
        if isinstance(item, COp):
            run.append(item)
        else:
            flush()
            out.append(item)
    flush()
    return out


def _moe(moe, xn: torch.Tensor, delta: torch.Tensor) -> None:
    delta.copy_(moe(xn[:, None]).view(delta.shape))


def _ptr(t: torch.Tensor) -> int:
    if not t.is_contiguous():
        raise ValueError("native decode needs contiguous tensors")
    return t.data_ptr()


class NativeStep:
    """The decode step for one cache: ``step(slots, positions, tokens)`` -> logits [rows, vocab].

    Buffers hold up to every slot of the cache (a step uses their first ``rows`` rows) and the
    weights' layout is prepared once here, so a step is the embedding lookup, four matrix
    products into fixed buffers (torch's, or the int8/int4 kernels of a quantized model) and four
    C calls per layer, and the head.
    """

    name = "native"

    def __init__(self, model: MiniMindForCausalLM, cache: KVCache, lib: ctypes.CDLL) -> None:
        cfg, n = model.config, cache.slots
        self.model, self.cache, self.lib = model, cache, lib
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.shape = (h, kv, d)
        self.eps, self.hidden = cfg.rms_norm_eps, cfg.hidden_size

        def buf(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device="cpu")

        hidden = cfg.hidden_size
        self.x, self.xn, self.delta = buf(n, hidden), buf(n, hidden), buf(n, hidden)
        self.qkv, self.att = buf(n, (h + 2 * kv) * d), buf(n, h * d)
        self.h13, self.act = buf(n, 2 * cfg.intermediate_size), buf(n, cfg.intermediate_size)
        self.logits = buf(n, cfg.vocab_size)
        self.scores = buf(cache.max_len + 1)
        self.slots = torch.zeros(n, dtype=torch.long)
        self.positions = torch.zeros(n, dtype=torch.long)
        if model.rope_cos.dtype != torch.float32 or model.rope_cos.device.type != "cpu":
            model.build_rope("cpu", torch.float32)
        self.cos, self.sin = model.rope_cos, model.rope_sin  # kept alive: their pointers are used
        self.layers = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qk_w = attn.qk_norm_weight.contiguous() if attn.qk_norm else None
            dense = isinstance(mlp, MLP) and mlp.w13 is not None
            aq, mq = getattr(attn, "quant", {}), getattr(mlp, "quant", {})
            self.layers.append((_mm(attn.wqkv, aq.get("wqkv")),
                                (_ptr(cache.k[i]), _ptr(cache.v[i])),
                                _mm(attn.o_proj.weight, aq.get("o_proj")),
                                layer.post_attention_layernorm.weight.data_ptr(),
                                _mm(mlp.w13, mq.get("w13")) if dense else None,
                                _mm(mlp.down_proj.weight, mq.get("down_proj")) if dense else mlp,
                                qk_w))  # qk_w kept alive: attend holds its pointer
        norms = [layer.input_layernorm.weight for layer in model.model.layers]
        self.norms = [w.data_ptr() for w in norms[1:]] + [model.model.norm.weight.data_ptr()]
        self.first_norm = norms[0].data_ptr()
        self.embed = model.model.embed_tokens.weight
        self._plans: dict[int, list] = {}
        self.head = _mm(model.lm_head.weight, getattr(model, "quant", {}).get("embed"))

    def _plan(self, b: int) -> list:
        """The step for ``b`` rows as a list of calls without arguments, built once per batch
        size: every buffer view, pointer and bound matrix product fixed (at batch 1 the Python
        between two products is a few microseconds, which int8 products make worth saving)."""
        plan = self._plans.get(b)
        if plan is not None:
            return plan
        lib, eps, n, cache = self.lib, self.eps, self.hidden, self.cache
        h, kv, d = self.shape
        x, xn, delta = self.x[:b], self.xn[:b], self.delta[:b]
        qkv, att, h13, act = self.qkv[:b], self.att[:b], self.h13[:b], self.act[:b]
        xp, xnp, dp = x.data_ptr(), xn.data_ptr(), delta.data_ptr()

        def norm(delta_ptr, weight_ptr) -> COp:
            return COp(OP_NORM, (xp, delta_ptr, xnp, weight_ptr), (b, n), eps)

        plan: list = [norm(None, self.first_norm)]
        for (wqkv, (kc, vc), wo, post_norm, w13, down, qk_w), next_norm in zip(self.layers,
                                                                            self.norms):
            attend = COp(OP_ATTEND, (qkv.data_ptr(), att.data_ptr(), kc, vc, self.cos.data_ptr(),
                                     self.sin.data_ptr(),
                                     qk_w.data_ptr() if qk_w is not None else None,
                                     self.slots.data_ptr(), self.positions.data_ptr(),
                                     self.scores.data_ptr()),
                         (b, h, kv, d, cache.max_len + 1, cache.slots, self.cos.shape[0]), eps)
            plan += [wqkv(xn, qkv), attend, wo(att, delta), norm(dp, post_norm)]
            if w13 is not None:
                plan += [w13(xn, h13), COp(OP_SILU, (act.data_ptr(), h13.data_ptr()),
                                           (b, act.shape[1])), down(act, delta)]
            else:  # MoE: routing and experts stay in torch
                plan.append(partial(_moe, down, xn, delta))
            plan.append(norm(dp, next_norm))
        plan.append(self.head(xn, self.logits[:b]))
        plan = _link(lib, plan)
        self._plans[b] = plan
        return plan

    def __call__(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray
                 ) -> torch.Tensor:
        """Logits [rows, vocab] for ``tokens`` at ``positions`` of ``slots`` (writes the cache)."""
        b = len(slots)
        if not 0 < b <= self.cache.slots or len(positions) != b or len(tokens) != b:
            raise ValueError(f"native step: {b} rows ({len(positions)} positions, {len(tokens)} "
                             f"tokens) for a cache of {self.cache.slots} slots")
        self.slots[:b] = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        self.positions[:b] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1))
        torch.index_select(self.embed, 0, ids, out=self.x[:b])
        for call in self._plan(b):
            call()
        return self.logits[:b].clone()  # the buffer is rewritten by the next step
