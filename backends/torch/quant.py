"""Weight-only int8 / int4 linear layers for CPU decode: ``quantize_weight(w).mm(x, out)``.

A weight [out, in] becomes llama.cpp-style groups (q8_0 / q4_0 arithmetic, float32 scales):
symmetric, one scale per ``group_size`` inputs of a row. ``QuantWeight.mm`` computes x @ W^T
with the activations quantized per group to int8 on the fly and the products summed in exact
int32 (``qkernels.c``: AVX-512 VNNI, AVX2 or portable C, picked on the CPU's flags; threads over
the output rows). Without a C compiler the same arithmetic runs in torch ("torch" path): the
same numbers to float rounding, slower. ``MINIMIND_QKERNEL=<path>`` forces a path.

Codes (what ``unpack`` returns and the kernels read, code = u - offset for the stored u):
- 8 bits (q8_0): s = max|w| / 127, code = round(w / s) (ties away from zero) in -127..127.
- 4 bits (q4_0): m = the w of largest |w| in the group (its first), s = m / -8,
  code = min(15, floor(w / s + 8.5)) - 8 in -8..7; so m itself is exactly -8 s.
- 4 bits, ``scale_search=True`` (what ``load(quantize=4)`` uses): the same codes -8..7 and
  layout, with s chosen per group by llama.cpp's make_qx_quants search (least |w|-weighted
  squared error over 19 candidate scales around m / -8, each refitted by least squares).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import cbuild

SOURCE = Path(__file__).with_name("qkernels.c")
TILE = 16  # qkernels.c's TILE: output rows per packed tile
BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
OFFSET = {8: 128, 4: 8}  # stored u = code + offset (unsigned, for u8 x s8 dot products)
PATHS = ("avx512vnni", "avx2", "portable")  # qkernels.c's PATH_* order: 2, 1, 0
_PATH_ID = {"portable": 0, "avx2": 1, "avx512vnni": 2}
# OpenMP, else pthreads, else one thread; -ffp-contract=off keeps rounding the same on every path
VARIANTS = (("-ffp-contract=off", "-fopenmp"),
            ("-ffp-contract=off", "-pthread", "-DMMQ_PTHREADS"),
            ("-ffp-contract=off",))
MMQ_ERRORS = {-1: "bad arguments", -2: "kernel path not supported by this CPU",
              -3: "out of memory"}
# mmq_matmul(x, batch, in, w, s, bits, group, rows, y, threads, path)
MMQ_ARGTYPES = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_int)
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_paths: list[str] = ["torch"]  # what runs here, set with _lib
_untyped = None  # mmq_matmul without argtypes: the cheapest call with prebuilt ctypes values
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled ``qkernels.c``, built on first use; None when disabled or no compiler."""
    global _lib, _paths, _untyped
    if _lib is not None:  # built (or refused) already: no lock needed to read it
        return _lib or None
    with _lock:
        if _lib is None:
            lib = cbuild.build(SOURCE, VARIANTS, purpose="quantized matmuls run in torch")
            mask = 0
            if lib is not None:
                lib.mmq_paths.restype = lib.mmq_threading.restype = ctypes.c_int
                lib.mmq_matmul.argtypes = list(MMQ_ARGTYPES)
                lib.mmq_matmul.restype = ctypes.c_int
                _untyped = lib["mmq_matmul"]  # for bind(): ctypes arguments, converted once
                _untyped.restype = ctypes.c_int
                mask = lib.mmq_paths()
            _paths = [p for p in PATHS if mask >> _PATH_ID[p] & 1] + ["torch"]
            _lib = lib or False
    return _lib or None


def available_paths() -> list[str]:
    """Kernel paths that run here, fastest first; "torch" (no compiler needed) is always last."""
    library()
    return list(_paths)


def threading_kind() -> str:
    """How the compiled kernels split rows over threads: "openmp", "pthreads" or "none"."""
    lib = library()
    return ("none", "openmp", "pthreads")[lib.mmq_threading()] if lib is not None else "none"


def default_path() -> str:
    """The path ``mm`` takes without ``path=``: ``$MINIMIND_QKERNEL``, else the fastest."""
    return _resolve_path(None)


def _resolve_path(path: str | None) -> str:
    """``path``, else ``$MINIMIND_QKERNEL``, else the fastest; refused unless it runs here."""
    source = "path"
    if path is None:
        path, source = os.environ.get("MINIMIND_QKERNEL"), "MINIMIND_QKERNEL"
    library()
    if not path:
        return _paths[0]
    if path not in _paths:
        known = (*PATHS, "torch")
        raise ValueError(f"{source}={path!r} does not run here; available: {', '.join(_paths)}"
                         + ("" if path in known else f" (kernel paths: {', '.join(known)})"))
    return path


def _resolve_threads(threads: int | None) -> int:
    n = torch.get_num_threads() if threads is None else threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return n


def _call(fn, args: tuple, keep: tuple, out: torch.Tensor) -> torch.Tensor:
    """One bound mmq_matmul call; ``keep`` holds the tensors whose pointers ``args`` carries."""
    rc = fn(*args)
    if rc:
        raise RuntimeError(f"qkernels.c mmq_matmul: {MMQ_ERRORS.get(rc, rc)}")
    return out


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), exact: float32 values rounded in float64."""
    d = v.double()
    return (torch.sign(d) * torch.floor(d.abs() + 0.5)).float()


@dataclass(eq=False)
class QuantWeight:
    """A packed weight: ``mm(x, out)`` computes x @ W^T. Build with ``quantize_weight``.

    ``data`` holds the unsigned codes in qkernels.c's tile layout (rows padded to 16, inputs
    to the group size); ``scales`` is [tiles, groups, 16] float32.
    """

    bits: int
    group_size: int
    out_features: int
    in_features: int
    data: torch.Tensor
    scales: torch.Tensor
    _torch_codes: torch.Tensor | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes one product reads: codes and scales (padding included)."""
        return self.data.numel() + 4 * self.scales.numel()

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [out, in], scales float32 [out, groups]): W ~ codes * scales per group."""
        tiles, g, n = self.scales.shape[0], self.groups, self.group_size * self.groups
        if self.bits == 8:
            u = self.data.view(tiles, n // 4, TILE, 4).permute(0, 2, 1, 3).reshape(-1, n)
        else:
            b = self.data.view(tiles, n // 8, TILE, 4).permute(0, 2, 1, 3)
            u = torch.stack([b & 15, b >> 4], dim=3).reshape(-1, n)  # [.., chunk, half, 4]
        codes = (u.to(torch.int16) - OFFSET[self.bits]).to(torch.int8)
        scales = self.scales.permute(0, 2, 1).reshape(-1, g)
        return (codes[:self.out_features, :self.in_features].contiguous(),
                scales[:self.out_features].contiguous())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for."""
        codes, scales = self.unpack()
        full = scales.repeat_interleave(self.group_size, dim=1)[:, :self.in_features]
        return codes.float() * full

    def mm(self, x: torch.Tensor, out: torch.Tensor | None = None, *,
           threads: int | None = None, path: str | None = None) -> torch.Tensor:
        """x [B, in] float32 contiguous (CPU) -> out [B, out_features], written in place.

        ``threads`` defaults to ``torch.get_num_threads()``; ``path`` (one of
        ``available_paths()``) defaults to ``$MINIMIND_QKERNEL``, else the fastest.
        """
        if out is None:
            rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 1
            out = torch.empty(rows, self.out_features)
        args = self._kernel_call(x, out, threads, path)
        if args is None:
            return self._mm_torch(x, out)
        return _call(library().mmq_matmul, args, (), out)

    def bind(self, x: torch.Tensor, out: torch.Tensor, *, threads: int | None = None,
             path: str | None = None) -> Callable[[], torch.Tensor]:
        """``mm(x, out)`` checked once, as a call without arguments (a decode step's buffers
        are fixed): each call reads ``x`` and rewrites ``out``. Keep x and out alive."""
        args = self._kernel_call(x, out, threads, path)
        if args is None:
            return partial(self._mm_torch, x, out)
        typed = tuple(t(v) for t, v in zip(MMQ_ARGTYPES, args))
        return partial(_call, _untyped, typed, (x, out, self), out)

    def kernel_args(self, x: torch.Tensor, out: torch.Tensor, *, threads: int | None = None,
                    path: str | None = None) -> tuple[int, tuple, tuple] | None:
        """``mm(x, out)`` as (address of mmq_matmul, its pointer arguments, its integer
        arguments), checked once, for a caller that runs it from C (the native step's
        ``run_ops``); None when the torch path runs here. Keep x and out alive."""
        args = self._kernel_call(x, out, threads, path)
        if args is None:
            return None
        fn = ctypes.cast(library().mmq_matmul, ctypes.c_void_p).value
        pointer = [t is ctypes.c_void_p for t in MMQ_ARGTYPES]
        return (fn, tuple(v for v, is_p in zip(args, pointer) if is_p),
                tuple(v for v, is_p in zip(args, pointer) if not is_p))

    def _kernel_call(self, x: torch.Tensor, out: torch.Tensor, threads: int | None,
                     path: str | None) -> tuple[int, ...] | None:
        """mmq_matmul's arguments for x -> out (checked), in its order; None for the torch
        path."""
        self._check(x, out)
        path, n = _resolve_path(path), _resolve_threads(threads)
        if path == "torch":
            return None
        return (x.data_ptr(), x.shape[0], self.in_features, self.data.data_ptr(),
                self.scales.data_ptr(), self.bits, self.group_size, self.out_features,
                out.data_ptr(), n, _PATH_ID[path])

    def _check(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """One clear error unless x [B, in] and out [B, out] are float32, contiguous, CPU."""
        f32 = torch.float32
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dtype is f32 \
                and out.dtype is f32 and x.is_cpu and out.is_cpu and x.is_contiguous() \
                and out.is_contiguous() and x.dim() == 2 and out.dim() == 2 \
                and x.shape[0] == out.shape[0] > 0 and x.shape[1] == self.in_features \
                and out.shape[1] == self.out_features:
            return

        def desc(t: object) -> str:
            if not isinstance(t, torch.Tensor):
                return type(t).__name__
            return (f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
                    f"{'' if t.is_contiguous() else ', not contiguous'}")

        raise ValueError(f"QuantWeight.mm needs x [batch >= 1, {self.in_features}] and out "
                         f"[batch, {self.out_features}], float32, contiguous, on CPU; got x "
                         f"{desc(x)}, out {desc(out)}")

    def _mm_torch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """qkernels.c's arithmetic in torch: integer sums are exact in float32 (< 2^24)."""
        g, gs = self.groups, self.group_size
        if self._torch_codes is None:  # [groups, group_size, out] codes as floats, built once
            codes, _ = self.unpack()
            padded = torch.zeros(self.out_features, g * gs)
            padded[:, :self.in_features] = codes.float()
            self._torch_codes = padded.view(-1, g, gs).permute(1, 2, 0).contiguous()
        xp = torch.zeros(x.shape[0], g * gs)
        xp[:, :self.in_features] = x
        xg = xp.view(-1, g, gs)
        d = xg.abs().amax(-1, keepdim=True) / 127  # NaN or inf anywhere: NaN out, as in C
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        xq = torch.round(xg * inv)  # ties to even, as qkernels.c
        sums = torch.bmm(xq.transpose(0, 1), self._torch_codes)  # [groups, B, out]
        _, scales = self.unpack()
        y = (sums * d.permute(1, 0, 2) * scales.t()[:, None, :]).sum(0)
        return out.copy_(y)


# make_qx_quants' candidates for 4 bits: inverse scales -(8 + 0.1 k) / max, k = 0 first, then
# -9..9; a later one is kept only if strictly better, so ties keep the earlier one as llama.cpp does
_SEARCH_STEPS = (0, *range(-9, 0), *range(1, 10))
_SEARCH_CHUNK = 65536  # groups per pass: few large ops (each a parallel region) and a bounded buffer
_SEARCH_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group this small is all zero codes


def _q4_search(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (-8..7) and scales of least |w|-weighted squared error per group: llama.cpp's
    ``make_qx_quants(n, 8, x, L, rmse_type=3)``. For each candidate inverse scale the codes are
    rounded and clamped, the scale refitted by weighted least squares (sum a w l / sum a l^2,
    a = |w|), and the candidate with the largest (sum a w l)^2 / sum a l^2 (the least error)
    wins: never worse than q4_0's own codes (the k = 0 candidate). Weighting by |w| keeps the
    large weights of a trained model closer: plain squared error, also tried, lowered the
    trained MiniMind2 tiny model's logits cosine at group 64. Computed on w / max|w| per group,
    so tiny groups neither underflow nor overflow."""
    size = grouped.shape[-1]
    flat = grouped.reshape(-1, size)
    codes, scale = torch.zeros_like(flat), torch.zeros(flat.shape[0])
    steps = torch.tensor([8 + 0.1 * k for k in _SEARCH_STEPS], dtype=torch.float32)
    buf = torch.empty(min(_SEARCH_CHUNK, flat.shape[0]), size)

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-group dot products, as a batched matmul (the cheapest reduction here)."""
        return torch.bmm(a[:, None], b[:, :, None]).view(-1)

    for start in range(0, flat.shape[0], _SEARCH_CHUNK):
        x = flat[start:start + _SEARCH_CHUNK]
        lv = buf[:x.shape[0]]
        m = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # signed max |w| (the first)
        live = m.abs() >= _SEARCH_EPS
        unit = torch.where(live, m.abs(), torch.ones_like(m))
        y = x / unit  # in [-1, 1]; the sign of m goes into the inverse scale
        weight = y.abs()
        wy = weight * y
        flip = -torch.sign(torch.where(live, m, torch.ones_like(m)))
        best = torch.zeros(x.shape[0])  # a live group's k = 0 candidate scores > 0
        pick = torch.zeros(x.shape[0], dtype=torch.long)
        for i in range(len(_SEARCH_STEPS)):
            torch.mul(y, flip * steps[i], out=lv).round_().clamp_(-8, 7)
            sumlx, suml2 = dot(wy, lv), dot(weight * lv, lv)
            score = sumlx * sumlx / suml2.clamp(min=1e-30)  # 0 in a dead group
            take = (score > best) & live[:, 0]
            best, pick = torch.where(take, score, best), torch.where(take, i, pick)
        torch.mul(y, flip * steps[pick][:, None], out=lv).round_().clamp_(-8, 7).mul_(live)
        sumlx, suml2 = dot(wy, lv), dot(weight * lv, lv)
        codes[start:start + x.shape[0]] = lv
        fitted = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), 0.0)
        scale[start:start + x.shape[0]] = fitted * unit[:, 0]
    return codes.view(grouped.shape), scale.view(grouped.shape[:-1])


def _codes(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as floats [rows, groups, size], scales [rows, groups]) of q8_0 / q4_0."""
    if bits == 8:
        scale = grouped.abs().amax(-1) / 127
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        return _round_away(grouped * inv[..., None]), scale
    first_max = grouped.abs().argmax(-1, keepdim=True)  # the first of equal |w|
    scale = grouped.gather(-1, first_max).squeeze(-1) / -8
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return torch.floor(grouped * inv[..., None] + 8.5).clamp(0, 15) - 8, scale


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int = 64, *,
                    scale_search: bool = False) -> QuantWeight:
    """A float32 weight [out, in] quantized per group of ``group_size`` inputs (q8_0 / q4_0).

    ``scale_search=True`` (4 bits only): each group's scale (and so its codes) is the
    searched one of ``_q4_search``, not q4_0's max / -8; the codes, layout and kernels are
    the same. Any shape works: inputs are padded to the group size and rows to 16 with zero
    codes.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if scale_search and bits != 4:
        raise ValueError("scale_search is for 4 bits; 8 bits keep q8_0's max|w| / 127 "
                         "(a search changes its logits by under 1e-4 cosine)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.float32 \
            or 0 in w.shape:
        raise ValueError("quantize_weight needs a float32 tensor [out, in]; got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
    w = w.detach().cpu()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight: the weight holds inf or NaN; quantize a finite weight")
    out_f, in_f = w.shape
    g = -(-in_f // group_size)
    rows, n = -(-out_f // TILE) * TILE, g * group_size
    wp = torch.zeros(rows, n)
    wp[:out_f, :in_f] = w
    grouped = wp.view(rows, g, group_size)
    codes, scale = _q4_search(grouped) if scale_search else _codes(grouped, bits)
    u = (codes + OFFSET[bits]).to(torch.uint8).view(rows // TILE, TILE, n)
    if bits == 8:  # [tile, in/4 chunks, 16 rows, 4]
        data = u.view(rows // TILE, TILE, n // 4, 4).permute(0, 2, 1, 3)
    else:  # [tile, in/8 chunks, 16 rows, 4 bytes]: inputs 8c+j low nibble, 8c+4+j high
        halves = u.view(rows // TILE, TILE, n // 8, 2, 4).permute(0, 2, 1, 3, 4)
        data = halves[..., 0, :] | (halves[..., 1, :] << 4)
    scales = scale.view(rows // TILE, TILE, g).permute(0, 2, 1)
    return QuantWeight(bits, group_size, out_f, in_f, data.contiguous().view(-1),
                       scales.contiguous())
