"""The int8 / int4 weight-only matmul kernels (backends/torch/quant.py, qkernels.c).

The oracle is numpy written here from llama.cpp's formulas (quantize_row_q8_0_ref,
quantize_row_q4_0_ref, the q8_0 activations) and plain integer sums: every kernel path must give
its numbers to float rounding, and stay within the quantization error of the float32 product.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch import quant  # noqa: E402

F32 = np.float32
PATHS = quant.available_paths()  # every path this machine runs, "torch" included
needs_c = pytest.mark.skipif(quant.library() is None, reason="no working C compiler")


# ---- the oracle ----------------------------------------------------------------------------
def groups(a: np.ndarray, g: int) -> np.ndarray:
    """[rows, n] -> [rows, ceil(n/g), g], zero padded."""
    rows, n = a.shape
    pad = np.zeros((rows, -(-n // g) * g), F32)
    pad[:, :n] = a
    return pad.reshape(rows, -1, g)


def np_weight_codes(w: np.ndarray, bits: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's q8_0 / q4_0 reference quantization, float32 scales: (codes, scales)."""
    blocks = groups(w.astype(F32), g)
    if bits == 8:  # d = amax / 127, code = roundf(x / d): ties away from zero
        d = (np.abs(blocks).max(-1) / F32(127)).astype(F32)
        inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0)).astype(F32)
        v = (blocks * inv[..., None]).astype(np.float64)
        codes = np.sign(v) * np.floor(np.abs(v) + 0.5)
    else:  # max = the signed value of largest |x| (first), d = max / -8, min(15, (int)(x/d + 8.5))
        first = np.abs(blocks).argmax(-1)[..., None]
        d = (np.take_along_axis(blocks, first, -1)[..., 0] / F32(-8)).astype(F32)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
        codes = np.minimum(15, np.trunc(blocks * inv[..., None] + F32(8.5))) - 8
    return codes.astype(np.int64), d


def np_act_codes(x: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations per group: d = max|x| / 127, code = rint(x / d) (numpy's ties-to-even)."""
    blocks = groups(x.astype(F32), g)
    d = (np.abs(blocks).max(-1) / F32(127)).astype(F32)
    inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0)).astype(F32)
    return np.rint(blocks * inv[..., None]).astype(np.int64), d


def np_qmm(x: np.ndarray, w: np.ndarray, bits: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound): the quantized product in float64 from exact integer sums, and the float32
    rounding it may carry (1e-5 of the sum of the terms' magnitudes)."""
    wq, wd = np_weight_codes(w, bits, g)
    xq, xd = np_act_codes(x, g)
    sums = np.einsum("bgk,rgk->brg", xq, wq)  # exact int64
    terms = sums * xd[:, None, :].astype(np.float64) * wd[None].astype(np.float64)
    return terms.sum(-1), 1e-5 * np.abs(terms).sum(-1) + 1e-30


def quant_error_bound(x: np.ndarray, w: np.ndarray, bits: int, g: int) -> np.ndarray:
    """|x w^T - quantized| <= sum_k |x||dw| + |w||dx| + |dw||dx| per output, with the rounding
    error of a weight <= d/2 (q8_0) or <= |d| (q4_0 clamps at 15) and of an activation <= d/2."""
    _, wd = np_weight_codes(w, bits, g)
    _, xd = np_act_codes(x, g)
    ew = np.abs(wd).astype(np.float64) * (0.5 if bits == 8 else 1.0)  # [rows, groups]
    ex = 0.5 * xd.astype(np.float64)  # [batch, groups]
    ax, aw = np.abs(groups(x, g)).sum(-1), np.abs(groups(w, g)).sum(-1)  # [., groups]
    return (ax @ ew.T + ex @ aw.T + g * ex @ ew.T) * (1 + 1e-5)


def data(rows: int, cols: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal((rows, cols))).astype(F32)
    w[:, rng.integers(0, cols, 2)] *= 6  # outlier inputs, as trained weights have
    x = rng.standard_normal((batch, cols)).astype(F32)
    return w, x


def run(w: np.ndarray, x: np.ndarray, bits: int, g: int, **kw) -> np.ndarray:
    q = quant.quantize_weight(torch.from_numpy(w), bits, g)
    return q.mm(torch.from_numpy(x), **kw).numpy()


# ---- the codes -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("g", quant.GROUP_SIZES)
def test_codes_and_scales_are_llama_cpp_formulas(bits, g):
    w, _ = data(37, 200, 1, seed=g + bits)  # 200: not a multiple of any group; 37 rows: 3 tiles
    q = quant.quantize_weight(torch.from_numpy(w), bits, g)
    codes, scales = q.unpack()
    want_codes, want_scales = np_weight_codes(w, bits, g)
    assert codes.dtype == torch.int8 and codes.shape == (37, 200) and scales.shape == (37, -(-200 // g))
    np.testing.assert_array_equal(codes.numpy(), want_codes.reshape(37, -1)[:, :200])
    np.testing.assert_array_equal(scales.numpy(), want_scales)
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert q.nbytes == q.data.numel() + 4 * q.scales.numel()
    assert q.data.numel() == 48 * (-(-200 // g) * g) * bits // 8  # rows padded to 16


def test_hand_computed_codes():
    """q8_0: ties round away from zero; q4_0: the first largest |w| sets the sign of d."""
    w = np.zeros((1, 32), F32)
    w[0, :4] = [127, 2.5, -2.5, 0.5]
    codes, scales = quant.quantize_weight(torch.from_numpy(w), 8, 32).unpack()
    assert codes[0, :4].tolist() == [127, 3, -3, 1] and scales[0, 0] == 1.0
    w[0, :4] = [1.0, -1.0, 0.5, -0.0625]
    codes, scales = quant.quantize_weight(torch.from_numpy(w), 4, 32).unpack()
    # d = 1 / -8: 1 -> -8; -1 -> 16 clamped to 15 -> 7; 0.5 -> -4; -0.0625 -> (0.5+8.5=9) -> 1
    assert scales[0, 0] == -0.125 and codes[0, :4].tolist() == [-8, 7, -4, 1]
    assert quant.quantize_weight(torch.from_numpy(w), 4, 32).dequantize()[0, 1] == -0.875


# ---- the products --------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("g", quant.GROUP_SIZES)
def test_each_path_is_the_quantized_arithmetic(path, bits, g):
    w, x = data(50, 384, 16, seed=1)
    want, rounding = np_qmm(x, w, bits, g)
    for batch in (1, 4, 16):
        got = run(w, x[:batch], bits, g, path=path)
        assert np.all(np.abs(got - want[:batch]) <= rounding[:batch]), (path, batch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (15, 100), (40, 64), (33, 257)])
@pytest.mark.parametrize("batch", [1, 3, 9])  # 9: the 8-row and 4-row batch blocks plus a rest
def test_odd_shapes_are_padded(path, shape, batch):
    rows, cols = shape
    w, x = data(rows, cols, batch, seed=rows * cols)
    for bits, g in ((8, 32), (4, 64), (4, 128)):
        want, rounding = np_qmm(x, w, bits, g)
        got = run(w, x, bits, g, path=path)
        assert got.shape == (batch, rows)
        assert np.all(np.abs(got - want) <= rounding), (bits, g)


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_sum_exactly(path):
    """All codes at their limits: the largest int sums (127 * 127 * 128) with no saturation."""
    rng = np.random.default_rng(2)
    for bits in quant.BITS:
        w = np.where(rng.random((32, 256)) < 0.5, -1, 1).astype(F32)
        x = np.where(rng.random((4, 256)) < 0.5, -1, 1).astype(F32)
        x[0], x[1] = 1, -1  # a row of all +127 and one of all -127 activations
        w[0], w[1] = 1, -1
        for g in quant.GROUP_SIZES:
            want, rounding = np_qmm(x, w, bits, g)
            got = run(w, x, bits, g, path=path)
            assert np.all(np.abs(got - want) <= rounding), (bits, g)
        if bits == 8:  # q8_0 is exact here: +-1 weights and activations are codes +-127
            np.testing.assert_allclose(got, x @ w.T, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("bits", quant.BITS)
def test_within_the_quantization_error_of_float32(bits):
    w, x = data(96, 512, 16, seed=3)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for g in quant.GROUP_SIZES:
        got = run(w, x, bits, g)
        bound = quant_error_bound(x, w, bits, g) + np_qmm(x, w, bits, g)[1]
        assert np.all(np.abs(got - exact) <= bound), g
        cos = (got * exact).sum() / np.linalg.norm(got) / np.linalg.norm(exact)
        assert cos > (0.9999 if bits == 8 else 0.985), (g, cos)  # sanity; the bound is the test


def test_threads_split_rows_only():
    """Each row is one thread's work: any thread count gives the same bits."""
    w, x = data(200, 300, 5, seed=4)
    for bits in quant.BITS:
        q = quant.quantize_weight(torch.from_numpy(w), bits, 64)
        xt = torch.from_numpy(x)
        one = q.mm(xt, threads=1)
        for n in (2, 3, 7, 64):
            assert torch.equal(q.mm(xt, threads=n), one)


def test_bind_is_mm_on_fixed_buffers():
    w, x = data(40, 96, 2, seed=5)
    q = quant.quantize_weight(torch.from_numpy(w), 8, 32)
    xt, out = torch.from_numpy(x.copy()), torch.empty(2, 40)
    step = q.bind(xt, out)
    assert step() is out and torch.equal(out, q.mm(xt))
    xt.mul_(-2)  # the bound call reads the buffer's new contents
    step()
    assert torch.equal(out, q.mm(xt))


def test_non_finite_activations_give_nan_rows():
    w, x = data(20, 64, 3, seed=6)
    x[1, 5], x[2, 60] = np.nan, np.inf
    for path in PATHS:
        got = run(w, x, 8, 32, path=path)
        assert np.isfinite(got[0]).all() and np.isnan(got[1:]).all(), path


# ---- choosing a path, refusing bad input ---------------------------------------------------
@needs_c
def test_the_environment_forces_a_path(monkeypatch):
    monkeypatch.delenv("MINIMIND_QKERNEL", raising=False)
    assert quant.default_path() == PATHS[0] != "torch"
    w, x = data(40, 100, 3, seed=8)
    q, xt = quant.quantize_weight(torch.from_numpy(w), 8, 32), torch.from_numpy(x)
    for path in PATHS:
        monkeypatch.setenv("MINIMIND_QKERNEL", path)
        assert quant.default_path() == path
        assert torch.equal(q.mm(xt), q.mm(xt, path=path))
    monkeypatch.setenv("MINIMIND_QKERNEL", "avx9000")
    with pytest.raises(ValueError, match="MINIMIND_QKERNEL='avx9000' does not run here; "
                                         "available: .*torch"):
        quant.quantize_weight(torch.ones(16, 32), 8, 32).mm(torch.ones(1, 32))


@pytest.mark.skipif("avx512vnni" in PATHS or quant.library() is None, reason="CPU has it")
def test_a_path_the_cpu_lacks_is_refused():
    with pytest.raises(ValueError, match="path='avx512vnni' does not run here"):
        quant.quantize_weight(torch.ones(16, 32), 8, 32).mm(torch.ones(1, 32), path="avx512vnni")


def test_bad_input_gets_one_clear_error():
    w = torch.randn(16, 64)
    for kw, match in (({"bits": 3}, "bits must be 8 or 4"),
                      ({"group_size": 48}, "group_size must be 32, 64 or 128")):
        with pytest.raises(ValueError, match=match):
            quant.quantize_weight(w, **kw)
    for bad in (w.double(), w[0], torch.zeros(0, 64), np.ones((4, 4), F32)):
        with pytest.raises(ValueError, match=r"needs a float32 tensor \[out, in\]"):
            quant.quantize_weight(bad)
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_weight(torch.full((16, 64), float("nan")))
    q = quant.quantize_weight(w, 8, 32)
    x = torch.randn(2, 64)
    for args, kw in (((torch.randn(2, 63),), {}), ((x.double(),), {}),
                     ((torch.randn(64, 2).t(),), {}), ((x, torch.empty(2, 15)), {}),
                     ((x, torch.empty(3, 16)), {}), ((torch.randn(0, 64),), {}),
                     ((x.numpy(),), {})):
        with pytest.raises(ValueError, match=r"QuantWeight.mm needs x \[batch >= 1, 64\] and "
                                             r"out \[batch, 16\]"):
            q.mm(*args, **kw)
    for threads in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            q.mm(x, threads=threads)
    with pytest.raises(ValueError, match="path='gpu' does not run here.*kernel paths: avx512vnni"):
        q.mm(x, path="gpu")


# ---- building: cached once, variants, and no compiler at all --------------------------------
@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """quant.library() builds again, into an empty cache folder (returns the build folder)."""
    for name in ("_lib", "_paths", "_untyped"):  # restored afterwards: the real build again
        monkeypatch.setattr(quant, name, getattr(quant, name))
    quant._lib = None
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "native"


def check_products(paths: list[str]) -> None:
    w, x = data(33, 100, 9, seed=7)
    for path in paths:
        for bits in quant.BITS:
            want, rounding = np_qmm(x, w, bits, 32)
            got = run(w, x, bits, 32, path=path, threads=2)
            assert np.all(np.abs(got - want) <= rounding), (path, bits)


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"CC": "false"},
                                 {"MINIMIND_NATIVE": "0"}])
def test_without_a_compiler_the_torch_path_runs(env, fresh_build, monkeypatch, caplog):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO):
        assert quant.library() is None
    assert quant.available_paths() == ["torch"] and quant.default_path() == "torch"
    assert quant.threading_kind() == "none"
    check_products(["torch"])
    assert not list(fresh_build.glob("*.so")) and not list(fresh_build.glob("*.tmp"))
    if env.get("CC") == "false":  # every variant failed, and that is remembered
        failed = list(fresh_build.glob("qkernels-*.failed"))
        assert len(failed) == 1 and failed[0].read_text().count("-ffp-contract=off") == 3
        assert "quantized matmuls run in torch" in caplog.text
        quant._lib = None
        monkeypatch.setattr(quant.cbuild.subprocess, "Popen", None)  # calling it would raise
        assert quant.library() is None


@needs_c
def test_builds_once_into_the_cache(fresh_build):
    assert quant.library() is not None and quant.threading_kind() in ("openmp", "pthreads")
    built = list(fresh_build.glob("qkernels-*.so"))
    assert len(built) == 1 and list(fresh_build.iterdir()) == built
    mtime = built[0].stat().st_mtime_ns
    quant._lib = None
    assert quant.library() is not None and built[0].stat().st_mtime_ns == mtime  # reused


@needs_c
@pytest.mark.parametrize("refuse, kind", [("-fopenmp", "pthreads"), ("-fopenmp|-pthread", "none")])
def test_compilers_without_openmp_or_threads(refuse, kind, fresh_build, monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp gets the pthreads build; one that also rejects -pthread
    the one-thread build; the numbers are the same."""
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in ' + refuse +
                  ') echo "unsupported: $a" >&2; exit 1;; esac; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert quant.library() is not None and quant.threading_kind() == kind
    assert not list(fresh_build.glob("*.failed"))
    check_products(quant.available_paths())


def test_environment_is_untouched():
    """Quantizing and multiplying set no process-wide state (threads, environment)."""
    before, env = torch.get_num_threads(), dict(os.environ)
    run(*data(16, 32, 1), 8, 32, threads=2)
    assert torch.get_num_threads() == before and dict(os.environ) == env
