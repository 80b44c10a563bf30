"""The MLX sampler against the numpy sampler (transformers' filter order): the same kept sets,
draw frequencies that follow the filtered probabilities, and mlx_lm's repetition penalty against
ours."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.sample_utils import make_logits_processors  # noqa: E402

from backends.mlx import sampling as msampling  # noqa: E402
from minimind_core import sampling  # noqa: E402
from minimind_core.params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.mlx

LOGITS = np.log(np.array([[0.5, 0.25, 0.15, 0.10, 0.0001]], dtype=np.float32))


def numpy_filter(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    x = logits / np.float32(params.temperature)
    return sampling.min_p(sampling.top_p(sampling.top_k(x, params.top_k), params.top_p),
                          params.min_p)


def numpy_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the numpy sampler draws from (independent of the MLX code)."""
    return sampling.softmax(numpy_filter(logits, params).astype(np.float64))[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=1.0, top_p=0.76), SamplingParams(temperature=1.0, min_p=0.4),
    SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05),
    # temperature before top-p: at T=2 the third token is inside the 0.9 nucleus, at T=1 not
    SamplingParams(temperature=2.0, top_p=0.9), SamplingParams(temperature=0.5, min_p=0.3)])
@pytest.mark.parametrize("logits", [LOGITS, np.array([[2.0, 1.0, 0.0]], dtype=np.float32)])
def test_filters_equal_numpy_filters(params, logits):
    got = np.array(msampling.filter_logits(mx.array(logits), params))
    want = numpy_filter(logits, params)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_filters_work_row_by_row():
    rows = np.stack([LOGITS[0], LOGITS[0][::-1]])
    # top-k 2 leaves (2/3, 1/3): a 0.7 nucleus keeps both, a 0.6 one only the first
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.7)
    got = np.isfinite(np.array(msampling.filter_logits(mx.array(rows), params)))
    assert got.tolist() == [[True, True, False, False, False], [False, False, False, True, True]]
    narrow = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    got = np.isfinite(np.array(msampling.filter_logits(mx.array(rows), narrow)))
    assert got.tolist() == [[True, False, False, False, False], [False, False, False, False, True]]


@pytest.mark.parametrize("logits,params", [
    (LOGITS, SamplingParams(temperature=1.0)),
    (LOGITS, SamplingParams(temperature=0.7, top_k=3, min_p=0.2)),
    # the review's reproducer: mlx_lm's make_sampler never draws token 2 here
    (np.array([[2.0, 1.0, 0.0]], dtype=np.float32), SamplingParams(temperature=2.0, top_p=0.9)),
])
def test_draw_frequencies_follow_numpy(logits, params):
    n = 3000
    rows = np.repeat(logits, n, axis=0)
    draws = np.array(msampling.make_sampler(SamplingParams.from_kwargs(params, seed=0))(
        mx.array(rows)))
    assert draws.shape == (n,)
    got = np.bincount(draws, minlength=logits.shape[1]) / n
    want = numpy_probs(logits, params)
    np.testing.assert_allclose(got, want, atol=0.03)
    assert np.all(got[want == 0] == 0)  # filtered tokens are never drawn
    ref = sampling.sample(rows, params, [[]] * n, np.random.default_rng(0))
    np.testing.assert_allclose(got, np.bincount(ref, minlength=logits.shape[1]) / n, atol=0.04)


def test_seed_reproduces_and_greedy_is_argmax():
    rows = mx.array(np.repeat(LOGITS, 64, axis=0))
    params = SamplingParams(temperature=1.0, seed=5)
    first = [np.array(s(rows)).tolist() for s in [msampling.make_sampler(params)] for _ in range(3)]
    again = [np.array(s(rows)).tolist() for s in [msampling.make_sampler(params)] for _ in range(3)]
    assert first == again and first[0] != first[1]  # same seed, same stream; steps differ
    other = msampling.make_sampler(SamplingParams(temperature=1.0, seed=6))(rows)
    assert np.array(other).tolist() != first[0]
    greedy = msampling.make_sampler(SamplingParams())(mx.array(np.stack([LOGITS[0], LOGITS[0][::-1]])))
    assert np.array(greedy).tolist() == [0, 4]


def test_engine_uses_this_sampler():
    from backends.mlx import engine

    assert engine.make_sampler is msampling.make_sampler


@pytest.mark.parametrize("context", [None, 3])
def test_mlx_lm_repetition_penalty_is_ours(context):
    """mlx_lm's processor (used by the engine) = ours: divide positive, multiply negative logits
    of the last ``context`` tokens (duplicates penalised once)."""
    logits = np.array([[1.5, -2.0, 0.5, -0.25, 3.0, 0.0]], dtype=np.float32)
    history = [0, 1, 1, 4, 2, 3, 3]
    size = context or len(history)
    (process,) = make_logits_processors(repetition_penalty=1.3, repetition_context_size=size)
    got = np.array(process(mx.array(history, dtype=mx.int32), mx.array(logits)))
    want = sampling.repetition_penalty(logits, [history], 1.3, context)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # and by hand, so neither side is only checked against the other
    recent = set(history[-size:])
    by_hand = [v / 1.3 if i in recent and v > 0 else v * 1.3 if i in recent else v
               for i, v in enumerate(logits[0])]
    np.testing.assert_allclose(got[0], by_hand, rtol=1e-6)
